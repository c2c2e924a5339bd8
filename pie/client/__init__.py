"""Python client of `pie serve`'s websocket protocol: `PieClient` (asyncio) and `Client` (synchronous).

>>> from pie.client import Client                                                 # doctest: +SKIP
>>> with Client("ws://127.0.0.1:8080") as c:                                      # doctest: +SKIP
...     print(c.run("text_completion", ["--prompt", "Hi", "--temperature", "0", "--max-tokens", "8"]).output)
"""

from pie.client.client import ConnectionClosed, Event, PieClient, PieError, RemoteInstance, Result
from pie.client.sync import Client, SyncRemoteInstance

__all__ = ["Client", "ConnectionClosed", "Event", "PieClient", "PieError", "RemoteInstance", "Result",
           "SyncRemoteInstance"]
