"""An asyncio client for the websocket protocol of `pie serve` (docs/protocol.md).

>>> async def main():                                                             # doctest: +SKIP
...     async with PieClient("ws://127.0.0.1:8080") as client:
...         inst = await client.launch(inferlet="text_completion",
...                                    arguments=["--prompt", "Hi", "--max-tokens", "8", "--temperature", "0"])
...         async for event in inst.events():
...             if event.type == "output":
...                 print(event.data, end="")
...         print(inst.result.error)
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import aiohttp
import msgpack

CHUNK_BYTES = 256 << 10


class PieError(Exception):
    """The server answered a request with an error ({"code", "message"})."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionClosed(PieError):
    def __init__(self, message: str, close_code: int | None = None):
        super().__init__("connection_closed", message)
        self.close_code = close_code


@dataclass
class Event:
    type: str  # output | log | done
    instance_id: int
    data: str | None = None  # output / log text
    error: str | None = None  # done: None on success
    return_value: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    trace: dict | None = None  # done, of an instance launched with trace=True: its Chrome trace


@dataclass
class Result:
    instance_id: int
    error: str | None
    output: str
    log: str
    return_value: str | None
    timings: dict[str, float] = field(default_factory=dict)
    trace: dict | None = None  # launched with trace=True: its Chrome trace (docs/traces.md)

    @property
    def ok(self) -> bool:
        return self.error is None


def ws_url(url: str) -> str:
    """ws://host:port/ from ws://, http:// or a bare host:port."""
    if url.startswith(("http://", "https://")):
        url = "ws" + url[4:]
    elif not url.startswith(("ws://", "wss://")):
        url = "ws://" + url
    return url


class RemoteInstance:
    """An instance on the server: its events in order (output, log, then one done)."""

    def __init__(self, client: "PieClient", instance_id: int):
        self.client = client
        self.id = instance_id
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._output: list[str] = []
        self._log: list[str] = []
        self.result: Result | None = None

    def _push(self, event: Event) -> None:
        self._queue.put_nowait(event)

    async def recv(self) -> Event:
        """The next event; after `done`, raises EOFError."""
        if self.result is not None and self._queue.empty():
            raise EOFError(f"instance {self.id} is done")
        event = await self._queue.get()
        if event.type == "output":
            self._output.append(event.data or "")
        elif event.type == "log":
            self._log.append(event.data or "")
        else:
            self.result = Result(self.id, event.error, "".join(self._output), "".join(self._log), event.return_value,
                                 event.timings, event.trace)
        return event

    async def events(self) -> AsyncIterator[Event]:
        while self.result is None:
            yield await self.recv()

    async def wait(self) -> Result:
        """Reads events until done; the collected output and log."""
        while self.result is None:
            await self.recv()
        return self.result

    async def send(self, message: str) -> None:
        """A message for the instance's runtime.receive ("" = end of input)."""
        await self.client.request("send", instance_id=self.id, message=message)

    async def terminate(self, reason: str | None = None) -> None:
        await self.client.request("terminate", instance_id=self.id, reason=reason)


class PieClient:
    def __init__(self, url: str, token: str | None = None, *, chunk_bytes: int = CHUNK_BYTES,
                 max_msg_bytes: int = 64 << 20):
        self.url = ws_url(url)
        self.token = token
        self.chunk_bytes = chunk_bytes
        self.max_msg_bytes = max_msg_bytes
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task | None = None
        self._ids = itertools.count(1)
        self._pending: dict[Any, asyncio.Future] = {}
        self._instances: dict[int, RemoteInstance] = {}
        self._early: dict[int, list[Event]] = {}
        self.errors: list[dict] = []  # {"code", "message"} of errors the server could not tie to a request
        self.closed: ConnectionClosed | None = None

    # ---- connection ------------------------------------------------------------------------------
    async def connect(self) -> "PieClient":
        self._session = aiohttp.ClientSession()
        try:
            self._ws = await self._session.ws_connect(self.url, max_msg_size=self.max_msg_bytes, autoping=True)
        except BaseException:
            await self._session.close()
            raise
        self._reader = asyncio.create_task(self._read())
        if self.token is not None:
            try:
                await self.request("auth", token=self.token)
            except BaseException:
                await self.close()
                raise
        return self

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> "PieClient":
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read(self) -> None:
        ws = self._ws
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    self._dispatch(msgpack.unpackb(msg.data, raw=False, strict_map_key=False))
                elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                    break
        finally:
            code = ws.close_code
            self.closed = ConnectionClosed(f"the connection closed (code {code})", code)
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(self.closed)
            self._pending.clear()
            for inst in self._instances.values():
                if inst.result is None:
                    inst._push(Event("done", inst.id, error="the connection to the server closed"))

    def _dispatch(self, msg: dict) -> None:
        kind = msg.get("type")
        if kind == "response":
            fut = self._pending.pop(msg.get("corr_id"), None)
            if fut is None or fut.done():
                return
            if msg.get("ok"):
                fut.set_result(msg)
            else:
                err = msg.get("error") or {}
                fut.set_exception(PieError(err.get("code", "error"), err.get("message", "")))
        elif kind in ("output", "log", "done"):
            iid = msg["instance_id"]
            event = Event(kind, iid, msg.get("data"), msg.get("error"), msg.get("return_value"),
                          msg.get("timings") or {}, msg.get("trace"))
            inst = self._instances.get(iid)
            if inst is None:
                self._early.setdefault(iid, []).append(event)
            else:
                inst._push(event)
                if kind == "done":
                    self._instances.pop(iid, None)
        elif kind == "error":
            self.errors.append(msg.get("error") or {})

    # ---- requests --------------------------------------------------------------------------------
    async def send_raw(self, frame: bytes) -> None:
        """Sends bytes as one binary frame (tests of the server's handling of bad frames)."""
        await self._ws.send_bytes(frame)

    async def request(self, kind: str, *, wait: bool = True, **fields: Any) -> dict:
        """Sends {"type": kind, "corr_id", **fields}; the server's answer (PieError if it is an error)."""
        if self.closed is not None:
            raise self.closed
        corr_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[corr_id] = fut
        message = {"type": kind, "corr_id": corr_id, **{k: v for k, v in fields.items() if v is not None}}
        await self._send(corr_id, message)
        return await fut

    async def _send(self, corr_id: Any, message: dict) -> None:
        """Sends one request frame; a connection already gone raises ConnectionClosed (and the request's
        future is forgotten, never left to fail unobserved)."""
        try:
            await self._ws.send_bytes(msgpack.packb(message, use_bin_type=True))
        except (ConnectionError, aiohttp.ClientError) as e:
            fut = self._pending.pop(corr_id, None)
            if fut is not None and not fut.done():
                fut.cancel()
            raise self.closed or ConnectionClosed(f"the connection is gone ({type(e).__name__}: {e})") from None

    async def ping(self) -> dict:
        return await self.request("ping")

    async def upload(self, program: bytes | str | Path, kind: str | None = None, name: str | None = None) -> str:
        """Uploads a program (bytes or a file: .py, .wasm, .wat) unless the server has it; its sha256."""
        if isinstance(program, (str, Path)):
            path = Path(program)
            data = path.read_bytes()
            name = name or path.name
        else:
            data = bytes(program)
        if kind is None:
            kind = "wasm" if data[:4] == b"\0asm" else "wat" if (name or "").endswith(".wat") else "python"
        digest = hashlib.sha256(data).hexdigest()
        if (await self.request("query", hash=digest))["exists"]:
            return digest
        chunks = [data[i:i + self.chunk_bytes] for i in range(0, len(data), self.chunk_bytes)] or [b""]
        corr_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[corr_id] = fut
        for index, chunk in enumerate(chunks):
            if fut.done():  # the server refused an earlier chunk
                break
            message = {"type": "upload", "corr_id": corr_id, "hash": digest, "kind": kind, "name": name or "",
                       "chunk_index": index, "num_chunks": len(chunks), "data": chunk}
            await self._send(corr_id, message)
        await fut
        return digest

    async def launch(self, inferlet: str | None = None, arguments: Sequence[str] = (), *, program: str | None = None,
                     deadline_s: float | None = None, memory_mb: int | None = None,
                     trace: bool = False) -> RemoteInstance:
        """Starts a bundled inferlet by name, an uploaded program by hash (`program=`), or a local file
        (`inferlet=` a path to a .py/.wasm/.wat: uploaded first). trace: its result carries its Chrome
        trace (docs/traces.md)."""
        from pie.server.protocol import is_program_hash

        if program is not None and not is_program_hash(program):
            raise ValueError(f"program: {program[:80]!r} is not a program hash (64 lowercase hex digits: upload "
                             "a file with inferlet=PATH)")
        if inferlet is not None and (inferlet.endswith((".py", ".wasm", ".wat")) or "/" in inferlet):
            program, inferlet = await self.upload(inferlet), None
        reply = await self.request("launch", inferlet=inferlet, program=program, arguments=list(arguments),
                                   deadline_s=deadline_s, memory_mb=memory_mb, trace=True if trace else None)
        iid = reply["instance_id"]
        inst = RemoteInstance(self, iid)
        self._instances[iid] = inst
        for event in self._early.pop(iid, []):
            inst._push(event)
            if event.type == "done":
                self._instances.pop(iid, None)
        if self.closed is not None and iid in self._instances:
            inst._push(Event("done", iid, error="the connection to the server closed"))
        return inst

    async def run(self, inferlet: str | None = None, arguments: Sequence[str] = (), **kwargs: Any) -> Result:
        """launch + wait: the collected result."""
        return await (await self.launch(inferlet, arguments, **kwargs)).wait()

    async def list(self) -> list[dict]:
        return (await self.request("list"))["instances"]

    async def stats(self) -> dict:
        return (await self.request("stats"))["stats"]
