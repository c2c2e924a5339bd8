"""Attacks on `pie serve` from a client, each a regression test of a defect that main once had."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from pie.server.programs import ProgramError, ProgramStore, sha256
from process_memory import rss_mb

PATHS = ["../../victim", "/tmp/victim", "..", "./x", "a" * 63, "A" * 64, "g" * 64, "0" * 64 + "/", ""]


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("bad", PATHS)
def test_a_program_hash_is_never_a_path(server, bad, tmp_path):
    """query / launch with a path where the hash goes: bad_request, and no file is read or deleted."""
    from pie.client import PieClient

    victim = tmp_path / "victim.py"
    victim.write_text("print('not a program of the store')\n")

    async def main():
        async with PieClient(server.ws_url) as client:
            for kind, fields in [("query", {"hash": bad}), ("query", {"hash": str(tmp_path / "victim")}),
                                 ("launch", {"program": bad, "arguments": []}),
                                 ("launch", {"program": str(tmp_path / "victim"), "arguments": []})]:
                with pytest.raises(Exception, match="bad_request"):
                    await client.request(kind, **fields)
            assert (await client.ping())["version"] == 1

    run(main())
    assert victim.exists()


def test_the_store_refuses_a_path_as_a_hash(tmp_path):
    store = ProgramStore(tmp_path / "store")
    victim = tmp_path / "victim.py"
    victim.write_text("x = 1\n")
    for bad in [str(tmp_path / "victim"), "../victim", "/etc/passwd"]:
        with pytest.raises(ProgramError, match="64 lowercase hex digits"):
            store.get(bad)
        with pytest.raises(ProgramError):
            store.has(bad)
    assert victim.exists()
    assert store.get(sha256(b"nothing")) is None  # a well-formed hash of nothing stored


def test_the_client_refuses_a_path_as_a_program_hash(server):
    from pie.client import PieClient

    async def main():
        async with PieClient(server.ws_url) as client:
            with pytest.raises(ValueError, match="not a program hash"):
                await client.launch(program="/etc/passwd")

    run(main())


def test_launch_by_name_never_reads_the_servers_working_directory(server, tmp_path, pool_whole):
    """A file in the server's working directory named like an inferlet (no suffix) is not launched."""
    from pie.client import PieClient

    before = os.getcwd()
    (tmp_path / "lurking").write_text("print('read from the working directory')\n")
    (tmp_path / "text_completion").write_text("print('shadowing a bundled name')\n")
    os.chdir(tmp_path)
    try:
        async def main():
            async with PieClient(server.ws_url) as client:
                with pytest.raises(Exception, match="no inferlet named 'lurking'"):
                    await client.request("launch", inferlet="lurking", arguments=[])
                result = await client.run("text_completion", ["--prompt", "Hi", "--max-tokens", "2",
                                                              "--temperature", "0"])
                assert result.ok and "shadowing" not in result.output

        run(main())
    finally:
        os.chdir(before)
    pool_whole()


HOLDS_TWO = "from wit_world.imports import kv, runtime\nkv.allocate(2)\nprint('holding')\nruntime.receive()\n"


def test_a_connection_is_one_client_for_its_page_quota(server_runtime, tmp_path):
    """kv_pages_per_client bounds what one client's instances hold together; another client is not
    affected, and a client's pages come back when its instances end."""
    from pie.client import PieClient
    from pie.runtime import Runtime, RuntimeConfig
    from pie.server import ServerThread, load_config

    cfg = load_config().replace(server={"port": 0}, limits={"kv_pages_per_client": 3})
    program = tmp_path / "holds_two.py"
    program.write_text(HOLDS_TWO)
    from types import SimpleNamespace

    model = SimpleNamespace(runner=server_runtime.runner, tokenizer=server_runtime.tokenizer,  # the same model
                            name=server_runtime.model_name, eos_ids=server_runtime.services.eos_ids)
    with Runtime(model, RuntimeConfig(kv_pages_per_client=3)) as rt, \
            ServerThread(cfg, runtime=rt, programs_dir=tmp_path / "store").start() as srv:
        async def main():
            async with PieClient(srv.ws_url) as one, PieClient(srv.ws_url) as other:
                first = await one.launch(str(program))
                assert (await first.recv()).data.startswith("holding")
                second = await one.launch(str(program))
                done = await second.wait()
                assert "its client's quota of 3 KV pages exceeded" in done.error
                third = await other.launch(str(program))  # another connection: its own quota
                assert (await third.recv()).data.startswith("holding")
                await third.terminate()
                await first.terminate()

        run(main())


def test_a_client_that_never_reads_its_replies_is_bounded(server, server_config, monkeypatch):
    """The attack: pings on a socket that is never read (it once grew the server by ~430 MB). The replies
    waiting for such a client stay within reply_backlog (the server stops reading its requests meanwhile,
    and closes the connection if it stays so for slow_client_s); other clients are served."""
    import msgpack

    from pie.client import PieClient
    from pie.server import outbox
    from raw_websocket import connect, frame

    peak = [0]
    put = outbox.Outbox.put

    def counting_put(self, event):
        put(self, event)
        peak[0] = max(peak[0], self.qsize())

    monkeypatch.setattr(outbox.Outbox, "put", counting_put)
    before = rss_mb()
    s = connect("127.0.0.1", server.server.port)
    s.settimeout(5)  # a send that cannot go on for 5 s: the server has stopped reading
    sent = 0
    try:
        for i in range(500_000):
            s.sendall(frame(msgpack.packb({"type": "ping", "corr_id": i})))
            sent += 1
    except OSError:  # a timeout, or the server dropped the connection
        pass
    s.close()
    assert sent < 500_000, "the server read every request of a client that reads none of the replies"
    assert peak[0] <= server_config.server.reply_backlog + 1, peak[0]
    assert rss_mb() - before < 100

    async def other():
        async with PieClient(server.ws_url) as client:
            return (await client.ping())["version"]

    assert run(other()) == 1


def test_a_connection_that_never_authenticates_is_closed(server_config, server_runtime, tmp_path):
    import aiohttp

    from pie.server import ServerThread

    cfg = server_config.replace(auth={"token": "sesame"}, server={"auth_timeout_s": 0.5})
    with ServerThread(cfg, runtime=server_runtime, programs_dir=tmp_path).start() as srv:
        async def main():
            async with aiohttp.ClientSession() as session:
                ws = await session.ws_connect(srv.ws_url)
                t = time.monotonic()
                msg = await ws.receive(timeout=10)  # nothing sent: the server closes
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert ws.close_code == 1008 and time.monotonic() - t < 5

        run(main())


def test_an_idle_connection_is_closed(server_config, server_runtime, tmp_path):
    import aiohttp

    from pie.client import PieClient
    from pie.server import ServerThread

    cfg = server_config.replace(server={"idle_timeout_s": 0.5})
    with ServerThread(cfg, runtime=server_runtime, programs_dir=tmp_path).start() as srv:
        async def main():
            async with PieClient(srv.ws_url) as client:
                assert (await client.ping())["version"] == 1
                await asyncio.sleep(2)
                assert client.closed is not None and client.closed.close_code == 1000

        run(main())


def test_a_token_guards_every_http_route(server_config, server_runtime, tmp_path):
    """With [auth] token set, no HTTP route answers without `Authorization: Bearer TOKEN` (the server's info at
    GET /, /health, /metrics, every /v1 route): 401 and nothing else; with the token each answers as before."""
    import http.client
    import json

    from pie.server import ServerThread

    cfg = server_config.replace(auth={"token": "sesame"})
    with ServerThread(cfg, runtime=server_runtime, programs_dir=tmp_path).start() as srv:
        m = srv.server.model_name
        routes = [("GET", "/", None), ("GET", "/health", None), ("GET", "/metrics", None), ("GET", "/v1/models", None),
                  ("GET", "/v1/models/anything", None),
                  ("POST", "/v1/completions", {"model": m, "prompt": "hi", "max_tokens": 1}),
                  ("POST", "/v1/chat/completions", {"model": m, "messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 1}),
                  ("POST", "/v1/responses", {"model": m, "input": "hi", "max_output_tokens": 1})]
        def status(method, path, body, headers):
            conn = http.client.HTTPConnection("127.0.0.1", srv.server.port, timeout=60)
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json", **headers})
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            return resp.status, data

        for method, path, body in routes:
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"},
                            {"Authorization": "Basic sesame"}]:
                code, data = status(method, path, body, headers)
                assert code == 401, (method, path, headers, code, data)
                assert json.loads(data)["error"]["code"] == "invalid_api_key"
            code, _ = status(method, path, body, {"Authorization": "Bearer sesame"})
            assert code != 401, (method, path)
            assert code == (404 if path.endswith("anything") else 200), (method, path, code)


EXPORTS_AND_STORES = """
import sys
from wit_world.imports import kv, kv_store
mine = kv.allocate(2)
kv.export_pages("private-" + sys.argv[1], mine[:1], kv.ExportOptions(persistent=True, shared=False))
kv.export_pages("shared-" + sys.argv[1], mine[1:], kv.ExportOptions(persistent=True, shared=True))
kv_store.set("note", sys.argv[1])
print(sorted(kv.list_exports()), kv_store.get("note"))
"""

SEES = """
from wit_world.imports import kv, kv_store
print(sorted(kv.list_exports()), kv_store.get("note"))
"""


def test_what_a_connection_leaves_behind_goes_with_it(server, server_runtime, tmp_path, pool_whole):
    """Exports and kv-store entries are the connection's: another connection sees only the shared export;
    when the connection closes its private export and its store go, and its shared export is ownerless
    (evictable, removable by anyone)."""
    from pie.client import PieClient

    writer, reader = tmp_path / "writer.py", tmp_path / "reader.py"
    dropper = tmp_path / "dropper.py"
    writer.write_text(EXPORTS_AND_STORES)
    reader.write_text(SEES)
    dropper.write_text("from wit_world.imports import kv\nkv.unexport_pages('shared-alice')\n")
    pool = server_runtime.plane.kv_pages

    def exports():
        return {e["name"]: e for e in pool.stats()["exports"]}

    async def main():
        async with PieClient(server.ws_url) as other:
            async with PieClient(server.ws_url) as alice:
                r = await alice.run(str(writer), ["alice"])
                assert r.ok and r.output == "['private-alice', 'shared-alice'] alice\n", r
                r = await alice.run(str(reader))  # a later instance of the same connection
                assert r.output == "['private-alice', 'shared-alice'] alice\n", r
                r = await other.run(str(reader))
                assert r.output == "['shared-alice'] None\n", r
            deadline = time.monotonic() + 30
            while "private-alice" in exports():
                assert time.monotonic() < deadline, exports()
                await asyncio.sleep(0.05)
            assert exports()["shared-alice"]["ownerless"]
            r = await other.run(str(reader))
            assert r.output == "['shared-alice'] None\n", r
            r = await other.run(str(dropper))  # ownerless: anyone who sees it may remove it
            assert r.ok and "shared-alice" not in exports(), r
        assert server.stats()["instances"]["num_clients_ended"] >= 2

    run(main())
    if "shared-alice" in exports():
        pool.unexport("shared-alice")
    pool_whole()


def test_stats_name_no_other_clients_exports(server):
    from pie.client import PieClient

    async def main():
        async with PieClient(server.ws_url) as client:
            return await client.stats()

    stats = run(main())
    assert set(stats["kv_pages"]) >= {"num_pages", "num_free", "num_exports", "num_evictions"}
    assert not {"instances", "clients", "exports"} & set(stats["kv_pages"]), stats["kv_pages"]


def _program(n: int, size: int):
    from pie.server.programs import Program

    data = (f"# program {n}\n".encode() + b"x" * size)[:size]
    return Program(sha256(data), "python", f"p{n}.py", data)


def test_the_program_store_is_bounded_in_memory_and_on_disk(tmp_path):
    """Uploads of many distinct programs: memory holds the most recently used up to its bound, the folder
    too; a program that went from both is simply missing (the client uploads it again)."""
    folder = tmp_path / "store"
    store = ProgramStore(folder, memory_bytes=3000, disk_bytes=5000)
    programs = [_program(i, 1000) for i in range(8)]
    for i, p in enumerate(programs):
        store.put(p)
        os.utime(folder / f"{p.hash}.py", ns=(i * 10**9, i * 10**9))  # distinct ages, whatever the clock
        assert store.memory_held <= 3000
    assert len(store) == 3
    on_disk = sorted(f.name for f in folder.iterdir())
    assert on_disk == sorted(f"{p.hash}.py" for p in programs[3:])  # the 5 most recent
    assert store.get(programs[0].hash) is None  # gone from both
    assert store.get(programs[4].hash).data == programs[4].data  # from disk, back in memory (and recently used)
    assert programs[4].hash in store._programs and len(store) == 3
    store.put(_program(100, 4000))  # larger than memory: kept on disk only, pushing out the oldest files
    assert store.memory_held <= 3000 and _program(100, 4000).hash not in store._programs
    assert store.get(_program(100, 4000).hash).data == _program(100, 4000).data
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 5000
    (folder / "notes.txt").write_text("not a program: left alone")
    store.put(_program(101, 1000))
    assert (folder / "notes.txt").exists()


def test_one_program_larger_than_the_disk_bound_is_still_kept(tmp_path):
    store = ProgramStore(tmp_path, memory_bytes=10, disk_bytes=10)
    big = _program(1, 100)
    store.put(big)
    assert store.get(big.hash).data == big.data  # the program just stored always stays


NEVER_READS = """
from wit_world.imports import messaging
print("up", flush=True)
messaging.receive(messaging.subscribe("nobody-broadcasts-here"))  # blocks; never reads its inbox
"""


def test_an_instance_that_never_reads_its_input_bounds_its_inbox(server, server_config, tmp_path, pool_whole):
    from pie.client import PieClient

    program = tmp_path / "never_reads.py"
    program.write_text(NEVER_READS)
    limit = server_config.limits.inbox_messages

    async def main():
        async with PieClient(server.ws_url) as client:
            inst = await client.launch(str(program))
            assert (await inst.recv()).data.startswith("up")
            for _ in range(limit):
                await inst.send("m")
            with pytest.raises(Exception, match="limit_reached"):
                await inst.send("one too many")
            assert (await client.ping())["version"] == 1  # the connection goes on
            await inst.terminate()

    run(main())
    pool_whole()
