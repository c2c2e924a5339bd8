"""GGUF conversion on tiny random-weight models written as llama.cpp writes them (q/k rows permuted
for the Llama family), checked against the HF model they came from."""

import numpy as np
import pytest
import torch

from pie.engine.batch import ForwardRequest, RawLogits
from pie.engine.config import EngineConfig, UnsupportedModelError
from pie.engine.gguf_convert import GGUFError, convert_gguf
from pie.engine.runner import ModelRunner
from pie.engine.tokenizer import Tokenizer
from tiny_models import tiny_hf_model

HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


# OLMo 2's norms sit after attention and MLP; llama.cpp names them apart from the pre-norms
OLMO2_TO_GGUF = {"post_attention_layernorm.weight": "post_attention_norm.weight",
                 "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}
MOE_TO_GGUF = {"mlp.gate.weight": "ffn_gate_inp.weight", "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
               "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
               "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
               "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
               "mlp.experts.down_proj": "ffn_down_exps.weight"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf, cfg: dict, arch: str) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_rope_freq_base(float(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("num_experts") or cfg.get("num_local_experts"):
        w.add_expert_count(cfg.get("num_experts") or cfg["num_local_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    tokens = [f"<t{i}>" for i in range(cfg["vocab_size"] - 2)] + ["<|im_start|>", "<|im_end|>"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    w.add_token_merges([])
    w.add_eos_token_id(len(tokens) - 1)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    for name, t in hf.state_dict().items():
        a = t.float().numpy().copy()
        if name == "lm_head.weight":
            if cfg.get("tie_word_embeddings"):
                continue
            gname = "output.weight"
        elif name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name.endswith("mlp.experts.gate_up_proj"):  # (E, 2I, H): llama.cpp stacks gate and up apart
            layer = name.split(".")[2]
            gate, up = np.split(a, 2, axis=1)
            w.add_tensor(f"blk.{layer}.ffn_gate_exps.weight", np.ascontiguousarray(gate))
            w.add_tensor(f"blk.{layer}.ffn_up_exps.weight", np.ascontiguousarray(up))
            continue
        else:
            layer, rest = name[len("model.layers."):].split(".", 1)
            table = {**HF_TO_GGUF, **MOE_TO_GGUF, **(OLMO2_TO_GGUF if arch == "olmo2" else {})}
            gname = f"blk.{layer}.{table[rest]}"
            if arch == "llama" and rest == "self_attn.q_proj.weight":
                a = llama_cpp_permute(a, cfg["num_attention_heads"])
            elif arch == "llama" and rest == "self_attn.k_proj.weight":
                a = llama_cpp_permute(a, cfg["num_key_value_heads"])
        w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family,arch", [("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3"),
                                         ("olmo2", "olmo2"), ("qwen2_moe", "qwen2moe"), ("qwen3_moe", "qwen3moe")])
def test_converted_tiny_gguf_matches_hf(tmp_path, family, arch):
    hf, cfg = tiny_hf_model(family)
    gguf_file = tmp_path / "tiny.gguf"
    write_gguf(gguf_file, hf, cfg, arch)
    out = tmp_path / "model"
    out.mkdir()
    convert_gguf(gguf_file, out, progress=False)
    runner = ModelRunner.from_path(out, EngineConfig(num_pages=16, page_size=8))
    assert runner.model_config.family == family
    ids = torch.randint(0, 211, (19,), generator=torch.Generator().manual_seed(9)).tolist()
    [res] = runner.execute([ForwardRequest(ids, list(range(19)), [3, 4, 5], 3,
                                           outputs=[(i, RawLogits()) for i in range(19)])])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (torch.stack(res.outputs) - ref).abs().max().item() <= 1e-4
    tok = Tokenizer(out)
    assert tok.encode("<|im_start|>") == [209]
    assert tok.special.eos_ids == (210,)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x<|im_end|>"


def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    with pytest.raises(GGUFError, match="no such file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out", progress=False)
