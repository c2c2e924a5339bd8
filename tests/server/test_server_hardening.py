"""Attacks on `pie serve` from a client, each a regression test of a defect that main once had."""

from __future__ import annotations

import asyncio
import os

import pytest

from pie.server.programs import ProgramError, ProgramStore, sha256

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
