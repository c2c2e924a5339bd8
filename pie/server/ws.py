"""One websocket connection: reads requests in order, answers each, streams its instances' events.

Everything the connection launched is terminated when it goes away (its pages return to the pool).
Frames it cannot act on (not msgpack, not a map, an unknown type, a missing field, too large) get an
error answer and the connection stays open; a frame over 4x the limit closes it (code 1009).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import re
from typing import Any, Callable

import msgpack
from aiohttp import WSMsgType, web

from pie.server.auth import token_matches
from pie.server.config import PieConfig
from pie.server.instances import CLIENT_CACHE, MAX_TRACE_EVENTS, InstanceManager, LaunchError, stop_instance
from pie.server.outbox import Outbox
from pie.server.programs import ProgramError, ProgramStore, Upload
from pie.server.protocol import PROTOCOL_VERSION, ProtocolError, error_response, pack, response, unpack_request
from pie.runtime.trace import bounded_trace

log = logging.getLogger("pie.server")

MAX_UPLOADS_IN_PROGRESS = 4
INFERLET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class Session:
    """stats: the server's counters (the `stats` request)."""

    def __init__(self, ws: web.WebSocketResponse, config: PieConfig, instances: InstanceManager,
                 programs: ProgramStore, stats: Callable[[], dict[str, Any]],
                 abort: Callable[[], None] = lambda: None):
        """abort: drops the connection at once (when even a close frame cannot be written)."""
        self.ws = ws
        self.abort = abort
        self.config = config
        self.instances = instances
        self.programs = programs
        self.stats = stats
        cfg = config.server
        self.outbox = Outbox(asyncio.get_running_loop(), cfg.outbox_messages, cfg.slow_client_s)
        self.authenticated = not config.auth.enabled
        self.uploads: dict[str, Upload] = {}
        self.instance_ids: set[int] = set()
        self.close_after_reply = False
        self.opened_at = asyncio.get_running_loop().time()

    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
        try:
            while True:
                if not await self._room_for_replies():
                    await self._close_for(1008, "the client does not read its replies")
                    break
                try:
                    msg = await asyncio.wait_for(self.ws.receive(), self._receive_timeout())
                except asyncio.TimeoutError:
                    if self.authenticated:
                        await self._close_for(1000, "idle: no request and no instance for "
                                                    f"{self.config.server.idle_timeout_s:g} s")
                    else:
                        await self._close_for(1008, "authentication timed out")
                    break
                if msg.type == WSMsgType.BINARY:
                    await self._on_frame(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    self.outbox.put(error_response(None, "malformed", "text frames are not part of the protocol: "
                                                                      "send msgpack maps in binary frames"))
                else:  # CLOSE, or ERROR (e.g. a frame over the hard limit): the connection is over
                    break
                if self.close_after_reply:
                    break
        finally:
            self.instances.end_owner(self, "the client disconnected")
            if self.close_after_reply:
                await self._flush(writer)
            self.outbox.close()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    def _receive_timeout(self) -> float | None:
        """How long to wait for the next frame: the rest of the authentication window, the idle timeout
        while the connection runs no instance, else forever."""
        cfg = self.config.server
        if not self.authenticated:
            return max(0.0, self.opened_at + cfg.auth_timeout_s - asyncio.get_running_loop().time())
        if cfg.idle_timeout_s > 0 and not self.instance_ids:
            return cfg.idle_timeout_s
        return None

    async def _room_for_replies(self) -> bool:
        """Stops reading requests while reply_backlog replies wait to be written (the client is not
        reading them); False when none left within slow_client_s."""
        cfg = self.config.server
        if self.outbox.num_control < cfg.reply_backlog:
            return True
        deadline = asyncio.get_running_loop().time() + cfg.slow_client_s
        while self.outbox.num_control >= cfg.reply_backlog:
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def _close_for(self, code: int, reason: str, timeout: float = 2.0) -> None:
        """Closes with a close frame, or, when the client does not read even that, drops the connection."""
        log.info("closing a connection: %s", reason)
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()), timeout)
        except asyncio.TimeoutError:
            self.abort()

    async def _flush(self, writer: asyncio.Task, timeout: float = 2.0) -> None:
        await self.drain_outbox(timeout)
        await self.ws.close(code=1008, message=b"authentication failed")

    async def drain_outbox(self, timeout: float = 2.0) -> None:
        """Waits (up to `timeout`) until everything queued for the client has been written."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.outbox.qsize() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)

    async def close(self, code: int, message: bytes) -> None:
        await self.drain_outbox()
        await self.ws.close(code=code, message=message)

    # ---- writing ---------------------------------------------------------------------------------
    async def _write(self) -> None:
        while True:
            event = await self.outbox.get()
            frame = self._frame(event)
            if frame is None:
                continue
            try:
                await self.ws.send_bytes(frame)
            except (ConnectionError, RuntimeError):  # the connection is gone; the reader ends too
                return

    def _frame(self, event: Any) -> bytes | None:
        if isinstance(event, dict):
            return pack(event)
        kind, instance_id, payload = event
        if kind == "output" or kind == "log":
            return pack({"type": kind, "instance_id": instance_id, "data": payload})
        if kind == "launched":  # the launch's answer, queued before any event of the instance
            self.instance_ids.add(instance_id)
            return pack(response(payload, instance_id=instance_id))
        if kind == "done":
            self.instance_ids.discard(instance_id)
            done = {"type": "done", "instance_id": instance_id, "error": payload.error,
                    "return_value": payload.return_value, "timings": payload.timings}
            if payload.trace is not None:  # launched with trace: true
                done["trace"] = bounded_trace(payload.trace, MAX_TRACE_EVENTS)
            return pack(done)
        return None

    # ---- reading ---------------------------------------------------------------------------------
    async def _on_frame(self, data: bytes) -> None:
        corr_id = None
        try:
            if len(data) > self.config.server.max_frame_bytes:
                corr_id = _corr_id_of(data)
                raise ProtocolError("too_large", f"the frame has {len(data)} bytes; this server takes at most "
                                                 f"{self.config.server.max_frame_bytes} (upload in chunks)",
                                    corr_id)
            msg = unpack_request(data)
            corr_id = msg["corr_id"]
            if not self.authenticated and msg["type"] != "auth":
                self.close_after_reply = True
                raise ProtocolError("unauthenticated", "authenticate first: send {type: auth, token}", corr_id)
            reply = await getattr(self, "_on_" + msg["type"])(msg)
            if reply is not None:
                self.outbox.put(response(corr_id, **reply))
        except ProtocolError as e:
            self.outbox.put(error_response(e.corr_id, e.code, e.message))
        except LaunchError as e:
            self.outbox.put(error_response(corr_id, e.code, str(e)))
        except ProgramError as e:
            self.outbox.put(error_response(corr_id, "bad_program", str(e)))
        except Exception as e:  # a bug of ours: this request fails, the server goes on
            log.exception("request failed")
            self.outbox.put(error_response(corr_id, "internal", f"{type(e).__name__}: {e}"))

    async def _on_auth(self, msg: dict) -> dict:
        expected = self.config.auth.token
        if expected and not token_matches(msg["token"], expected):
            self.close_after_reply = True
            raise ProtocolError("unauthenticated", "wrong token", msg["corr_id"])
        self.authenticated = True
        return {"version": PROTOCOL_VERSION}

    async def _on_ping(self, msg: dict) -> dict:
        return {"version": PROTOCOL_VERSION}

    async def _on_query(self, msg: dict) -> dict:
        return {"exists": await asyncio.to_thread(self.programs.has, msg["hash"])}

    async def _on_upload(self, msg: dict) -> dict | None:
        digest = msg["hash"]
        upload = self.uploads.get(digest)
        if upload is None:
            if msg["chunk_index"] != 0:
                raise ProgramError(f"upload: no upload of {digest[:16]}... in progress (start with chunk 0)")
            if len(self.uploads) >= MAX_UPLOADS_IN_PROGRESS:
                raise ProgramError(f"upload: at most {MAX_UPLOADS_IN_PROGRESS} uploads at once per connection")
            upload = Upload(digest, msg.get("kind") or "python", msg.get("name") or "", msg["num_chunks"],
                            self.config.server.max_program_bytes)
            self.uploads[digest] = upload
        try:
            program = upload.add(msg["chunk_index"], msg["num_chunks"], msg["data"])
        except ProgramError:
            self.uploads.pop(digest, None)
            raise
        if program is None:
            return None
        self.uploads.pop(digest, None)
        await asyncio.to_thread(self.programs.put, program)
        return {"hash": digest}

    async def _on_launch(self, msg: dict) -> None:
        limit = self.config.limits.max_instances_per_connection
        if len(self.instance_ids) >= limit:
            raise LaunchError("busy", f"this connection runs its limit of {limit} instances")
        program = None
        name = msg.get("inferlet")
        if msg.get("program") is not None:
            program = await asyncio.to_thread(self.programs.get, msg["program"])
            if program is None:
                raise LaunchError("unknown_program", f"no program with hash {msg['program'][:64]!r}: upload it first")
        elif name is None:
            raise LaunchError("bad_request", 'launch: give "program" (an uploaded hash) or "inferlet" (a bundled name)')
        elif not INFERLET_NAME.fullmatch(name) or name.endswith((".py", ".wasm", ".wat")):
            raise LaunchError("bad_request", f"launch: {name!r} is not a bundled inferlet name (upload files instead)")
        corr_id = msg["corr_id"]
        outbox = self.outbox
        await self.instances.launch(
            self, outbox, msg["arguments"], program=program, inferlet=name, deadline_s=msg.get("deadline_s"),
            memory_mb=msg.get("memory_mb"), trace=bool(msg.get("trace")), cache_scope=CLIENT_CACHE,
            on_started=lambda inst: outbox.post_from_thread(("launched", inst.id, corr_id)))
        return None  # answered by the "launched" event

    def _running(self, msg: dict) -> Any:
        running = self.instances.get(msg["instance_id"], self)
        if running is None:
            raise ProtocolError("unknown_instance", f"no running instance {msg['instance_id']} of this connection",
                                msg["corr_id"])
        return running.instance

    async def _on_send(self, msg: dict) -> dict:
        inst = self._running(msg)
        try:
            inst.send(msg["message"])
        except queue.Full:
            raise ProtocolError("limit_reached", f"instance {inst.id} holds {inst.inbox.maxsize} unread messages, "
                                f"its limit (limits.inbox_messages): wait for it to read", msg["corr_id"]) from None
        return {}

    async def _on_terminate(self, msg: dict) -> dict:
        stop_instance(self._running(msg), msg.get("reason") or "terminated by the client")
        return {}

    async def _on_list(self, msg: dict) -> dict:
        return {"instances": [r.describe() for r in self.instances.owned_by(self)]}

    async def _on_stats(self, msg: dict) -> dict:
        return {"stats": self.stats()}


def _corr_id_of(data: bytes) -> Any:
    try:
        msg = msgpack.unpackb(data, raw=False)
        corr_id = msg.get("corr_id") if isinstance(msg, dict) else None
        return corr_id if isinstance(corr_id, (int, str)) else None
    except Exception:
        return None
