"""Tiny random-weight HuggingFace models of each supported architecture, built from a config."""

from __future__ import annotations

import torch

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


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
    else:
        raise ValueError(arch)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms are initialised to 1; randomise them so they are exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.eval()
    return model, cfg.to_dict()
