"""Shared pieces of the evaluation (benchmarks/eval/run_eval.py).

- `Stack`: one Model, one Runtime over it (the embedded path: inferlets launched in process) and one
  ServerThread serving that same Runtime (the endpoint path: the OpenAI-compatible API, every request an
  instance of `openai_chat` on the same scheduler and KV pool). Baseline and inferlet therefore share
  model, scheduler and pages; they only run one after the other.
- `Meter`: wall time and the engine's work (tokens computed = prefill + decode inputs, forward passes)
  over a block, from `model.runner` counter deltas; and how many cores' worth of CPU other processes
  took meanwhile (/proc/stat minus this process: the machine is shared with other workers).
- `launch_all`: starts instances at once on the embedded path and records each one's latency.
- `Endpoint`: the client side, the official `openai` AsyncOpenAI client over loopback (what a user of
  vLLM / SGLang writes), counting requests and completion tokens.
- `ToolServer`: the loopback tool server (POST /calculator, POST /lookup) that both sides call.
"""

from __future__ import annotations

import ast
import http.server
import json
import operator
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence


# ---- statistics -------------------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def latency_summary(latencies: Sequence[float], wall: float, **extra: Any) -> dict:
    return {"n": len(latencies), "mean_s": statistics.mean(latencies), "p50_s": percentile(latencies, 0.5),
            "p90_s": percentile(latencies, 0.9), "wall_s": wall, "per_min": 60.0 * len(latencies) / wall, **extra}


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, incl. steal; CPU seconds of this process)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    t = os.times()
    return busy, t.user + t.system


class CpuWatch:
    """How many cores' worth of CPU *other* processes used over an interval (the machine is shared)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.busy0, self.self0 = cpu_seconds()

    def others_cores(self) -> float:
        busy, mine = cpu_seconds()
        wall = max(time.perf_counter() - self.t0, 1e-9)
        return max(0.0, (busy - self.busy0) - (mine - self.self0)) / wall


def machine() -> dict:
    from pie.engine.machine import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


# ---- engine counters ----------------------------------------------------------------------------------------

class Meter:
    """with Meter(model) as m: ...  ->  m.wall, m.tokens (computed by the model), m.passes, m.others
    (cores' worth of CPU used by other processes meanwhile)."""

    def __init__(self, model: Any):
        self.runner = model.runner

    def __enter__(self) -> "Meter":
        self.cpu = CpuWatch()
        self.tokens0, self.passes0 = self.runner.num_tokens_processed, self.runner.num_forward_passes
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.tokens = self.runner.num_tokens_processed - self.tokens0
        self.passes = self.runner.num_forward_passes - self.passes0
        self.others = self.cpu.others_cores()

    def record(self) -> dict:
        return {"wall_s": self.wall, "tokens_computed": self.tokens, "forward_passes": self.passes,
                "other_processes_cores": round(self.others, 2)}


# ---- the stack: model, embedded runtime, endpoint -------------------------------------------------------------

class Stack:
    def __init__(self, model: Any, http_allow: Sequence[str] = ()):
        from pie.runtime import Runtime, RuntimeConfig
        from pie.server import ServerThread, load_config

        self.model = model
        self.runtime = Runtime(model, RuntimeConfig(deadline_s=900, http_allow=tuple(http_allow)))
        self.runtime.python_runtime()
        self.config = load_config().replace(server={"port": 0})
        self.server = ServerThread(self.config, runtime=self.runtime).start()  # prefix caching on (the default)
        self.base_url = self.server.url + "/v1"
        # the same runtime behind a second endpoint without prefix caching: the baseline as it was before
        self.plain_server = ServerThread(self.config.replace(openai={"prefix_caching": False}),
                                         runtime=self.runtime).start()
        self.plain_url = self.plain_server.url + "/v1"
        self.model_name = self.server.server.model_name
        self.api_key = self.config.auth.token or "unused"
        self.tokenizer = self.runtime.tokenizer

    def chat_text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text an inferlet's `inferlet.chat_prompt(messages)` renders (the model's template)."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def close(self) -> None:
        self.server.stop()
        self.plain_server.stop()
        self.runtime.close()


@dataclass
class Launched:
    latency_s: float
    output: str
    log: str
    return_value: str | None

    def json(self) -> dict:
        lines = [l for l in self.output.splitlines() if l.startswith("{")]
        return json.loads(lines[-1])


def launch_all(runtime: Any, jobs: Sequence[tuple[str, list[str], dict]], timeout: float = 900) -> list[Launched]:
    """Launches every (inferlet, args, launch kwargs) at once on the embedded path; waits for all. Each
    latency is from that instance's launch to its end. Raises on an instance error (the first error
    terminates the others: cooperating instances would otherwise wait for it until their deadline)."""
    ends: dict[int, float] = {}
    starts, insts = [], []

    def done(k: int, result: Any) -> None:
        ends[k] = time.perf_counter()
        if result.error is not None:
            for other in list(insts):
                if not other.done.is_set():
                    other.terminate(f"another instance of the job failed: {result.error}")

    try:
        for k, (name, args, kwargs) in enumerate(jobs):
            starts.append(time.perf_counter())
            insts.append(runtime.launch(name, [str(a) for a in args], on_done=lambda r, k=k: done(k, r), **kwargs))
    except Exception:
        for i in insts:
            i.terminate("the job could not be launched")
        raise
    results = [i.wait(timeout) for i in insts]
    out = []
    for k, r in enumerate(results):
        if r.error is not None:
            raise RuntimeError(f"{jobs[k][0]} failed: {r.error}\n{r.output[-2000:]}\n{r.log[-2000:]}")
        out.append(Launched(ends.get(k, time.perf_counter()) - starts[k], r.output, r.log, r.return_value))
    return out


# ---- the client side: the OpenAI endpoint ------------------------------------------------------------------------

@dataclass
class Endpoint:
    """An AsyncOpenAI client (create inside the event loop that uses it) plus request / token counts."""

    base_url: str
    model: str
    api_key: str = "unused"
    requests: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    client: Any = field(default=None, repr=False)

    async def __aenter__(self) -> "Endpoint":
        import openai

        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=0, timeout=900)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    def _count(self, resp: Any) -> None:
        self.requests += 1
        self.completion_tokens += resp.usage.completion_tokens
        self.prompt_tokens += resp.usage.prompt_tokens

    async def complete(self, prompt: str, max_tokens: int, *, temperature: float = 0.0, stop: Sequence[str] = (),
                       logprobs: int | None = None, n: int = 1, seed: int | None = None) -> Any:
        """/v1/completions on raw text (the client keeps the transcript and resends all of it)."""
        kwargs: dict[str, Any] = {}
        if stop:
            kwargs["stop"] = list(stop)
        if logprobs is not None:
            kwargs["logprobs"] = logprobs
        if seed is not None:
            kwargs["seed"] = seed
        resp = await self.client.completions.create(model=self.model, prompt=prompt, max_tokens=max_tokens,
                                                    temperature=temperature, n=n, **kwargs)
        self._count(resp)
        return resp

    async def chat(self, messages: list[dict], max_tokens: int, *, stop: Sequence[str] = ()) -> str:
        """/v1/chat/completions, greedy; the reply's text."""
        kwargs = {"stop": list(stop)} if stop else {}
        resp = await self.client.chat.completions.create(model=self.model, messages=messages, temperature=0,
                                                         max_tokens=max_tokens, **kwargs)
        self._count(resp)
        return resp.choices[0].message.content or ""


# ---- the tool server ------------------------------------------------------------------------------------------

FACTS = {
    "paris": "Paris is the capital of France; about 2.1 million people live there.",
    "rome": "Rome is the capital of Italy; about 2.8 million people live there.",
    "berlin": "Berlin is the capital of Germany; about 3.7 million people live there.",
    "madrid": "Madrid is the capital of Spain; about 3.3 million people live there.",
}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def arithmetic(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return arithmetic(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](arithmetic(node.left), arithmetic(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](arithmetic(node.operand))
    raise ValueError("not an arithmetic expression")


class _ToolHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        arg = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        try:
            if self.path == "/calculator":
                status, reply = 200, str(arithmetic(ast.parse(arg, mode="eval")))
            elif self.path == "/lookup":
                status, reply = 200, FACTS.get(arg.strip().lower(), f"no entry for {arg.strip()}")
            else:
                status, reply = 404, "no such tool"
        except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as e:
            status, reply = 400, f"bad expression: {e}"
        body = reply.encode()
        with self.server.lock:
            self.server.calls += 1
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class ToolServer:
    """POST /calculator (an arithmetic expression) and POST /lookup (a city) on 127.0.0.1, a thread each."""

    def __init__(self) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ToolHandler)
        self.httpd.daemon_threads = True
        self.httpd.calls = 0
        self.httpd.lock = threading.Lock()
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="eval-tools", daemon=True)
        self.thread.start()

    @property
    def calls(self) -> int:
        return self.httpd.calls

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
