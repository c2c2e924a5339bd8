"""End to end, SmolLM2-135M on the CPU, greedy, EOS ignored:

- TPOT of `pie generate`'s loop (pie.control.generate.generate_batch, what the CLI runs) and of the
  bundled `text_completion` inferlet (`pie run text_completion`), by the slope method: per round, one
  generation of SHORT and one of LONG tokens back to back, TPOT = (t(LONG) - t(SHORT)) / (LONG - SHORT),
  so that launch and prefill cancel out (reported clock; as benchmarks/runtime/bench_forward_path.py).
- /v1/chat/completions of `pie serve` (aiohttp over loopback, max_tokens 8): the latency of one request
  with 1 client, and the mean latency of 16 clients' requests sent at once (reported clock).
"""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from pie_bench import REPORTED, measure_reported, ops

PROMPT = "Write a long story about a lighthouse keeper."
SHORT, LONG = 4, 20


def slope(run) -> float:
    t = time.perf_counter()
    run(SHORT)
    t_short = time.perf_counter() - t
    t = time.perf_counter()
    run(LONG)
    t_long = time.perf_counter() - t
    return (t_long - t_short) / (LONG - SHORT)


@REPORTED
def test_tpot_pie_generate(benchmark, model):
    from pie.control.generate import GenerationParams, generate_batch

    ids = model.prompt_ids(PROMPT)

    def run(tokens: int) -> None:
        [g] = generate_batch(model, [ids], GenerationParams(max_tokens=tokens, temperature=0, ignore_eos=True))
        assert len(g.token_ids) == tokens

    ops(benchmark, 1, "token")
    measure_reported(benchmark, lambda: slope(run), rounds=9)


@REPORTED
def test_tpot_text_completion(benchmark, runtime):
    def run(tokens: int) -> None:
        r = runtime.run("text_completion", ["--prompt", PROMPT, "--temperature", "0", "--ignore-eos",
                                            "--max-tokens", str(tokens)])
        assert r.error is None, r.error

    ops(benchmark, 1, "token")
    measure_reported(benchmark, lambda: slope(run), rounds=9)


# ---- the OpenAI endpoint ----------------------------------------------------------------------------------
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 plus 2?", "Say hello to a friend.",
             "Why is the sky blue?", "Give me a fruit.", "What is water made of?", "Name a planet."]


async def _latencies(server, clients: int, max_tokens: int = 8) -> list[float]:
    import aiohttp

    url = server.url + "/v1/chat/completions"
    token = server.server.config.auth.token
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def one(session, i: int) -> float:
        body = {"model": server.server.model_name, "messages": [{"role": "user", "content": QUESTIONS[i % 8]}],
                "max_tokens": max_tokens, "temperature": 0}
        t = time.perf_counter()
        async with session.post(url, json=body, headers=headers) as resp:
            reply = await resp.json()
            assert resp.status == 200, reply
        assert reply["usage"]["completion_tokens"] >= 1, reply
        return time.perf_counter() - t

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        return list(await asyncio.gather(*(one(session, i) for i in range(clients))))


@REPORTED
@pytest.mark.parametrize("clients", [1, 16])
def test_chat_completions_latency(benchmark, server, clients):
    ops(benchmark, 1, "request")
    measure_reported(benchmark, lambda: statistics.mean(asyncio.run(_latencies(server, clients))),
                     rounds=11 if clients == 1 else 7)
