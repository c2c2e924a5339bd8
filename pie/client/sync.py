"""A synchronous wrapper of PieClient: the asyncio client on an event loop of its own thread.

>>> with Client("ws://127.0.0.1:8080") as client:                                 # doctest: +SKIP
...     result = client.run("text_completion", ["--prompt", "Hi", "--max-tokens", "8", "--temperature", "0"])
...     print(result.output)
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Coroutine, Iterator, Sequence

from pie.client.client import Event, PieClient, RemoteInstance, Result


class SyncRemoteInstance:
    """A RemoteInstance driven synchronously (through the Client's event loop thread)."""

    def __init__(self, client: "Client", remote: RemoteInstance):
        self._client = client
        self.remote = remote
        self.id = remote.id

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        while self.remote.result is None:
            yield self._client._call(self.remote.recv(), timeout)

    def wait(self, timeout: float | None = None) -> Result:
        return self._client._call(self.remote.wait(), timeout)

    def send(self, message: str) -> None:
        self._client._call(self.remote.send(message))

    def terminate(self, reason: str | None = None) -> None:
        self._client._call(self.remote.terminate(reason))

    @property
    def result(self) -> Result | None:
        return self.remote.result


class Client:
    def __init__(self, url: str, token: str | None = None, **kwargs: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pie-client", daemon=True)
        self._thread.start()
        self._async = PieClient(url, token, **kwargs)
        try:
            self._call(self._async.connect(), 30)
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def upload(self, program: bytes | str | Path, kind: str | None = None, name: str | None = None) -> str:
        return self._call(self._async.upload(program, kind, name))

    def launch(self, inferlet: str | None = None, arguments: Sequence[str] = (), **kwargs: Any) -> SyncRemoteInstance:
        return SyncRemoteInstance(self, self._call(self._async.launch(inferlet, arguments, **kwargs)))

    def run(self, inferlet: str | None = None, arguments: Sequence[str] = (), timeout: float | None = None,
            **kwargs: Any) -> Result:
        return self._call(self._async.run(inferlet, arguments, **kwargs), timeout)

    def list(self) -> list[dict]:
        return self._call(self._async.list())

    def stats(self) -> dict:
        return self._call(self._async.stats())

    def ping(self) -> dict:
        return self._call(self._async.ping())

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self._call(self._async.close(), 10)
            finally:
                self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
