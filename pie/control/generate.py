"""The built-in generate loop: prompt -> text, greedy or sampled, stopping on EOS, stop strings or max
tokens. It is `pie generate`, and the baseline the inferlet path is measured against.

It is an ordinary client of the control plane: its sequences are one instance whose KV pages come from
the runner's page pool, and each step is one ForwardCommand per live sequence, submitted together to
the instance's queue (so they share one forward pass) and waited for. Pages are accounted once, in the
pool, whoever else uses the runner.

- `generate` / `generate_batch`: one thread, one pass per step over every live sequence (prefill
  chunked to the runner's token budget).
- `generate_concurrently` (`pie generate --prompts-file`): every prompt its own instance on its own
  thread, the way inferlets run; the scheduler batches their steps into shared passes. Each prompt's
  output equals what `generate` gives for it alone.

>>> model = Model()                                                                   # doctest: +SKIP
>>> generate(model, "What is the capital of France?", GenerationParams(temperature=0)).text  # doctest: +SKIP
'The capital of France is Paris.'
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any, Iterator, Sequence

from pie.control._control import ForwardCommand, ForwardOutput, Sampler, SamplerKind
from pie.control.config import SchedulerConfig
from pie.control.plane import ControlPlane


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    def sampler(self, step: int) -> Sampler:
        """The sampler of the step-th generated token. A seeded generation derives one seed per step."""
        if self.temperature == 0:
            return Sampler(SamplerKind.GREEDY)
        seed = None if self.seed is None else (self.seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF
        return Sampler(SamplerKind.SAMPLE, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                       min_p=self.min_p, seed=seed)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int


@dataclass
class SequenceState:
    prompt_len: int
    tokens: list[int]  # prompt + generated
    handles: list[int] = field(default_factory=list)  # KV page handles of the sequence's instance
    pages: list[int] = field(default_factory=list)  # their physical pages
    num_cached: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None
    text: str | None = None


def accept_token(model: Any, s: SequenceState, token: int, params: GenerationParams) -> None:
    """Appends a sampled token to a sequence, or finishes it (EOS, a stop string, max tokens)."""
    generated = len(s.tokens) - s.prompt_len
    if token in model.eos_ids and not params.ignore_eos:
        s.finish_reason = "stop"
    else:
        s.tokens.append(token)
        generated += 1
    text = None
    if s.finish_reason is None and params.stop:
        text = model.tokenizer.decode(s.tokens[s.prompt_len:])
        cut = min((i for i in (text.find(stop) for stop in params.stop) if i >= 0), default=-1)
        if cut >= 0:
            s.finish_reason, text = "stop", text[:cut]
    if s.finish_reason is None and generated >= params.max_tokens:
        s.finish_reason = "length"
    if s.finish_reason is not None:
        s.text = text if text is not None else model.tokenizer.decode(s.tokens[s.prompt_len:])


def _finished(s: SequenceState) -> Generation:
    return Generation(text=s.text or "", token_ids=s.tokens[s.prompt_len:], finish_reason=s.finish_reason or "length",
                      prompt_tokens=s.prompt_len)


def _new_sequences(prompts: Sequence[list[int]], params: GenerationParams) -> list[SequenceState]:
    seqs = [SequenceState(prompt_len=len(p), tokens=list(p)) for p in prompts]
    for i, s in enumerate(seqs):
        if s.prompt_len == 0:
            raise ValueError(f"prompt {i} is empty")
        if params.max_tokens == 0:
            s.finish_reason, s.text = "length", ""
    return seqs


@contextmanager
def _plane_for(model: Any, plane: ControlPlane | None,
               scheduler_config: SchedulerConfig = SchedulerConfig()) -> Iterator[ControlPlane]:
    """`plane` if given (running on the model's runner), else a plane of the call's own."""
    if plane is not None:
        yield plane
        return
    own = ControlPlane.serving(model.runner, scheduler_config).start()
    try:
        yield own
    finally:
        own.stop("generation finished")


def _next_command(plane: ControlPlane, instance: int, s: SequenceState, budget: int,
                  params: GenerationParams) -> ForwardCommand:
    """The sequence's next pass: its uncached tokens, at most `budget` of them (a long prompt goes in
    budget-sized chunks), with an output when the pass reaches the sequence's end."""
    page_size = plane.limits.page_size
    end = min(len(s.tokens), s.num_cached + budget)
    num_pages = -(-end // page_size)
    if num_pages > len(s.handles):
        new = plane.kv_pages.allocate(instance, num_pages - len(s.handles))
        s.handles += new
        s.pages += plane.kv_pages.resolve(instance, new)
    outputs = []
    if end == len(s.tokens):
        outputs = [ForwardOutput(end - s.num_cached - 1, params.sampler(len(s.tokens) - s.prompt_len))]
    return ForwardCommand(s.tokens[s.num_cached:end], list(range(s.num_cached, end)), s.pages[:num_pages],
                          end - (num_pages - 1) * page_size, outputs=outputs)


def _accept(model: Any, s: SequenceState, command: ForwardCommand, params: GenerationParams) -> None:
    s.num_cached += command.num_tokens
    if command.outputs:
        accept_token(model, s, command.results[0].ids[0], params)


def generate_batch(model: Any, prompts: Sequence[list[int]], params: GenerationParams = GenerationParams(),
                   plane: ControlPlane | None = None) -> list[Generation]:
    """Generates for all prompts (token ids) at once: one forward pass per step over every live sequence.
    `model` is a pie.engine.Model; `plane` a running plane over its runner (default: one of the call's own)."""
    seqs = _new_sequences(prompts, params)
    with _plane_for(model, plane) as plane:
        instance = plane.open_instance()
        try:
            queue = plane.create_queue(instance)
            while True:
                live = [s for s in seqs if s.finish_reason is None]
                if not live:
                    break
                budget = plane.limits.max_tokens
                commands, owners = [], []
                for s in live:
                    if budget <= 0:
                        break
                    command = _next_command(plane, instance, s, budget, params)
                    budget -= command.num_tokens
                    commands.append(command)
                    owners.append(s)
                for future in queue.submit_forward_all(commands, plane.limits):
                    future.result()
                for s, command in zip(owners, commands):
                    _accept(model, s, command, params)
        finally:
            plane.end_instance(instance, "generation finished")
    return [_finished(s) for s in seqs]


def generate(model: Any, prompt: str, params: GenerationParams = GenerationParams(), system: str | None = None,
             raw: bool = False, plane: ControlPlane | None = None) -> Generation:
    """One prompt (through the model's chat template unless `raw`) -> its generation."""
    return generate_batch(model, [model.prompt_ids(prompt, system, raw)], params, plane)[0]


def generate_concurrently(model: Any, prompts: Sequence[list[int]], params: GenerationParams,
                          scheduler_config: SchedulerConfig = SchedulerConfig(),
                          plane: ControlPlane | None = None) -> list[Generation]:
    """Generates for every prompt (token ids) concurrently, each its own instance on its own thread;
    returns one `Generation` per prompt, in order. Uses `plane` if given (running on the model's
    runner), else a private plane with `scheduler_config` for the call."""
    outputs: list[Generation | None] = [None] * len(prompts)
    errors: list[tuple[int, BaseException]] = []
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty")

    with _plane_for(model, plane, scheduler_config) as plane:
        def run(index: int) -> None:
            try:
                outputs[index] = _generate_one(model, plane, prompts[index], params)
            except BaseException as error:  # reported to the caller below
                errors.append((index, error))

        threads = [threading.Thread(target=run, args=(i,), name=f"pie-prompt-{i}") for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        index, error = min(errors, key=lambda e: e[0])
        raise RuntimeError(f"prompt {index}: {type(error).__name__}: {error}") from error
    return [out for out in outputs if out is not None]


def _generate_one(model: Any, plane: ControlPlane, prompt: list[int], params: GenerationParams) -> Generation:
    [s] = _new_sequences([prompt], params)
    instance = plane.open_instance()
    try:
        queue = plane.create_queue(instance)
        while s.finish_reason is None:
            command = _next_command(plane, instance, s, plane.limits.max_tokens, params)
            queue.submit_forward(command, plane.limits, depends_on_previous=True).result()
            _accept(model, s, command, params)
        return _finished(s)
    finally:
        plane.end_instance(instance, "generation finished")


def read_prompts_file(path: str) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def print_generations(prompts: Sequence[str], generations: Sequence[Generation], out: IO[str]) -> None:
    """One JSON object per line, in input order: {"prompt": ..., "text": ..., "tokens": N}."""
    for prompt, generation in zip(prompts, generations):
        out.write(json.dumps({"prompt": prompt, "text": generation.text, "tokens": len(generation.token_ids)},
                             ensure_ascii=False) + "\n")
    out.flush()


def run_prompts_file(model: Any, path: str, params: GenerationParams, out: IO[str], system: str | None = None,
                     raw: bool = False, scheduler_config: SchedulerConfig = SchedulerConfig()) -> int:
    """What `pie generate --prompts-file FILE` does; returns the exit status."""
    prompts = read_prompts_file(path)
    generations = generate_concurrently(model, [model.prompt_ids(p, system, raw) for p in prompts], params,
                                        scheduler_config)
    print_generations(prompts, generations, out)
    return 0
