"""The sandbox: no filesystem, sockets or environment; deadline and memory cap stop runaway guests,
while a well-behaved instance beside them completes correctly."""

import re

import pytest

PROMPT = ["--prompt", "What is the capital of France?", "--max-tokens", "16", "--temperature", "0"]
EXPECTED = "The capital of France is Paris.\n"


def test_no_filesystem_sockets_or_environment(run_py):
    r = run_py("""
        import os
        try:
            open("/etc/passwd").read()
            print("read a file")
        except OSError as e:
            print("open:", type(e).__name__)
        try:
            import socket
            socket.create_connection(("127.0.0.1", 80))
            print("connected")
        except Exception as e:
            print("socket:", type(e).__name__)
        print("env:", dict(os.environ))
        print("listdir:", os.listdir("/") if os.path.exists("/") else "no root")
    """)
    assert r.error is None, r.error
    lines = r.output.splitlines()
    assert lines[0] == "open: FileNotFoundError"
    assert lines[1] in ("socket: ModuleNotFoundError", "socket: ImportError", "socket: OSError")
    assert lines[2] == "env: {}"
    assert lines[3] in ("listdir: []", "listdir: no root")


@pytest.mark.parametrize("guest, kwargs, error", [
    ("while True:\n    pass\n", {"deadline_s": 1.0}, "deadline exceeded"),
    ("blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 20))\n", {"memory_mb": 64}, "MemoryError"),
])
def test_runaway_guest_is_stopped_while_a_neighbour_completes(runtime, guest, kwargs, error):
    good = runtime.launch("text_completion", PROMPT)
    bad = runtime.launch_source(guest, filename="runaway.py", **kwargs)
    rb = bad.wait(60)
    rg = good.wait(60)
    assert rb.error is not None and rb.error.startswith(error), rb.error
    assert rb.timings["total"] < 30
    assert rg.error is None and rg.output == EXPECTED
    assert runtime.num_free_pages == runtime.num_pages


def test_deadline_also_bounds_host_waits(runtime):
    inst = runtime.launch_source("from wit_world.imports import runtime\nruntime.receive()\n", deadline_s=0.5)
    r = inst.wait(30)
    assert r.error == "runtime.receive: the instance's deadline passed while waiting for a client message"


def test_terminate_stops_a_running_instance(runtime):
    import threading

    started = threading.Event()
    inst = runtime.launch_source("from wit_world.imports import kv\nprint('started')\nwhile True:\n    kv.page_size()\n",
                                 on_output=lambda message: started.set())
    assert started.wait(30)
    inst.terminate("killed by the test")
    r = inst.wait(30)
    assert re.fullmatch(r"[a-z-]+\.[a-z-]+: .*killed by the test", r.error), r.error


def _hostile(core_module_body: str) -> str:
    """A component whose core module declares `core_module_body` besides the memory it runs with."""
    return f"""
(component
  (core module $m
    (memory (export "mem") 1)
    {core_module_body}
    (func (export "run") (result i32) (i32.const 16)))
  (core instance $i (instantiate $m))
  (alias core export $i "mem" (core memory $mem))
  (type $r (result (error string)))
  (func (export "run") (result $r) (canon lift (core func $i "run") (memory $mem)))
)
"""


@pytest.mark.parametrize("declares, error", [
    ("(memory 4) (memory 4) (memory 4)", "memory count too high"),  # many memories: each under the cap
    ("(table 2000000 funcref)", "table"),  # one table far past the element limit
    ("(table 1 funcref) (table 1 funcref) (table 1 funcref) (table 1 funcref) (table 1 funcref)",
     "table count too high"),
])
def test_a_store_is_capped_as_a_whole(runtime, tmp_path, declares, error):
    """The memory cap was per linear memory: a component could declare many memories (or huge tables) and
    take a multiple of it. The Store now caps memories, tables, table elements and core instances."""
    path = tmp_path / "hostile.wat"
    path.write_text(_hostile(declares))
    r = runtime.run(path)
    assert r.error is not None and error in r.error, r.error
    ok = tmp_path / "ok.wat"
    ok.write_text(_hostile(""))
    assert runtime.run(ok).error is None  # the same component without them runs
    assert runtime.num_free_pages == runtime.num_pages
