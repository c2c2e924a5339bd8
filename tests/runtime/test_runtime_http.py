"""Outgoing HTTP (http.fetch): only hosts on the allow-list, to a tool server on loopback."""

import http.server
import textwrap
import threading
import time

import pytest


class _Tool(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        reply = b"echo:" + body + b" via " + self.headers.get("X-Tool", "").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(reply)

    def do_GET(self):
        self.send_response(302 if self.path == "/redirect" else 404)
        self.send_header("Location", "http://localhost:1/elsewhere")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def tool_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Tool)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


GUEST = """
    import sys
    import inferlet
    from wit_world.imports.http import Request
    from componentize_py_types import Err

    def fetch(method, url, body=b"", headers=()):
        try:
            r = inferlet.http.fetch(Request(method=method, url=url, headers=list(headers), body=body))
            return f"{r.status} {bytes(r.body).decode()}"
        except Err as e:
            return f"err {e.value}"

    port = sys.argv[1]
    print(fetch("POST", f"http://127.0.0.1:{port}/tool", b"2+2", [("X-Tool", "calc")]))
    print(fetch("GET", f"http://127.0.0.1:{port}/missing"))
    print(fetch("GET", f"http://127.0.0.1:{port}/redirect"))
    print(fetch("GET", f"http://localhost:{port}/tool"))
    print(fetch("GET", "http://127.0.0.1:1/other-port"))
    print(fetch("GET", "file:///etc/passwd"))
"""


def test_fetch_reaches_allowed_hosts_only(run_py, tool_server):
    port = tool_server
    r = run_py(GUEST, str(port), http_allow=(f"127.0.0.1:{port}",))
    assert r.error is None, r.error
    lines = r.output.splitlines()
    assert lines[0] == "200 echo:2+2 via calc"
    assert lines[1] == "404 "
    assert lines[2] == "302 "  # redirects are returned, not followed off the allow-list
    assert lines[3].startswith(f"err req.url: host localhost:{port} is not on the allow-list")
    assert lines[4].startswith("err req.url: host 127.0.0.1:1 is not on the allow-list")
    assert lines[5] == "err req.url: 'file:///etc/passwd' is not an http(s) URL"


def test_fetch_is_denied_by_default(run_py, tool_server):
    r = run_py(GUEST, str(tool_server))
    assert r.error is None, r.error
    assert all(line.startswith("err req.url:") for line in r.output.splitlines())


def test_host_without_port_allows_every_port():
    from pie.runtime.http_fetch import host_allowed

    assert host_allowed("127.0.0.1", 8080, ("127.0.0.1",))
    assert host_allowed("LOCALHOST", 80, ("localhost:80",))
    assert not host_allowed("localhost", 81, ("localhost:80",))
    assert not host_allowed("evil.example", 80, ())


# ---- the whole fetch is bounded: deadline, http_timeout_s, termination, body size ---------------------------

DRIP_S = 0.1  # one byte per DRIP_S
DRIP_BYTES = 100  # a drip lasts DRIP_BYTES * DRIP_S = 10 s: far past every bound below


def _pattern(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


class _Slow(http.server.BaseHTTPRequestHandler):
    """/drip-body: headers at once, then the body one byte per DRIP_S; /drip-headers: the status line and
    headers one byte per DRIP_S; /sized/N: N bytes with a Content-Length; /unsized/N: N bytes, no
    Content-Length (ends at close)."""

    protocol_version = "HTTP/1.0"
    started = threading.Event()  # a drip began
    dropped = threading.Event()  # the client went away during a drip

    def do_GET(self):
        kind, _, n = self.path.strip("/").partition("/")
        try:
            if kind == "drip-body":
                self.send_response(200)
                self.end_headers()
                self.wfile.flush()
                self._drip(b"x" * DRIP_BYTES)
            elif kind == "drip-headers":
                self._drip(b"HTTP/1.0 200 OK\r\nX-Slow: " + b"y" * DRIP_BYTES + b"\r\n\r\n")
            elif kind in ("sized", "unsized"):
                self.send_response(200)
                if kind == "sized":
                    self.send_header("Content-Length", n)
                self.end_headers()
                self.wfile.write(_pattern(int(n)))
        except OSError:
            pass

    def _drip(self, data: bytes) -> None:
        type(self).started.set()
        try:
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                time.sleep(DRIP_S)
        except OSError:
            type(self).dropped.set()
            raise

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def slow_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def fresh_slow_server(slow_server):
    _Slow.started.clear()
    _Slow.dropped.clear()
    return slow_server


FETCH_GUEST = """
    import sys
    import inferlet
    from wit_world.imports.http import Request
    from componentize_py_types import Err

    port = sys.argv[1]
    for path in sys.argv[2:]:
        try:
            r = inferlet.http.fetch(Request(method="GET", url=f"http://127.0.0.1:{port}/{path}", headers=[],
                                            body=b""))
            body = bytes(r.body)
            kind, _, n = path.partition("/")
            same = body == bytes(i % 251 for i in range(int(n))) if n else None
            print(f"{r.status} {len(body)} {same}")
        except Err as e:
            print(f"err {e.value}")
    print("after")
"""


def test_slow_drip_ends_with_the_instance_deadline(run_py, fresh_slow_server):
    """The attack: a server sending one byte per 0.1 s; each socket read is quick, the whole is not."""
    port = fresh_slow_server
    t0 = time.monotonic()
    r = run_py(FETCH_GUEST, str(port), "drip-body", deadline_s=2, http_allow=(f"127.0.0.1:{port}",))
    elapsed = time.monotonic() - t0
    assert elapsed < 2 + 1, f"the instance ran {elapsed:.2f} s past its 2 s deadline"
    # the fetch fails at the deadline; the interrupted guest may or may not get to print it
    assert r.error is not None or r.output.startswith(f"err GET http://127.0.0.1:{port}/drip-body: no complete"), r
    assert "200 " not in r.output
    assert _Slow.dropped.wait(2), "the abandoned connection was not closed"


def test_http_timeout_bounds_each_fetch_without_a_deadline(run_py, fresh_slow_server):
    port = fresh_slow_server
    t0 = time.monotonic()
    r = run_py(FETCH_GUEST, str(port), "drip-body", "drip-headers", "sized/10", deadline_s=0,
               http_timeout_s=0.5, http_allow=(f"127.0.0.1:{port}",))
    elapsed = time.monotonic() - t0
    assert r.error is None, r.error
    lines = r.output.splitlines()
    for line, path in zip(lines, ("drip-body", "drip-headers")):
        assert line == f"err GET http://127.0.0.1:{port}/{path}: no complete response within http_timeout_s (0.5 s)"
    assert lines[2:] == ["200 10 True", "after"]
    assert elapsed < 2 * 0.5 + 1.5, f"two fetches bounded by 0.5 s took {elapsed:.2f} s"


def test_response_body_is_limited(run_py, slow_server):
    port = slow_server
    r = run_py(FETCH_GUEST, str(port), "sized/1000", "unsized/1000", "sized/1001", "unsized/1001",
               "unsized/3000000", "sized/0", http_max_body_bytes=1000, http_allow=(f"127.0.0.1:{port}",))
    assert r.error is None, r.error
    url = f"http://127.0.0.1:{port}"
    assert r.output.splitlines() == [
        "200 1000 True",
        "200 1000 True",
        f"err GET {url}/sized/1001: response body over 1000 bytes (Content-Length 1001)",
        f"err GET {url}/unsized/1001: response body over 1000 bytes",
        f"err GET {url}/unsized/3000000: response body over 1000 bytes",
        "200 0 True",
        "after",
    ]


def test_large_body_reaches_the_guest_intact(run_py, slow_server):
    """The default limit (16 MiB) and the bytes path of the list<u8> result, at a size a per-byte Python list
    would make slow."""
    port = slow_server
    r = run_py(FETCH_GUEST, str(port), f"sized/{4 << 20}", http_allow=(f"127.0.0.1:{port}",))
    assert r.error is None, r.error
    assert r.output.splitlines() == [f"200 {4 << 20} True", "after"]


def test_terminating_the_instance_ends_a_pending_fetch(runtime, fresh_slow_server):
    port = fresh_slow_server
    inst = runtime.launch_source(textwrap.dedent(FETCH_GUEST), [str(port), "drip-body"], filename="guest.py",
                                 deadline_s=0, http_timeout_s=60, http_allow=(f"127.0.0.1:{port}",))
    assert _Slow.started.wait(30), "the fetch never reached the server"
    time.sleep(0.3)  # the instance thread is now waiting in the fetch
    t0 = time.monotonic()
    inst.terminate("stopped by the test")
    r = inst.wait(10)
    elapsed = time.monotonic() - t0
    assert elapsed < 0.5, f"the instance took {elapsed:.2f} s to stop"
    assert r.error is not None and "stopped by the test" in r.error, r.error
    assert "after" not in r.output
    assert _Slow.dropped.wait(2), "the abandoned connection was not closed"
    assert runtime.num_free_pages == runtime.num_pages
