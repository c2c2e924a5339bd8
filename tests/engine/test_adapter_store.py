"""`pie model add-adapter`: adapters are checked against their base model when registered (one clear
line for a bad one), listed by `pie model list`, and found by name for the base they were made for."""

import pytest

from pie.cli import main
from pie.engine.adapter_store import AdapterStore
from pie.engine.lora import save_random_adapter
from pie.engine.model_store import ModelStore, ModelStoreError


@pytest.fixture
def home(model, tmp_path, monkeypatch):
    """A PIE_HOME of its own whose model cache holds the session's default model (linked)."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / model.name).symlink_to(ModelStore().root / model.name)
    monkeypatch.setenv("PIE_HOME", str(tmp_path))
    return tmp_path


def test_add_list_and_resolve(model, home, capsys):
    folder = save_random_adapter(model.runner.model_config, home / "src", rank=8)
    assert main(["model", "add-adapter", str(folder), "--name", "sql", "--base", model.name]) == 0
    assert "sql: LoRA rank 8 adapter of smollm2-135m" in capsys.readouterr().out
    entry = AdapterStore().resolve("sql", model.name)
    assert (entry.path / "adapter_model.safetensors").is_file() and entry.rank == 8
    assert main(["model", "list"]) == 0
    assert "sql\tLoRA adapter of smollm2-135m\trank 8" in capsys.readouterr().out
    with pytest.raises(ModelStoreError, match="registered for smollm2-135m, not other"):
        AdapterStore().resolve("sql", "other")


def _refusal(capsys, *argv) -> str:
    assert main(["model", "add-adapter", *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pie: error: "), err
    return err


def test_refusals_are_one_line(model, home, capsys):
    config = model.runner.model_config
    assert "no such folder" in _refusal(capsys, str(home / "missing"), "--name", "a")
    # another base's shapes: made for a model with a wider hidden size
    wide = save_random_adapter(config.__class__(**{**config.__dict__, "hidden_size": config.hidden_size * 2}),
                               home / "wide", rank=4, targets=("q_proj",))
    assert "do not fit the base model's" in _refusal(capsys, str(wide), "--name", "a")
    bad_rank = save_random_adapter(config, home / "rank0", rank=4, targets=("v_proj",))
    (bad_rank / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 0, "lora_alpha": 8}')
    assert "r must be a positive integer" in _refusal(capsys, str(bad_rank), "--name", "a")
    no_weights = save_random_adapter(config, home / "noweights", rank=4, targets=("v_proj",))
    (no_weights / "adapter_model.safetensors").unlink()
    assert "no adapter_model.safetensors" in _refusal(capsys, str(no_weights), "--name", "a")
    assert "a model has that name" in _refusal(capsys, str(bad_rank), "--name", model.name)
    assert AdapterStore().list() == []  # nothing was left behind
