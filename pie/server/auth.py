"""The server's one credential check. With `[auth] token` set, every route needs it: HTTP requests send
`Authorization: Bearer TOKEN`; a websocket sends `{type: auth, token}` as its first frame (the upgrade
itself carries no header from browsers, so it is let through and the session refuses every other frame
until the token matches). Comparisons are constant-time.
"""

from __future__ import annotations

import hmac

from aiohttp import web


def token_matches(given: str, expected: str) -> bool:
    """Constant-time in the content of `given` (hmac.compare_digest on the encoded bytes)."""
    return hmac.compare_digest(given.encode(), expected.encode())


def bearer_matches(request: web.Request, expected: str) -> bool:
    given = request.headers.get("Authorization", "")
    return given.startswith("Bearer ") and token_matches(given[7:], expected)


def is_websocket_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"
