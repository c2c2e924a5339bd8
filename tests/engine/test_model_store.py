"""`pie model add | list | remove` and the errors a user sees: one clear line, a non-zero exit,
no traceback, nothing half-written left in the cache."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from cli_helpers import run_pie
from tiny_models import tiny_hf_model

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def pie(home: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_pie(*args, env={"PIE_HOME": str(home)}, timeout=timeout)


def write_tiny_hf_folder(path: Path, arch: str = "llama") -> Path:
    """A tiny random-weight HF model folder with a byte-level BPE tokenizer and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    hf, _ = tiny_hf_model(arch)
    hf.config.vocab_size = 211
    hf.save_pretrained(path)
    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet)[:200])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": CHATML}))
    return path


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


def cache_entries(home: Path) -> list[str]:
    d = home / "models"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_add_list_generate_remove_a_local_folder(tmp_path):
    folder = write_tiny_hf_folder(tmp_path / "tiny-llama")
    home = tmp_path / "home"
    add = pie(home, "model", "add", str(folder), "--name", "tiny")
    assert add.returncode == 0, add.stderr
    assert "LlamaForCausalLM" in add.stdout
    listed = pie(home, "model", "list")
    assert listed.stdout.startswith("tiny\tLlamaForCausalLM")
    gen = pie(home, "generate", "--model", "tiny", "--prompt", "hi", "--max-tokens", "5", "--temperature", "0")
    assert gen.returncode == 0, gen.stderr
    from pie.engine.model import Model
    from pie.control.generate import GenerationParams, generate

    os.environ["PIE_HOME"] = str(home)
    try:
        expected = generate(Model("tiny", progress=False), "hi", GenerationParams(max_tokens=5, temperature=0)).text
    finally:
        del os.environ["PIE_HOME"]
    assert gen.stdout == expected + "\n"
    assert pie(home, "model", "remove", "tiny").returncode == 0
    assert cache_entries(home) == []
    assert (folder / "config.json").is_file()  # a registered folder is the user's: left alone


def test_unknown_name(tmp_path):
    assert_one_line_error(pie(tmp_path, "model", "add", "no-such-model"), "not a known model", "smollm2-135m")
    assert_one_line_error(pie(tmp_path, "generate", "--model", "no-such-model", "--prompt", "x"), "unknown model")
    assert_one_line_error(pie(tmp_path, "model", "remove", "no-such-model"), "unknown model")
    assert cache_entries(tmp_path) == []


def test_missing_file(tmp_path):
    assert_one_line_error(pie(tmp_path, "model", "add", str(tmp_path / "nope.gguf")), "no such file")
    assert cache_entries(tmp_path) == []


def test_unsupported_architecture(tmp_path):
    folder = write_tiny_hf_folder(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(pie(tmp_path / "h", "model", "add", str(folder)), "GPT2LMHeadModel", "not supported")
    assert cache_entries(tmp_path / "h") == []


def test_corrupt_gguf_leaves_nothing(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4000))
    assert_one_line_error(pie(tmp_path / "h", "model", "add", str(bad)), "broken.gguf")
    assert cache_entries(tmp_path / "h") == []


def test_truncated_gguf_leaves_nothing(tmp_path, smollm2_gguf):
    data = smollm2_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 3])
    assert_one_line_error(pie(tmp_path / "h", "model", "add", str(cut)), "cut.gguf")
    assert cache_entries(tmp_path / "h") == []


def test_corrupt_safetensors(tmp_path):
    folder = write_tiny_hf_folder(tmp_path / "m")
    [weights] = folder.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    assert_one_line_error(pie(tmp_path / "h", "model", "add", str(folder)), "corrupt")
    assert cache_entries(tmp_path / "h") == []


def test_gguf_file_is_converted_into_the_cache(tmp_path, smollm2_gguf, smollm2_entry):
    home = tmp_path / "h"
    add = pie(home, "model", "add", str(smollm2_gguf), "--name", "smol")
    assert add.returncode == 0, add.stderr
    assert cache_entries(home) == ["smol"]
    assert not (home / "models" / "smol" / "model.gguf").exists()
    entry_dir = home / "models" / "smol"
    assert {p.name for p in entry_dir.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                    "tokenizer_config.json", "pie-model.json"}
    from safetensors.torch import load_file

    ours = load_file(entry_dir / "model.safetensors")
    ref = load_file(smollm2_entry.path / "model.safetensors")
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight"))
    packed = pie(home, "model", "add", str(smollm2_gguf), "--name", "smol-q", "--keep-quantized")
    assert packed.returncode == 0, packed.stderr
    kept = load_file(home / "models" / "smol-q" / "model.safetensors")
    assert (home / "models" / "smol-q" / "model.gguf").is_file()
    assert "model.layers.0.self_attn.q_proj.weight" not in kept and "model.embed_tokens.weight" in kept
