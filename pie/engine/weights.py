"""Loading a model folder (HuggingFace layout): config.json + *.safetensors, plus the packed linear
layers of a GGUF kept quantized (model.gguf, see pie.engine.gguf_convert)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pie.engine.config import ModelConfig, UnsupportedModelError


class ModelFilesError(ValueError):
    """A model file is missing or unreadable."""


def safetensors_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFilesError(f"{path}: no .safetensors weights found")
    return files


def load_model_dir(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelFilesError(f"{path}: no config.json (expected a HuggingFace model folder)")
    config = ModelConfig.from_file(config_file)
    state_dict: dict[str, torch.Tensor] = {}
    for f in safetensors_files(path):
        try:
            state_dict.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFilesError(f"{f}: corrupt or unreadable safetensors file ({e})") from None
    from pie.engine.gguf_convert import PACKED_GGUF, packed_linears

    if (path / PACKED_GGUF).is_file():  # QuantizedWeight values: the CPU kernels multiply them packed
        state_dict.update(packed_linears(path / PACKED_GGUF))
    return config, state_dict


def check_model_dir(path: str | Path) -> ModelConfig:
    """Validates a model folder without loading its weights: config, architecture, readable headers."""
    from safetensors import safe_open

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelFilesError(f"{path}: no config.json (expected a HuggingFace model folder)")
    config = ModelConfig.from_file(config_file)
    names: set[str] = set()
    for f in safetensors_files(path):
        try:
            with safe_open(f, framework="pt") as fh:
                names.update(fh.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFilesError(f"{f}: corrupt or unreadable safetensors file ({e})") from None
    if "model.embed_tokens.weight" not in names:
        raise UnsupportedModelError(f"{path}: weights lack model.embed_tokens.weight (not a {config.architecture} checkpoint?)")
    return config
