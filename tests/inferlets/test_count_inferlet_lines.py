"""scripts/count_inferlet_lines.py: SDK code is attributed per function, class and method to the examples
that use it (transitively through the SDK); code that one application alone uses is counted with it."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "count_inferlet_lines.py"


@pytest.fixture(scope="module")
def counts():
    spec = importlib.util.spec_from_file_location("count_inferlet_lines", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module, module.Attribution()


def owned(counts, example, twin=None):
    return {u.key for u in counts[1].own(example, twin)}


def test_code_lines_skip_blanks_comments_and_docstrings(counts):
    module, _ = counts
    source = '"""Module doc."""\n\n# a comment\ndef f(x):\n    """Doc\n    more."""\n    return (x +\n            1)  # tail\n'
    assert module.code_line_numbers(source) == {4, 7, 8}


def test_single_use_functions_inside_shared_modules_are_counted_with_their_example(counts):
    assert "__init__.Context.speculate" in owned(counts, "speculative_decoding")
    assert "parallel.step_all" in owned(counts, "beam_search")
    assert {"__init__.Subscription", "__init__.Subscription.receive", "__init__.broadcast",
            "__init__.store"} <= owned(counts, "agent_swarm")


def test_shared_code_is_the_sdks(counts):
    _, attribution = counts
    for key in ("__init__.Context.fork", "__init__.Context.generate", "__init__.Context._pass",
                "__init__.Stopper.push", "roles.RoleBlocks.user", "expressions.Expressions.gen", "__init__:"):
        assert len(attribution.users[key]) >= 2, key
        assert all(key not in owned(counts, e) for e in attribution.examples), key
    # reached through the SDK only: speculate's helper _run_scratch is also score's (select's)
    assert "__init__.Context._run_scratch" in attribution.used["speculative_decoding"]
    assert len(attribution.users["__init__.Context._run_scratch"]) >= 2


def test_twins_share_their_module(counts):
    assert not any(k.startswith("sliding.") for k in owned(counts, "attention_sink"))
    assert {"sliding.Window.run", "sliding.main", "sliding:"} <= owned(counts, "attention_sink", "windowed_attention")


def test_an_examples_count_is_its_file_plus_what_it_owns(counts):
    module, attribution = counts
    lines = attribution.lines("beam_search")
    assert lines == module.code_lines(attribution.examples["beam_search"]) + \
        sum(u.lines for u in attribution.own("beam_search"))
    assert lines > module.code_lines(attribution.examples["beam_search"])  # step_all is counted with it
