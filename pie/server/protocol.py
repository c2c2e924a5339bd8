"""The websocket protocol: msgpack maps, one per binary frame (docs/protocol.md lists every message).

Client -> server messages carry a "type" and a client-chosen "corr_id"; the server answers each with one
{"type": "response", "corr_id", "ok", ...} (uploads: once, after the last chunk or at the first error).
Instance events ({"type": "output" | "log" | "done", "instance_id", ...}) come unasked.
"""

from __future__ import annotations

import re
from typing import Any

import msgpack

PROTOCOL_VERSION = 1

# client -> server message types and the fields each needs (name -> accepted Python types)
REQUESTS: dict[str, dict[str, tuple[type, ...]]] = {
    "auth": {"token": (str,)},
    "query": {"hash": (str,)},
    "upload": {"hash": (str,), "chunk_index": (int,), "num_chunks": (int,), "data": (bytes,)},
    "launch": {"arguments": (list,)},
    "send": {"instance_id": (int,), "message": (str,)},
    "terminate": {"instance_id": (int,)},
    "list": {},
    "stats": {},
    "ping": {},
}

OPTIONAL: dict[str, dict[str, tuple[type, ...]]] = {
    "upload": {"kind": (str,), "name": (str,)},
    "launch": {"program": (str,), "inferlet": (str,), "deadline_s": (int, float), "memory_mb": (int,),
               "trace": (bool,)},
    "terminate": {"reason": (str,)},
}


SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # a program's hash: 64 lowercase hex digits, never a path
HASH_FIELDS = {("query", "hash"), ("upload", "hash"), ("launch", "program")}


def is_program_hash(text: Any) -> bool:
    return isinstance(text, str) and SHA256_HEX.fullmatch(text) is not None


class ProtocolError(Exception):
    """A message the server cannot act on: answered with an error, the connection stays open."""

    def __init__(self, code: str, message: str, corr_id: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.corr_id = corr_id


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack_request(frame: bytes) -> dict[str, Any]:
    """A client message, checked: a map with a known "type", a "corr_id" and the type's fields."""
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types (ExtraData, FormatError, ValueError, ...)
        raise ProtocolError("malformed", f"the frame is not a msgpack message ({type(e).__name__})") from None
    if not isinstance(msg, dict):
        raise ProtocolError("malformed", f"a message must be a msgpack map, got {type(msg).__name__}")
    corr_id = msg.get("corr_id")
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("malformed", 'the message has no "type" string', corr_id)
    if kind not in REQUESTS:
        raise ProtocolError("unknown_type", f"unknown message type {kind!r} (known: {', '.join(REQUESTS)})", corr_id)
    if corr_id is None or not isinstance(corr_id, (int, str)) or isinstance(corr_id, bool):
        raise ProtocolError("malformed", 'the message has no "corr_id" (an integer or a string)')
    for name, types in REQUESTS[kind].items():
        if name not in msg:
            raise ProtocolError("bad_request", f"{kind}: missing field {name!r}", corr_id)
        _check(kind, name, msg[name], types, corr_id)
    for name, types in OPTIONAL.get(kind, {}).items():
        if msg.get(name) is not None:
            _check(kind, name, msg[name], types, corr_id)
    for message_type, name in HASH_FIELDS:
        if kind == message_type and msg.get(name) is not None and not is_program_hash(msg[name]):
            raise ProtocolError("bad_request", f"{kind}: field {name!r} must be a sha256 (64 lowercase hex "
                                               f"digits), got {str(msg[name])[:80]!r}", corr_id)
    return msg


def _check(kind: str, name: str, value: Any, types: tuple[type, ...], corr_id: Any) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):  # True is an int too
        want = " or ".join(t.__name__ for t in types)
        raise ProtocolError("bad_request", f"{kind}: field {name!r} must be {want}, got {type(value).__name__}",
                            corr_id)


def response(corr_id: Any, **fields: Any) -> dict[str, Any]:
    return {"type": "response", "corr_id": corr_id, "ok": True, **fields}


def error_response(corr_id: Any, code: str, message: str) -> dict[str, Any]:
    if corr_id is None:
        return {"type": "error", "error": {"code": code, "message": message}}
    return {"type": "response", "corr_id": corr_id, "ok": False, "error": {"code": code, "message": message}}
