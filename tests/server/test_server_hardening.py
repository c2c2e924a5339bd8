"""Attacks on `pie serve` from a client, each a regression test of a defect that main once had."""

from __future__ import annotations

import asyncio
import os

import pytest

from pie.server.programs import ProgramError, ProgramStore, sha256

PATHS = ["../../victim", "/tmp/victim", "..", "./x", "a" * 63, "A" * 64, "g" * 64, "0" * 64 + "/", ""]


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


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
