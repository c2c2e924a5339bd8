"""Features of single families against HF transformers (fp32, max abs diff <= 1e-4), each with a negative
control showing that the feature changes the logits (so the parity is not vacuous): Gemma's soft-capping,
per-layer sliding windows and per-layer RoPE; Phi-3's LongRoPE past original_max_position_embeddings;
grouped mixtures of experts (against a per-token reference, and from checkpoint folders); the refusals
of unsupported architectures and of features the CUDA kernels do not compute. (test_hf_parity.py runs
every family through prefill, decode over scattered pages and mixed batches.)"""

import dataclasses
import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from pie.engine.batch import ForwardRequest, RawLogits
from pie.engine.config import EngineConfig, ModelConfig, UnsupportedModelError
from pie.engine.layer_ops import LayerOps
from pie.engine.mlp import ACTIVATION_FUNCTIONS, MixtureOfExperts, run_experts
from pie.engine.runner import ModelRunner
from tiny_models import tiny_hf_model

TOL = 1e-4


def seq_request(ids, start, pages, page_size=4, outputs="all", **options):
    """Request for ids[start:] of a sequence laid out over `pages`; options: further ForwardRequest fields."""
    n = len(ids)
    used = -(-n // page_size)
    outs = [(i, RawLogits()) for i in range(n - start)] if outputs == "all" else outputs
    return ForwardRequest(token_ids=ids[start:], positions=list(range(start, n)), kv_page_ids=pages[:used],
                          kv_last_page_len=n - (used - 1) * page_size, outputs=outs, **options)


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]  # (T, V)


def prefill_diff(config: ModelConfig, hf, ids: list[int]) -> float:
    """Max |logit diff| of a runner built from `config` (and HF's weights) against HF, over a prefill of
    ids laid out over scattered pages and then one decode step."""
    runner = ModelRunner(config, hf.state_dict(), EngineConfig(num_pages=64, page_size=4))
    ref = hf_logits(hf, ids)
    pages = list(range(63, 0, -3))
    [res] = runner.execute([seq_request(ids[:-1], 0, pages)])
    [last] = runner.execute([seq_request(ids, len(ids) - 1, pages)])
    got = torch.cat([torch.stack(res.outputs), torch.stack(last.outputs)])
    return (got - ref).abs().max().item()


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 211, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- Gemma --------------------------------------------------------------------------------------
def test_gemma2_soft_capping_windows_and_scale_are_each_needed():
    hf, cfg = tiny_hf_model("gemma2")
    config = ModelConfig.from_hf(cfg)
    assert (config.attn_logit_softcap, config.final_logit_softcap) == (0.2, 0.3)
    assert config.sliding_layers == (0, 2) and config.sliding_window == 6  # layer 1 global
    assert [config.layer_window(i) for i in range(3)] == [6, None, 6]
    ids = random_ids(27, 20)  # longer than the window
    assert prefill_diff(config, hf, ids) <= TOL
    for change in (dict(attn_logit_softcap=None), dict(final_logit_softcap=None), dict(sliding_window=None),
                   dict(sliding_layers=None), dict(query_pre_attn_scalar=None), dict(embedding_scale=None)):
        assert prefill_diff(dataclasses.replace(config, **change), hf, ids) > 20 * TOL, change


def test_gemma3_local_rope_and_windows_are_each_needed():
    hf, cfg = tiny_hf_model("gemma3")
    config = ModelConfig.from_hf(cfg)
    assert config.local_rope is not None and config.local_rope.theta == 100.0
    assert config.rope.kind == "linear" and config.rope.factor == 4.0
    assert config.layer_rope(0) is config.local_rope and config.layer_rope(1) is config.rope
    ids = random_ids(25, 21)
    assert prefill_diff(config, hf, ids) <= TOL
    for change in (dict(local_rope=None), dict(sliding_window=None), dict(norm_weight_offset=0.0)):
        assert prefill_diff(dataclasses.replace(config, **change), hf, ids) > 20 * TOL, change


def test_gemma3_hub_config_spelling():
    """Gemma 3 configs written by transformers 4 spell the local RoPE as rope_local_base_freq and the
    global layers by a pattern."""
    config = ModelConfig.from_hf({
        "architectures": ["Gemma3ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 7, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
        "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window": 512, "sliding_window_pattern": 6, "query_pre_attn_scalar": 4,
        "hidden_activation": "gelu_pytorch_tanh"})
    assert config.sliding_layers == (0, 1, 2, 3, 4, 6)
    assert config.layer_rope(5) == config.rope and config.rope.factor == 8.0
    assert config.layer_rope(6).theta == 1e4 and config.layer_rope(6).kind == "default"
    assert config.hidden_act == "gelu_pytorch_tanh" and config.tie_word_embeddings


# ---- Phi-3 LongRoPE ------------------------------------------------------------------------------
def test_phi3_longrope_beyond_original_context():
    """A sequence longer than original_max_position_embeddings (64) rotates with the long factors:
    a fresh prefill matches HF's forward over the whole sequence; decoding past 64 tokens matches
    HF's own incremental decoding (whose cached keys keep the factors they were written with); in one
    batch, a long and a short request each get their own factors."""
    hf, cfg = tiny_hf_model("phi3")
    config = ModelConfig.from_hf(cfg)
    assert config.rope.kind == "longrope" and config.rope.original_max_position_embeddings == 64
    assert config.rope.attention_factor == pytest.approx((1 + torch.log(torch.tensor(8.0)).item()
                                                          / torch.log(torch.tensor(64.0)).item()) ** 0.5)
    runner = ModelRunner(config, hf.state_dict(), EngineConfig(num_pages=96, page_size=4))
    long_ids, short_ids = random_ids(80, 30), random_ids(20, 31)
    long_ref, short_ref = hf_logits(hf, long_ids), hf_logits(hf, short_ids)
    assert (long_ref[:64] - hf_logits(hf, long_ids[:64])).abs().max() > 20 * TOL  # the factors matter
    long_pages, short_pages = list(range(20, 40))[::-1], [90, 3, 50, 7, 60]
    long_res, short_res = runner.execute([seq_request(long_ids, 0, long_pages), seq_request(short_ids, 0, short_pages)])
    assert (torch.stack(long_res.outputs) - long_ref).abs().max().item() <= TOL
    assert (torch.stack(short_res.outputs) - short_ref).abs().max().item() <= TOL

    # HF decoding one token at a time from a 60-token prompt
    with torch.no_grad():
        out = hf(torch.tensor([long_ids[:60]]), use_cache=True)
        cache, steps = out.cache, [out.logits[0, -1]]
        for n in range(61, 81):
            out = hf(torch.tensor([long_ids[n - 1:n]]), cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits[0, -1])
    pages = list(range(60, 80))
    [res] = runner.execute([seq_request(long_ids[:60], 0, pages, outputs=[(59, RawLogits())])])
    got = [res.outputs[0]]
    for n in range(61, 81):
        [res] = runner.execute([seq_request(long_ids[:n], n - 1, pages)])
        got.append(res.outputs[0])
    assert (torch.stack(got) - torch.stack(steps)).abs().max().item() <= TOL
    assert (torch.stack(got)[-1] - long_ref[-1]).abs().max() > 20 * TOL  # differs from a fresh prefill, as in HF


def test_phi3_fused_projections_are_split_as_hf_does():
    hf, cfg = tiny_hf_model("phi3")
    runner = ModelRunner(ModelConfig.from_hf(cfg), hf.state_dict(), EngineConfig(num_pages=8, page_size=4))
    layer = runner.model.layers[0]
    sd = hf.state_dict()
    assert torch.equal(layer.qkv, sd["model.layers.0.self_attn.qkv_proj.weight"])
    assert torch.equal(layer.mlp.gate_up, sd["model.layers.0.mlp.gate_up_proj.weight"])


# ---- mixtures of experts -------------------------------------------------------------------------
def per_token_experts(h, experts, weights, gate_up, down, act):
    """The plain reference: every token, every chosen expert, one at a time."""
    out = torch.zeros_like(h)
    for n in range(h.shape[0]):
        for e, w in zip(experts[n].tolist(), weights[n]):
            gate, up = (gate_up[e] @ h[n]).chunk(2)
            out[n] += w * (down[e] @ (act(gate) * up))
    return out


@pytest.mark.parametrize("num_rows,num_experts,top_k", [(1, 4, 2), (7, 8, 3), (33, 16, 4), (5, 3, 3)])
def test_grouped_experts_match_per_token_reference(num_rows, num_experts, top_k):
    gen = torch.Generator().manual_seed(num_rows)
    hidden, inter = 24, 10
    moe = MixtureOfExperts(router=torch.randn(num_experts, hidden, generator=gen),
                           gate_up=torch.randn(num_experts, 2 * inter, hidden, generator=gen) / 5,
                           down=torch.randn(num_experts, hidden, inter, generator=gen) / 3, top_k=top_k, normalize=True)
    h = torch.randn(num_rows, hidden, generator=gen)
    experts, weights = moe.route(h, LayerOps)
    assert experts.shape == (num_rows, top_k)
    assert torch.allclose(weights.sum(-1), torch.ones(num_rows))
    act = ACTIVATION_FUNCTIONS["silu"]
    got = run_experts(h, experts, weights, moe.gate_up, moe.down, LayerOps, act)
    want = per_token_experts(h, experts, weights, moe.gate_up, moe.down, act)
    assert (got - want).abs().max().item() <= 1e-5


def test_experts_run_once_per_expert_not_per_token():
    """run_experts calls the linear op twice per expert that has tokens, whatever the number of tokens."""
    calls = []

    class CountingOps(LayerOps):
        @staticmethod
        def linear(x, w, bias=None):
            calls.append(x.shape[0])
            return LayerOps.linear(x, w, bias)

    gen = torch.Generator().manual_seed(3)
    experts = torch.tensor([[0, 2]] * 40 + [[2, 0]] * 9)  # 49 tokens, experts 1 and 3 unused
    weights = torch.full((49, 2), 0.5)
    run_experts(torch.randn(49, 8, generator=gen), experts, weights, torch.randn(4, 12, 8, generator=gen),
                torch.randn(4, 8, 6, generator=gen), CountingOps, ACTIVATION_FUNCTIONS["silu"])
    assert calls == [49, 49, 49, 49]  # gate_up and down of expert 0, then of expert 2


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_routing_spreads_over_experts(arch):
    """The tiny models route a batch to every expert, several per token (the parity tests then cover
    grouping with every expert busy)."""
    hf, cfg = tiny_hf_model(arch)
    config = ModelConfig.from_hf(cfg)
    runner = ModelRunner(config, hf.state_dict(), EngineConfig(num_pages=16, page_size=4))
    moe = next(lw.mlp for lw in runner.model.layers if isinstance(lw.mlp, MixtureOfExperts))
    h = runner.model.embed_tokens(torch.tensor(random_ids(37, 40)))
    experts, _ = moe.route(h, LayerOps)
    assert experts.shape[1] == config.num_experts_per_token >= 2
    assert set(experts.flatten().tolist()) == set(range(config.num_experts))
    if arch == "qwen2_moe":
        assert config.dense_layers == (1,) and not isinstance(runner.model.layers[1].mlp, MixtureOfExperts)
        assert runner.model.layers[0].mlp.shared is not None


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "olmo2", "gemma2", "phi3"])
def test_checkpoint_folder_matches_hf(tmp_path, arch):
    """From the folder save_pretrained writes (per-expert tensor names in the MoE checkpoints)."""
    hf, cfg = tiny_hf_model(arch)
    hf.save_pretrained(tmp_path)
    runner = ModelRunner.from_path(tmp_path, EngineConfig(num_pages=16, page_size=4))
    ids = random_ids(19, 41)
    [res] = runner.execute([seq_request(ids, 0, [9, 2, 11, 4, 5])])
    assert (torch.stack(res.outputs) - hf_logits(hf, ids)).abs().max().item() <= TOL


def test_mixtral_checkpoint_names(tmp_path):
    """Mixtral's own checkpoints name experts block_sparse_moe.experts.J.w1/w2/w3."""
    hf, cfg = tiny_hf_model("mixtral")
    sd = {}
    for name, t in hf.state_dict().items():
        if ".mlp.experts.gate_up_proj" in name:
            prefix = name.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts.")
            for j, w in enumerate(t):
                sd[f"{prefix}{j}.w1.weight"], sd[f"{prefix}{j}.w3.weight"] = (x.clone() for x in w.chunk(2))
        elif ".mlp.experts.down_proj" in name:
            prefix = name.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts.")
            for j, w in enumerate(t):
                sd[f"{prefix}{j}.w2.weight"] = w.clone()
        else:
            sd[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t
    runner = ModelRunner(ModelConfig.from_hf(cfg), sd, EngineConfig(num_pages=16, page_size=4))
    ids = random_ids(15, 42)
    [res] = runner.execute([seq_request(ids, 0, [1, 2, 3, 4])])
    assert (torch.stack(res.outputs) - hf_logits(hf, ids)).abs().max().item() <= TOL


# ---- refusals ------------------------------------------------------------------------------------
def test_unsupported_architecture_lists_families(tmp_path):
    from pie.engine.model_store import ModelStore, ModelStoreError

    with pytest.raises(UnsupportedModelError) as err:
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"]})
    message = str(err.value)
    for arch in ("LlamaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
                 "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "Olmo2ForCausalLM"):
        assert arch in message
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    save_file({"wte.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    with pytest.raises(ModelStoreError, match=r"'GPT2LMHeadModel' is not supported; supported families: .*gemma2 "
                                              r"\(Gemma2ForCausalLM\).*mixtral \(MixtralForCausalLM\)"):
        ModelStore(tmp_path / "home").add(str(folder))


def test_partial_rotary_is_refused():
    hf, cfg = tiny_hf_model("phi3")
    cfg = {**cfg, "rope_parameters": {**cfg["rope_parameters"], "partial_rotary_factor": 0.75}}
    with pytest.raises(UnsupportedModelError, match="partial rotary"):
        ModelConfig.from_hf(cfg)


@pytest.mark.parametrize("arch,feature", [("gemma2", "soft-capping"), ("gemma2", "some layers only"),
                                          ("gemma3", "separate RoPE"), ("phi3", "LongRoPE")])
def test_cuda_backend_refuses_what_its_kernels_do_not_compute(arch, feature):
    """The CUDA attention backend has one RoPE table, one window and a plain softmax: models needing
    more are refused by it (the runner then attends with the PyTorch backend, and says why)."""
    from pie.engine.attention.cuda import CudaAttention, kernel_unsupported_features

    hf, cfg = tiny_hf_model(arch)
    config = ModelConfig.from_hf(cfg)
    assert any(feature in f for f in kernel_unsupported_features(config))
    runner = ModelRunner(config, hf.state_dict(), EngineConfig(num_pages=8, page_size=4))
    with pytest.raises(UnsupportedModelError, match=feature):
        CudaAttention(config, runner.cache, kernels=None)  # refused before any kernel is touched
    for plain in ("llama", "olmo2", "mixtral"):
        assert kernel_unsupported_features(ModelConfig.from_hf(tiny_hf_model(plain)[1])) == []


@pytest.mark.parametrize("arch", ["olmo2", "mixtral", "qwen2_moe", "qwen3_moe", "phi3"])
def test_cuda_backend_plumbing_of_new_families(arch, monkeypatch):
    """The CUDA attention backend over the PyTorch stand-in for its kernels (tests/cuda/reference_kernels.py)
    gives the PyTorch backend's logits for the families it accepts: OLMo 2's post-norms and whole-projection
    q/k norms, mixtures of experts, Phi-3's fused projections (with plain RoPE and a sliding window:
    LongRoPE is refused, above), over prefill, decode, masks and input embeddings."""
    import importlib.util
    from pathlib import Path

    from pie.engine.attention.cuda import CudaAttention

    spec = importlib.util.spec_from_file_location(
        "reference_kernels", Path(__file__).parents[1] / "cuda" / "reference_kernels.py")
    kernels = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "reference_kernels", kernels)  # its dataclasses look their module up
    spec.loader.exec_module(kernels)
    hf, cfg = tiny_hf_model(arch)
    config = ModelConfig.from_hf(cfg)
    if arch == "phi3":
        config = dataclasses.replace(config, rope=ModelConfig.from_hf(tiny_hf_model("llama")[1]).rope, sliding_window=7)
    engine_config = EngineConfig(num_pages=64, page_size=4)
    reference = ModelRunner(config, hf.state_dict(), engine_config)
    path = ModelRunner(config, hf.state_dict(), engine_config)
    path.attention = CudaAttention(config, path.cache, kernels=kernels, min_sdpa_prefill_tokens=8)
    a, b, c = random_ids(13, 50), random_ids(9, 51), random_ids(5, 52)
    mask_b = [[1, i, 1, 8 - i - 1] if i < 8 else [9] for i in range(9)]  # first and own token; last row all
    embeddings = reference.embed_tokens(c) * 1.5
    steps = [[seq_request(a[:12], 0, [9, 2, 30, 4, 11]), seq_request(b, 0, [20, 21, 5], mask=mask_b)],
             [seq_request(a, 12, [9, 2, 30, 4, 11]), seq_request(c, 0, [40, 41], input_embeddings=embeddings)],
             [seq_request(a + [3, 4, 5], 13, [9, 2, 30, 4, 11])]]
    for step, batch in enumerate(steps):
        for k, (want, got) in enumerate(zip(reference.execute(batch), path.execute(batch))):
            diff = (torch.stack(want.outputs) - torch.stack(got.outputs)).abs().max().item()
            assert diff <= TOL, f"step {step} request {k}: {diff}"
    # a[:12] (unless past the window); b is masked, c too short
    assert path.attention.num_sdpa_prefill_requests == (0 if config.sliding_window else 1)
