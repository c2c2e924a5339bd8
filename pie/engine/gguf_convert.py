"""Converting a GGUF file (llama.cpp) into a model folder: config.json, model.safetensors (float32,
dequantized), tokenizer.json, tokenizer_config.json (special tokens, chat template).

With `keep_quantized` (`pie model add --keep-quantized`), the linear layers' weights of a type the CPU kernels
run (pie.engine.quantized.QUANT_TYPES) stay packed: the GGUF is copied into the folder as `model.gguf`,
model.safetensors holds only the other tensors (embeddings, norms, biases, experts: dequantized), and
`packed_linears` reads the packed ones at load. A tied LM head is kept packed as `lm_head.weight`
besides the dense embedding table.

llama.cpp stores the Llama family's q/k projection rows permuted for its RoPE layout; they are
put back into HuggingFace order here (Qwen's and OLMo 2's are stored unpermuted). Experts are stored
stacked, one (E, ...) tensor per projection; they are split into HF's per-expert tensors.

Gemma 2/3, Phi-3 and Mixtral GGUFs are not converted: llama.cpp writes them with a SentencePiece
tokenizer ("llama"), which this converter does not rebuild; their HuggingFace folders load directly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from pie.engine.config import UnsupportedModelError, supported_families

GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                      "olmo2": "Olmo2ForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM",
                      "qwen3moe": "Qwen3MoeForCausalLM"}
# whether the chosen experts' weights are renormalised (llama.cpp fixes it per architecture)
_NORMALIZED_EXPERT_WEIGHTS = {"qwen2moe": False, "qwen3moe": True}

# GGUF tensor name -> HF tensor name ({i} = layer)
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",  # OLMo 2 (its only norms: no attn/ffn_norm)
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",  # the router, (E, H)
    "ffn_gate_exps.weight": "mlp.experts.{j}.gate_proj.weight",  # (E, I, H), split per expert
    "ffn_up_exps.weight": "mlp.experts.{j}.up_proj.weight",
    "ffn_down_exps.weight": "mlp.experts.{j}.down_proj.weight",  # (E, H, I)
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",  # (1, H)
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


class GGUFError(ValueError):
    pass


def _open(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises assorted errors on truncated or foreign files
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_config(reader) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(GGUF_ARCHITECTURES)}); for other families "
                                    f"({supported_families()}) register the HuggingFace folder instead")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UnsupportedModelError("GGUF with a rope_freqs tensor (Llama 3.1+ rope scaling) is not supported; "
                                    "register the HuggingFace folder instead")

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise GGUFError(f"GGUF metadata lacks {arch}.{key}")
        return value

    num_heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(_field(reader, f"{arch}.vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length", 0)
                                 or need("expert_feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // num_heads)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 4096)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    expert_count = int(_field(reader, f"{arch}.expert_count", 0) or 0)
    if expert_count:
        config.update(
            num_experts=expert_count,
            num_experts_per_tok=int(need("expert_used_count")),
            moe_intermediate_size=int(need("expert_feed_forward_length")),
            shared_expert_intermediate_size=int(_field(reader, f"{arch}.expert_shared_feed_forward_length", 0)),
            norm_topk_prob=bool(_field(reader, f"{arch}.expert_weights_norm", _NORMALIZED_EXPERT_WEIGHTS.get(arch))),
            # layers without a router keep a dense MLP
            mlp_only_layers=[i for i in range(config["num_hidden_layers"]) if f"blk.{i}.ffn_gate_inp.weight" not in names])
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise UnsupportedModelError(f"GGUF rope scaling {scaling!r} is not supported")
    return config


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. w: (n_head * head_dim, ...)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


PACKED_GGUF = "model.gguf"  # the packed GGUF's name inside a model folder
# HF names (suffixes) of the linear layers that may stay packed; experts are stacked at load, so dense
_PACKABLE = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
             "up_proj.weight", "down_proj.weight", "lm_head.weight")


def _packed_name(t, config: dict[str, Any]) -> str | None:
    """The HF name a GGUF tensor is loaded packed under, or None when it is dequantized."""
    from pie.engine.quantized import QUANT_TYPES

    if t.tensor_type.name not in QUANT_TYPES or len(t.shape) != 2:
        return None
    if t.name == "token_embd.weight":
        return "lm_head.weight" if config["tie_word_embeddings"] else None
    name = _hf_name(t.name)
    return name if name and "{j}" not in name and name.endswith(_PACKABLE) else None


def packed_linears(gguf_path: str | Path) -> dict[str, Any]:
    """HF name -> QuantizedWeight (N, K) of the GGUF's packed linear layers (q/k rows put back in HF
    order for the Llama family, as `convert_tensors` does for dense ones)."""
    import torch

    from pie.engine.quantized import QuantizedWeight

    reader = _open(Path(gguf_path))
    config = hf_config(reader)
    out: dict[str, Any] = {}
    for t in reader.tensors:
        name = _packed_name(t, config)
        if name is None:
            continue
        n, k = int(t.shape[1]), int(t.shape[0])  # ggml lists dimensions fastest first
        w = QuantizedWeight(torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(n, -1)), t.tensor_type.name,
                            (n, k))
        heads = {"q_proj.weight": config["num_attention_heads"], "k_proj.weight": config["num_key_value_heads"]}
        for suffix, n_head in heads.items():
            if config["model_type"] == "llama" and name.endswith(suffix):
                w = w.rows(torch.from_numpy(_unpermute(np.arange(n), n_head)))
        out[name] = w
    return out


def convert_tensors(reader, config: dict[str, Any], progress: bool = True,
                    keep_quantized: bool = False) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize
    from tqdm import tqdm

    permuted = config["model_type"] == "llama"
    out: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc="converting", unit="tensor", disable=not progress):
        name = _hf_name(t.name)
        if name is None:
            raise GGUFError(f"GGUF tensor {t.name!r} is not known to the converter")
        if keep_quantized and _packed_name(t, config) is not None and t.name != "token_embd.weight":
            continue  # loaded packed from the GGUF (packed_linears)
        try:
            w = dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        except (NotImplementedError, ValueError) as e:
            raise GGUFError(f"GGUF tensor {t.name!r} ({t.tensor_type.name}): cannot dequantize ({e})") from None
        w = np.ascontiguousarray(w, dtype=np.float32)
        if permuted and name.endswith("q_proj.weight"):
            w = _unpermute(w, config["num_attention_heads"])
        elif permuted and name.endswith("k_proj.weight"):
            w = _unpermute(w, config["num_key_value_heads"])
        if "{j}" in name:  # (E, ...) stacked experts
            for j, expert in enumerate(w):
                out[name.format(j=j)] = np.ascontiguousarray(expert)
        elif name.endswith("shared_expert_gate.weight"):
            out[name] = w.reshape(1, -1)
        else:
            out[name] = w
    return out


def tokenizer_files(reader) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer.json content, tokenizer_config.json content) of a GGUF's gpt2-style BPE tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
                                    "register the HuggingFace folder instead")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i, ty in enumerate(types) if ty == TOKEN_TYPE_CONTROL])
    tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                   for i, ty in enumerate(types) if ty == TOKEN_TYPE_USER_DEFINED])

    def token(key: str) -> str | None:
        i = _field(reader, key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    tokenizer_config = {
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    return json.loads(tk.to_str()), tokenizer_config


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True,
                 keep_quantized: bool = False) -> dict[str, Any]:
    """Writes the model folder into out_dir (which must exist and be empty). Returns the HF config.
    keep_quantized: keep the quantized linear layers packed (a copy of the GGUF as model.gguf)."""
    import shutil

    from safetensors.numpy import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise GGUFError(f"{gguf_path}: no such file")
    reader = _open(gguf_path)
    config = hf_config(reader)
    tokenizer_json, tokenizer_config = tokenizer_files(reader)
    tensors = convert_tensors(reader, config, progress, keep_quantized)
    if keep_quantized and any(_packed_name(t, config) for t in reader.tensors):
        shutil.copyfile(gguf_path, out_dir / PACKED_GGUF)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    save_file(tensors, str(out_dir / "model.safetensors"))
    return config
