"""The command line: `pie run` (embedded and --server) agree with the OpenAI route, `pie config`, and
`pie serve` draining on SIGTERM."""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cli_helpers import run_pie

INFERLETS = Path(__file__).parent / "inferlets"
PROMPT = "Write a short poem about the sea."
MAX_TOKENS = "40"


def test_greedy_chat_completion_equals_pie_run_text_completion(openai_client, server):
    args = ["text_completion", "--", "--prompt", PROMPT, "--max-tokens", MAX_TOKENS, "--temperature", "0"]
    embedded = run_pie("run", *args)
    assert embedded.returncode == 0, embedded.stderr
    r = openai_client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": PROMPT}],
                                              temperature=0, max_tokens=int(MAX_TOKENS))
    assert r.choices[0].finish_reason == "length"  # the whole budget: a long stretch of text compared
    assert embedded.stdout == r.choices[0].message.content + "\n"
    remote = run_pie("run", "--server", server.ws_url, *args)
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == embedded.stdout


def test_pie_run_on_a_server_uploads_a_file_and_forwards_stdin(server):
    r = run_pie("run", "--server", server.url, str(INFERLETS / "echo.py"), "--", "x", stdin="one\ntwo\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello xecho:one\necho:two\nbye\n"
    assert "input closed" in r.stderr
    bad = run_pie("run", "--server", server.url, "no_such_inferlet")
    assert bad.returncode == 1 and "no inferlet named" in bad.stderr and "Traceback" not in bad.stderr
    gone = run_pie("run", "--server", "ws://127.0.0.1:1", "text_completion")
    assert gone.returncode == 1 and gone.stderr.startswith("pie: error:")


def test_pie_config_prints_the_effective_toml(tmp_path):
    from pie.server.config import load_config

    f = tmp_path / "pie.toml"
    f.write_text('[server]\nport = 9001\ngrace_s = 5\n[scheduler]\npolicy = "size_or_wait"\nbatch_size = 8\nmax_wait = 0.01\n'
                 '[limits]\nhttp_allow = ["example.com:443"]\n[auth]\ntoken = "hush"\n')
    r = run_pie("config", "--config", str(f), "--host", "0.0.0.0")
    assert r.returncode == 0, r.stderr
    cfg = load_config(text=r.stdout)
    assert (cfg.server.host, cfg.server.port, cfg.server.grace_s) == ("0.0.0.0", 9001, 5.0)
    assert (cfg.scheduler.policy, cfg.scheduler.batch_size) == ("size_or_wait", 8)
    assert cfg.limits.http_allow == ("example.com:443",)
    assert "hush" not in r.stdout
    f.write_text("[server]\nprot = 1\n")
    bad = run_pie("config", "--config", str(f))
    assert bad.returncode == 1 and "server.prot" in bad.stderr and "Traceback" not in bad.stderr


def _read_port(proc: subprocess.Popen, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"http://[\d.]+:(\d+)", line)
        if m:
            return int(m.group(1))
    raise AssertionError(f"pie serve did not start: {proc.stderr.read() if proc.poll() is not None else ''}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_drains_on_a_signal_and_exits_0(tmp_path, sig):
    from pie.client import Client, PieError

    cfg = tmp_path / "pie.toml"
    cfg.write_text("[server]\ngrace_s = 8.0\n[model]\nkv_cache_mb = 128\n[limits]\ndeadline_s = 120.0\n")
    proc = subprocess.Popen([sys.executable, "-m", "pie.cli", "serve", "--config", str(cfg), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir(),
                            env=dict(os.environ))
    try:
        port = _read_port(proc)
        with Client(f"ws://127.0.0.1:{port}") as client:
            waiting = client.launch(str(INFERLETS / "echo.py"))  # waits for input: never finishes by itself
            assert next(waiting.events(timeout=60)).data == "hello "
            finishing = client.launch("text_completion", ["--prompt", PROMPT, "--max-tokens", "12",
                                                           "--temperature", "0"])
            proc.send_signal(sig)
            time.sleep(0.5)
            with pytest.raises(PieError, match="shutting_down"):
                client.launch("text_completion", ["--prompt", "x"])
            done = finishing.wait(60)
            assert done.error is None and len(done.output) > 10  # finished within the grace period
            stuck = waiting.wait(60)
            assert "shutting down" in stuck.error
        assert proc.wait(60) == 0
        assert "draining" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_pie_run_writes_the_instances_trace_embedded_and_on_a_server(server, tmp_path):
    """`pie run --trace FILE`: the Chrome trace of the instance, embedded and through the protocol's
    launch option (sent back in its done event)."""
    import json

    args = ["text_completion", "--", "--prompt", PROMPT, "--max-tokens", "4", "--temperature", "0", "--per-token"]
    for where, extra in (("embedded", []), ("server", ["--server", server.ws_url])):
        path = tmp_path / f"{where}.json"
        r = run_pie("run", *extra, "--trace", str(path), *args)
        assert r.returncode == 0, r.stderr
        assert f"written to {path}" in r.stderr
        events = json.loads(path.read_text())["traceEvents"]
        names = [e["name"] for e in events]
        assert names.count("forward.wait") == names.count("forward pass") >= 4, where  # prompt + 3 tokens
        assert "runtime.send" in names and "output" in names, where
    plain = run_pie("run", "--server", server.ws_url, *args)
    assert plain.returncode == 0 and "trace" not in plain.stderr
    bad = run_pie("run", "--trace", str(tmp_path / "missing" / "t.json"), *args)  # refused before the run
    assert bad.returncode == 1 and bad.stdout == "" and "--trace" in bad.stderr and "Traceback" not in bad.stderr
