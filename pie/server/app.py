"""`pie serve`: one asyncio process serving the websocket protocol (GET / or /ws with an upgrade) and the
OpenAI-compatible routes (/v1/...) over one Runtime. Instances run on their own threads; the event loop
only moves messages.

>>> cfg = load_config().replace(server={"port": 0})                                # doctest: +SKIP
>>> with ServerThread(cfg).start() as srv:                                         # doctest: +SKIP
...     print(srv.url)
http://127.0.0.1:41234
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from pie.server.auth import bearer_matches, is_websocket_upgrade
from pie.server.config import PieConfig
from pie.server.instances import InstanceManager
from pie.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pie.server.metrics import ServerMetrics
from pie.server.openai_api import OpenAIRoutes
from pie.server.openai_params import APIError
from pie.server.programs import ProgramStore
from pie.server.ws import Session

log = logging.getLogger("pie.server")


def build_runtime(config: PieConfig, model: Any = None, progress: bool = True) -> Any:
    from pie.engine.model import Model
    from pie.runtime import Runtime

    models = list(model) if isinstance(model, (list, tuple)) else [] if model is None else [model]
    while len(models) < config.model.data_parallel:  # replicas: each a model of its own (weights, KV pool)
        models.append(Model(config.model.name, config.model.engine_config(), progress=progress,
                            tensor_parallel=config.model.tensor_parallel))
    load_adapters(models, config.model.adapters)
    runtime = Runtime(models, config.limits.runtime_config(scheduler=config.scheduler.scheduler_config()))
    runtime.python_runtime()  # build or load the Python runtime component now, not at the first request
    return runtime


def load_adapters(models: list[Any], names: tuple[str, ...]) -> None:
    """Loads the registered adapters `names` onto every replica's runner, in order (adapter i + 1 is
    names[i]), before the runtime's planes are made. Raises ModelStoreError for one not registered for
    the model."""
    from pie.engine.adapter_store import AdapterStore

    store = AdapterStore()
    for name in names:
        for m in models:
            entry = store.resolve(name, m.name)
            m.runner.load_adapter(name, entry.path)


class Server:
    def __init__(self, config: PieConfig, runtime: Any = None, model: Any = None, progress: bool = True,
                 programs_dir: Path | None = None):
        """`runtime`: serve an existing Runtime (not closed by the server); else one is built from the
        configuration (and `model`, a pie.engine.model.Model, when given). Uploaded programs are kept in
        `programs_dir` (default $PIE_HOME/programs)."""
        self.config = config
        self.owns_runtime = runtime is None
        self.runtime = runtime if runtime is not None else build_runtime(config, model, progress)
        self.model_name = self.runtime.model_name
        self.programs = ProgramStore(Path(programs_dir) if programs_dir else self.runtime.config.pie_home / "programs",
                                     config.server.programs_memory_bytes, config.server.programs_disk_bytes)
        self.sessions: set[Session] = set()
        self.started_at = time.time()
        self.instances: InstanceManager | None = None
        self.metrics = ServerMetrics(self.runtime)
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self.instances = InstanceManager(self.runtime, self.config.limits, asyncio.get_running_loop(),
                                         on_ended=self.metrics.instance_ended)
        app = web.Application(client_max_size=self.config.server.max_body_bytes, middlewares=[self._errors, self._auth])
        app.router.add_get("/", self._root)
        app.router.add_get("/ws", self._root)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        if self.config.openai.enabled:
            OpenAIRoutes(self.config, self.instances, self.model_name, self.started_at, self.metrics,
                         self.runtime.services.model.adapters).add_to(app)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.server.host, self.config.server.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def shutdown(self, grace_s: float | None = None) -> int:
        """Drain: no new instances; running ones get grace_s seconds to finish, then are terminated; then
        connections close. Returns how many instances were terminated."""
        grace = self.config.server.grace_s if grace_s is None else grace_s
        terminated = await self.instances.drain(grace)
        await asyncio.gather(*(s.close(1001, b"the server is shutting down") for s in list(self.sessions)))
        if self._runner is not None:
            await self._runner.cleanup()
        self.instances.close()
        if self.owns_runtime:
            await asyncio.to_thread(self.runtime.close)
        return terminated

    async def serve_until_signal(self) -> int:
        """Runs until SIGINT or SIGTERM, then drains; 0 once drained."""
        await self.start()
        host = self.config.server.host
        print(f"pie serve: {self.model_name} on http://{host}:{self.port} (websocket ws://{host}:{self.port}/, "
              f"OpenAI http://{host}:{self.port}/v1)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        live = len(self.instances.live)
        print(f"pie serve: draining ({live} instances running, grace {self.config.server.grace_s:g} s)",
              file=sys.stderr, flush=True)
        terminated = await self.shutdown()
        print(f"pie serve: stopped ({terminated} instances terminated at the end of the grace period)",
              file=sys.stderr, flush=True)
        return 0

    # ---- handlers ----------------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400 or not request.path.startswith("/v1"):
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status)
            return web.json_response(APIError(e.status, f"{request.method} {request.path}: {e.reason}",
                                              code=code).body(), status=e.status)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug of ours: this request fails, the server goes on
            log.exception("request failed")
            return web.json_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
                                     .body(), status=500)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """With a token configured, every HTTP request carries it; a websocket upgrade goes on to its session,
        which takes the token as its first frame and refuses everything else until then."""
        token = self.config.auth.token
        if not token or bearer_matches(request, token) or is_websocket_upgrade(request):
            return await handler(request)
        error = APIError(401, "Incorrect API key provided (send 'Authorization: Bearer TOKEN')", code="invalid_api_key")
        return web.json_response(error.body(), status=401, headers={"WWW-Authenticate": "Bearer"})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model": self.model_name})

    async def _metrics(self, request: web.Request) -> web.Response:
        """Prometheus text format (docs/metrics.md); behind the token like every route."""
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def _root(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=4 * self.config.server.max_frame_bytes, compress=False,
                                   autoping=True)
        if not ws.can_prepare(request).ok:
            return web.json_response({"name": "pie", "model": self.model_name, "websocket": "GET / with an upgrade",
                                      "openai": "/v1" if self.config.openai.enabled else None})
        if len(self.sessions) >= self.config.server.max_connections or not self.instances.accepting:
            return web.json_response({"error": "the server takes no more connections"}, status=503)
        await ws.prepare(request)
        transport = request.transport
        session = Session(ws, self.config, self.instances, self.programs, self.stats,
                          abort=lambda: transport.abort() if transport is not None else None)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
        return ws

    # ---- counters ----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        rt = self.runtime
        out: dict[str, Any] = {"model": self.model_name, "connections": len(self.sessions), "programs": len(self.programs),
                               "instances": self.instances.stats(),
                               "kv_pages": {"num_pages": rt.num_pages, "num_free": rt.num_free_pages}}
        # Counters only: which instance, client or export holds what is no client's business.
        replicas = []
        for replica in rt.replicas:
            plane = replica.plane.stats()
            replicas.append({"kv_pages": {k: v for k, v in plane["kv_pages"].items()
                                          if k not in ("instances", "clients", "exports")},
                             "scheduler": plane["scheduler"], "num_plane_instances": len(plane["live_instances"])})
        # every replica together (counters summed); each one under "replicas"
        out["kv_pages"] = _summed([r["kv_pages"] for r in replicas])
        out["scheduler"] = _summed([r["scheduler"] for r in replicas])
        out["num_plane_instances"] = sum(r["num_plane_instances"] for r in replicas)
        out["replicas"] = replicas
        return out


def _summed(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Counter dicts of the replicas added up key by key (num_* counts); other values from the first."""
    total = dict(parts[0])
    for part in parts[1:]:
        for key, value in part.items():
            if key.startswith("num_") and isinstance(value, (int, float)):
                total[key] = total.get(key, 0) + value
    return total


class ServerThread:
    """A Server on an event loop of its own thread (tests, benchmarks, embedding)."""

    def __init__(self, config: PieConfig, runtime: Any = None, model: Any = None, programs_dir: Path | None = None):
        self.server = Server(config, runtime=runtime, model=model, progress=False, programs_dir=programs_dir)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="pie-server", daemon=True)

    def start(self) -> "ServerThread":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(60)
        return self

    @property
    def url(self) -> str:
        return f"http://{self.server.config.server.host}:{self.server.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.server.config.server.host}:{self.server.port}/"

    def call(self, fn: Any, *args: Any) -> Any:
        """Runs fn(*args) on the server's loop and returns its result."""
        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def stats(self) -> dict[str, Any]:
        return self.call(self.server.stats)

    def stop(self, grace_s: float = 0.0) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.server.shutdown(grace_s), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(config: PieConfig) -> int:
    """`pie serve`: loads the model, builds the runtime, serves until SIGINT / SIGTERM, drains, returns 0."""
    server = Server(config)
    return asyncio.run(server.serve_until_signal())
