"""http.fetch: the outgoing HTTP client of inferlets.

Invariants:
- only hosts on the instance's allow-list are reached ("host" allows every port, "host:port" one); redirects are
  returned to the inferlet, never followed (a redirect could leave the allow-list); no proxy from the environment;
- the whole fetch (name lookup, connect, TLS handshake, request, headers, body) ends within
  min(the instance's remaining deadline, its http_timeout_s), and at most SLICE_S after the instance is
  terminated: the I/O runs on a worker thread, the instance thread waits for it in slices and, on either event,
  shuts the worker's connection down and returns at once;
- the worker also bounds itself: every socket operation's timeout is the time left of that budget, and the body
  is read in chunks of at most CHUNK bytes, so a slow-drip server cannot keep it past the budget by more than
  one operation;
- a response body is at most the instance's http_max_body_bytes: a larger Content-Length is refused before
  the body is read, and no more than the limit + 1 bytes of a body are read;
- a status >= 400 is still a response; failures are ("err", "METHOD URL: reason").
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pie.runtime.instance import Instance

SLICE_S = 0.05  # how often the waiting instance thread looks at termination and the budget
CHUNK = 64 << 10  # bytes of body asked for per read


def host_allowed(host: str, port: int, allow: tuple[str, ...]) -> bool:
    """Whether `host:port` is on the allow-list ("host" allows every port, "host:port" one)."""
    host = host.lower()
    return any(entry.lower() in (host, f"{host}:{port}") for entry in allow)


class _BudgetExceeded(Exception):
    pass


class _Exchange:
    """One request and its response, run on a worker thread; `cancel` (from any thread) ends it early."""

    def __init__(self, method: str, parts: urllib.parse.SplitResult, port: int, headers: list[tuple[str, str]],
                 body: bytes, ends_at: float, max_body: int):
        self.method, self.parts, self.port, self.headers, self.body = method, parts, port, headers, body
        self.ends_at = ends_at  # time.monotonic() by which the exchange must be over
        self.max_body = max_body
        self.done = threading.Event()
        self.result: tuple[str, Any] | None = None  # set before `done`
        self._lock = threading.Lock()  # guards _shut and _cancelled
        self._shut: socket.socket | None = None  # our own descriptor of the connection (closed by the worker)
        self._cancelled = False

    def _left(self) -> float:
        left = self.ends_at - time.monotonic()
        if left <= 0 or self._cancelled:
            raise _BudgetExceeded
        return left

    def cancel(self) -> None:
        """Shuts the connection down: the worker's blocked operation returns at once, and it ends."""
        with self._lock:
            self._cancelled = True
            if self._shut is not None:
                try:
                    self._shut.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # not connected (any more)

    def run(self) -> None:
        try:
            self.result = self._exchange()
        except (_BudgetExceeded, TimeoutError):  # every timeout is the budget's remainder: the budget ran out
            self.result = "timeout", None
        except (http.client.HTTPException, OSError, ValueError) as e:
            self.result = "err", str(e) or type(e).__name__
        except BaseException as e:  # noqa: BLE001 - a worker must always report, never die silently
            self.result = "err", f"{type(e).__name__}: {e}"
        finally:
            with self._lock:
                if self._shut is not None:
                    self._shut.close()
                    self._shut = None
            self.done.set()

    def _exchange(self) -> tuple[str, Any]:
        p = self.parts
        if p.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                p.hostname, self.port, timeout=self._left(), context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(p.hostname, self.port, timeout=self._left())
        try:
            conn.connect()
            sock = conn.sock  # the response reads through it even after http.client has let go of it
            with self._lock:
                # a descriptor of our own to shut the connection down with: http.client closes its socket when
                # it likes, and a shutdown through a closed (and reused) descriptor number would hit another
                # connection
                self._shut = socket.fromfd(sock.fileno(), sock.family, sock.type)
                if self._cancelled:
                    raise _BudgetExceeded
            target = (p.path or "/") + (f"?{p.query}" if p.query else "")
            headers = dict(self.headers)
            if not any(k.lower() == "connection" for k in headers):
                headers["Connection"] = "close"  # one exchange per connection
            sock.settimeout(self._left())
            conn.request(self.method, target, body=self.body or None, headers=headers)
            sock.settimeout(self._left())
            resp = conn.getresponse()  # status line and headers (http.client caps their count and length)
            try:
                status, headers = resp.status, resp.getheaders()
                if resp.length is not None and resp.length > self.max_body:
                    return "err", f"response body over {self.max_body} bytes (Content-Length {resp.length})"
                data = bytearray()
                while not resp.isclosed():  # an open response holds the socket open
                    sock.settimeout(self._left())
                    chunk = resp.read1(min(CHUNK, self.max_body + 1 - len(data)))
                    if not chunk:
                        break
                    data += chunk
                    if len(data) > self.max_body:
                        return "err", f"response body over {self.max_body} bytes"
                return "ok", (status, headers, data)
            finally:
                resp.close()
        finally:
            conn.close()


def http_fetch(inst: "Instance", request: tuple) -> tuple[str, Any]:
    """request: (method, url, headers, body) -> ("ok", (status, headers, body)) or ("err", reason)."""
    method, url, headers, body = request
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "err", f"req.url: {url!r} is not an http(s) URL"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        return "err", f"req.url: {url!r}: {e}"
    if not host_allowed(parts.hostname, port, inst.http_allow):
        return "err", (f"req.url: host {parts.hostname}:{port} is not on the allow-list "
                       f"({', '.join(inst.http_allow) or 'empty'}; set http_allow in the configuration)")
    left = inst.state.seconds_left  # -1: no deadline
    if left == -1.0 or left > inst.http_timeout_s:
        budget, bound = inst.http_timeout_s, f"http_timeout_s ({inst.http_timeout_s:g} s)"
    else:
        budget, bound = left, f"the instance's deadline ({max(left, 0):.2f} s left)"
    if budget <= 0:
        return "err", f"{method} {url}: not started: {bound}"
    started = time.monotonic()
    exchange = _Exchange(method.upper(), parts, port, list(headers), bytes(body), started + budget,
                         inst.http_max_body_bytes)
    threading.Thread(target=exchange.run, name=f"pie-http-{inst.id}", daemon=True).start()
    while not exchange.done.wait(SLICE_S):
        if inst.state.terminated:
            exchange.cancel()
            raise RuntimeError(inst.terminate_reason or "the instance was terminated")
        if time.monotonic() - started >= budget:
            exchange.cancel()
            return "err", f"{method} {url}: no complete response within {bound}"
    assert exchange.result is not None
    if exchange.result[0] == "timeout":
        return "err", f"{method} {url}: no complete response within {bound}"
    if exchange.result[0] == "err":
        return "err", f"{method} {url}: {exchange.result[1]}"
    return exchange.result
