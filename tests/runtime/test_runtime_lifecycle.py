"""How an instance ends, seen from its host: a termination wakes a guest blocked on client input, the
on_done callback reports the result, a host function returning the wrong type fails the call (not the
process), and the runtime's scheduler comes from its configuration."""

import threading
import time

from pie.control.config import SchedulerConfig

WAITS_FOR_INPUT = "from wit_world.imports import runtime\nprint('waiting', flush=True)\nruntime.receive()\nprint('after')\n"


def _wait_for_output(inst, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in "".join(inst.messages):
        assert time.monotonic() < deadline, f"no {text!r} from the instance"
        time.sleep(0.01)


def test_terminate_wakes_a_guest_waiting_for_input(runtime):
    inst = runtime.launch_source(WAITS_FOR_INPUT)
    _wait_for_output(inst, "waiting")
    t = time.monotonic()
    inst.terminate("stopped by the test")
    result = inst.wait(10)
    assert time.monotonic() - t < 2.0
    assert result.output == "waiting\n"  # never "after": the wait ended in an error
    assert "stopped by the test" in result.error
    assert runtime.num_free_pages == runtime.num_pages


def test_on_done_reports_the_result_once(runtime):
    seen = []
    called = threading.Event()

    def on_done(result):
        seen.append(result)
        called.set()

    inst = runtime.launch_source("print('hello')\n", on_done=on_done)
    assert called.wait(30)
    assert len(seen) == 1 and seen[0].ok and seen[0].output == "hello\n" and seen[0].instance_id == inst.id


def test_a_host_function_returning_the_wrong_type_fails_the_call(runtime):
    inst = runtime.launch_source(WAITS_FOR_INPUT)
    _wait_for_output(inst, "waiting")
    inst.inbox.put(None)  # not a string: runtime.receive cannot encode it
    result = inst.wait(10)
    assert result.error.startswith("runtime.receive: "), result.error
    ok = runtime.run_source("print('still serving')\n")  # the process and the runtime go on
    assert ok.output == "still serving\n"


def test_scheduler_policy_comes_from_the_configuration(model):
    from pie.runtime import Runtime, RuntimeConfig

    with Runtime(model, RuntimeConfig(scheduler=SchedulerConfig(policy="fixed_size", batch_size=3))) as rt:
        assert rt.plane.scheduler.policy.name == "FIXED_SIZE"
        assert rt.plane.scheduler.batch_size == 3


UNCLOSED = """
import sys
from pie.engine.model import Model
from pie.runtime import Runtime
rt = Runtime(Model(progress=False))   # the README's API, used without `with` and never closed
print(rt.run("text_completion", ["--prompt", "Hi", "--max-tokens", "2", "--temperature", "0"]).error)
if sys.argv[1] == "running":          # and one instance still waiting for client input at exit
    rt.launch_source("from wit_world.imports import runtime\\nruntime.receive()\\n")
print("exiting", flush=True)
"""


def test_a_runtime_left_open_does_not_abort_the_interpreter(model):
    import subprocess
    import sys
    import tempfile

    for case in ("idle", "running"):
        done = subprocess.run([sys.executable, "-c", UNCLOSED, case], capture_output=True, text=True, timeout=300,
                              cwd=tempfile.gettempdir())
        assert done.returncode == 0, (case, done.returncode, done.stderr[-2000:])
        assert done.stdout == "None\nexiting\n" and "terminate called" not in done.stderr, (case, done.stderr)


def test_page_quotas_come_from_the_configuration(model):
    from pie.runtime import Runtime, RuntimeConfig

    guest = "from wit_world.imports import kv\nkv.allocate(2)\nprint('two')\nkv.allocate(2)\nprint('four')\n"
    with Runtime(model, RuntimeConfig(kv_pages_per_instance=3)) as rt:
        r = rt.run_source(guest)
        assert r.output == "two\n"
        assert r.error.startswith("kv.allocate: count: instance ") and "quota of 3 KV pages exceeded" in r.error
    with Runtime(model, RuntimeConfig(kv_pages_per_client=5)) as rt:
        first = rt.launch_source(WAITS_FOR_INPUT.replace("runtime\n", "runtime, kv\nkv.allocate(4)\n", 1), client=9)
        _wait_for_output(first, "waiting")
        r = rt.run_source(guest, client=9)  # its client already holds 4 of 5
        assert r.output == "" and "its client's quota of 5 KV pages exceeded" in r.error
        assert rt.run_source(guest, client=10).output == "two\nfour\n"  # another client
        first.terminate("done")
        first.wait(30)
        assert rt.run_source(guest, client=9).output == "two\nfour\n"  # its pages came back
