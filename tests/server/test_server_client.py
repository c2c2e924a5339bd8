"""The websocket protocol through pie.client: upload, launch, stream, send, terminate, list, stats; many
clients at once; disconnects; slow clients; malformed and oversize frames; authentication."""

import asyncio
import hashlib
import time

from pathlib import Path

import msgpack
import pytest

INFERLETS = Path(__file__).parent / "inferlets"


def run(coro):
    return asyncio.run(coro)


def test_upload_launch_stream_send_and_return(server, pool_whole):
    from pie.client import PieClient

    async def main():
        async with PieClient(server.ws_url, chunk_bytes=97) as client:  # many chunks
            source = (INFERLETS / "echo.py").read_bytes()
            digest = await client.upload(INFERLETS / "echo.py")
            assert digest == hashlib.sha256(source).hexdigest()
            assert (await client.request("query", hash=digest))["exists"]
            inst = await client.launch(program=digest, arguments=["a", "b"])
            first = await inst.recv()
            assert (first.type, first.data) == ("output", "hello a b")
            listed = await client.list()
            assert [i["instance_id"] for i in listed] == [inst.id]
            assert listed[0]["program"] == digest
            await inst.send("one")
            await inst.send("two")
            assert (await inst.recv()).data == "echo:one"
            assert (await inst.recv()).data == "echo:two"
            await inst.send("")
            result = await inst.wait()
            assert result.ok, result.error
            assert result.return_value == "bye"
            assert result.output == "hello a becho:oneecho:two"
            assert result.log.strip() == "input closed"
            assert await client.list() == []

    run(main())
    pool_whole()


def test_uploaded_programs_are_cached_on_disk(server, tmp_path):
    from pie.client import Client
    from pie.server.programs import ProgramStore

    source = b'import inferlet\ninferlet.send("cached")\n'
    with Client(server.ws_url) as client:
        digest = client.upload(source, name="cached.py")
        assert client.run(program=digest).output == "cached"
    fresh = ProgramStore(server.server.programs.folder)  # another server process on the same home
    assert fresh.get(digest).data == source


def test_bundled_inferlet_by_name_matches_the_embedded_run(server, server_runtime):
    from pie.client import Client

    args = ["--prompt", "What is the capital of France?", "--max-tokens", "12", "--temperature", "0"]
    expected = server_runtime.run("text_completion", args).output
    with Client(server.ws_url) as client:
        result = client.run("text_completion", args, timeout=120)
    assert result.ok, result.error
    assert result.output == expected


def test_terminate_a_running_instance_frees_its_pages(server, pool_whole):
    from pie.client import Client

    with Client(server.ws_url) as client:
        inst = client.launch(str(INFERLETS / "stream.py"))
        events = inst.events(timeout=60)
        assert next(events).data == "started"
        next(events)  # a token: it holds pages now
        inst.terminate("enough")
        result = inst.wait(60)
    assert result.error is not None and "enough" in result.error
    pool_whole()


def test_terminate_an_instance_waiting_for_input(server, pool_whole):
    from pie.client import Client

    with Client(server.ws_url) as client:
        inst = client.launch(str(INFERLETS / "echo.py"))
        assert next(inst.events(timeout=60)).data == "hello "
        inst.terminate("stop waiting")
        result = inst.wait(30)
    assert "stop waiting" in result.error and result.return_value is None
    pool_whole()


def test_launch_errors(server):
    from pie.client import Client, PieError

    with Client(server.ws_url) as client:
        with pytest.raises(PieError, match="unknown_program"):
            client.launch(program="0" * 64)
        with pytest.raises(PieError, match="no inferlet named"):
            client._call(client._async.request("launch", inferlet="no_such_inferlet", arguments=[]))
        with pytest.raises(PieError, match="bundled inferlet name"):  # no server-side paths
            client._call(client._async.request("launch", inferlet="../../etc/passwd", arguments=[]))
        with pytest.raises(PieError, match="memory_mb"):
            client.launch("text_completion", memory_mb=1 << 20)
        with pytest.raises(PieError, match="unknown_instance"):
            client._call(client._async.request("send", instance_id=999999, message="x"))
        with pytest.raises(PieError, match="sha256"):  # the data does not match the announced hash
            client._call(client._async.request("upload", hash="a" * 64, chunk_index=0, num_chunks=1, data=b"x"))
        # a failing program reports its error in `done`
        result = client.run(program=client.upload(b"raise ValueError('boom')\n"))
        assert "ValueError: boom" in result.error
        assert client.ping()["version"] == 1


def test_200_concurrent_clients_none_lost_and_the_pool_back_to_zero(server, pool_whole):
    from pie.client import PieClient

    source = (INFERLETS / "tiny.py").read_bytes()
    before = server.stats()["instances"]

    async def one(k: int) -> str:
        async with PieClient(server.ws_url) as client:
            digest = await client.upload(source, name="tiny.py")
            args = [str(k)] + (["--generate"] if k % 20 == 0 else [])
            result = await client.run(program=digest, arguments=args)
            assert result.ok, result.error
            return result.output

    async def main():
        return await asyncio.gather(*(one(k) for k in range(200)))

    t0 = time.perf_counter()
    outputs = run(main())
    assert outputs == [f"got {k}" for k in range(200)]
    stats = pool_whole()
    assert stats["instances"]["num_launched"] - before["num_launched"] == 200
    assert stats["instances"]["num_failed"] == before["num_failed"]
    assert time.perf_counter() - t0 < 120


@pytest.mark.parametrize("inferlet", ["stream.py", "host_stream.py"])  # its own loop; a generation stream
def test_disconnect_mid_stream_terminates_and_frees(server, pool_whole, inferlet):
    from pie.client import PieClient

    async def main():
        client = await PieClient(server.ws_url).connect()
        insts = [await client.launch(str(INFERLETS / inferlet)) for _ in range(3)]
        for inst in insts:
            assert (await inst.recv()).data == "started"
            await inst.recv()  # generating, pages held
        assert server.stats()["instances"]["num_live"] >= 3
        await client._ws.close()  # gone without terminating anything
        await client.close()

    run(main())
    pool_whole()


def test_slow_client_does_not_stall_others(server, pool_whole):
    """A client that stops reading: its instance waits for room, then is terminated; another client is
    served meanwhile."""
    import aiohttp

    from pie.client import PieClient

    async def main():
        slow = await PieClient(server.ws_url).connect()
        digest = await slow.upload(INFERLETS / "flood.py")
        before = server.stats()["instances"]["num_slow_client"]
        await slow.launch(program=digest, arguments=["100000", "60000"])  # 6 GB if it were read
        slow._reader.cancel()  # stop reading: the socket buffers fill up, then the server's outbox
        t0 = time.perf_counter()
        async with PieClient(server.ws_url) as fast:
            result = await fast.run("text_completion", ["--prompt", "Hi", "--max-tokens", "4", "--temperature", "0"])
            assert result.ok
        assert time.perf_counter() - t0 < 30
        for _ in range(200):
            if server.stats()["instances"]["num_slow_client"] > before:
                break
            await asyncio.sleep(0.1)
        assert server.stats()["instances"]["num_slow_client"] == before + 1
        await slow._ws.close()
        await slow._session.close()

    run(main())
    pool_whole()


def test_malformed_and_oversize_frames_get_errors_and_the_server_goes_on(server, server_config):
    from pie.client import PieClient

    limit = server_config.server.max_frame_bytes

    async def main():
        async with PieClient(server.ws_url) as client:
            # answered with {"type": "error"} (no usable corr_id): not msgpack, truncated, not a map, no
            # corr_id, a text frame
            for frame in [b"\xc1", b"\x93\x01\x02", msgpack.packb([1, 2, 3]), msgpack.packb({"type": "launch"})]:
                await client.send_raw(frame)
            await client._ws.send_str("not binary")
            # answered to their corr_id (which no request of this client uses)
            for frame in [msgpack.packb({"corr_id": "x"}), msgpack.packb({"type": 7, "corr_id": "y"})]:
                await client.send_raw(frame)
            with pytest.raises(Exception, match="too_large"):
                await client.request("ping", pad=b"x" * (limit + 10))
            for kind, fields, match in [("nope", {}, "unknown_type"), ("send", {"instance_id": "x", "message": "m"},
                                        "must be int"), ("send", {"message": "m"}, "missing field"),
                                        ("launch", {"arguments": "notalist"}, "must be list")]:
                with pytest.raises(Exception, match=match):
                    await client.request(kind, **fields)
            assert (await client.ping())["version"] == 1  # still connected and served
            for _ in range(50):
                if len(client.errors) >= 5:
                    break
                await asyncio.sleep(0.02)
            assert len(client.errors) == 5
            assert {e["code"] for e in client.errors} == {"malformed"}
        # a frame over the hard limit (4x) closes that connection with 1009; others are not affected
        client = await PieClient(server.ws_url).connect()
        await client.send_raw(b"\x00" * (4 * limit + 1))
        await asyncio.wait_for(client._reader, 10)
        assert client.closed.close_code == 1009
        await client.close()
        async with PieClient(server.ws_url) as again:
            assert (await again.ping())["version"] == 1

    run(main())


def test_authentication(server_config, server_runtime, tmp_path):
    import openai

    from pie.client import Client, PieError
    from pie.server import ServerThread

    cfg = server_config.replace(auth={"token": "s3cret"})
    with ServerThread(cfg, runtime=server_runtime, programs_dir=tmp_path).start() as srv:
        with Client(srv.ws_url, token="s3cret") as client:
            assert client.ping()["version"] == 1
        with pytest.raises(PieError, match="wrong token"):
            Client(srv.ws_url, token="wrong")
        with Client(srv.ws_url) as client:  # no auth first: refused, then closed
            with pytest.raises(PieError, match="unauthenticated"):
                client.ping()
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.body["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list()] == [srv.server.model_name]
        bad.close()
        good.close()


def test_a_request_on_a_dropped_connection_raises_connection_closed(server, caplog):
    from pie.client import PieClient
    from pie.client.client import ConnectionClosed

    async def main():
        async with PieClient(server.ws_url) as client:
            client._ws._writer.transport.abort()  # gone under the client, before its reader has noticed
            with pytest.raises(ConnectionClosed):
                await client.ping()
            assert not client._pending

    asyncio.run(main())
    assert "never retrieved" not in caplog.text


def test_a_launch_with_trace_gets_its_trace_in_the_done_event(server, pool_whole):
    from pie.client import Client

    with Client(server.ws_url) as client:
        traced = client.run(str(INFERLETS / "tiny.py"), ["x", "--generate"], trace=True, timeout=60)
        plain = client.run(str(INFERLETS / "tiny.py"), ["x", "--generate"], timeout=60)
    assert traced.error is None and plain.error is None and traced.output == plain.output == "got x"
    assert plain.trace is None
    events = traced.trace["traceEvents"]
    assert events[0]["name"] == "process_name" and events[0]["pid"] == traced.instance_id
    names = [e["name"] for e in events]
    assert "generation.start" in names and names.count("output") == 1  # Context.generate runs on a stream
    pool_whole()
