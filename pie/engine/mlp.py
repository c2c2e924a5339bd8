"""The feed-forward blocks of a layer: the gated MLP (SwiGLU, GeGLU) and the mixture of experts (Mixtral,
Qwen2-MoE, Qwen3-MoE).

Experts run grouped: the (token, expert) assignments are sorted by expert, and each expert that
received any runs once, as two matmuls over the rows routed to it; no loop visits tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

Activation = Callable[[torch.Tensor], torch.Tensor]
ACTIVATION_FUNCTIONS: dict[str, Activation] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}


@dataclass
class GatedMLP:
    """down(act(gate(x)) * up(x))."""

    gate_up: torch.Tensor  # (2I, H): the gate projection's rows, then the up projection's
    down: torch.Tensor  # (H, I)

    def __call__(self, h: torch.Tensor, ops, act: Activation, lora=None) -> torch.Tensor:
        """h: (N, H) -> (N, H). ops: the backend's layer ops (pie.engine.layer_ops). lora: the layer's
        LoRA deltas (pie.engine.lora.LayerLora: (group, x, y) -> None, y += delta) or None."""
        gate_up = ops.linear(h, self.gate_up)  # (N, 2I)
        if lora is not None:
            lora("gate_up", h, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)  # (N, I) each
        if lora is None:
            return ops.linear(act(gate) * up, self.down)
        x = act(gate) * up  # (N, I)
        out = ops.linear(x, self.down)  # (N, H)
        lora("down", x, out)
        return out


@dataclass
class MixtureOfExperts:
    """Each token's output is the weighted sum of its top_k experts (gated MLPs), weighted by the router's
    softmax over all experts (renormalised over the chosen ones when `normalize`), plus, when present,
    a shared expert scaled by sigmoid(shared_gate . x) (Qwen2-MoE)."""

    router: torch.Tensor  # (E, H)
    gate_up: torch.Tensor  # (E, 2I, H): per expert, its gate rows then its up rows
    down: torch.Tensor  # (E, H, I)
    top_k: int
    normalize: bool
    shared: GatedMLP | None = None
    shared_gate: torch.Tensor | None = None  # (1, H)

    def route(self, h: torch.Tensor, ops) -> tuple[torch.Tensor, torch.Tensor]:
        """(experts (N, K) int64, weights (N, K) float32) chosen for each row of h (N, H)."""
        logits = ops.linear(h, self.router)  # (N, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts, weights

    def __call__(self, h: torch.Tensor, ops, act: Activation) -> torch.Tensor:
        """h: (N, H) -> (N, H)."""
        experts, weights = self.route(h, ops)
        out = run_experts(h, experts, weights, self.gate_up, self.down, ops, act)
        if self.shared is not None:
            out = out + torch.sigmoid(ops.linear(h, self.shared_gate)) * self.shared(h, ops, act)
        return out


def run_experts(h: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, ops, act: Activation) -> torch.Tensor:
    """sum over k of weights[n, k] * expert_{experts[n, k]}(h[n]), for every row n.

    h: (N, H); experts: (N, K) int64 in [0, E), no expert twice in a row; weights: (N, K) float32;
    gate_up: (E, 2I, H); down: (E, H, I). Returns (N, H) in h's dtype. Each expert with assignments runs
    one gate_up and one down matmul over its rows (gathered); its weighted outputs are added back in
    float32 products rounded to h's dtype, experts in ascending order.
    """
    num_rows, k = experts.shape
    flat = experts.reshape(-1)  # (N*K,) expert of each assignment, row-major
    order = torch.argsort(flat, stable=True)  # (N*K,) assignments grouped by expert
    rows = order // k  # (N*K,) the token row of each grouped assignment
    flat_weights = weights.reshape(-1)[order]  # (N*K,)
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()  # (E,) assignments per expert (host sync)
    out = torch.zeros_like(h)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        idx = rows[start:start + count]  # (C,) distinct rows routed to expert e
        gate, up = ops.linear(h[idx], gate_up[e]).chunk(2, dim=-1)  # (C, I) each
        y = ops.linear(act(gate) * up, down[e])  # (C, H)
        out.index_add_(0, idx, (y.float() * flat_weights[start:start + count, None]).to(h.dtype))
        start += count
    return out
