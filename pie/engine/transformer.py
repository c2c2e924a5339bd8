"""The decoder-only transformer of the Llama and Qwen families, run over a flattened ragged batch.

Differences inside the families are switches of `ModelConfig`: q/k/v bias (Qwen2), RMSNorm of q and k
per head (Qwen3), rope scaling (Llama 3), sliding window (Mistral), tied embeddings (SmolLM2, Qwen).
Weights use HuggingFace names on load; q/k/v and gate/up are fused into one matmul each.

`Transformer.forward` is the one layer loop of every device: RoPE, the paged-KV write and attention
come from an attention backend (pie.engine.attention), the norms and linear layers from the backend's
layer ops (pie.engine.layer_ops), so each path keeps its own numerics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pie.engine.attention.base import AttentionBackend
from pie.engine.config import ModelConfig
from pie.engine.layer_ops import rms_norm


class WeightsError(ValueError):
    """A weight is missing or has the wrong shape."""


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # (H,)
    qkv: torch.Tensor  # (Hq*D + 2*Hkv*D, H)
    qkv_bias: torch.Tensor | None  # (Hq*D + 2*Hkv*D,)
    q_norm: torch.Tensor | None  # (D,)
    k_norm: torch.Tensor | None  # (D,)
    o: torch.Tensor  # (H, Hq*D)
    post_attention_norm: torch.Tensor  # (H,)
    gate_up: torch.Tensor  # (2*I, H)
    down: torch.Tensor  # (H, I)


class Transformer:
    """The model's weights (fused per layer, on `device` in `dtype`) and its forward pass."""

    def __init__(self, config: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: str | torch.device = "cpu"):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        take = _WeightTaker(state_dict, dtype, self.device)
        c = config
        self.embed = take("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
        self.layers: list[LayerWeights] = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            qkv = torch.cat([take(p + "self_attn.q_proj.weight", (c.q_size, c.hidden_size)),
                             take(p + "self_attn.k_proj.weight", (c.kv_size, c.hidden_size)),
                             take(p + "self_attn.v_proj.weight", (c.kv_size, c.hidden_size))])
            qkv_bias = None
            if c.attention_bias:
                qkv_bias = torch.cat([take(p + "self_attn.q_proj.bias", (c.q_size,)),
                                      take(p + "self_attn.k_proj.bias", (c.kv_size,)),
                                      take(p + "self_attn.v_proj.bias", (c.kv_size,))])
            gate_up = torch.cat([take(p + "mlp.gate_proj.weight", (c.intermediate_size, c.hidden_size)),
                                 take(p + "mlp.up_proj.weight", (c.intermediate_size, c.hidden_size))])
            self.layers.append(LayerWeights(
                input_norm=take(p + "input_layernorm.weight", (c.hidden_size,)),
                qkv=qkv,
                qkv_bias=qkv_bias,
                q_norm=take(p + "self_attn.q_norm.weight", (c.head_dim,)) if c.qk_norm else None,
                k_norm=take(p + "self_attn.k_norm.weight", (c.head_dim,)) if c.qk_norm else None,
                o=take(p + "self_attn.o_proj.weight", (c.hidden_size, c.q_size)),
                post_attention_norm=take(p + "post_attention_layernorm.weight", (c.hidden_size,)),
                gate_up=gate_up,
                down=take(p + "mlp.down_proj.weight", (c.hidden_size, c.intermediate_size)),
            ))
        self.norm = take("model.norm.weight", (c.hidden_size,))
        if c.tie_word_embeddings and "lm_head.weight" not in state_dict:
            self.lm_head = self.embed
        else:
            self.lm_head = take("lm_head.weight", (c.vocab_size, c.hidden_size))

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, attention: AttentionBackend, plan: Any,
                output_rows: torch.Tensor | None = None,
                input_embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (M, vocab) float32 of the flattened batch's output rows; writes the batch's K/V.

        token_ids: (N,) int64 on the model's device. attention, plan: the backend and its plan of this
        batch (`attention.plan(batch)`: positions, write slots, who attends what). output_rows: (M,)
        int64 rows whose logits are wanted, None for all N. input_embeds: (E,) int64 rows and their
        (E, H) embeddings, used instead of those rows' token embeddings.
        Only device work: capturable in a CUDA graph.
        """
        c, ops, eps = self.config, attention.ops, self.config.rms_norm_eps
        n = token_ids.shape[0]
        residual = self.embed[token_ids]  # (N, H), a fresh tensor: the residual stream
        if input_embeds is not None:
            residual[input_embeds[0]] = input_embeds[1].to(residual.dtype)
        h = ops.rms_norm(residual, self.layers[0].input_norm, eps)
        for li, lw in enumerate(self.layers):
            qkv = ops.linear(h, lw.qkv, lw.qkv_bias)  # (N, (Hq + 2 Hkv) D)
            q = qkv[:, :c.q_size].view(n, c.num_heads, c.head_dim)
            k = qkv[:, c.q_size:c.q_size + c.kv_size].view(n, c.num_kv_heads, c.head_dim)
            v = qkv[:, c.q_size + c.kv_size:].view(n, c.num_kv_heads, c.head_dim)
            if lw.q_norm is not None:  # Qwen3: per-head RMSNorm before RoPE
                q = rms_norm(q, lw.q_norm, eps)
                k = rms_norm(k, lw.k_norm, eps)
            attn = attention.attend(plan, li, q, k, v)  # (N, Hq, D): RoPE, K/V into the cache, attention
            o = ops.linear(attn.view(n, c.q_size), lw.o)
            h, residual = ops.add_rms_norm(o, residual, lw.post_attention_norm, eps)
            gate, up = ops.linear(h, lw.gate_up).chunk(2, dim=-1)
            mlp = ops.linear(F.silu(gate) * up, lw.down)
            next_norm = self.layers[li + 1].input_norm if li + 1 < len(self.layers) else self.norm
            h, residual = ops.add_rms_norm(mlp, residual, next_norm, eps)  # h: the next layer's input
        if output_rows is not None:
            h = h[output_rows]
        return ops.linear(h, self.lm_head).float()


class _WeightTaker:
    """Looks weights up by HF name, checks shapes, converts dtype/device, names what is missing."""

    def __init__(self, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device):
        self.state_dict = state_dict
        self.dtype = dtype
        self.device = device

    def __call__(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.state_dict:
            raise WeightsError(f"weights: missing tensor {name!r}")
        t = self.state_dict[name]
        if tuple(t.shape) != shape:
            raise WeightsError(f"weights: {name!r} has shape {tuple(t.shape)}, expected {shape}")
        return t.to(device=self.device, dtype=self.dtype).contiguous()
