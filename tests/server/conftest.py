"""Fixtures of the server tests: one model (a small KV cache), one Runtime and one in-process server
(on a thread of its own, port chosen by the OS) per session; clients connect over loopback."""

from pathlib import Path

import pytest

INFERLETS = Path(__file__).parent / "inferlets"
MODEL = "smollm2-135m"


@pytest.fixture(scope="session")
def server_config():
    from pie.server.config import load_config

    return load_config().replace(
        server={"port": 0, "outbox_messages": 64, "slow_client_s": 1.0, "max_frame_bytes": 64 << 10, "grace_s": 0.0},
        limits={"deadline_s": 120.0}, model={"kv_cache_mb": 256})


@pytest.fixture(scope="session")
def server_runtime(server_config):
    from pie.engine.model import Model
    from pie.server.app import build_runtime

    model = Model(server_config.model.name, server_config.model.engine_config(), progress=False)
    runtime = build_runtime(server_config, model, progress=False)
    yield runtime
    runtime.close()


@pytest.fixture(scope="session")
def server(server_config, server_runtime, tmp_path_factory):
    from pie.server import ServerThread

    srv = ServerThread(server_config, runtime=server_runtime, programs_dir=tmp_path_factory.mktemp("programs")).start()
    yield srv
    srv.stop()


@pytest.fixture
def openai_client(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield client
    client.close()


@pytest.fixture
def pool_whole(server):
    """pool_whole() waits until no instance is live and every KV page is free, but those the /v1 routes'
    prefix cache holds, which nothing else holds (asserts it); the stats."""
    return lambda timeout=30.0: assert_pool_whole(server, timeout)


def assert_pool_whole(server, timeout: float = 30.0) -> dict:
    """Waits until no instance is live and every KV page is free or held by the prefix cache alone (no
    instance and no export holds one); the stats."""
    import time

    def whole(stats: dict) -> bool:
        kv = stats["kv_pages"]
        return (stats["instances"]["num_live"] == 0 and kv["num_free"] + kv.get("num_cached", 0) == kv["num_pages"]
                and kv.get("num_exports", 0) == 0 and stats.get("num_plane_instances", 0) == 0)

    deadline = time.monotonic() + timeout
    while True:
        stats = server.stats()
        if whole(stats) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert stats["instances"]["num_live"] == 0, stats
    assert stats["kv_pages"]["num_free"] + stats["kv_pages"].get("num_cached", 0) == stats["kv_pages"]["num_pages"], stats
    assert stats["kv_pages"].get("num_exports", 0) == 0, stats
    assert stats.get("num_plane_instances", 0) == 0, stats
    return stats
