"""Outgoing HTTP (http.fetch): only hosts on the allow-list, to a tool server on loopback."""

import http.server
import threading

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
    from pie.runtime.api import host_allowed

    assert host_allowed("127.0.0.1", 8080, ("127.0.0.1",))
    assert host_allowed("LOCALHOST", 80, ("localhost:80",))
    assert not host_allowed("localhost", 81, ("localhost:80",))
    assert not host_allowed("evil.example", 80, ())
