"""Fixtures of the example-inferlet tests (`model`, `runtime`: tests/conftest.py):
- `run_inferlet` runs a bundled example or a guest source and checks that every KV page is back in the
  pool afterwards;
- `measure` runs a bundled example and reports the model work done meanwhile (pages held by exports may
  stay: the fork-, prefix- and agent-inferlet tests); the runner's counters are global, so these tests run
  one at a time;
- `chat_tokens` and `completion`: a prompt as the inferlets render it, and what text_completion prints."""

import json
import textwrap
from dataclasses import dataclass

import pytest


@dataclass
class Run:
    output: str  # what the instance printed
    log: str  # its stderr
    passes: int  # model forward passes (batches) run meanwhile
    tokens: int  # tokens the model processed meanwhile
    seconds: float

    @property
    def stats(self) -> dict:
        """The last JSON line of the log (what --stats writes)."""
        lines = [l for l in self.log.splitlines() if l.startswith("{")]
        return json.loads(lines[-1])


@pytest.fixture
def run_inferlet(runtime, model):
    """run_inferlet(NAME, *args) -> Run; run_inferlet(source=SRC, args=[...]) runs a guest source.
    Fails on an instance error or on pages not returned to the pool."""

    def run(name=None, *args, source=None, expect_error=False):
        runner = model.runner
        p0, t0 = runner.num_forward_passes, runner.num_tokens_processed
        if source is not None:
            r = runtime.run_source(textwrap.dedent(source), [str(a) for a in args], filename="guest.py")
        else:
            r = runtime.run(name, [str(a) for a in args])
        assert runtime.num_free_pages == runtime.num_pages, "pages leaked by the instance"
        if expect_error:
            assert r.error is not None, r.output
            return r
        assert r.error is None, f"{r.error}\n{r.log}"
        return Run(r.output, r.log, runner.num_forward_passes - p0, runner.num_tokens_processed - t0,
                   r.timings.get("total", 0.0))

    return run


@dataclass
class Measured:
    output: str  # what the instance printed
    log: str
    return_value: str | None
    tokens: int  # tokens the model computed meanwhile (runner.num_tokens_processed delta)
    passes: int  # forward passes (batches) it ran meanwhile

    def json(self, event=None):
        """The output's JSON line (the last one, or the last with this "event")."""
        lines = [json.loads(l) for l in self.output.splitlines() if l.startswith("{")]
        if event is not None:
            lines = [l for l in lines if l.get("event") == event]
        assert lines, self.output
        return lines[-1]


@pytest.fixture
def measure(runtime, model):
    """measure(NAME, *args, **launch_kwargs) -> Measured. Fails on an instance error, and on pages not back
    in the pool afterwards (pages held by exports excepted)."""

    def run(name, *args, **kwargs):
        runner = model.runner
        t0, p0 = runner.num_tokens_processed, runner.num_forward_passes
        r = runtime.run(name, [str(a) for a in args], **kwargs)
        tokens, passes = runner.num_tokens_processed - t0, runner.num_forward_passes - p0
        assert r.error is None, f"{r.error}\n{r.output}\n{r.log}"
        stats = runtime.plane.kv_pages.stats()
        assert stats["num_free"] + stats["num_exported"] == stats["num_pages"], "pages leaked by the instance"
        return Measured(r.output, r.log, r.return_value, tokens, passes)

    return run


@pytest.fixture
def chat_tokens(runtime):
    """chat_tokens(system, user) -> the prompt's token ids as the inferlets render it (chat template)."""

    def render(system, user, add_generation_prompt=True):
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
                   ([{"role": "user", "content": user}] if user is not None else [])
        return runtime.tokenizer.encode(runtime.tokenizer.apply_chat_template(messages, add_generation_prompt))

    return render


@pytest.fixture
def completion(runtime):
    """completion(prompt, max_tokens, *extra_args) -> what text_completion prints (greedy unless the extra
    arguments say otherwise), without print's newline."""

    def run(prompt, max_tokens, *extra):
        r = runtime.run("text_completion", ["--prompt", prompt, "--max-tokens", str(max_tokens),
                                            "--temperature", "0", *map(str, extra)])
        assert r.error is None, r.error
        assert r.output.endswith("\n")
        return r.output[:-1]

    return run
