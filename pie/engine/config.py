"""Frozen configuration of the inference layer: the model's shape (`ModelConfig`) and the engine's
settings (`EngineConfig`). Both are validated on construction; the CLI only builds them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# HF architecture name -> family. The family decides which weights exist and how they are named (qkv
# bias, q/k norm, fused projections, norm layout, experts); `ModelConfig.from_hf` reads its settings.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Olmo2ForCausalLM": "olmo2",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
NORM_LAYOUTS = ("pre", "sandwich", "post")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModelError(ValueError):
    """The model's architecture or one of its settings is not supported."""


def supported_families() -> str:
    """The families and their HF architectures, for error messages:
    "gemma2 (Gemma2ForCausalLM), llama (LlamaForCausalLM, MistralForCausalLM), ..."."""
    by_family: dict[str, list[str]] = {}
    for arch, family in SUPPORTED_ARCHITECTURES.items():
        by_family.setdefault(family, []).append(arch)
    return ", ".join(f"{f} ({', '.join(sorted(a))})" for f, a in sorted(by_family.items()))


def unsupported_architecture(arch: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"architecture {arch!r} is not supported; supported families: {supported_families()}")


ROPE_KINDS = ("default", "linear", "llama3", "longrope")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # one of ROPE_KINDS
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # longrope (Phi-3): per-frequency divisors (head_dim // 2 each); a sequence longer than
    # original_max_position_embeddings is rotated with long_factor, a shorter one with short_factor
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0  # cos and sin are multiplied by it (longrope)

    def __post_init__(self) -> None:
        if self.kind not in ROPE_KINDS:
            raise UnsupportedModelError(f"rope scaling type {self.kind!r} is not supported "
                                        f"(supported: {', '.join(ROPE_KINDS)})")
        if self.kind == "longrope" and (not self.short_factor or len(self.short_factor) != len(self.long_factor)):
            raise UnsupportedModelError("longrope scaling needs short_factor and long_factor of equal length")

    def uses_long_factor(self, sequence_length: int) -> bool:
        """Whether a sequence of this many tokens is rotated with the long factors (longrope only)."""
        return self.kind == "longrope" and sequence_length > self.original_max_position_embeddings

    def inverse_frequencies(self, head_dim: int, long: bool = False) -> torch.Tensor:
        """(head_dim // 2,) float32 inverse frequencies, scaled as the rope type says (`long`: longrope's
        long factors instead of its short ones)."""
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # (D/2,)
        if self.kind == "longrope":
            factors = torch.tensor(self.long_factor if long else self.short_factor, dtype=torch.float32)
            if factors.shape != exponents.shape:
                raise UnsupportedModelError(f"longrope factors: {factors.numel()} values, expected {head_dim // 2}")
            return 1.0 / (factors * self.theta ** exponents)
        inv_freq = 1.0 / (self.theta ** exponents)
        if self.kind == "linear":
            return inv_freq / self.factor
        if self.kind == "llama3":
            low_freq_wavelen = self.original_max_position_embeddings / self.low_freq_factor
            high_freq_wavelen = self.original_max_position_embeddings / self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
            smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
            return torch.where(is_medium, smoothed, scaled)
        return inv_freq


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # of the dense MLPs
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    # RMSNorm of q and k before RoPE: None, "per_head" (over head_dim: Qwen3, Gemma 3) or "whole" (over
    # all heads of the projection: OLMo 2)
    qk_norm: str | None = None
    sliding_window: int | None = None  # a token sees at most this many latest positions (on sliding_layers)
    sliding_layers: tuple[int, ...] | None = None  # layers with the window; None: every layer (Mistral)
    local_rope: RopeConfig | None = None  # RoPE of the sliding-window layers when it differs (Gemma 3)
    # Where the RMSNorms sit in a layer: "pre" (before attention and before the MLP: Llama), "sandwich"
    # (before and after each: Gemma), "post" (after each, inside the residual branch: OLMo 2)
    norm_layout: str = "pre"
    norm_weight_offset: float = 0.0  # RMSNorms scale by (offset + weight): 1.0 in Gemma
    hidden_act: str = "silu"  # the gated MLP's activation, one of ACTIVATIONS (gelu_pytorch_tanh: GeGLU)
    embedding_scale: float | None = None  # token embeddings are multiplied by it (Gemma: sqrt(hidden_size))
    query_pre_attn_scalar: float | None = None  # softmax scale is its -1/2 power (Gemma); None: head_dim's
    attn_logit_softcap: float | None = None  # attention scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    # Mixture of experts (num_experts > 0): each token's MLP is the weighted sum of the top
    # num_experts_per_token of num_experts gated MLPs of moe_intermediate_size, plus a shared expert
    # of shared_expert_intermediate_size (Qwen2-MoE) when that is positive; dense_layers keep a dense MLP.
    num_experts: int = 0
    num_experts_per_token: int = 0
    moe_intermediate_size: int = 0
    normalize_expert_weights: bool = False  # the chosen experts' softmax weights are rescaled to sum to 1
    shared_expert_intermediate_size: int = 0
    dense_layers: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise unsupported_architecture(self.architecture)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise UnsupportedModelError(f"config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"config: num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.qk_norm not in (None, "per_head", "whole"):
            raise UnsupportedModelError(f"config: qk_norm {self.qk_norm!r} is not None, 'per_head' or 'whole'")
        if self.norm_layout not in NORM_LAYOUTS:
            raise UnsupportedModelError(f"config: norm_layout {self.norm_layout!r} is not one of {NORM_LAYOUTS}")
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedModelError(f"activation {self.hidden_act!r} is not supported "
                                        f"(supported: {', '.join(ACTIVATIONS)})")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise UnsupportedModelError(f"config: sliding_window must be positive, got {self.sliding_window}")
        for cap in (self.attn_logit_softcap, self.final_logit_softcap):
            if cap is not None and cap <= 0:
                raise UnsupportedModelError(f"config: soft-capping values must be positive, got {cap}")
        if self.num_experts:
            if not 1 <= self.num_experts_per_token <= self.num_experts or self.moe_intermediate_size <= 0:
                raise UnsupportedModelError(
                    f"config: {self.num_experts_per_token} experts per token of {self.num_experts}, expert size "
                    f"{self.moe_intermediate_size}: need 1 <= experts per token <= experts and a positive size")

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def softmax_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_sliding_layer(self, layer: int) -> bool:
        """Whether `layer` is a sliding-window (local) layer: with a window, all layers unless
        sliding_layers names some; without one, the layers sliding_layers names (for their RoPE)."""
        if self.sliding_layers is not None:
            return layer in self.sliding_layers
        return self.sliding_window is not None

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer`, None when it attends over the whole sequence."""
        return self.sliding_window if self.is_sliding_layer(layer) else None

    def layer_rope(self, layer: int) -> RopeConfig:
        return self.local_rope if self.local_rope is not None and self.is_sliding_layer(layer) else self.rope

    def layer_has_experts(self, layer: int) -> bool:
        return self.is_moe and layer not in self.dense_layers

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a HuggingFace config.json dictionary (transformers 4.x or 5.x spelling)."""
        architectures = hf.get("architectures") or []
        if not architectures:
            raise UnsupportedModelError("config.json names no architecture")
        arch = architectures[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise unsupported_architecture(arch)
        family = SUPPORTED_ARCHITECTURES[arch]
        try:
            num_heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            num_layers = int(hf["num_hidden_layers"])
            max_positions = int(hf.get("max_position_embeddings", 4096))
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            rope, local_rope = _ropes_from_hf(hf, max_positions)
            sliding = hf.get("sliding_window")
            if not (family in ("llama", "phi3", "mixtral", "gemma2", "gemma3") or hf.get("use_sliding_window")):
                sliding = None
            gemma = family in ("gemma2", "gemma3")
            softcaps = {key: float(hf[key]) if hf.get(key) is not None else None
                        for key in ("attn_logit_softcapping", "final_logit_softcapping")}
            fields: dict[str, Any] = dict(
                architecture=arch,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=num_layers,
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(hf.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope=rope,
                local_rope=local_rope,
                max_position_embeddings=max_positions,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
                attention_bias=bool(hf.get("attention_bias", hf.get("qkv_bias", family in ("qwen2", "qwen2_moe")))),
                qk_norm={"qwen3": "per_head", "qwen3_moe": "per_head", "gemma3": "per_head",
                         "olmo2": "whole"}.get(family),
                sliding_window=int(sliding) if sliding else None,
                sliding_layers=_sliding_layers(hf, family, num_layers) if sliding or local_rope else None,
                norm_layout={"gemma2": "sandwich", "gemma3": "sandwich", "olmo2": "post"}.get(family, "pre"),
                norm_weight_offset=1.0 if gemma else 0.0,
                hidden_act=str(hf.get("hidden_activation") or hf.get("hidden_act") or "silu"),
                embedding_scale=hidden ** 0.5 if gemma else None,
                query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or 256) if gemma else None,
                attn_logit_softcap=softcaps["attn_logit_softcapping"],
                final_logit_softcap=softcaps["final_logit_softcapping"],
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
            )
            if family in MOE_FAMILIES:
                fields.update(_experts_from_hf(hf, family, num_layers))
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, UnsupportedModelError):
                raise
            raise UnsupportedModelError(f"config.json is missing or has a bad value: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        try:
            return cls.from_hf(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise UnsupportedModelError(f"{path}: not valid JSON ({e})") from None


def _rope_from_params(params: dict[str, Any], hf: dict[str, Any], max_positions: int,
                      default_theta: float = 10000.0) -> RopeConfig:
    """One RopeConfig from a rope_parameters / rope_scaling dictionary (HF spellings of both versions)."""
    theta = float(params.get("rope_theta", hf.get("rope_theta", default_theta)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "su":  # the first name of longrope in Phi-3 configs
        kind = "longrope"
    partial = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0)
    if partial != 1.0:
        raise UnsupportedModelError(f"partial rotary embeddings (partial_rotary_factor {partial}) are not supported")
    original = int(params.get("original_max_position_embeddings")
                   or hf.get("original_max_position_embeddings") or 8192)
    factor = float(params.get("factor") or 1.0)
    attention_factor = 1.0
    if kind == "longrope":
        # the scaling of cos/sin the LongRoPE paper suggests, from the context extension factor
        factor = float(params.get("factor") or max_positions / original)
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeConfig(
        theta=theta, kind=kind, factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        short_factor=tuple(float(f) for f in params.get("short_factor") or ()),
        long_factor=tuple(float(f) for f in params.get("long_factor") or ()),
        attention_factor=float(attention_factor))


def _ropes_from_hf(hf: dict[str, Any], max_positions: int) -> tuple[RopeConfig, RopeConfig | None]:
    """(RoPE of the model, or of its full-attention layers; RoPE of its sliding-window layers when it
    differs: Gemma 3's rope_local_base_freq, or transformers 5's per-layer-type rope_parameters)."""
    params = dict(hf.get("rope_parameters") or {})
    if "full_attention" in params or "sliding_attention" in params:
        full = _rope_from_params(dict(params.get("full_attention") or {}), hf, max_positions)
        local = _rope_from_params(dict(params.get("sliding_attention") or {}), hf, max_positions)
        return full, (local if local != full else None)
    rope = _rope_from_params({**dict(hf.get("rope_scaling") or {}), **params}, hf, max_positions)
    if hf.get("rope_local_base_freq") is not None:
        local = RopeConfig(theta=float(hf["rope_local_base_freq"]))
        return rope, (local if local != rope else None)
    return rope, None


def _sliding_layers(hf: dict[str, Any], family: str, num_layers: int) -> tuple[int, ...] | None:
    """Layers with the sliding window: from layer_types, or Gemma's pattern (every pattern-th layer
    global); None (every layer) for the other families."""
    layer_types = hf.get("layer_types")
    if layer_types:
        if len(layer_types) != num_layers:
            raise UnsupportedModelError(f"config: {len(layer_types)} layer_types for {num_layers} layers")
        unknown = set(layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise UnsupportedModelError(f"config: layer types {sorted(unknown)} are not supported")
        return tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    if family in ("gemma2", "gemma3"):
        pattern = int(hf.get("sliding_window_pattern") or (2 if family == "gemma2" else 6))
        return tuple(i for i in range(num_layers) if (i + 1) % pattern)
    return None


def _experts_from_hf(hf: dict[str, Any], family: str, num_layers: int) -> dict[str, Any]:
    """The ModelConfig fields of a mixture-of-experts family."""
    num_experts = int(hf.get("num_local_experts") or hf.get("num_experts") or 0)
    if num_experts <= 0:
        raise UnsupportedModelError(f"config: a {family} model needs num_experts (or num_local_experts) > 0")
    fields: dict[str, Any] = dict(num_experts=num_experts, num_experts_per_token=int(hf["num_experts_per_tok"]))
    if family == "mixtral":
        fields.update(moe_intermediate_size=int(hf["intermediate_size"]), normalize_expert_weights=True)
        return fields
    step = int(hf.get("decoder_sparse_step") or 1)
    mlp_only = {int(i) for i in hf.get("mlp_only_layers") or ()}
    fields.update(
        moe_intermediate_size=int(hf["moe_intermediate_size"]),
        normalize_expert_weights=bool(hf.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0)
        if family == "qwen2_moe" else 0,
        dense_layers=tuple(i for i in range(num_layers) if i in mlp_only or (i + 1) % step))
    return fields


def resolve_device(name: str) -> str:
    """"auto" -> "cuda" when torch sees a CUDA device, else "cpu"; other names are checked and kept."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device name (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch sees no CUDA device here (torch {torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: only cpu and cuda are supported")
    return name


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the model runner. `num_pages` None sizes the KV cache from `kv_cache_mb`."""

    dtype: str = "float32"
    device: str = "cpu"
    page_size: int = 16
    num_pages: int | None = None
    kv_cache_mb: int = 1024
    max_batch_tokens: int = 8192
    max_batch_requests: int = 1024
    embedding_slots: int = 4096  # rows of the input-embedding table (pie.engine.embedding_table)
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    cuda_kernels: bool = True  # on CUDA devices, attend with our kernels (pie.engine.attention.cuda; False: PyTorch)
    cuda_graphs: bool = True  # on the CUDA kernel path, replay decode batches as CUDA graphs

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.page_size <= 0:
            raise ValueError(f"page_size must be positive, got {self.page_size}")
        if self.num_pages is not None and self.num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {self.num_pages}")
        if self.kv_cache_mb <= 0 or self.max_batch_tokens <= 0 or self.max_batch_requests <= 0:
            raise ValueError("kv_cache_mb, max_batch_tokens and max_batch_requests must be positive")
        if self.embedding_slots <= 0:
            raise ValueError(f"embedding_slots must be positive, got {self.embedding_slots}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def pages_for(self, model: ModelConfig) -> int:
        if self.num_pages is not None:
            return self.num_pages
        bytes_per_page = (2 * model.num_layers * self.page_size * model.kv_size
                          * torch.tensor([], dtype=self.torch_dtype).element_size())
        return max(1, (self.kv_cache_mb << 20) // bytes_per_page)
