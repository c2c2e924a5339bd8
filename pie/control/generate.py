"""The built-in generate loop: prompt -> text, greedy or sampled, stopping on EOS, stop strings or max
tokens. It is `pie generate`, and the baseline the inferlet path is measured against.

It is an ordinary client of the control plane and runs on the one decode loop of the system: each
sequence is a generation stream (csrc/control/generation_stream.h, `ControlPlane.start_stream`), the
loop inferlets hand their generations to, run by the control layer pass after pass. Its pages come
from the runner's page pool, accounted once whoever else uses the runner.

- `generate` / `generate_batch`: every prompt a stream of one instance, on one queue.
- `generate_concurrently` (`pie generate --prompts-file`): every prompt its own instance and queue, the
  way inferlets run; the scheduler batches their streams' steps into shared passes. Each prompt's
  output equals what `generate` gives for it alone.

>>> model = Model()                                                                   # doctest: +SKIP
>>> generate(model, "What is the capital of France?", GenerationParams(temperature=0)).text  # doctest: +SKIP
'The capital of France is Paris.'
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, Iterator, Sequence

from pie.control._control import GenerationStream, Sampler, SamplerKind
from pie.control.config import SchedulerConfig
from pie.control.plane import ControlPlane, token_table


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


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int


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


def _stream_sampler(params: GenerationParams) -> Sampler:
    """The stream's sampler: a seeded one derives the seed of each step itself (pie.control.step_seed,
    the derivation of `GenerationParams.sampler`)."""
    if params.temperature == 0:
        return Sampler(SamplerKind.GREEDY)
    seed = None if params.seed is None else params.seed & 0xFFFF_FFFF_FFFF_FFFF
    return Sampler(SamplerKind.SAMPLE, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                   min_p=params.min_p, seed=seed)


def _check_prompts(prompts: Sequence[list[int]]) -> None:
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty")


def _start(model: Any, plane: ControlPlane, instance: int, queue: Any, prompt: list[int],
           params: GenerationParams) -> GenerationStream:
    """A stream generating for `prompt` on a fresh context of the instance (its pages come from the pool)."""
    return plane.start_stream(
        instance, queue, pending=prompt, num_cached=0, handles=[], sampler=_stream_sampler(params),
        max_tokens=params.max_tokens, eos_ids=() if params.ignore_eos else model.eos_ids,
        stop_strings=params.stop, token_bytes=token_table(model) if params.stop else None)


def _finish(model: Any, stream: GenerationStream, prompt_len: int, params: GenerationParams) -> Generation:
    """Waits for the stream's end; its tokens and text (cut at the first stop string)."""
    stream.wait()
    end = stream.poll()
    if end["end"] == "failed":
        raise RuntimeError(f"generation failed: {end['message']}")
    tokens = stream.generated
    text = model.tokenizer.decode(tokens)
    if end["end"] == "stop-string":
        text = text[:min(i for i in (text.find(s) for s in params.stop) if i >= 0)]
    reason = "length" if end["end"] == "length" else "stop"
    return Generation(text=text, token_ids=tokens, finish_reason=reason, prompt_tokens=prompt_len)


def generate_batch(model: Any, prompts: Sequence[list[int]], params: GenerationParams = GenerationParams(),
                   plane: ControlPlane | None = None) -> list[Generation]:
    """Generates for all prompts (token ids) at once: one stream per prompt on one instance's queue, so
    every step of every live sequence shares one pass. `model` is a pie.engine.Model; `plane` a running
    plane over its runner (default: one of the call's own)."""
    _check_prompts(prompts)
    if params.max_tokens == 0:
        return [Generation("", [], "length", len(p)) for p in prompts]
    with _plane_for(model, plane) as plane:
        instance = plane.open_instance()
        try:
            queue = plane.create_queue(instance)
            streams = [_start(model, plane, instance, queue, list(p), params) for p in prompts]
            return [_finish(model, s, len(p), params) for s, p in zip(streams, prompts)]
        finally:
            plane.end_instance(instance, "generation finished")


def generate(model: Any, prompt: str, params: GenerationParams = GenerationParams(), system: str | None = None,
             raw: bool = False, plane: ControlPlane | None = None) -> Generation:
    """One prompt (through the model's chat template unless `raw`) -> its generation."""
    return generate_batch(model, [model.prompt_ids(prompt, system, raw)], params, plane)[0]


def generate_concurrently(model: Any, prompts: Sequence[list[int]], params: GenerationParams,
                          scheduler_config: SchedulerConfig = SchedulerConfig(),
                          plane: ControlPlane | None = None) -> list[Generation]:
    """Generates for every prompt (token ids) concurrently, each its own instance and queue, the way
    inferlets run; the scheduler batches their streams' steps into shared passes. Each prompt's output
    equals what `generate` gives for it alone. Uses `plane` if given (running on the model's runner),
    else a private plane with `scheduler_config` for the call."""
    _check_prompts(prompts)
    if params.max_tokens == 0:
        return [Generation("", [], "length", len(p)) for p in prompts]
    with _plane_for(model, plane, scheduler_config) as plane:
        instances: list[int] = []
        try:
            streams = []
            for prompt in prompts:
                instances.append(plane.open_instance())
                streams.append(_start(model, plane, instances[-1], plane.create_queue(instances[-1]), list(prompt),
                                      params))
            outputs = []
            for index, (stream, prompt) in enumerate(zip(streams, prompts)):
                try:
                    outputs.append(_finish(model, stream, len(prompt), params))
                except RuntimeError as error:
                    raise RuntimeError(f"prompt {index}: {error}") from None
            return outputs
        finally:
            for instance in instances:
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
