"""Tiny random-weight HuggingFace models of each supported architecture, built from a config."""

from __future__ import annotations

import torch

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
THREE_LAYERS = {**TINY, "num_hidden_layers": 3}
ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "olmo2", "gemma2", "gemma3", "phi3", "mixtral",
         "qwen2_moe", "qwen3_moe"]


def tiny_hf_model(arch: str, seed: int = 0):
    """Returns (hf_model in fp32 eval mode, hf config dict)."""
    import transformers

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**TINY, rope_theta=10000.0, tie_word_embeddings=False)
    elif arch == "llama3":
        cfg = transformers.LlamaConfig(**TINY, rope_theta=500000.0, tie_word_embeddings=True,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**TINY, sliding_window=None, head_dim=16)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**TINY, tie_word_embeddings=True)
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False)
    elif arch == "olmo2":
        cfg = transformers.Olmo2Config(**TINY, eos_token_id=2, pad_token_id=1)
    elif arch == "gemma2":  # window shorter than the tests' sequences; caps small enough to bend scores
        cfg = transformers.Gemma2Config(**THREE_LAYERS, head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
                                        attn_logit_softcapping=0.2, final_logit_softcapping=0.3)
    elif arch == "gemma3":  # global layer 1 with linear rope scaling, local layers 0 and 2 with their own theta
        cfg = transformers.Gemma3TextConfig(
            **THREE_LAYERS, head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                             "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}})
        cfg.architectures = ["Gemma3ForCausalLM"]
    elif arch == "phi3":  # LongRoPE: long factors past 64 tokens; max/original = 8 scales cos and sin
        gen = torch.Generator().manual_seed(seed)
        cfg = transformers.Phi3Config(
            **TINY, pad_token_id=0, eos_token_id=2, original_max_position_embeddings=64,
            rope_scaling={"rope_type": "longrope",
                          "short_factor": (1 + torch.rand(8, generator=gen)).tolist(),
                          "long_factor": (2 + 6 * torch.rand(8, generator=gen)).tolist()})
    elif arch == "mixtral":
        cfg = transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)
    elif arch == "qwen2_moe":  # a shared expert; layer 1 keeps a dense MLP
        cfg = transformers.Qwen2MoeConfig(**THREE_LAYERS, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                          mlp_only_layers=[1])
    elif arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**TINY, head_dim=32, num_experts=8, num_experts_per_tok=3,
                                          moe_intermediate_size=32, norm_topk_prob=True)
    else:
        raise ValueError(arch)
    if not cfg.architectures:
        cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms are initialised to 1 (Gemma's to 0); randomise them so they are exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            elif name.endswith("mlp.gate.weight"):  # routers: clear preferences, no near-ties in the top k
                p.normal_(0, 1.0)
    model.eval()
    return model, cfg.to_dict()


# Tiny LoRA adapters: (rank, lora_alpha, target modules, rslora), different enough that a mix-up shows
TINY_ADAPTERS = {
    "a1": (4, 8, ["q_proj", "v_proj"], False),
    "a2": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
    "a3": (2, 3, ["k_proj", "o_proj", "gate_proj", "down_proj"], False),
}


def tiny_lora_adapter(hf_model, out_dir, name: str, seed: int = 0) -> None:
    """Saves a random PEFT LoRA adapter (TINY_ADAPTERS[name]) of hf_model to out_dir with save_pretrained:
    A and B both random (PEFT's default B is zero, which would test nothing). hf_model is not changed."""
    import copy

    import peft

    rank, alpha, targets, rslora = TINY_ADAPTERS[name]
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                             lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(hf_model), config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.normal_(0, 0.2)
    model.save_pretrained(out_dir)
