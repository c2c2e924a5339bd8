"""Fixtures of the example-inferlet tests: `run_inferlet`, which runs a bundled example or a guest source
and checks that every KV page is back in the pool afterwards (`engine`, `runtime`: tests/conftest.py)."""

import json
import textwrap
from dataclasses import dataclass

import pytest


@dataclass
class Run:
    output: str  # what the instance printed
    log: str  # its stderr
    passes: int  # model forward passes (batches) the engine ran meanwhile
    tokens: int  # tokens the engine processed meanwhile
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
