"""Serving benchmark (on demand, not in CI): `pie serve`'s OpenAI endpoint against the embedded path.

1. /v1/chat/completions at 1 / 16 / 64 concurrent clients (the official `openai` AsyncOpenAI client over
   loopback), each client sending requests one after another: latency (mean, p50, p90) and aggregate
   generated tokens/s; the same requests run through the embedded path (Runtime.launch of the same
   openai_chat inferlet on threads, no HTTP) at the same concurrency.
2. The baseline agentic workflow, as users of vLLM / SGLang run it: a client-orchestrated, multi-turn,
   tool-using loop through the OpenAI endpoint (each turn: a chat completion; the client parses a
   `CALL tool(arg)` line or falls back to the script's next tool, runs the tool locally, appends the
   result as a `tool` message and asks again). The inferlet version of such a workflow (the examples
   issue) is measured against this.

    python benchmarks/server/bench_server.py [--concurrency 1 16 64] [--max-tokens 16] [--turns 4]

Prints a table and writes benchmarks/results/server.json and server.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import statistics
import threading
import time
from pathlib import Path

PROMPTS = ["What is the capital of France?", "Name three colors.", "What is 2 plus 2?", "Say hello to a friend.",
           "Why is the sky blue?", "Give me a fruit.", "What is water made of?", "Name a planet."]

TOOLS = {
    "calc": lambda arg: str(eval(arg, {"__builtins__": {}}, {})) if re.fullmatch(r"[\d+\-*/ ().]+", arg) else "error",
    "lookup": lambda arg: {"paris": "Paris is the capital of France (2.1 million people)."}.get(arg.lower().strip(),
                                                                                               f"no entry for {arg}"),
    "weather": lambda arg: f"The weather in {arg} is sunny, 21 C.",
}
SCRIPT = [("lookup", "Paris"), ("calc", "2100000 / 105"), ("weather", "Paris"), ("calc", "21 * 9 / 5 + 32")]
SYSTEM = ("You are an agent with tools. To use one, answer with one line `CALL name(argument)`. Tools: calc "
          "(arithmetic), lookup (facts about a city), weather (a city's weather). When you know the answer, "
          "answer with `FINAL: ...`.")


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def summary(latencies: list[float], tokens: int, wall: float) -> dict:
    return {"requests": len(latencies), "mean_s": statistics.mean(latencies), "p50_s": percentile(latencies, 0.5),
            "p90_s": percentile(latencies, 0.9), "tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
            "req_per_s": len(latencies) / wall}


def spec(prompt: str, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0.0,
            "top_p": 1.0, "seed": None, "stop": [], "logprobs": False, "top_logprobs": 0, "json_schema": None}


async def bench_http(base_url: str, model: str, concurrency: int, per_client: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    latencies: list[float] = []
    tokens = 0

    async def one_client(c: int) -> None:
        nonlocal tokens
        for r in range(per_client):
            t0 = time.perf_counter()
            resp = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": PROMPTS[(c + r) % len(PROMPTS)]}],
                temperature=0, max_tokens=max_tokens)
            latencies.append(time.perf_counter() - t0)
            tokens += resp.usage.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return summary(latencies, tokens, wall)


def bench_embedded(runtime, concurrency: int, per_client: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()

    def one_client(c: int) -> None:
        nonlocal tokens
        for r in range(per_client):
            t0 = time.perf_counter()
            res = runtime.run("openai_chat", [json.dumps(spec(PROMPTS[(c + r) % len(PROMPTS)], max_tokens))])
            dt = time.perf_counter() - t0
            assert res.error is None, res.error
            final = json.loads(res.output[res.output.rindex('{"text"'):])
            with lock:
                latencies.append(dt)
                tokens += final["completion_tokens"]

    threads = [threading.Thread(target=one_client, args=(c,)) for c in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(latencies, tokens, time.perf_counter() - t0)


async def bench_workflow(base_url: str, model: str, num_workflows: int, turns: int, max_tokens: int) -> dict:
    """Client-orchestrated agent loops through the OpenAI endpoint."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    call = re.compile(r"CALL\s+(\w+)\((.*?)\)")
    per_workflow: list[float] = []
    num_requests = 0
    tokens = 0
    tool_calls_parsed = 0

    async def workflow(w: int) -> None:
        nonlocal num_requests, tokens, tool_calls_parsed
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": "How many people live in Paris per square km (105 km2), and what "
                                                "is the weather there in Fahrenheit?"}]
        t0 = time.perf_counter()
        for turn in range(turns):
            resp = await client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                        max_tokens=max_tokens)
            num_requests += 1
            tokens += resp.usage.completion_tokens
            reply = resp.choices[0].message.content
            messages.append({"role": "assistant", "content": reply})
            m = call.search(reply)
            if m and m.group(1) in TOOLS:
                tool_calls_parsed += 1
                name, arg = m.group(1), m.group(2)
            else:  # a small model rarely follows the format: the script's next call keeps the shape
                name, arg = SCRIPT[turn % len(SCRIPT)]
            messages.append({"role": "tool", "content": f"{name}({arg}) = {TOOLS[name](arg)}"})
        resp = await client.chat.completions.create(model=model, messages=messages + [
            {"role": "user", "content": "Now give the FINAL answer."}], temperature=0, max_tokens=max_tokens)
        num_requests += 1
        tokens += resp.usage.completion_tokens
        per_workflow.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(workflow(w) for w in range(num_workflows)))
    wall = time.perf_counter() - t0
    await client.close()
    return {"workflows": num_workflows, "turns": turns, "requests": num_requests, "tokens": tokens,
            "tool_calls_parsed": tool_calls_parsed, "mean_workflow_s": statistics.mean(per_workflow),
            "p90_workflow_s": percentile(per_workflow, 0.9), "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--workflows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--workflow-max-tokens", type=int, default=24)
    p.add_argument("--kv-cache-mb", type=int, default=512)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "server"))
    args = p.parse_args()

    from pie.server import ServerThread, load_config
    from pie.server.app import build_runtime

    cfg = load_config().replace(server={"port": 0}, model={"kv_cache_mb": args.kv_cache_mb})
    runtime = build_runtime(cfg, progress=False)
    srv = ServerThread(cfg, runtime=runtime).start()
    base = srv.url + "/v1"
    model = srv.server.model_name
    runtime.run("openai_chat", [json.dumps(spec("warm up", 2))])  # compile / page in once
    rows = []
    try:
        for c in args.concurrency:
            http = asyncio.run(bench_http(base, model, c, args.requests_per_client, args.max_tokens))
            emb = bench_embedded(runtime, c, args.requests_per_client, args.max_tokens)
            rows.append({"concurrency": c, "http": http, "embedded": emb})
            print(f"c={c}: http {http['mean_s']:.3f} s mean, {http['tok_per_s']:.1f} tok/s; "
                  f"embedded {emb['mean_s']:.3f} s, {emb['tok_per_s']:.1f} tok/s", flush=True)
        flows = [asyncio.run(bench_workflow(base, model, w, args.turns, args.workflow_max_tokens))
                 for w in args.workflows]
    finally:
        srv.stop()
        runtime.close()

    lines = [f"# pie serve: OpenAI endpoint vs embedded ({platform.processor() or platform.machine()}, "
             f"{model}, max_tokens {args.max_tokens}, {args.requests_per_client} requests per client)", "",
             "| clients | HTTP mean s | HTTP p90 s | HTTP tok/s | embedded mean s | embedded p90 s | embedded tok/s "
             "| HTTP / embedded latency |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h, e = r["http"], r["embedded"]
        lines.append(f"| {r['concurrency']} | {h['mean_s']:.3f} | {h['p90_s']:.3f} | {h['tok_per_s']:.1f} | "
                     f"{e['mean_s']:.3f} | {e['p90_s']:.3f} | {e['tok_per_s']:.1f} | {h['mean_s'] / e['mean_s']:.2f}x |")
    lines += ["", f"Client-orchestrated tool-using workflow ({args.turns} tool turns + a final answer, "
                  f"max_tokens {args.workflow_max_tokens}):", "",
              "| workflows at once | requests | mean workflow s | p90 workflow s | wall s | tool calls parsed |",
              "|---|---|---|---|---|---|"]
    for f in flows:
        lines.append(f"| {f['workflows']} | {f['requests']} | {f['mean_workflow_s']:.2f} | {f['p90_workflow_s']:.2f} | "
                     f"{f['wall_s']:.2f} | {f['tool_calls_parsed']} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "chat": rows, "workflow": flows}, indent=1))
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
