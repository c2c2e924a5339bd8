"""LoRA adapters: low-rank deltas on a base model's linear layers, many adapters in one batch.

An adapter is a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors). For each targeted
projection p of a layer it holds A_p (r, in) and B_p (out, r); the projection's output becomes
`y + scaling * (x @ A_p^T) @ B_p^T`, with scaling = lora_alpha / r (lora_alpha / sqrt(r) with rslora).

Our q/k/v and gate/up projections are fused (pie.engine.transformer), so an adapter's sub-projections
are fused the same way when it is loaded: per fused group (qkv, o, gate_up, down) one A (R, in), the
sub-projections' A stacked, and one B (out, R), their B (times scaling) placed block-diagonally into
the sub-projection's output columns; R is the sum of their ranks. A sub-projection the adapter does not
target has no block (zero delta).

A runner holds an `AdapterTable` (index 0 = no adapter). A forward pass names an adapter per request;
`LoraBatch` applies them grouped: for each distinct adapter in the batch, its rows are gathered, run
through two small matmuls and added back (`index_add_`): one loop per distinct adapter, none per token.

>>> table = AdapterTable(model_config, torch.float32, "cpu")       # doctest: +SKIP
>>> table.load("sql", "/path/to/peft_adapter")                      # doctest: +SKIP
1
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from typing import Callable

import torch

from pie.engine.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
GROUPS = ("qkv", "o", "gate_up", "down")  # the fused linear layers a delta may apply to

# PEFT's module name -> (its fused group, its part index in the group); qkv_proj / gate_up_proj: the
# checkpoints that fuse them already (Phi-3)
_PROJECTIONS = {
    "q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "qkv_proj": ("qkv", None),
    "o_proj": ("o", None),
    "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "gate_up_proj": ("gate_up", None),
    "down_proj": ("down", None),
}
# A layer's deltas: (group, x (N, in), y (N, out)) -> None, y += the delta of `group` in place
LayerLora = Callable[[str, torch.Tensor, torch.Tensor], None]
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


class AdapterError(ValueError):
    """An adapter cannot be used with this base model; the message says what is wrong (one line)."""


@dataclass(frozen=True)
class LoraConfig:
    """The parts of a PEFT LoraConfig that the deltas depend on."""

    rank: int
    alpha: float
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise AdapterError(f"{CONFIG_FILE}: r must be a positive integer, got {self.rank!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @classmethod
    def from_file(cls, path: Path) -> "LoraConfig":
        try:
            cfg = json.loads(path.read_text())
        except OSError:
            raise AdapterError(f"{path.parent}: no {CONFIG_FILE} (expected a PEFT LoRA adapter folder)") from None
        except ValueError as e:
            raise AdapterError(f"{path}: not JSON ({e})") from None
        if cfg.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
        unsupported = [(cfg.get("use_dora"), "use_dora"), (cfg.get("bias", "none") != "none", "bias"),
                       (cfg.get("modules_to_save"), "modules_to_save"), (cfg.get("rank_pattern"), "rank_pattern"),
                       (cfg.get("alpha_pattern"), "alpha_pattern"), (cfg.get("fan_in_fan_out"), "fan_in_fan_out"),
                       (cfg.get("lora_bias"), "lora_bias"), (cfg.get("layer_replication"), "layer_replication"),
                       (cfg.get("trainable_token_indices"), "trainable_token_indices"),
                       (cfg.get("alora_invocation_tokens"), "alora_invocation_tokens")]
        for is_set, key in unsupported:
            if is_set:
                raise AdapterError(f"{path}: {key} is not supported (plain LoRA only)")
        alpha = cfg.get("lora_alpha", 8)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise AdapterError(f"{path}: lora_alpha must be a number, got {alpha!r}")
        return cls(rank=cfg.get("r"), alpha=float(alpha), use_rslora=bool(cfg.get("use_rslora", False)))


def _projection_shapes(c: ModelConfig, layer: int) -> dict[str, tuple[int, int]]:
    """PEFT module name -> (in_features, out_features) of layer `layer`'s projections."""
    shapes = {"q_proj": (c.hidden_size, c.q_size), "k_proj": (c.hidden_size, c.kv_size),
              "v_proj": (c.hidden_size, c.kv_size), "qkv_proj": (c.hidden_size, c.q_size + 2 * c.kv_size),
              "o_proj": (c.q_size, c.hidden_size)}
    if not c.layer_has_experts(layer):  # an expert layer's MLP takes no adapter
        i = c.intermediate_size
        shapes.update({"gate_proj": (c.hidden_size, i), "up_proj": (c.hidden_size, i),
                       "gate_up_proj": (c.hidden_size, 2 * i), "down_proj": (i, c.hidden_size)})
    return shapes


def _group_offsets(c: ModelConfig) -> dict[str, list[int]]:
    """Fused group -> the first output column of each part (q, k, v / gate, up)."""
    return {"qkv": [0, c.q_size, c.q_size + c.kv_size], "gate_up": [0, c.intermediate_size]}


_GROUP_OUT = {  # fused group -> its output width
    "qkv": lambda c: c.q_size + 2 * c.kv_size, "o": lambda c: c.hidden_size,
    "gate_up": lambda c: 2 * c.intermediate_size, "down": lambda c: c.hidden_size,
}


def read_adapter(path: str | Path, config: ModelConfig) -> tuple[LoraConfig, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]]:
    """Reads and checks a PEFT LoRA folder against the base model's config. Returns (its config,
    {(layer, PEFT module name): (A (r, in), B (out, r)) float32}). Raises AdapterError (one line)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: no such folder (expected a PEFT LoRA adapter folder)")
    lora = LoraConfig.from_file(path / CONFIG_FILE)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise AdapterError(f"{path}: no {WEIGHTS_FILE} (save the adapter with save_pretrained(safe_serialization=True))")
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{weights_file}: corrupt or unreadable safetensors file ({e})") from None
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.search(key)
        if m is None:
            raise AdapterError(f"{weights_file}: {key!r} is not a LoRA weight of a supported projection "
                               f"({', '.join(_PROJECTIONS)})")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        parts.setdefault((layer, module), {})[which] = t
    if not parts:
        raise AdapterError(f"{weights_file}: holds no LoRA weights")
    out: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, module), ab in sorted(parts.items()):
        where = f"{weights_file.name}: layer {layer} {module}"
        if not 0 <= layer < config.num_layers:
            raise AdapterError(f"{where}: the base model has {config.num_layers} layers")
        shapes = _projection_shapes(config, layer)
        if module not in shapes:
            raise AdapterError(f"{where}: not a projection this base model's layer takes an adapter on "
                               f"({', '.join(shapes)})")
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where}: lora_{'B' if 'A' in ab else 'A'} is missing")
        a, b = ab["A"], ab["B"]
        fan_in, fan_out = shapes[module]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != lora.rank or b.shape[1] != lora.rank:
            raise AdapterError(f"{where}: rank {tuple(a.shape)[:1]} / {tuple(b.shape)[1:]} of lora_A {tuple(a.shape)} "
                               f"and lora_B {tuple(b.shape)} does not match r = {lora.rank} of {CONFIG_FILE}")
        if a.shape[1] != fan_in or b.shape[0] != fan_out:
            raise AdapterError(f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the base "
                               f"model's ({fan_out}, {fan_in}) projection (an adapter of another base model?)")
        out[(layer, module)] = (a.float(), b.float())
    return lora, out


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter's deltas on the fused projections, in the model's dtype and device."""

    name: str
    config: LoraConfig
    # per layer: fused group -> (A (R, in), B (out, R) with scaling folded in); groups it does not target are absent
    layers: tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], ...]

    @classmethod
    def load(cls, name: str, path: str | Path, config: ModelConfig, dtype: torch.dtype,
             device: str | torch.device = "cpu") -> "LoraAdapter":
        lora, weights = read_adapter(path, config)
        offsets = _group_offsets(config)
        layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        for li in range(config.num_layers):
            fused: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for group in GROUPS:
                mods = [(m, part) for m, (g, part) in _PROJECTIONS.items() if g == group and (li, m) in weights]
                if not mods:
                    continue
                out_size = _GROUP_OUT[group](config)
                a = torch.cat([weights[(li, m)][0] for m, _ in mods])  # (R, in)
                b = torch.zeros(out_size, a.shape[0])  # (out, R), block-diagonal over the parts
                col = 0
                for m, part in mods:
                    bm = weights[(li, m)][1] * lora.scaling  # (out_m, r)
                    row = 0 if part is None else offsets[group][part]
                    b[row:row + bm.shape[0], col:col + lora.rank] = bm
                    col += lora.rank
                fused[group] = (a.to(device=device, dtype=dtype).contiguous(),
                                b.to(device=device, dtype=dtype).contiguous())
            layers.append(fused)
        return cls(name=name, config=lora, layers=tuple(layers))


class AdapterTable:
    """The adapters loaded on a model runner, by index: 0 is no adapter, 1.. the loaded ones in order."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.adapters: list[LoraAdapter | None] = [None]  # index 0: the base model

    def __len__(self) -> int:
        return len(self.adapters)

    @property
    def names(self) -> list[str]:
        """Names of the loaded adapters, in index order (index i + 1)."""
        return [a.name for a in self.adapters[1:]]

    def index(self, name: str) -> int | None:
        """The index of the adapter loaded as `name`, None if there is none."""
        for i, a in enumerate(self.adapters[1:], start=1):
            if a.name == name:
                return i
        return None

    def load(self, name: str, path: str | Path) -> int:
        """Loads the PEFT adapter at `path` as `name` (checked against the base model: AdapterError) and
        returns its index; a name already loaded keeps its index and is not loaded again."""
        existing = self.index(name)
        if existing is not None:
            return existing
        self.adapters.append(LoraAdapter.load(name, path, self.config, self.dtype, self.device))
        return len(self.adapters) - 1

    def batch(self, adapters: list[int], qo_lens: list[int]) -> "LoraBatch | None":
        """The deltas of one ragged batch whose request r (qo_lens[r] rows) uses adapter adapters[r]
        (0: none); None when no request uses one."""
        counts = torch.tensor(qo_lens, dtype=torch.int64)  # (R,)
        per_request = torch.tensor(adapters, dtype=torch.int64)  # (R,)
        used = sorted(set(adapters) - {0})
        if not used:
            return None
        token_adapter = torch.repeat_interleave(per_request, counts)  # (N,) adapter of each row
        groups: list[tuple[LoraAdapter, torch.Tensor | None]] = []
        for index in used:
            rows = torch.nonzero(token_adapter == index).flatten()  # (N_a,) int64
            whole = len(used) == 1 and rows.numel() == token_adapter.numel()
            groups.append((self.adapters[index], None if whole else rows.to(self.device, non_blocking=True)))
        return LoraBatch(groups)


class LoraBatch:
    """The adapters of one forward pass and the rows each applies to, grouped: (adapter, rows (N_a,) int64
    on the model's device, or None for every row), distinct adapters, rows disjoint."""

    def __init__(self, groups: list[tuple[LoraAdapter, torch.Tensor | None]]):
        self.groups = groups

    def add(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += the adapters' deltas of `group` in `layer`, in place. x: (N, in) the projection's input;
        y: (N, out) its output, in x's dtype."""
        for adapter, rows in self.groups:
            ab = adapter.layers[layer].get(group)
            if ab is None:
                continue
            a, b = ab  # (R, in), (out, R)
            if rows is None:
                y += (x @ a.t()) @ b.t()
            else:
                y.index_add_(0, rows, (x.index_select(0, rows) @ a.t()) @ b.t())

    def layer(self, layer: int) -> LayerLora:
        """`add` bound to one layer: (group, x, y) -> None."""
        return lambda group, x, y: self.add(layer, group, x, y)


def save_random_adapter(config: ModelConfig, path: str | Path, rank: int = 16, alpha: float = 32.0,
                        targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                    "up_proj", "down_proj"),
                        std: float = 0.02, seed: int = 0) -> Path:
    """Writes a PEFT-format LoRA adapter of random A and B (normal, `std`) for every layer's `targets`
    (benchmarks, and tests on models too large to build with peft). Returns the folder."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for li in range(config.num_layers):
        shapes = _projection_shapes(config, li)
        for module in targets:
            if module not in shapes:
                continue
            fan_in, fan_out = shapes[module]
            kind = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{li}.{kind}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * std
    save_file(tensors, path / WEIGHTS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": alpha,
                                                "target_modules": list(targets), "bias": "none"}))
    return path
