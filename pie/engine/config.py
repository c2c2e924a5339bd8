"""Frozen configuration of the inference layer: the model's shape (`ModelConfig`) and the engine's
settings (`EngineConfig`). Both are validated on construction; the CLI only builds them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# HF architecture name -> family. The family decides which weights exist (qkv bias, q/k norm).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModelError(ValueError):
    """The model's architecture or one of its settings is not supported."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("default", "linear", "llama3"):
            raise UnsupportedModelError(f"rope scaling type {self.kind!r} is not supported "
                                        "(supported: default, linear, llama3)")

    def inverse_frequencies(self, head_dim: int) -> torch.Tensor:
        """(head_dim // 2,) float32 inverse frequencies, scaled as the rope type says."""
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
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
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # Mistral-style: a token sees at most this many latest positions
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise UnsupportedModelError(f"config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"config: num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a HuggingFace config.json dictionary (transformers 4.x or 5.x spelling)."""
        architectures = hf.get("architectures") or []
        if not architectures:
            raise UnsupportedModelError("config.json names no architecture")
        arch = architectures[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported (supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
        family = SUPPORTED_ARCHITECTURES[arch]
        try:
            num_heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            rope_params = dict(hf.get("rope_parameters") or {})
            rope_scaling = dict(hf.get("rope_scaling") or {})
            rope_params = {**rope_scaling, **rope_params}
            theta = float(rope_params.get("rope_theta", hf.get("rope_theta", 10000.0)))
            kind = rope_params.get("rope_type", rope_params.get("type", "default")) or "default"
            rope = RopeConfig(
                theta=theta, kind=kind, factor=float(rope_params.get("factor", 1.0)),
                low_freq_factor=float(rope_params.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope_params.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(rope_params.get("original_max_position_embeddings", 8192)))
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            sliding = hf.get("sliding_window") if (family == "llama" or hf.get("use_sliding_window")) else None
            return cls(
                architecture=arch,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(hf.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope=rope,
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", family == "qwen2")),
                qk_norm=family == "qwen3",
                sliding_window=int(sliding) if sliding else None,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
            )
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
