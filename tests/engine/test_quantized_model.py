"""Models with GGUF quantized linear layers kept packed: a tiny Llama GGUF against the same GGUF
dequantized (the reference), and SmolLM2-135M Q4_1 against HF transformers loading the GGUF."""

import shutil

import numpy as np
import pytest
import torch

from pie.engine.batch import ForwardRequest, RawLogits
from pie.engine.config import EngineConfig
from pie.engine.gguf_convert import PACKED_GGUF, convert_gguf
from pie.engine.quantized import QuantizedWeight
from pie.engine.runner import ModelRunner
from test_gguf_convert import write_gguf
from tiny_models import tiny_hf_model


def _logits(folder, ids):
    runner = ModelRunner.from_path(folder, EngineConfig(num_pages=16, page_size=8))
    n = len(ids)
    [prefill] = runner.execute([ForwardRequest(ids, list(range(n)), [0, 1, 2], n % 8 or 8,
                                               outputs=[(i, RawLogits()) for i in range(n)])])
    return runner, torch.stack(prefill.outputs)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_tiny_llama_packed_matches_dequantized(tmp_path, qtype, monkeypatch):
    import gguf

    hf, cfg = tiny_hf_model("llama")
    gguf_file = tmp_path / "tiny.gguf"
    real_add = gguf.GGUFWriter.add_tensor

    def add_quantized(self, name, tensor, *args, **kwargs):  # linear layers (K % 32 == 0) quantized
        if tensor.ndim == 2 and tensor.shape[1] % 32 == 0 and "token_embd" not in name:
            t = getattr(gguf.GGMLQuantizationType, qtype)
            return real_add(self, name, gguf.quants.quantize(tensor, t), raw_dtype=t)
        return real_add(self, name, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", add_quantized)
    write_gguf(gguf_file, hf, cfg, "llama")
    monkeypatch.undo()
    packed, dense = tmp_path / "packed", tmp_path / "dense"
    packed.mkdir(), dense.mkdir()
    convert_gguf(gguf_file, packed, progress=False, keep_quantized=True)
    convert_gguf(gguf_file, dense, progress=False)
    assert (packed / PACKED_GGUF).is_file() and not (dense / PACKED_GGUF).exists()
    ids = torch.randint(0, 211, (19,), generator=torch.Generator().manual_seed(3)).tolist()
    runner, got = _logits(packed, ids)
    assert isinstance(runner.model.layers[0].qkv, QuantizedWeight)
    _, ref = _logits(dense, ids)
    # int16 activations: |error| <= sum |w| * amax / 65534 per layer; measured ~1e-5 here
    assert (got - ref).abs().max().item() <= 1e-3


def test_smollm2_q4_1_packed_greedy_tokens_match_hf(smollm2_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    from pie.control.generate import GenerationParams, generate_batch
    from pie.engine.model import Model
    from test_smollm2 import PROMPTS

    folder = tmp_path / "smollm2"
    folder.mkdir()
    convert_gguf(smollm2_gguf, folder, progress=False, keep_quantized=True)
    model = Model(str(folder), EngineConfig(dtype="float32", kv_cache_mb=256), progress=False)
    assert isinstance(model.runner.model.lm_head, QuantizedWeight)
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                              dtype=torch.float32).eval()
    prompts = [model.prompt_ids(p) for p in PROMPTS]
    ours = generate_batch(model, prompts, GenerationParams(max_tokens=32, temperature=0))  # prefill + decode
    for ids, gen in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        while out and out[-1] in model.eos_ids:
            out.pop()
        assert gen.token_ids == out
