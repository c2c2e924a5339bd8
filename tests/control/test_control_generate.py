"""With the real model: prompts run concurrently through queues, scheduler and page pool give,
each, exactly what they give alone."""

from __future__ import annotations

import io
import json

import pytest

from pie.control import SchedulerConfig
from pie.control.generate import generate_concurrently, run_prompts_file

TOPICS = ["the sea", "a mountain", "coffee", "robots", "the moon", "autumn", "a library", "trains"]
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2+2?", "Say hello in Spanish.",
             "Write a haiku about {}.", "Describe {} in one sentence.", "Give a title for a story about {}.",
             "List two facts about {}."]


def distinct_prompts() -> list[str]:
    prompts = [q for q in QUESTIONS if "{}" not in q]
    prompts += [q.format(t) for q in QUESTIONS if "{}" in q for t in TOPICS[:3]]
    return prompts  # 16


@pytest.fixture(scope="module")
def model(smollm2_entry):
    from pie.engine.config import EngineConfig
    from pie.engine.model import Model

    return Model(smollm2_entry.name, EngineConfig(dtype="float32", kv_cache_mb=1024), progress=False)


def test_256_concurrent_greedy_requests_equal_each_alone(model):
    from pie.control.generate import GenerationParams, generate

    params = GenerationParams(max_tokens=8, temperature=0, ignore_eos=True)  # raw prompts often end at once
    prompts = distinct_prompts()
    # Raw prompts (no chat template) keep the 256 prefills short.
    alone = {p: generate(model, p, params, raw=True).token_ids for p in prompts}
    requests = [prompts[i % len(prompts)] for i in range(256)]
    together = generate_concurrently(model, [model.prompt_ids(p, raw=True) for p in requests], params,
                                     SchedulerConfig(policy="adaptive"))
    mismatches = [(i, p) for i, (p, g) in enumerate(zip(requests, together)) if g.token_ids != alone[p]]
    assert mismatches == []
    assert all(len(g.token_ids) == 8 for g in together)


def test_prompts_file_prints_json_lines_in_order_equal_to_each_alone(model, tmp_path):
    from pie.control.generate import GenerationParams, generate

    params = GenerationParams(max_tokens=8, temperature=0)
    prompts = (distinct_prompts() * 2)[:32]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n\n")
    out = io.StringIO()
    assert run_prompts_file(model, str(prompts_file), params, out) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["prompt"] for line in lines] == prompts
    for prompt in set(prompts):
        alone = generate(model, prompt, params)
        for line in lines:
            if line["prompt"] == prompt:
                assert line["text"] == alone.text and line["tokens"] == len(alone.token_ids)


def test_cli_prompts_file_matches_cli_prompt(smollm2_entry, tmp_path):
    from cli_helpers import run_pie

    prompts = ["What is the capital of France?", "Name three colors.", "Say hello in Spanish."]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    common = ["--temperature", "0", "--max-tokens", "12"]
    run = run_pie("generate", "--prompts-file", str(prompts_file), *common)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == prompts
    alone = run_pie("generate", "--prompt", prompts[1], *common)
    assert alone.returncode == 0, alone.stderr
    assert lines[1]["text"] + "\n" == alone.stdout
