"""A bounded soak of `pie serve`: many clients at once, each in a loop, connect, launch one to three
instances of random kinds, read some of what they stream, then at a random point wait for them, terminate
some, send them input, close the connection, or drop it abruptly (a TCP reset, no close frame; also while
a launch is under way, and from a bare socket that never reads more than a few frames). At the end every
KV page is free, no instance is live, the server's counters add up and it still answers; its RSS stayed
within RSS_GROWTH_MB of what it was after the warm-up.

PIE_SOAK_S (seconds of soak, default SOAK_S_DEFAULT: about a minute in all with the 135M model on a
2-core CPU), PIE_SOAK_SEED (the choices of every client follow from it; printed on failure),
PIE_SOAK_CLIENTS (concurrent clients). A longer soak on demand:
    PIE_SOAK_S=600 PIE_SOAK_SEED=7 pytest -q tests/server/test_server_soak.py -s
The server runs in this process (on a thread), so the RSS measured is the server's plus the test's clients'.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import os
import random
import socket
import struct
import threading
import time
import traceback
from pathlib import Path

import msgpack

from process_memory import rss_mb

SOAK_S_DEFAULT = 40.0
SOAK_S = float(os.environ.get("PIE_SOAK_S", SOAK_S_DEFAULT))
SEED = int(os.environ.get("PIE_SOAK_SEED", "20250101"))
CLIENTS = int(os.environ.get("PIE_SOAK_CLIENTS", "8"))
WARMUP_S = min(10.0, SOAK_S / 4)  # the first seconds of the soak: its RSS is the baseline (the largest sample)
# The bound on the process's RSS after the warm-up: the warm-up's peak + RSS_GROWTH_MB. Measured on a
# 2-core CPU with smollm2-135m (RSS ~1.36 GB idle, ~1.5 GB peak during the warm-up): the peak after the
# warm-up was 9-56 MB above the warm-up's peak over soaks of 20-150 s (up to 24 live Python instances of
# ~7 MB each, allocator slack), and the end below it. A leak of what an instance holds (its store, its
# outbox, its events: MB each) passes the bound within the ~300 instances a 40 s soak launches; a leak of
# ~7 KB a request (60,000 pings once grew the server by 430 MB) within the ~80,000 pings it sends.
RSS_GROWTH_MB = 200
WAIT_S = 120.0  # the longest any single wait may take (an instance that never ends is a failure)
SAMPLE_S = 0.25  # RSS sampling period
RAW_QUIET_S = 3.0  # a bare-socket client stops reading after this long with nothing (its instances may wait)

STREAMER = """import sys
for i in range(int(sys.argv[1])):
    print("line", i, flush=True)
"""

HOLDER = """import sys
from wit_world.imports import kv, runtime
pages = kv.allocate(int(sys.argv[1]))
runtime.send("holding")
while True:
    message = runtime.receive()
    if message == "":
        break
    runtime.send("echo:" + message)
runtime.set_return(str(len(pages)))
"""

GENERATOR = """import sys
import inferlet
ctx = inferlet.Context()
ctx.fill(inferlet.chat_prompt([{"role": "user", "content": "Count from one to one hundred."}]))
inferlet.send("started")
for _ in range(int(sys.argv[1])):
    token = ctx.next_token(inferlet.greedy())
    ctx.fill_tokens([token])
    inferlet.send(inferlet.decode([token]))
"""

FAILER = """import sys
from wit_world.imports import kv, runtime
kv.allocate(int(sys.argv[1]))
runtime.send("failing")
raise RuntimeError("soak: planned failure")
"""

PROGRAMS = {"streamer": STREAMER, "holder": HOLDER, "generator": GENERATOR, "failer": FAILER}
KINDS = ["text_completion", "streamer", "holder", "generator", "failer"]
KIND_WEIGHTS = [3, 3, 4, 2, 1]
ACTIONS = ["wait", "terminate", "send", "close", "drop", "drop_launching"]
ACTION_WEIGHTS = [3, 3, 2, 1, 3, 1]
CHATTER = [0, 100, 300, 1000, 2000]  # pings a PieClient session sends (in bursts of CHATTER_BURST, pipelined)
CHATTER_BURST = 100
RAW_SESSION_P = 0.2  # a session from a bare socket instead of PieClient
PROMPTS = ["Hi", "What is the capital of France?", "Write a haiku about the sea.", "1, 2, 3,"]


class RssSampler(threading.Thread):
    def __init__(self):
        super().__init__(name="soak-rss", daemon=True)
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MB)
        self.t0 = time.monotonic()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.monotonic() - self.t0, rss_mb()))
            self._halt.wait(SAMPLE_S)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def summary(self, every: int = 40) -> str:
        step = max(1, len(self.samples) // every)
        return " ".join(f"{t:.0f}s:{mb:.0f}" for t, mb in self.samples[::step])


class Soak:
    """Shared state of the clients: the counts of what they did, the failures they saw."""

    def __init__(self, server, digests: dict[str, str], paths: dict[str, Path]):
        self.server = server
        self.digests = digests
        self.paths = paths
        self.counts: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.end = 0.0

    def fail(self, where: str, what: str) -> None:
        self.failures.append(f"{where}: {what}")

    # ---- what to launch ------------------------------------------------------------------------
    def pick(self, rng: random.Random) -> tuple[str, list[str]]:
        kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
        if kind == "text_completion":
            args = ["--prompt", rng.choice(PROMPTS), "--max-tokens", str(rng.randint(1, 12)), "--temperature", "0"]
        elif kind == "streamer":
            args = [str(rng.choice([0, 1, 10, 100, rng.randint(1, 2000)]))]
        elif kind == "holder":
            args = [str(rng.randint(1, 6))]
        elif kind == "generator":
            args = [str(rng.randint(1, 20))]
        else:
            args = [str(rng.randint(1, 4))]
        return kind, args

    async def launch(self, client, rng: random.Random, kind: str, args: list[str]):
        self.counts[f"kind:{kind}"] += 1
        if kind == "text_completion":
            return await asyncio.wait_for(client.launch(kind, args), WAIT_S)
        if rng.random() < 0.3:  # by path: the client asks whether the server has it (upload otherwise)
            return await asyncio.wait_for(client.launch(str(self.paths[kind]), args), WAIT_S)
        return await asyncio.wait_for(client.launch(program=self.digests[kind], arguments=args), WAIT_S)

    # ---- one simulated client ------------------------------------------------------------------
    async def client_loop(self, k: int) -> None:
        rng = random.Random(f"{SEED}-{k}")
        iteration = 0
        while time.monotonic() < self.end and not self.failures:
            where = f"client {k} iteration {iteration}"
            try:
                if rng.random() < RAW_SESSION_P:
                    await self.raw_session(rng, where)
                else:
                    await self.pie_session(rng, where)
            except Exception:
                self.fail(where, traceback.format_exc())
                return
            iteration += 1
            self.counts["sessions"] += 1

    async def pie_session(self, rng: random.Random, where: str) -> None:
        from pie.client import PieClient, PieError

        client = await asyncio.wait_for(PieClient(self.server.ws_url).connect(), WAIT_S)
        self.counts["connections"] += 1
        action = rng.choices(ACTIONS, ACTION_WEIGHTS)[0]
        self.counts[f"action:{action}"] += 1
        n = rng.randint(1, 3)
        drop_after = rng.randint(0, n) if action == "drop" else None  # before which launch the drop comes
        live: list[tuple[str, object]] = []
        try:
            for i in range(n):
                if drop_after == i and rng.random() < 0.5:
                    await self.drop(client)
                    return
                kind, args = self.pick(rng)
                if action == "drop_launching" and i == n - 1:  # drop while this launch is under way
                    task = asyncio.ensure_future(self.launch(client, rng, kind, args))
                    await asyncio.sleep(rng.choice([0, 0, 0.001, 0.01, 0.05]))
                    await self.drop(client)
                    (outcome,) = await asyncio.gather(task, return_exceptions=True)
                    self.counts["launches_unconfirmed" if isinstance(outcome, BaseException)
                                else "launches_confirmed"] += 1
                    return
                inst = await self.launch(client, rng, kind, args)
                self.counts["launches_confirmed"] += 1
                live.append((kind, inst))
            await self.chatter(client, rng, {inst.id for _, inst in live})
            for kind, inst in live:  # streaming: read some of what each sends
                await self.read_some(inst, kind, rng.randint(0, 6), where)
            if action == "drop":
                await self.drop(client)
                return
            if action == "close":  # a goodbye while instances run: the server terminates them
                await asyncio.wait_for(client.close(), WAIT_S)
                return
            terminated: set[int] = set()
            if action == "terminate":
                for kind, inst in rng.sample(live, rng.randint(1, len(live))):
                    try:
                        await asyncio.wait_for(inst.terminate("soak terminates"), WAIT_S)
                        terminated.add(inst.id)
                        self.counts["terminated"] += 1
                    except PieError as e:  # it had ended already
                        if e.code != "unknown_instance":
                            raise
                        self.counts["terminate_after_end"] += 1
            for kind, inst in live:
                if kind == "holder" and inst.id not in terminated and inst.result is None:
                    for j in range(rng.randint(0, 4) if action == "send" else rng.randint(0, 1)):
                        message = f"m{j}-{rng.randint(0, 999)}"
                        await asyncio.wait_for(inst.send(message), WAIT_S)
                        self.counts["sent"] += 1
                        event = await asyncio.wait_for(inst.recv(), WAIT_S)
                        if event.type == "output" and event.data == "holding":  # not read before
                            event = await asyncio.wait_for(inst.recv(), WAIT_S)
                        if event.type != "output" or event.data != "echo:" + message:
                            self.fail(where, f"holder {inst.id}: sent {message!r}, got {event}")
                    await asyncio.wait_for(inst.send(""), WAIT_S)  # end of input: it returns
            for kind, inst in live:
                try:
                    result = await asyncio.wait_for(inst.wait(), WAIT_S)
                except asyncio.TimeoutError:
                    self.fail(where, f"{kind} instance {inst.id} did not end within {WAIT_S:g} s (action {action})")
                    continue
                self.check_result(where, kind, inst.id, result, inst.id in terminated)
            await asyncio.wait_for(client.close(), WAIT_S)
        finally:
            if client.closed is None:
                await asyncio.wait_for(client.close(), WAIT_S)

    async def chatter(self, client, rng: random.Random, launched: set[int]) -> None:
        """Requests that launch nothing, in bursts, while the instances stream: pings, now and then a list
        and a stats (a few KB leaked per request would show in the RSS over tens of thousands)."""
        count = rng.choice(CHATTER)
        for start in range(0, count, CHATTER_BURST):
            burst = min(CHATTER_BURST, count - start)
            answers = await asyncio.wait_for(asyncio.gather(*(client.ping() for _ in range(burst))), WAIT_S)
            assert all(a["version"] == 1 for a in answers), answers[:3]
            self.counts["pings"] += burst
        if rng.random() < 0.2:
            listed = {i["instance_id"] for i in await asyncio.wait_for(client.list(), WAIT_S)}
            assert listed <= launched, (listed, launched)
            await asyncio.wait_for(client.stats(), WAIT_S)
            self.counts["lists_and_stats"] += 2

    async def read_some(self, inst, kind: str, count: int, where: str) -> None:
        if kind == "holder":
            count = min(count, 1)  # "holding", then nothing until it is sent something
        for _ in range(count):
            if inst.result is not None:
                return
            try:
                event = await asyncio.wait_for(inst.recv(), WAIT_S)
            except asyncio.TimeoutError:
                self.fail(where, f"{kind} instance {inst.id}: nothing streamed for {WAIT_S:g} s")
                return
            self.counts["events_read"] += 1
            if event.type == "done":
                return

    def check_result(self, where: str, kind: str, iid: int, result, terminated: bool) -> None:
        error = result.error
        if error is None:
            self.counts["ended_ok"] += 1
            if kind == "failer":
                self.fail(where, f"failer {iid} ended without its planned failure")
            return
        if "slow client" in error:  # the client's loop fell behind for slow_client_s: documented, counted
            self.counts["slow_client"] += 1
        elif terminated and "soak terminates" in error:
            self.counts["ended_terminated"] += 1
        elif kind == "failer" and "planned failure" in error:
            self.counts["ended_failed"] += 1
        else:
            self.fail(where, f"{kind} instance {iid} ended with an unexpected error: {error!r}")

    async def drop(self, client) -> None:
        """Drops the connection at once: a TCP reset, no close frame, nothing more read or written."""
        self.counts["drops"] += 1
        transport = client._ws._writer.transport  # aiohttp's WebSocketWriter
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        await asyncio.wait_for(asyncio.gather(client._reader, return_exceptions=True), WAIT_S)
        await client._session.close()

    # ---- a bare socket: launches, reads a few frames (or none), drops ------------------------------
    async def raw_session(self, rng: random.Random, where: str) -> None:
        self.counts["raw_sessions"] += 1
        self.counts["connections"] += 1
        host, port = "127.0.0.1", self.server.server.port
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), WAIT_S)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write((f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
            if b" 101 " not in head.split(b"\r\n")[0]:
                self.fail(where, f"raw handshake refused: {head[:200]!r}")
                return
            n = rng.randint(0, 3)
            for corr_id in range(1, n + 1):
                kind, args = self.pick(rng)
                self.counts[f"kind:{kind}"] += 1
                target = {"inferlet": kind} if kind == "text_completion" else {"program": self.digests[kind]}
                writer.write(_frame(msgpack.packb({"type": "launch", "corr_id": corr_id, "arguments": args, **target})))
            await writer.drain()
            frames = rng.choice([0, 0, 1, 3, 10, 50])
            confirmed = 0
            for _ in range(frames):
                try:
                    message = await asyncio.wait_for(_read_frame(reader), RAW_QUIET_S)
                except asyncio.TimeoutError:  # e.g. its instances wait for input: nothing more comes
                    break
                except asyncio.IncompleteReadError:
                    self.fail(where, "raw session: the server closed the connection")
                    break
                if isinstance(message, dict) and message.get("type") == "response":
                    if not message.get("ok"):
                        self.fail(where, f"raw launch refused: {message}")
                    confirmed += 1
            self.counts["launches_confirmed"] += confirmed
            self.counts["launches_unconfirmed"] += n - confirmed
        finally:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            self.counts["drops"] += 1


def _frame(payload: bytes) -> bytes:
    """One masked binary frame (a client's frames are masked)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x82, 0x80 | n])
    elif n < 1 << 16:
        head = bytes([0x82, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([0x82, 0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _read_frame(reader: asyncio.StreamReader) -> object:
    """The next data frame of the server (unmasked), decoded from msgpack (pings skipped; a close frame raises)."""
    while True:
        b0, b1 = await reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", await reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", await reader.readexactly(8))[0]
        payload = await reader.readexactly(n)
        if b0 & 0x0F == 0x2:
            return msgpack.unpackb(payload, raw=False, strict_map_key=False)
        if b0 & 0x0F == 0x8:
            raise asyncio.IncompleteReadError(payload, None)


def test_soak_many_clients_launch_stream_disconnect_and_terminate_at_random(server, pool_whole, tmp_path):
    from pie.client import PieClient

    paths = {}
    for name, source in PROGRAMS.items():
        paths[name] = tmp_path / f"soak_{name}.py"
        paths[name].write_text(source)

    async def warm_up() -> dict[str, str]:
        """Every kind once, in turn: programs uploaded, the Python runtime and the inferlet loaded."""
        async with PieClient(server.ws_url) as client:
            digests = {name: await client.upload(path) for name, path in paths.items()}
            for name, args in [("streamer", ["5"]), ("generator", ["2"]), ("failer", ["1"])]:
                await asyncio.wait_for(client.run(program=digests[name], arguments=args), WAIT_S)
            holder = await client.launch(program=digests["holder"], arguments=["2"])
            await holder.send("")
            await asyncio.wait_for(holder.wait(), WAIT_S)
            r = await asyncio.wait_for(client.run("text_completion", ["--prompt", "Hi", "--max-tokens", "2",
                                                                      "--temperature", "0"]), WAIT_S)
            assert r.ok, r.error
        return digests

    digests = asyncio.run(warm_up())
    pool_whole(60)
    before = server.stats()
    soak = Soak(server, digests, paths)
    sampler = RssSampler()

    async def main() -> None:
        soak.end = time.monotonic() + SOAK_S
        try:  # each wait is bounded by WAIT_S already: this only guards against a hang the test did not foresee
            await asyncio.wait_for(asyncio.gather(*(soak.client_loop(k) for k in range(CLIENTS))), SOAK_S + 5 * WAIT_S)
        except asyncio.TimeoutError:
            soak.fail("the clients", f"still running {5 * WAIT_S:g} s after the end of the soak")

    t0 = time.monotonic()
    soak_s = 0.0
    sampler.start()
    try:
        asyncio.run(main())
        soak_s = time.monotonic() - t0
        after_pool = whole_or_why(pool_whole, 120)
        sampler.samples.append((time.monotonic() - sampler.t0, rss_mb()))
    finally:
        sampler.stop()

    def report(extra: str = "") -> str:
        warm = [mb for t, mb in sampler.samples if t <= WARMUP_S] or [0.0]
        later = [mb for t, mb in sampler.samples if t > WARMUP_S] or [0.0]
        return (f"\nsoak seed PIE_SOAK_SEED={SEED} PIE_SOAK_S={SOAK_S:g} PIE_SOAK_CLIENTS={CLIENTS} "
                f"(ran {soak_s:.1f} s)\ncounts: {dict(sorted(soak.counts.items()))}\n"
                f"RSS MB: warm-up ({WARMUP_S:g} s) peak {max(warm):.0f}, peak after it {max(later):.0f}, "
                f"end {sampler.samples[-1][1]:.0f} (bound: warm-up peak + {RSS_GROWTH_MB})\n"
                f"RSS samples (s:MB): {sampler.summary()}\n"
                f"failures ({len(soak.failures)}):\n" + "\n".join(soak.failures[:10]) + extra)

    print(report())
    assert not soak.failures, report()
    assert isinstance(after_pool, dict), report(f"\nnot whole after 120 s: {after_pool}")

    # the counters add up
    deadline = time.monotonic() + 30
    while (stats := server.stats())["connections"] > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    inst, inst0 = stats["instances"], before["instances"]
    launched = inst["num_launched"] - inst0["num_launched"]
    msg = report(f"\nstats before: {before}\nstats after: {stats}")
    assert stats["connections"] == 0, msg
    assert inst["num_live"] == 0 and inst["num_launched"] == inst["num_finished"], msg
    assert soak.counts["launches_confirmed"] <= launched <= \
        soak.counts["launches_confirmed"] + soak.counts["launches_unconfirmed"], msg
    assert inst["num_failed"] - inst0["num_failed"] >= \
        soak.counts["ended_terminated"] + soak.counts["ended_failed"] + soak.counts["slow_client"], msg
    assert inst["num_clients_ending"] == 0, msg
    assert inst["num_clients_ended"] - inst0["num_clients_ended"] <= soak.counts["connections"], msg
    kv, sched = stats["kv_pages"], stats["scheduler"]
    # nothing held but what the /v1 routes' prefix cache keeps (earlier tests of the session filled it)
    assert kv["num_used"] == kv["num_cached"] and kv["num_pinned"] == 0, msg
    assert kv["num_free"] + kv["num_cached"] == kv["num_pages"], msg
    assert kv["num_exports"] == before["kv_pages"]["num_exports"], msg
    assert sched["num_pending"] == 0 and sched["num_in_flight"] == 0 and sched["num_queues"] == 0, msg
    resolved = ("num_completed", "num_failed", "num_cancelled")  # every command given to the engine was resolved
    assert sched["num_submitted"] - before["scheduler"]["num_submitted"] == \
        sum(sched[k] - before["scheduler"][k] for k in resolved), msg
    assert stats["num_plane_instances"] == 0, msg

    # the server still answers
    async def still_answers():
        async with PieClient(server.ws_url) as client:
            assert (await client.ping())["version"] == 1
            return await asyncio.wait_for(client.run("text_completion", ["--prompt", "Hi", "--max-tokens", "2",
                                                                         "--temperature", "0"]), WAIT_S)

    result = asyncio.run(still_answers())
    assert result.ok, (result.error, msg)
    pool_whole(60)

    # the RSS stayed within the bound
    warm = [mb for t, mb in sampler.samples if t <= WARMUP_S]
    later = [mb for t, mb in sampler.samples if t > WARMUP_S]
    assert warm and later, msg
    assert max(later) <= max(warm) + RSS_GROWTH_MB, msg
    assert soak.counts["launches_confirmed"] > 0 and soak.counts["drops"] > 0, msg


def whole_or_why(pool_whole, timeout: float):
    """The stats once the pool is whole, or the reason it is not (a string) after `timeout`."""
    try:
        return pool_whole(timeout)
    except AssertionError as e:
        return str(e)
