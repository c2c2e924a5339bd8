"""The CUDA kernel path of the model runner (the CUDA attention backend, pie.engine.attention.cuda,
its layer ops and pie.engine.cuda_graphs).

Without a GPU: the CUDA backend runs with a PyTorch stand-in for the kernels (reference_kernels.py) in
float32 and must give the PyTorch backend's logits (the plumbing: plans, residual stream, cache
writes, custom masks, sliding windows, input embeddings, sampler dispatch).

On a GPU: the real kernels, bf16, against (a) the runner's PyTorch path on the same device, (b) HF
transformers on the GPU, teacher-forced along our greedy tokens: at each step our greedy token must
be HF's, or the two must be within the measured logit error of each other in HF's logits (a tie at
bf16 resolution); and CUDA-graph replay against eager decode. Models: tiny random models of each
architecture, a random-weight Llama-3.2-1B-shaped model, and SmolLM2-135M when its weights are at
hand (PIE_SMOLLM2_DIR, or the model store; PIE_REQUIRE_SMOLLM2=1 makes their absence a failure).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

import reference_kernels
from pie.engine import cuda_ops as ck
from pie.engine.attention.cuda import CudaAttention
from pie.engine.batch import ForwardRequest, Greedy, Logprobs, RawLogits, Sample, TopKDistribution
from pie.engine.config import EngineConfig, ModelConfig
from pie.engine.device_sampling import DeviceSampling
from pie.engine.runner import ModelRunner
from tiny_models import tiny_hf_model

GPU = torch.cuda.is_available() and ck.available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA device and the built CUDA kernels")
PAGE = 4


def request(ids, start, pages, outputs=None, mask=None, embeddings=None, page_size=PAGE):
    """ids[start:] of a sequence laid out over `pages`; RawLogits for every input by default."""
    n = len(ids)
    used = -(-n // page_size)
    outs = [(i, RawLogits()) for i in range(n - start)] if outputs is None else outputs
    return ForwardRequest(token_ids=ids[start:], positions=list(range(start, n)), kv_page_ids=pages[:used],
                          kv_last_page_len=n - (used - 1) * page_size, outputs=outs, mask=mask,
                          input_embeddings=embeddings)


def with_stand_in(runner: ModelRunner, min_sdpa_prefill_tokens: int | None = None) -> ModelRunner:
    """The runner, switched to the CUDA attention backend over the PyTorch stand-in kernels (its own
    weights/cache; no CUDA graphs). Fresh causal requests of min_sdpa_prefill_tokens or more go through
    SDPA (None: none do)."""
    runner.attention = CudaAttention(runner.model_config, runner.cache, kernels=reference_kernels,
                                     min_sdpa_prefill_tokens=min_sdpa_prefill_tokens)
    runner.device_sampling = DeviceSampling(runner.sampling, kernels=reference_kernels)
    return runner


def stand_in_pair(arch: str, sliding_window: int | None = None, min_sdpa_prefill_tokens: int | None = None):
    hf, cfg = tiny_hf_model(arch)
    config = ModelConfig.from_hf(cfg)
    if sliding_window is not None:
        config = dataclasses.replace(config, sliding_window=sliding_window)
    engine_config = EngineConfig(num_pages=64, page_size=PAGE)
    reference = ModelRunner(config, hf.state_dict(), engine_config)
    return reference, with_stand_in(ModelRunner(config, hf.state_dict(), engine_config), min_sdpa_prefill_tokens)


def max_diff(a: list, b: list) -> float:
    """Largest |difference| between two lists of RawLogits outputs (each a (V,) tensor)."""
    return (torch.stack(a).float().cpu() - torch.stack(b).float().cpu()).abs().max().item()


@pytest.mark.parametrize("sdpa", [None, 2], ids=["kernels-only", "sdpa-prefill"])
@pytest.mark.parametrize("arch,window", [("llama", None), ("llama3", None), ("qwen2", None), ("qwen3", None),
                                         ("mistral", 6)])
def test_stand_in_forward_matches_torch_path(arch, window, sdpa):
    reference, path = stand_in_pair(arch, window, sdpa)
    g = torch.Generator().manual_seed(7)
    a, b, c = (torch.randint(0, 211, (n,), generator=g).tolist() for n in (13, 9, 5))
    pages_a, pages_b, pages_c = [9, 2, 30, 4, 11], [20, 21, 5], [40, 41]
    mask_b = [[1, i, 1, 8 - i - 1] if i < 8 else [9] for i in range(9)]  # first and own token only, last row all
    emb = reference.embed_tokens(c) * 1.5  # input embeddings that differ from the tokens'
    steps = [
        [request(a[:12], 0, pages_a), request(b, 0, pages_b, mask=mask_b)],
        [request(a, 12, pages_a), request(c, 0, pages_c, embeddings=emb)],  # decode + embeddings prefill
        [request(a + [3, 4, 5], 13, pages_a)],  # prefill over cached context (past the window)
    ]
    for i, batch in enumerate(steps):
        want = reference.execute(batch)
        got = path.execute(batch)
        for k, (w, o) in enumerate(zip(want, got)):
            diff = max_diff(w.outputs, o.outputs)
            assert diff <= 1e-4, f"{arch}: step {i} request {k}: max |logit diff| {diff}"
    # fresh causal prefill took the SDPA route: a[:12] (unless past mistral's window of 6) and c
    assert path.attention.num_sdpa_prefill_requests == (0 if sdpa is None else 2 if window is None else 1)


def test_stand_in_sdpa_prefill_in_ragged_batches():
    """Fresh requests of many lengths (padded SDPA groups) beside cached-prefix prefill, decode and a
    masked fresh request (the kernels' share) in one batch; the stand-in poisons rows the kernels
    skip, so a row neither side writes shows up as NaN logits."""
    reference, path = stand_in_pair("llama3", None, 2)
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (23, 21, 2, 19, 8, 30, 6)]
    pages = [list(range(8 * i, 8 * i + 8))[::-1] for i in range(8)]  # pages in falling order
    first = [request(seqs[0], 0, pages[0]), request(seqs[1], 0, pages[1]), request(seqs[2], 0, pages[2]),
             request(seqs[3], 0, pages[3]), request(seqs[4][:7], 0, pages[4]),
             request(seqs[5][:20], 0, pages[5]),
             request(seqs[6], 0, pages[6], mask=[[i + 1, 5 - i] for i in range(6)])]  # causal, spelled out
    second = [request(seqs[4], 7, pages[4]), request(seqs[5], 20, pages[5]),  # decode, prefill over a prefix
              request(seqs[1] + [5, 6], 0, pages[7])]  # fresh again, elsewhere
    for step, batch in enumerate([first, second]):
        for k, (w, o) in enumerate(zip(reference.execute(batch), path.execute(batch))):
            diff = max_diff(w.outputs, o.outputs)
            assert diff <= 1e-4, f"step {step} request {k}: max |logit diff| {diff}"
    assert path.attention.num_sdpa_prefill_requests == 7  # six fresh unmasked in the first, one in the second


def test_stand_in_sampler_dispatch():
    reference, path = stand_in_pair("llama")
    ids = list(range(1, 11))
    outs = [(9, Greedy()), (9, RawLogits()), (9, TopKDistribution(k=5)), (9, Logprobs(token_ids=(3, 7))),
            (9, Sample(temperature=0.8, top_k=20, seed=123)), (9, Sample(temperature=0.0)),
            (8, Sample(temperature=1.0, seed=123))]
    [got] = path.execute([request(ids, 0, [0, 1, 2], outputs=outs)])
    [want] = reference.execute([request(ids, 0, [0, 1, 2], outputs=outs)])
    greedy, raw, dist, lps, drawn, zero_t, other = got.outputs
    assert greedy == int(raw.argmax()) == zero_t == want.outputs[0]
    assert dist[0] == want.outputs[2][0] and torch.allclose(torch.tensor(dist[1]), torch.tensor(want.outputs[2][1]))
    assert torch.allclose(torch.tensor(lps), torch.tensor(want.outputs[3]), atol=1e-4)
    assert drawn in dist[0] or drawn in torch.topk(raw, 20).indices.tolist()
    [again] = path.execute([request(ids, 0, [0, 1, 2], outputs=outs)])
    assert again.outputs[4] == drawn and again.outputs[6] == other  # seeded draws repeat


# ----------------------------------------------------------------------------- on the GPU


def cuda_runner(config: ModelConfig, state_dict, *, kernels=True, graphs=True, num_pages=512, page_size=16,
                seed=0) -> ModelRunner:
    engine_config = EngineConfig(dtype="bfloat16", device="cuda", num_pages=num_pages, page_size=page_size,
                          cuda_kernels=kernels, cuda_graphs=graphs)
    runner = ModelRunner(config, state_dict, engine_config, seed=seed)
    assert (runner.attention.name == "cuda") == kernels, runner.cuda_path_reason
    return runner


def greedy_run(runner: ModelRunner, prompts: list[list[int]], steps: int, page_size=16):
    """Greedy decoding of each prompt (one batch per step); returns per prompt (tokens, per-step logits)."""
    pages_per = -(-(max(map(len, prompts)) + steps) // page_size)
    seqs = [list(p) for p in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    start = [0] * len(prompts)
    for _ in range(steps):
        batch = [request(s, st, list(range(i * pages_per, (i + 1) * pages_per)),
                         outputs=[(len(s) - st - 1, RawLogits())], page_size=page_size)
                 for i, (s, st) in enumerate(zip(seqs, start))]
        for i, res in enumerate(runner.execute(batch)):
            row = res.outputs[0].float().cpu()
            logits[i].append(row)
            start[i] = len(seqs[i])
            seqs[i].append(int(row.argmax()))
    return [(s[len(p):], lg) for s, p, lg in zip(seqs, prompts, logits)]


def hf_teacher_forced(hf, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """HF's logits (steps, V) float32 at the positions that chose each of `tokens` after `prompt`."""
    ids = torch.tensor([prompt + tokens], device="cuda")
    with torch.no_grad():
        out = hf(ids).logits[0].float().cpu()
    return out[len(prompt) - 1: len(prompt) - 1 + len(tokens)]


def check_against_hf(ours_tokens, ours_logits, hf_logits, label: str) -> dict:
    """Per step: our greedy token is HF's argmax on the same prefix, or HF's logits for the two are
    within the step's measured max |ours - HF| (a tie at bf16 resolution). Returns a summary."""
    agree, ties = 0, []
    for i, (tok, mine, theirs) in enumerate(zip(ours_tokens, ours_logits, hf_logits)):
        hf_tok = int(theirs.argmax())
        err = (mine - theirs).abs().max().item()
        if tok == hf_tok:
            agree += 1
            continue
        margin = (theirs[hf_tok] - theirs[tok]).item()
        assert margin <= 2 * err, (f"{label}: step {i}: ours {tok}, HF {hf_tok}, HF margin {margin:.4f} "
                                   f"> 2 x max |logit error| {err:.4f}")
        ties.append((i, round(margin, 4), round(err, 4)))
    rel = torch.stack([(m - t).norm() / t.norm() for m, t in zip(ours_logits, hf_logits)]).max().item()
    summary = dict(model=label, steps=len(ours_tokens), agree=agree, ties=ties, max_rel_logit_err=rel)
    print(summary)
    return summary


def wide_hf_model(arch: str):
    """A small random HF model of `arch` with head_dim 64 (the kernels' smallest), bf16 on the GPU."""
    import transformers

    common = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
    cls, extra = {"qwen2": (transformers.Qwen2Config, {}), "qwen3": (transformers.Qwen3Config, {}),
                  "mistral": (transformers.MistralConfig, dict(sliding_window=48))}[arch]
    cfg = cls(**common, **extra)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    torch.manual_seed(1)
    with torch.device("cuda"):
        hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.8, 1.2) if "norm" in name else p.normal_(0, 0.05)
    return hf.eval(), ModelConfig.from_hf(cfg.to_dict())


@needs_gpu
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_gpu_other_architectures_match_hf_and_torch_path(arch):
    """q/k/v bias (Qwen2), per-head q/k norm (Qwen3), sliding window 48 (Mistral; prompts past it)."""
    hf, config = wide_hf_model(arch)
    fast = cuda_runner(config, hf.state_dict())
    slow = cuda_runner(config, hf.state_dict(), kernels=False)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (4, 37, 90)]
    for prompt, (toks, lg), (toks2, lg2) in zip(prompts, greedy_run(fast, prompts, 16), greedy_run(slow, prompts, 16)):
        check_against_hf(toks, lg, hf_teacher_forced(hf, prompt, toks), arch)
        if toks == toks2:
            assert max((a - b).abs().max().item() for a, b in zip(lg, lg2)) < 0.25


def random_llama(hidden, layers, heads, kv_heads, head_dim, inter, vocab, tied, seed=0, std=0.02):
    """A random-weight HF Llama in bf16 on the GPU (Llama-3 rope scaling) and its ModelConfig."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=tied, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    with torch.device("cuda"):
        hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, std)
    hf.eval()
    return hf, ModelConfig.from_hf(cfg.to_dict())


def _tiny_wide(arch_heads=(8, 2), head_dim=64):
    return random_llama(hidden=256, layers=3, heads=arch_heads[0], kv_heads=arch_heads[1], head_dim=head_dim,
                        inter=512, vocab=1000, tied=False, std=0.05)


@needs_gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_small_llama_matches_hf_and_torch_path(head_dim):
    hf, config = _tiny_wide(head_dim=head_dim)
    state = hf.state_dict()
    fast = cuda_runner(config, state)
    slow = cuda_runner(config, state, kernels=False)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (1, 37, 130)]
    for prompt, (toks, lg), (toks2, lg2) in zip(prompts, greedy_run(fast, prompts, 20), greedy_run(slow, prompts, 20)):
        check_against_hf(toks, lg, hf_teacher_forced(hf, prompt, toks), f"small llama d{head_dim}")
        assert toks == toks2 or check_against_hf(toks2, lg2, hf_teacher_forced(hf, prompt, toks2), "torch path")


@needs_gpu
def test_gpu_graph_replay_matches_eager():
    hf, config = _tiny_wide()
    state = hf.state_dict()
    graphed = cuda_runner(config, state, graphs=True)
    eager = cuda_runner(config, state, graphs=False)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (3, 250, 17, 64, 300)]
    ours = greedy_run(graphed, prompts, 40)
    assert graphed.cuda_graphs.num_graph_replays >= 39 and graphed.cuda_graphs.num_graph_captures >= 1
    ref = greedy_run(eager, prompts, 40)
    assert eager.cuda_graphs is None
    for (t1, l1), (t2, l2) in zip(ours, ref):
        assert t1 == t2
        assert max((a - b).abs().max().item() for a, b in zip(l1, l2)) < 0.05


@needs_gpu
def test_gpu_sdpa_prefill_matches_kernel_prefill():
    """Fresh prompts of ragged lengths (padded SDPA groups, one under the 128-token threshold) beside
    a cached-prefix prefill: the SDPA route against pie's prefill kernel, every row's logits."""
    hf, config = _tiny_wide(head_dim=128)
    state = hf.state_dict()
    routed = cuda_runner(config, state)
    kernels = cuda_runner(config, state)
    kernels.attention.min_sdpa_prefill_tokens = None
    g = torch.Generator().manual_seed(6)
    seqs = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (511, 129, 128, 200, 40, 450)]
    span = 40  # pages per request
    batch = [request(s, 0, list(range(i * span, (i + 1) * span)), page_size=16) for i, s in enumerate(seqs[:5])]
    for runner in (routed, kernels):  # the last prompt's first 300 tokens, cached before the batch
        runner.execute([request(seqs[5][:300], 0, list(range(5 * span, 6 * span)), outputs=[], page_size=16)])
    batch.append(request(seqs[5], 300, list(range(5 * span, 6 * span)), page_size=16))
    got, want = routed.execute(batch), kernels.execute(batch)
    # the 300-token prefix and the four fresh prompts of >= 128 tokens; the 40-token one stays on the kernel
    assert routed.attention.num_sdpa_prefill_requests == 5 and kernels.attention.num_sdpa_prefill_requests == 0
    for k, (o, w) in enumerate(zip(got, want)):
        a, b = torch.stack(o.outputs).float(), torch.stack(w.outputs).float()
        assert torch.isfinite(a).all()
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 0.03, f"request {k}: relative logit difference {rel:.4f}"


@needs_gpu
def test_gpu_llama_3_2_1b_shape_matches_hf():
    hf, config = random_llama(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, inter=8192, vocab=128256,
                              tied=True, std=0.02)
    runner = cuda_runner(config, hf.state_dict(), num_pages=256)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128256, (n,), generator=g).tolist() for n in (45, 301)]
    for prompt, (toks, lg) in zip(prompts, greedy_run(runner, prompts, 24)):
        summary = check_against_hf(toks, lg, hf_teacher_forced(hf, prompt, toks), "llama-3.2-1B-shaped")
        assert summary["max_rel_logit_err"] < 0.05


def smollm2_dir() -> Path | None:
    env = os.environ.get("PIE_SMOLLM2_DIR")
    if env:
        return Path(env)
    from pie.engine.model_store import ModelStore

    entry = ModelStore().get("smollm2-135m")
    return Path(entry.path) if entry else None


@needs_gpu
def test_gpu_smollm2_greedy_matches_hf():
    path = smollm2_dir()
    if path is None or not (path / "config.json").exists():
        if os.environ.get("PIE_REQUIRE_SMOLLM2") == "1":
            raise AssertionError("PIE_REQUIRE_SMOLLM2=1 but SmolLM2 weights were not found (PIE_SMOLLM2_DIR)")
        pytest.skip("SmolLM2 weights not in the model store")
    import transformers
    from pie.engine.tokenizer import Tokenizer
    from pie.engine.weights import load_model_dir

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    config, state = load_model_dir(path)
    runner = cuda_runner(config, state)
    tok = Tokenizer(path)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))
               for text in ("What is the capital of France?", "Write a haiku about the sea.",
                            "List three prime numbers.")]
    for prompt, (toks, lg) in zip(prompts, greedy_run(runner, prompts, 48)):
        summary = check_against_hf(toks, lg, hf_teacher_forced(hf, prompt, toks), "SmolLM2-135M")
        assert summary["agree"] >= summary["steps"] - 2


# ----------------------------------------------------------------------------- choosing the device


def test_device_and_dtype_defaults_follow_the_machine():
    import argparse

    from pie.cli import _engine_config
    from pie.engine.config import resolve_device

    args = argparse.Namespace(device="auto", dtype="auto", page_size=16, kv_cache_mb=64, threads=None)
    config = _engine_config(args)
    if torch.cuda.is_available():
        assert (config.device, config.dtype) == ("cuda", "bfloat16")
    else:
        assert (config.device, config.dtype) == ("cpu", "float32")
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_names_a_missing_cuda_device(capsys):
    from pie.cli import main

    assert main(["generate", "--prompt", "hello", "--device", "cuda", "--max-tokens", "1"]) == 1
    assert "no CUDA device" in capsys.readouterr().err


def test_runner_on_cpu_has_no_cuda_path():
    hf, cfg = tiny_hf_model("llama")
    runner = ModelRunner(ModelConfig.from_hf(cfg), hf.state_dict(), EngineConfig(num_pages=8))
    assert runner.attention.name == "torch"
