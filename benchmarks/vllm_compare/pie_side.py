"""Pie's side of the scheduler comparison: N decoding sequences through our control layer, no model.

Runs under the project venv:

    .venv/bin/python benchmarks/vllm_compare/pie_side.py --n 1 32 128 512

The same work as vllm_side.py (N running sequences; each decode step = schedule + one sampled token
per sequence + bookkeeping), in two ways, each measured as CPU time of the whole process (every
thread) and wall time per decode step:

- ``control``: the control layer alone, driven the way pie.control.generate drives it (an ordinary
  Python client of the plane), with one instance per sequence: each sequence has its own instance,
  command queue and KV pages in the runner's PagePool. Each step every sequence builds its one-token
  ForwardCommand (allocating a page from the pool when its last page is full), submits it to its
  queue; the adaptive scheduler batches the N commands; the batch loop runs them on the real
  ForwardHandler (pack_forward, then write_batch_outputs, one call each per batch) over a runner with no model that answers every
  output with one token; the client waits on the N futures and appends each token.
- ``guests``: the same, with the inferlets in the loop: N Python inferlets (wasm guests of the
  Runtime, each its own instance on its own thread) each decode through the WIT API (kv.allocate,
  forward.submit, forward.wait), the runtime's host functions submitting into the same control
  plane, over the same model-less runner. Measured in the steady state of decoding (all N guests
  past their prefill), from timestamps the runner takes at every batch: CPU per decode command,
  times N.

Pages hold 16 tokens (vLLM's default block size); prompts are 64 tokens, prefilled in one pass first.

With --serve it answers one measurement per stdin line ({"mode", "n", "steps", "blocks"}) with one
JSON line, so that run.py can alternate it with the vLLM side; otherwise it prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout this file is in

import pie  # noqa: E402,F401  (first: its environment defaults)
from worker_protocol import default_steps, protocol_stdout  # noqa: E402  (this file's folder)
from pie.control import (  # noqa: E402
    ControlPlane,
    ForwardCommand,
    ForwardOutput,
    Sampler,
    SamplerKind,
    SchedulerConfig,
)

PAGE_SIZE = 16
VOCAB = 32000
TOKEN = 7  # what the model-less runner samples (not an EOS: the sequences run on)


class ModellessRunner:
    """A model runner's interface (what ControlPlane.serving and the Runtime read) with no model: `run_batch`
    answers every output of the batch with TOKEN. Records (wall, process CPU, requests, decode
    requests) at every batch when `stamps` is a list."""

    def __init__(self, num_pages: int, max_batch_requests: int, max_batch_tokens: int):
        self.vocab_size = VOCAB
        self.page_size = PAGE_SIZE
        self.num_pages = num_pages
        self.max_batch_requests = max_batch_requests
        self.max_batch_tokens = max_batch_tokens
        self.max_position = 0
        self.embeddings = None
        self.model_config = SimpleNamespace(architecture="ModellessForCausalLM", num_layers=1, vocab_size=VOCAB,
                                            eos_token_ids=[])
        self.stamps: list | None = None
        self.gate: threading.Event | None = None  # while set to an unset Event, batches wait for it

    def embed_tokens(self, token_ids):  # no guest here embeds text
        raise NotImplementedError("the model-less runner has no embeddings")

    def run_batch(self, batch):
        if self.gate is not None:
            self.gate.wait()
        if self.stamps is not None:
            decode = batch.qo_lens.count(1)
            self.stamps.append((time.perf_counter(), time.process_time(), batch.num_requests, decode))
        return [TOKEN] * len(batch.output_rows)


class ModellessModel:
    """What the Runtime reads of a pie.engine.Model: runner, tokenizer (unused here), name, EOS ids."""

    def __init__(self, runner: ModellessRunner):
        self.runner = runner
        self.tokenizer = None
        self.name = "modelless"
        self.eos_ids = frozenset()


def prompt_tokens(run: int, i: int, length: int) -> list[int]:
    return [(run * 7919 + i * 104729 + j) % (VOCAB - 10) + 10 for j in range(length)]


# ---- the control layer alone ----------------------------------------------------------------------
class Sequence:
    __slots__ = ("instance", "queue", "tokens", "handles", "pages", "num_cached")

    def __init__(self, instance: int, queue, tokens: list[int]):
        self.instance, self.queue, self.tokens = instance, queue, tokens
        self.handles: list[int] = []
        self.pages: list[int] = []
        self.num_cached = 0


GREEDY = Sampler(SamplerKind.GREEDY)


class ControlBench:
    """A plane over a model-less runner (its own pools), driven by one Python client thread."""

    def __init__(self, num_pages: int, max_batch: int, max_tokens: int, scheduler: SchedulerConfig):
        self.runner = ModellessRunner(num_pages, max_batch, max_tokens)
        self.plane = ControlPlane.serving(self.runner, scheduler).start()
        self.limits = self.plane.limits
        self._run = 0

    def close(self) -> None:
        self.plane.stop("benchmark done")

    def _command(self, s: Sequence) -> ForwardCommand:
        """The sequence's next pass (as pie.control.generate._next_command): its uncached tokens, a new
        page from the pool when the last one is full, one greedy output at the end."""
        end = len(s.tokens)
        num_pages = -(-end // PAGE_SIZE)
        if num_pages > len(s.handles):
            kv = self.plane.kv_pages
            new = kv.allocate(s.instance, num_pages - len(s.handles))
            s.handles += new
            s.pages += kv.resolve(s.instance, new)
        start = s.num_cached
        return ForwardCommand(s.tokens[start:end], range(start, end), s.pages, end - (num_pages - 1) * PAGE_SIZE,
                              outputs=[ForwardOutput(end - start - 1, GREEDY)])

    def step(self, seqs: list[Sequence]) -> None:
        """One decode step of every sequence: build, submit, wait, append (and allocate)."""
        limits = self.limits
        commands = [self._command(s) for s in seqs]
        futures = [s.queue.submit_forward(c, limits) for s, c in zip(seqs, commands)]
        for f in futures:
            f.result()
        for s, c in zip(seqs, commands):
            s.num_cached += c.num_tokens
            s.tokens.append(c.results[0].ids[0])

    def measure(self, n: int, steps: int, blocks: int, prompt_len: int) -> dict:
        self._run += 1
        plane = self.plane
        seqs = []
        for i in range(n):
            instance = plane.open_instance()
            seqs.append(Sequence(instance, plane.create_queue(instance), prompt_tokens(self._run, i, prompt_len)))
        self.step(seqs)  # the prefill pass
        for _ in range(3):  # warm: the scheduler's high water reaches N
            self.step(seqs)
        batches0, commands0 = plane.loop.num_batches, plane.loop.num_commands
        cpu, wall = [], []
        for _ in range(blocks):
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(steps):
                self.step(seqs)
            c1, w1 = time.process_time(), time.perf_counter()
            cpu.append((c1 - c0) / steps)
            wall.append((w1 - w0) / steps)
        num_batches = plane.loop.num_batches - batches0
        mean_batch = (plane.loop.num_commands - commands0) / max(num_batches, 1)
        assert all(len(s.tokens) == prompt_len + 4 + steps * blocks for s in seqs)
        used = plane.kv_pages.stats()
        for s in seqs:
            plane.end_instance(s.instance, "done")
        return {"mode": "control", "n": n, "steps": steps, "blocks": blocks, "cpu_s_per_step": cpu,
                "wall_s_per_step": wall, "mean_batch": mean_batch, "kv_stats": _small(used)}

    def breakdown(self, prompt_len: int, count: int = 128, repeats: int = 21) -> dict:
        """CPU time per command of the Python pieces of one control-layer decode step, each alone: the
        client building a one-token ForwardCommand, the ForwardHandler's execute over a batch of `count`
        (pack_forward, the model-less run, write_batch_outputs), the client reading the token from the result."""
        from pie.control.handlers import ForwardHandler

        plane = self.plane
        instance = plane.open_instance()
        seq = Sequence(instance, plane.create_queue(instance), prompt_tokens(0, 0, prompt_len))
        self.step([seq])
        handler = ForwardHandler(self.runner)
        commands = [self._command(seq) for _ in range(count)]
        handler.execute(commands)

        def per_command(fn) -> float:  # the median of `repeats` timings of `count` calls
            times = []
            for _ in range(repeats):
                c = time.process_time()
                fn()
                times.append((time.process_time() - c) / count)
            return statistics.median(times) * 1e6

        result = {
            "build_command_us": per_command(lambda: [self._command(seq) for _ in range(count)]),
            "handler_execute_us": per_command(lambda: handler.execute(commands)),
            "read_result_us": per_command(lambda: [c.results[0].ids[0] for c in commands]),
        }
        plane.end_instance(instance, "done")
        return result


def _small(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if isinstance(v, (int, float))}


# ---- with the inferlet guests in the loop ---------------------------------------------------------
GUEST = """
import sys
from wit_world.imports import forward as F, kv, runtime
run, index, prompt_len, steps = (int(a) for a in sys.argv[1:5])
page_size = kv.page_size()
tokens = [(run * 7919 + index * 104729 + j) % 31990 + 10 for j in range(prompt_len)]
pages = kv.allocate(-(-prompt_len // page_size))
greedy = [F.Sampler_Greedy()]
# the prefill pass; then wait for every guest to be there
last = F.wait(F.submit(0, F.ForwardPass(tokens, [], list(range(prompt_len)), pages,
                                        prompt_len - (len(pages) - 1) * page_size, [], [prompt_len - 1], greedy,
                                        [])))
tokens.append(last[0].ids[0])
runtime.send("ready")
runtime.receive()
# one-token passes: a new page when the last one is full
for _ in range(steps):
    n = len(tokens)
    if n > len(pages) * page_size:
        pages += kv.allocate(1)
    out = F.wait(F.submit(0, F.ForwardPass([tokens[-1]], [], [n - 1], pages, n - (len(pages) - 1) * page_size, [],
                                           [0], greedy, [])))
    tokens.append(out[0].ids[0])
runtime.send(str(len(tokens)))
"""


def decode_window(stamps: list, n: int, steps: int, blocks: int, margin: int) -> tuple[list, list, list]:
    """(CPU per step, wall per step, mean batch) of each of `blocks` windows of `steps` decode steps of
    the N sequences, skipping `margin` steps of every sequence at each end, from the runner's stamps
    (wall, process CPU, requests, decode requests) at every batch: CPU per decode command, times N."""
    cum, total = [], 0
    for _, _, _, decode in stamps:
        total += decode
        cum.append(total)
    cpu, wall, sizes = [], [], []
    per_block = steps * n
    lo = next(i for i, c in enumerate(cum) if c >= margin * n)
    for _ in range(blocks):
        hi = next((i for i in range(lo, len(cum)) if cum[i] >= cum[lo] + per_block), len(cum) - 1)
        commands = cum[hi] - cum[lo]  # the decode commands of batches lo+1..hi, run between the stamps
        cpu.append((stamps[hi][1] - stamps[lo][1]) / commands * n)
        wall.append((stamps[hi][0] - stamps[lo][0]) / commands * n)
        sizes.append(commands / max(hi - lo, 1))
        lo = hi
    return cpu, wall, sizes


class GuestBench:
    """A Runtime over a model-less model; N Python guests decode through the WIT API."""

    def __init__(self, num_pages: int, max_batch: int, max_tokens: int, scheduler: SchedulerConfig):
        from pie.runtime import Runtime, RuntimeConfig

        self.runner = ModellessRunner(num_pages, max_batch, max_tokens)
        self.rt = Runtime(ModellessModel(self.runner), RuntimeConfig(deadline_s=0, scheduler=scheduler))
        self.rt.python_runtime()
        self._run = 0
        self.measure(2, 10, 1, 16, margin=2)  # warm: the component loaded, a first launch

    def close(self) -> None:
        self.rt.close()

    def measure(self, n: int, steps: int, blocks: int, prompt_len: int, margin: int = 4) -> dict:
        """N guests each prefill, wait until all N have, then decode `2 * margin + steps * blocks` steps
        together; the window is the `steps * blocks` decode steps per guest in the middle, cut into
        `blocks` equal parts, timed by the runner's stamps at every batch."""
        self._run += 1
        decode_steps = steps * blocks + 2 * margin
        ready = threading.Semaphore(0)
        outputs: list[str] = []

        def on_output(message: str) -> None:
            if message == "ready":
                ready.release()
            else:
                outputs.append(message)

        t = time.perf_counter()
        instances = [self.rt.launch_source(GUEST, [str(self._run), str(i), str(prompt_len), str(decode_steps)],
                                           filename="decode_guest.py", on_output=on_output) for i in range(n)]
        for _ in range(n):
            if not ready.acquire(timeout=600):
                raise RuntimeError("a guest did not get through its prefill")
        launched = time.perf_counter() - t
        self.runner.stamps = stamps = []
        for inst in instances:
            inst.send("go")
        return {**self._finish("guests", instances, outputs, stamps, n, steps, blocks, prompt_len, margin),
                "launch_and_prefill_s": launched}

    def _finish(self, mode: str, instances: list, outputs: list[str], stamps: list, n: int, steps: int,
                blocks: int, prompt_len: int, margin: int) -> dict:
        """Waits for the guests (each printed its final length), then the decode windows of the stamps."""
        decode_steps = steps * blocks + 2 * margin
        results = [inst.wait(1200) for inst in instances]
        self.runner.stamps = self.runner.gate = None
        for inst in instances:  # their threads' cleanup (Stores dropped) done before the next measurement
            thread = getattr(inst, "_thread", None)
            if thread is not None:
                thread.join(60)
        instances.clear()
        gc.collect()
        for r in results:
            assert r.error is None, r.error
        assert outputs == [str(prompt_len + 1 + decode_steps)] * n, outputs[:3]
        assert sum(decode for _, _, _, decode in stamps) == n * decode_steps
        cpu, wall, sizes = decode_window(stamps, n, steps, blocks, margin)
        return {"mode": mode, "n": n, "steps": steps, "blocks": blocks, "cpu_s_per_step": cpu,
                "wall_s_per_step": wall, "mean_batch": statistics.mean(sizes), "batches": len(stamps)}


# ---- the decode loop on the host: generation streams ------------------------------------------------
class StreamBench:
    """N generation streams over the model-less runner, one instance and queue each (pie generate's way,
    and what Context.generate hands to the host): the control layer runs every step, with no client
    work per token. Batches wait at a gate until every stream has started, so that the timed window
    is the steady state of N sequences."""

    def __init__(self, num_pages: int, max_batch: int, max_tokens: int, scheduler: SchedulerConfig):
        self.runner = ModellessRunner(num_pages, max_batch, max_tokens)
        self.plane = ControlPlane.serving(self.runner, scheduler).start()
        self._run = 0

    def close(self) -> None:
        self.plane.stop("benchmark done")

    def measure(self, n: int, steps: int, blocks: int, prompt_len: int, margin: int = 4) -> dict:
        self._run += 1
        decode_steps = steps * blocks + 2 * margin
        plane = self.plane
        self.runner.gate = gate = threading.Event()
        self.runner.stamps = stamps = []
        instances, streams = [], []
        for i in range(n):
            instances.append(plane.open_instance())
            streams.append(plane.start_stream(instances[-1], plane.create_queue(instances[-1]),
                                              pending=prompt_tokens(self._run, i, prompt_len), num_cached=0,
                                              handles=[], sampler=GREEDY, max_tokens=decode_steps + 1))
        gate.set()
        for stream in streams:
            assert stream.wait(600), "a stream did not end"
        self.runner.stamps = self.runner.gate = None
        for stream in streams:
            end = stream.poll()
            assert end["end"] == "length" and len(stream.generated) == decode_steps + 1, end
        for instance in instances:
            plane.end_instance(instance, "done")
        assert sum(decode for _, _, _, decode in stamps) == n * decode_steps
        cpu, wall, sizes = decode_window(stamps, n, steps, blocks, margin)
        return {"mode": "streams", "n": n, "steps": steps, "blocks": blocks, "cpu_s_per_step": cpu,
                "wall_s_per_step": wall, "mean_batch": statistics.mean(sizes), "batches": len(stamps)}


STREAM_GUEST = """
import sys
from wit_world.imports import generation as G, forward as F, runtime
run, index, prompt_len, steps = (int(a) for a in sys.argv[1:5])
tokens = [(run * 7919 + index * 104729 + j) % 31990 + 10 for j in range(prompt_len)]
runtime.send("ready")
runtime.receive()
s = G.start(G.StreamParams(pending=tokens, num_cached=0, pages=[], sampler=F.Sampler_Greedy(),
                           stop=G.StopConditions(eos=False, stop_tokens=[], stop_strings=[], max_tokens=steps + 1),
                           grammar=None, top_logprobs=0, queue=0))
runtime.send("started")
chunk = G.finish(s)  # one call for the whole generation
runtime.send(str(prompt_len + len(chunk.tokens)))
"""


class GuestStreamBench(GuestBench):
    """N Python guests, each handing its decode loop to the host (generation.start, then one
    generation.finish): the runtime and control layer per step when inferlets generate on streams."""

    def measure(self, n: int, steps: int, blocks: int, prompt_len: int, margin: int = 4) -> dict:
        self._run += 1
        decode_steps = steps * blocks + 2 * margin
        ready, started = threading.Semaphore(0), threading.Semaphore(0)
        outputs: list[str] = []

        def on_output(message: str) -> None:
            if message == "ready":
                ready.release()
            elif message == "started":
                started.release()
            else:
                outputs.append(message)

        instances = [self.rt.launch_source(STREAM_GUEST, [str(self._run), str(i), str(prompt_len), str(decode_steps)],
                                           filename="stream_guest.py", on_output=on_output) for i in range(n)]
        for _ in range(n):
            if not ready.acquire(timeout=600):
                raise RuntimeError("a guest did not start")
        self.runner.gate = gate = threading.Event()
        self.runner.stamps = stamps = []
        for inst in instances:
            inst.send("go")
        for _ in range(n):
            if not started.acquire(timeout=600):
                raise RuntimeError("a guest did not start its stream")
        gate.set()
        return self._finish("guest_streams", instances, outputs, stamps, n, steps, blocks, prompt_len, margin)


class PieSide:
    def __init__(self, max_n: int, prompt_len: int, kv_tokens: int, modes: list[str], scheduler: SchedulerConfig):
        num_pages = -(-kv_tokens // PAGE_SIZE) + 2 * max_n + 64
        max_batch = max(max_n, 1)
        max_tokens = max(8192, max_n * prompt_len)
        self.prompt_len = prompt_len
        self.control = ControlBench(num_pages, max_batch, max_tokens, scheduler)
        self.guests = GuestBench(num_pages, max_batch, max_tokens, scheduler) if "guests" in modes else None
        self.streams = StreamBench(num_pages, max_batch, max_tokens, scheduler) if "streams" in modes else None
        self.guest_streams = GuestStreamBench(num_pages, max_batch, max_tokens, scheduler) \
            if "guest_streams" in modes else None
        self.num_pages = num_pages
        gc.collect()
        gc.freeze()  # the setup heap out of the GC's way, as vLLM's EngineCore does for its own

    def measure(self, mode: str, n: int, steps: int, blocks: int) -> dict:
        if mode == "breakdown":
            return self.control.breakdown(self.prompt_len)
        bench = {"control": self.control, "guests": self.guests, "streams": self.streams,
                 "guest_streams": self.guest_streams}[mode]
        return bench.measure(n, steps, blocks, self.prompt_len)

    def close(self) -> None:
        for bench in (self.guests, self.guest_streams, self.streams):
            if bench is not None:
                bench.close()
        self.control.close()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "?"

    return {"pie": getattr(pie, "__version__", None) or of("pie"), "torch": of("torch"),
            "wasmtime": of("wasmtime"), "python": sys.version.split()[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1, 32, 128, 512])
    ap.add_argument("--modes", nargs="+", default=["control", "guests", "streams", "guest_streams"],
                    choices=["control", "guests", "streams", "guest_streams"])
    ap.add_argument("--steps", type=int, default=0, help="steps per block (default: by N)")
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--kv-tokens", type=int, default=0, help="KV capacity in tokens (default: by the plan)")
    ap.add_argument("--serve", action="store_true", help="answer {\"mode\", \"n\", \"steps\", \"blocks\"} lines")
    args = ap.parse_args()
    out = protocol_stdout()
    plan = {n: args.steps or default_steps(n) for n in args.n}
    kv_tokens = args.kv_tokens or max(n * (args.prompt_len + s * args.blocks + 32) for n, s in plan.items())
    t = time.perf_counter()
    side = PieSide(max(args.n), args.prompt_len, kv_tokens, args.modes, SchedulerConfig())
    header = {"side": "pie", "versions": versions(), "scheduler": "adaptive (SchedulerConfig defaults)",
              "page_size": PAGE_SIZE, "num_pages": side.num_pages, "prompt_len": args.prompt_len,
              "setup_s": time.perf_counter() - t}
    try:
        if args.serve:
            print(json.dumps({"ready": True, **header}), file=out, flush=True)
            for line in sys.stdin:
                req = json.loads(line)
                print(json.dumps(side.measure(req["mode"], req["n"], req["steps"], req.get("blocks", 1))), file=out,
                      flush=True)
            return 0
        results = []
        for n in args.n:
            for mode in args.modes:
                r = side.measure(mode, n, plan[n], args.blocks)
                r["cpu_us_per_step_median"] = statistics.median(r["cpu_s_per_step"]) * 1e6
                r["cpu_us_per_request_step_median"] = r["cpu_us_per_step_median"] / n
                results.append(r)
                print(f"{mode} N={n}: {r['cpu_us_per_step_median']:.1f} us/step CPU, "
                      f"{r['cpu_us_per_request_step_median']:.2f} us/request-step, mean batch {r['mean_batch']:.1f}",
                      file=sys.stderr, flush=True)
        print(json.dumps({**header, "results": results}, indent=1), file=out, flush=True)
    finally:
        side.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
