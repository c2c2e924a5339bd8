"""Many prompts at once through the control layer: `pie generate --prompts-file`.

Every prompt runs as its own instance on its own thread, the way inferlets will: it allocates KV
pages from the plane's pool, submits one FORWARD command per step to its queue and waits on the
future (without the GIL); the scheduler batches the steps of all prompts into shared forward passes,
and the engine loop runs them on the model runner. Token selection, stop rules and detokenisation
are the built-in generate loop's (`pie.engine.generate.Engine`), so each prompt's output equals
what `pie generate` prints for it alone.

>>> engine = Engine()                                                           # doctest: +SKIP
>>> outs = generate_concurrently(engine, [engine.prompt_ids(p) for p in prompts],
...                              GenerationParams(temperature=0))                # doctest: +SKIP
"""

from __future__ import annotations

import json
import threading
from typing import IO, Any, Sequence

from pie.control.config import SchedulerConfig
from pie.control.kinds import CommandKind
from pie.control.plane import ControlPlane


def generate_concurrently(engine: Any, prompts: Sequence[list[int]], params: Any,
                          scheduler_config: SchedulerConfig = SchedulerConfig(),
                          plane: ControlPlane | None = None) -> list[Any]:
    """Generates for every prompt (token ids) concurrently; returns one `Generation` per prompt, in order.

    `engine` is a `pie.engine.generate.Engine`; `params` its `GenerationParams`. Uses `plane` if
    given (it must be running on the engine's runner), else a private plane for the call.
    """
    from pie.engine.generate import Generation

    own_plane = plane is None
    if plane is None:
        plane = ControlPlane.for_runner(engine.runner, scheduler_config).start()
    outputs: list[Any] = [None] * len(prompts)
    errors: list[tuple[int, BaseException]] = []

    def run(index: int) -> None:
        try:
            outputs[index] = _generate_one(engine, plane, prompts[index], params)
        except BaseException as error:  # reported to the caller below
            errors.append((index, error))

    try:
        for index, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {index} is empty")
        threads = [threading.Thread(target=run, args=(i,), name=f"pie-prompt-{i}") for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        if own_plane:
            plane.stop()
    if errors:
        index, error = min(errors, key=lambda e: e[0])
        raise RuntimeError(f"prompt {index}: {type(error).__name__}: {error}") from error
    assert all(isinstance(out, Generation) for out in outputs)
    return outputs


def _generate_one(engine: Any, plane: ControlPlane, prompt: list[int], params: Any) -> Any:
    from pie.engine.batch import ForwardRequest
    from pie.engine.generate import Generation, SequenceState

    runner = engine.runner
    page_size, budget = runner.page_size, runner.max_batch_tokens
    instance = plane.open_instance()
    try:
        queue = plane.create_queue(instance)
        seq = SequenceState(prompt_len=len(prompt), tokens=list(prompt))
        handles: list[int] = []
        if params.max_tokens == 0:
            seq.finish_reason, seq.text = "length", ""
        while seq.finish_reason is None:
            end = min(len(seq.tokens), seq.num_cached + budget)  # a long prompt goes in budget-sized chunks
            num_pages = -(-end // page_size)
            if num_pages > len(handles):
                handles += plane.kv_pages.allocate(instance, num_pages - len(handles))
            pages = plane.kv_pages.resolve(instance, handles[:num_pages])
            finishes_prompt = end == len(seq.tokens)
            request = ForwardRequest(
                token_ids=seq.tokens[seq.num_cached:end], positions=list(range(seq.num_cached, end)),
                kv_page_ids=pages, kv_last_page_len=end - (num_pages - 1) * page_size,
                outputs=[(end - seq.num_cached - 1, params.sampler(len(seq.tokens) - seq.prompt_len))]
                if finishes_prompt else [])
            result = queue.submit(CommandKind.FORWARD, request, num_tokens=end - seq.num_cached,
                                  depends_on_previous=True).result()
            seq.num_cached = end
            if result.outputs:
                engine.accept_token(seq, int(result.outputs[0]), params)
        return Generation(text=seq.text or "", token_ids=seq.tokens[seq.prompt_len:],
                          finish_reason=seq.finish_reason or "length", prompt_tokens=seq.prompt_len)
    finally:
        plane.end_instance(instance, "generation finished")


def read_prompts_file(path: str) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def print_generations(prompts: Sequence[str], generations: Sequence[Any], out: IO[str]) -> None:
    """One JSON object per line, in input order: {"prompt": ..., "text": ..., "tokens": N}."""
    for prompt, generation in zip(prompts, generations):
        out.write(json.dumps({"prompt": prompt, "text": generation.text, "tokens": len(generation.token_ids)},
                             ensure_ascii=False) + "\n")
    out.flush()


def run_prompts_file(engine: Any, path: str, params: Any, out: IO[str], system: str | None = None,
                     raw: bool = False, scheduler_config: SchedulerConfig = SchedulerConfig()) -> int:
    """What `pie generate --prompts-file FILE` does; returns the exit status."""
    prompts = read_prompts_file(path)
    generations = generate_concurrently(engine, [engine.prompt_ids(p, system, raw) for p in prompts], params,
                                        scheduler_config)
    print_generations(prompts, generations, out)
    return 0
