"""The decoder-only transformer of the Llama and Qwen families, run over a flattened ragged batch.

Differences inside the families are switches of `ModelConfig`: q/k/v bias (Qwen2), RMSNorm of q and k
per head (Qwen3), rope scaling (Llama 3), sliding window (Mistral), tied embeddings (SmolLM2, Qwen).
Weights use HuggingFace names on load; q/k/v and gate/up are fused into one matmul each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pie.engine.attention import AttentionPlan, paged_attention
from pie.engine.config import ModelConfig
from pie.engine.kernels import linear
from pie.engine.kv_cache import PagedKVCache


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., C). Normalised in float32, as HF does, then scaled by weight in x's dtype."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Transformer:
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
        self.inv_freq = c.rope.inverse_frequencies(c.head_dim).to(self.device)  # (D/2,) float32
        self.scale = c.head_dim ** -0.5

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (N,) int64 -> cos, sin: (N, 1, D) in the model dtype."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # (N, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, write_slots: torch.Tensor,
                output_rows: torch.Tensor, plan: AttentionPlan, cache: PagedKVCache,
                input_embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """
        token_ids, positions, write_slots: (N,) int64 for the flattened batch.
        output_rows: (M,) int64 rows whose logits are wanted.
        Returns logits (M, vocab) float32. Writes the batch's K/V into `cache` at `write_slots`.
        """
        c = self.config
        n = token_ids.shape[0]
        if self.device.type != "cpu":  # the batch is described on the host
            token_ids, positions, write_slots, output_rows = (
                t.to(self.device, non_blocking=True) for t in (token_ids, positions, write_slots, output_rows))
            plan = plan.to(self.device)
        x = self.embed[token_ids]  # (N, H)
        if input_embeds is not None:  # (R,) rows and their (R, H) embeddings replace the token embeddings
            x[input_embeds[0]] = input_embeds[1].to(x.dtype)
        cos, sin = self.rope_tables(positions)
        for li, lw in enumerate(self.layers):
            h = rms_norm(x, lw.input_norm, c.rms_norm_eps)
            qkv = linear(h, lw.qkv, lw.qkv_bias)  # (N, (Hq + 2 Hkv) D)
            q = qkv[:, :c.q_size].view(n, c.num_heads, c.head_dim)
            k = qkv[:, c.q_size:c.q_size + c.kv_size].view(n, c.num_kv_heads, c.head_dim)
            v = qkv[:, c.q_size + c.kv_size:].view(n, c.num_kv_heads, c.head_dim)
            if lw.q_norm is not None:
                q = rms_norm(q, lw.q_norm, c.rms_norm_eps)
                k = rms_norm(k, lw.k_norm, c.rms_norm_eps)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            k_cache, v_cache = cache.k[li], cache.v[li]  # (slots, Hkv, D)
            k_cache[write_slots] = k
            v_cache[write_slots] = v
            attn = paged_attention(q, k, v, k_cache, v_cache, plan, self.scale)  # (N, Hq, D)
            x = x + linear(attn.reshape(n, c.q_size), lw.o)
            h = rms_norm(x, lw.post_attention_norm, c.rms_norm_eps)
            gate, up = linear(h, lw.gate_up).chunk(2, dim=-1)
            x = x + linear(F.silu(gate) * up, lw.down)
        h = rms_norm(x[output_rows], self.norm, c.rms_norm_eps)
        return linear(h, self.lm_head).float()


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
