"""A websocket client on a bare socket that writes frames and never reads: what a hostile or stuck client
does, below any client library (which would keep reading the socket into its own buffers)."""

from __future__ import annotations

import base64
import os
import socket
import struct


def connect(host: str, port: int) -> socket.socket:
    """A socket after the websocket handshake (the 101 response read byte by byte: nothing more)."""
    s = socket.create_connection((host, port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert b" 101 " in head.split(b"\r\n")[0], head
    return s


def frame(payload: bytes) -> bytes:
    """One masked binary frame (a client's frames are masked)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x82]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_until_closed(s: socket.socket, timeout: float) -> tuple[int, int | None]:
    """Reads everything the server sends until it closes: (bytes read, the close frame's code or None when
    the connection was dropped without one)."""
    s.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    code = None
    i = 0
    while i + 2 <= len(data):  # walk the server's (unmasked) frames to the close frame
        opcode, n = data[i] & 0x0F, data[i + 1] & 0x7F
        j = i + 2
        if n == 126:
            n, j = struct.unpack(">H", data[j:j + 2])[0], j + 2
        elif n == 127:
            n, j = struct.unpack(">Q", data[j:j + 8])[0], j + 8
        if opcode == 0x8 and n >= 2:
            code = struct.unpack(">H", data[j:j + 2])[0]
        i = j + n
    return len(data), code
