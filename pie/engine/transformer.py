"""The decoder-only transformer of every supported family, run over a flattened ragged batch.

Differences between the families are switches of `ModelConfig`: q/k/v bias (Qwen2), RMSNorm of q and k
per head (Qwen3, Gemma 3) or over the whole projection (OLMo 2), where the norms sit (before each
sublayer: Llama; before and after: Gemma; after: OLMo 2), GeGLU (Gemma), scaled embeddings and logit
soft-capping (Gemma 2), mixtures of experts (Mixtral, Qwen-MoE); rope scaling, sliding windows and
attention soft-capping belong to the attention backend. Weights use HuggingFace names on load
(`_load_layer` knows each family's); q/k/v and gate/up are fused into one matmul each, experts
stacked into (E, ...) tensors.

`Transformer.forward` is the one layer loop of every device: RoPE, the paged-KV write and attention
come from an attention backend (pie.engine.attention), the norms and linear layers from the backend's
layer ops (pie.engine.layer_ops), so each path keeps its own numerics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pie.engine.attention.base import AttentionBackend
from pie.engine.config import ModelConfig
from pie.engine.layer_ops import rms_norm
from pie.engine.lora import LayerLora, LoraBatch
from pie.engine.mlp import ACTIVATION_FUNCTIONS, GatedMLP, MixtureOfExperts


class WeightsError(ValueError):
    """A weight is missing or has the wrong shape."""


@dataclass
class LayerWeights:
    """One layer. A norm that the family's layout lacks is None (see ModelConfig.norm_layout)."""

    attn_norm: torch.Tensor | None  # (H,) on the attention's input (pre, sandwich)
    qkv: torch.Tensor  # (Hq*D + 2*Hkv*D, H)
    qkv_bias: torch.Tensor | None  # (Hq*D + 2*Hkv*D,)
    q_norm: torch.Tensor | None  # (D,) per head, or (Hq*D,) over the whole projection
    k_norm: torch.Tensor | None  # (D,) per head, or (Hkv*D,)
    o: torch.Tensor  # (H, Hq*D)
    attn_out_norm: torch.Tensor | None  # (H,) on the attention's output, before the residual add (sandwich, post)
    mlp_norm: torch.Tensor | None  # (H,) on the MLP's input (pre, sandwich)
    mlp: GatedMLP | MixtureOfExperts
    mlp_out_norm: torch.Tensor | None  # (H,) on the MLP's output, before the residual add (sandwich, post)


# HF names of a layer's norms, by layout: (attn_norm, attn_out_norm, mlp_norm, mlp_out_norm)
_NORM_NAMES = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),
}


class Transformer:
    """The model's weights (fused per layer, on `device` in `dtype`) and its forward pass."""

    def __init__(self, config: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: str | torch.device = "cpu"):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        take = _WeightTaker(state_dict, dtype, self.device, config.norm_weight_offset)
        c = config
        self.embed = take("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
        # HF multiplies by the scale rounded to the model dtype
        self.embed_scale = (None if c.embedding_scale is None
                            else torch.tensor(c.embedding_scale, dtype=dtype, device=self.device))
        self.act = ACTIVATION_FUNCTIONS[c.hidden_act]
        self.layers = [_load_layer(c, take, i) for i in range(c.num_layers)]
        self.norm = take.norm("model.norm.weight", (c.hidden_size,))
        if c.tie_word_embeddings and "lm_head.weight" not in state_dict:
            self.lm_head = self.embed
        else:
            self.lm_head = take("lm_head.weight", (c.vocab_size, c.hidden_size))

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(N, H) input embeddings of token_ids (N,) int64: rows of the embedding table, scaled as the
        family says; a fresh tensor."""
        rows = self.embed[token_ids]
        return rows if self.embed_scale is None else rows * self.embed_scale

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, attention: AttentionBackend, plan: Any,
                output_rows: torch.Tensor | None = None,
                input_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
                lora: LoraBatch | None = None) -> torch.Tensor:
        """Logits (M, vocab) float32 of the flattened batch's output rows; writes the batch's K/V.

        token_ids: (N,) int64 on the model's device. attention, plan: the backend and its plan of this
        batch (`attention.plan(batch)`: positions, write slots, who attends what). output_rows: (M,)
        int64 rows whose logits are wanted, None for all N. input_embeds: (E,) int64 rows and their
        (E, H) embeddings (as `embed_tokens` gives them), used instead of those rows' token embeddings.
        lora: the batch's LoRA deltas (pie.engine.lora), added to the projections' outputs; None: none.
        Only device work, except for a mixture of experts (its per-expert row counts come to the host).
        """
        c, ops, eps = self.config, attention.ops, self.config.rms_norm_eps
        residual = self.embed_tokens(token_ids)  # (N, H), a fresh tensor: the residual stream
        if input_embeds is not None:
            residual[input_embeds[0]] = input_embeds[1].to(residual.dtype)
        first_norm = self.layers[0].attn_norm
        h = residual if first_norm is None else ops.rms_norm(residual, first_norm, eps)
        for li, lw in enumerate(self.layers):
            layer_lora = None if lora is None else lora.layer(li)
            attn = self._attention(li, lw, h, attention, plan, layer_lora)  # (N, H)
            h, residual = _add_to_residual(ops, attn, residual, lw.attn_out_norm, lw.mlp_norm, eps)
            mlp = lw.mlp(h, ops, self.act) if layer_lora is None else lw.mlp(h, ops, self.act, layer_lora)  # (N, H)
            next_norm = self.layers[li + 1].attn_norm if li + 1 < len(self.layers) else self.norm
            h, residual = _add_to_residual(ops, mlp, residual, lw.mlp_out_norm, next_norm, eps)  # the next input
        if output_rows is not None:
            h = h[output_rows]
        logits = ops.linear(h, self.lm_head)  # (M, V)
        if c.final_logit_softcap is not None:
            logits = torch.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
        return logits.float()

    def _attention(self, li: int, lw: LayerWeights, h: torch.Tensor, attention: AttentionBackend,
                   plan: Any, lora: LayerLora | None = None) -> torch.Tensor:
        """The attention sublayer of layer li on its input h (N, H): (N, H), before any output norm.
        lora: (group, x, y) -> None adds the layer's LoRA deltas to a projection's output y in place."""
        c, ops, eps = self.config, attention.ops, self.config.rms_norm_eps
        n = h.shape[0]
        qkv = ops.linear(h, lw.qkv, lw.qkv_bias)  # (N, (Hq + 2 Hkv) D)
        if lora is not None:
            lora("qkv", h, qkv)
        q = qkv[:, :c.q_size]
        k = qkv[:, c.q_size:c.q_size + c.kv_size]
        v = qkv[:, c.q_size + c.kv_size:].view(n, c.num_kv_heads, c.head_dim)
        if c.qk_norm == "whole":  # OLMo 2: over all heads of the projection
            q, k = rms_norm(q, lw.q_norm, eps), rms_norm(k, lw.k_norm, eps)
        q = q.view(n, c.num_heads, c.head_dim)
        k = k.view(n, c.num_kv_heads, c.head_dim)
        if c.qk_norm == "per_head":  # Qwen3, Gemma 3: per head, before RoPE
            q, k = rms_norm(q, lw.q_norm, eps), rms_norm(k, lw.k_norm, eps)
        attn = attention.attend(plan, li, q, k, v)  # (N, Hq, D): RoPE, K/V into the cache, attention
        out = ops.linear(attn.view(n, c.q_size), lw.o)  # (N, H)
        if lora is not None:
            lora("o", attn.view(n, c.q_size), out)
        return out


def _add_to_residual(ops, x: torch.Tensor, residual: torch.Tensor, out_norm: torch.Tensor | None,
                     next_norm: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Adds a sublayer's output x (N, H), normed by out_norm when given, to the residual stream.
    Returns (the next sublayer's input: next_norm of the new residual, or the residual itself when the
    next sublayer has no input norm; the new residual). x may be overwritten (the CUDA ops fuse in place)."""
    if out_norm is not None:
        x = ops.rms_norm(x, out_norm, eps)
    if next_norm is None:
        residual = residual + x
        return residual, residual
    return ops.add_rms_norm(x, residual, next_norm, eps)


def _load_layer(c: ModelConfig, take: "_WeightTaker", i: int) -> LayerWeights:
    """Layer i's weights under the family's HF names."""
    p = f"model.layers.{i}."
    h, d = c.hidden_size, c.head_dim
    if c.family == "phi3":  # q, k and v are one projection in the checkpoint
        qkv = take(p + "self_attn.qkv_proj.weight", (c.q_size + 2 * c.kv_size, h))
    else:
        qkv = torch.cat([take(p + "self_attn.q_proj.weight", (c.q_size, h)),
                         take(p + "self_attn.k_proj.weight", (c.kv_size, h)),
                         take(p + "self_attn.v_proj.weight", (c.kv_size, h))])
    qkv_bias = None
    if c.attention_bias:
        qkv_bias = torch.cat([take(p + "self_attn.q_proj.bias", (c.q_size,)),
                              take(p + "self_attn.k_proj.bias", (c.kv_size,)),
                              take(p + "self_attn.v_proj.bias", (c.kv_size,))])
    q_norm = k_norm = None
    if c.qk_norm is not None:
        q_shape, k_shape = ((d,), (d,)) if c.qk_norm == "per_head" else ((c.q_size,), (c.kv_size,))
        q_norm = take.norm(p + "self_attn.q_norm.weight", q_shape)
        k_norm = take.norm(p + "self_attn.k_norm.weight", k_shape)
    attn_norm, attn_out_norm, mlp_norm, mlp_out_norm = (
        None if name is None else take.norm(f"{p}{name}.weight", (h,)) for name in _NORM_NAMES[c.norm_layout])
    return LayerWeights(attn_norm=attn_norm, qkv=qkv, qkv_bias=qkv_bias, q_norm=q_norm, k_norm=k_norm,
                        o=take(p + "self_attn.o_proj.weight", (h, c.q_size)), attn_out_norm=attn_out_norm,
                        mlp_norm=mlp_norm, mlp=_load_mlp(c, take, i), mlp_out_norm=mlp_out_norm)


def _load_mlp(c: ModelConfig, take: "_WeightTaker", i: int) -> GatedMLP | MixtureOfExperts:
    p = f"model.layers.{i}."
    if not c.layer_has_experts(i):
        if c.family == "phi3":
            return GatedMLP(take(p + "mlp.gate_up_proj.weight", (2 * c.intermediate_size, c.hidden_size)),
                            take(p + "mlp.down_proj.weight", (c.hidden_size, c.intermediate_size)))
        return _gated_mlp(take, p + "mlp.", c.intermediate_size, c.hidden_size)
    e, inter, h = c.num_experts, c.moe_intermediate_size, c.hidden_size
    if c.family == "mixtral" and take.has(p + "block_sparse_moe.gate.weight"):  # Mixtral's checkpoint names
        moe = p + "block_sparse_moe."
        router = take(moe + "gate.weight", (e, h))
        gate_up = torch.stack([torch.cat([take(f"{moe}experts.{j}.w1.weight", (inter, h)),
                                          take(f"{moe}experts.{j}.w3.weight", (inter, h))]) for j in range(e)])
        down = torch.stack([take(f"{moe}experts.{j}.w2.weight", (h, inter)) for j in range(e)])
    else:
        moe = p + "mlp."
        router = take(moe + "gate.weight", (e, h))
        if take.has(moe + "experts.gate_up_proj"):  # transformers 5 keeps experts stacked
            gate_up = take(moe + "experts.gate_up_proj", (e, 2 * inter, h))
            down = take(moe + "experts.down_proj", (e, h, inter))
        else:  # the checkpoints' per-expert names
            experts = [_gated_mlp(take, f"{moe}experts.{j}.", inter, h) for j in range(e)]
            gate_up = torch.stack([x.gate_up for x in experts])
            down = torch.stack([x.down for x in experts])
    shared = shared_gate = None
    if c.shared_expert_intermediate_size:
        shared = _gated_mlp(take, moe + "shared_expert.", c.shared_expert_intermediate_size, h)
        shared_gate = take(moe + "shared_expert_gate.weight", (1, h))
    return MixtureOfExperts(router=router, gate_up=gate_up.contiguous(), down=down.contiguous(),
                            top_k=c.num_experts_per_token, normalize=c.normalize_expert_weights,
                            shared=shared, shared_gate=shared_gate)


def _gated_mlp(take: "_WeightTaker", prefix: str, inter: int, hidden: int) -> GatedMLP:
    gate_up = torch.cat([take(prefix + "gate_proj.weight", (inter, hidden)),
                         take(prefix + "up_proj.weight", (inter, hidden))])
    return GatedMLP(gate_up, take(prefix + "down_proj.weight", (hidden, inter)))


class _WeightTaker:
    """Looks weights up by HF name, checks shapes, converts dtype/device, names what is missing.
    norm_offset: added to RMSNorm weights (`norm`) in float32 before the conversion (Gemma's 1 + w)."""

    def __init__(self, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
                 norm_offset: float = 0.0):
        self.state_dict = state_dict
        self.dtype = dtype
        self.device = device
        self.norm_offset = norm_offset

    def has(self, name: str) -> bool:
        return name in self.state_dict

    def norm(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """An RMSNorm weight, as the norm scales by it (offset added)."""
        if not self.norm_offset:
            return self(name, shape)
        w = self(name, shape, dtype=torch.float32) + self.norm_offset
        return w.to(self.dtype).contiguous()

    def __call__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.state_dict:
            raise WeightsError(f"weights: missing tensor {name!r}")
        t = self.state_dict[name]
        if tuple(t.shape) != shape:
            raise WeightsError(f"weights: {name!r} has shape {tuple(t.shape)}, expected {shape}")
        return t.to(device=self.device, dtype=dtype or self.dtype).contiguous()
