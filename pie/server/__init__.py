"""The server: the websocket protocol (docs/protocol.md) and OpenAI-compatible HTTP routes served by
inferlets, over one Runtime. `pie serve` runs it; `pie.client` talks to it.

>>> from pie.server import ServerThread, load_config                             # doctest: +SKIP
>>> with ServerThread(load_config().replace(server={"port": 0})).start() as srv:  # doctest: +SKIP
...     print(srv.url)
"""

from pie.server.app import Server, ServerThread, serve
from pie.server.config import ConfigError, PieConfig, load_config

__all__ = ["ConfigError", "PieConfig", "Server", "ServerThread", "load_config", "serve"]
