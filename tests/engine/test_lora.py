"""LoRA adapters against HF peft on tiny random models (fp32, max abs diff <= 1e-4): each adapter alone,
three adapters and the base mixed in one batch (prefill and decode), the merged model; and the adapters
a base model must refuse."""

import copy
import json

import pytest
import torch

from pie.engine.batch import BatchError, ForwardRequest, RawLogits
from pie.engine.config import EngineConfig, ModelConfig
from pie.engine.lora import AdapterError
from pie.engine.runner import ModelRunner
from tiny_models import TINY_ADAPTERS, tiny_hf_model, tiny_lora_adapter

peft = pytest.importorskip("peft")

TOL = 1e-4
NAMES = list(TINY_ADAPTERS)  # a1, a2, a3


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    """(hf base model, {adapter name: its PeftModel}, runner with the adapters loaded as 1, 2, 3, folders)."""
    hf, cfg = tiny_hf_model(request.param)
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    folders = {}
    for seed, name in enumerate(NAMES):
        folders[name] = root / name
        tiny_lora_adapter(hf, folders[name], name, seed=10 + seed)
    peft_models = {name: peft.PeftModel.from_pretrained(copy.deepcopy(hf), folders[name]).eval() for name in NAMES}
    runner = ModelRunner(ModelConfig.from_hf(cfg), hf.state_dict(), EngineConfig(num_pages=96, page_size=4))
    for i, name in enumerate(NAMES, start=1):
        assert runner.load_adapter(name, folders[name]) == i
    return hf, peft_models, runner, folders


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # (T, V)


def request(ids, start, pages, adapter, page_size=4):
    n = len(ids)
    used = -(-n // page_size)
    return ForwardRequest(token_ids=ids[start:], positions=list(range(start, n)), kv_page_ids=pages[:used],
                          kv_last_page_len=n - (used - 1) * page_size,
                          outputs=[(i, RawLogits()) for i in range(n - start)], adapter=adapter)


def seqs(seed: int, lengths) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 211, (n,), generator=gen).tolist() for n in lengths]


def test_adapters_change_the_logits(setup):
    """A check that the references are worth matching: each adapter moves the logits well past TOL."""
    hf, peft_models, _, _ = setup
    [ids] = seqs(0, [9])
    base = logits_of(hf, ids)
    for name in NAMES:
        assert (logits_of(peft_models[name], ids) - base).abs().max().item() > 100 * TOL, name


@pytest.mark.parametrize("name", NAMES)
def test_each_adapter_alone_matches_peft(setup, name):
    _, peft_models, runner, _ = setup
    [ids] = seqs(1, [13])
    [res] = runner.execute([request(ids, 0, [7, 3, 11, 20], NAMES.index(name) + 1)])
    assert (torch.stack(res.outputs) - logits_of(peft_models[name], ids)).abs().max().item() <= TOL


def test_mixed_batch_of_three_adapters_and_base_matches_peft(setup):
    hf, peft_models, runner, _ = setup
    models = [hf] + [peft_models[n] for n in NAMES]
    # request k uses adapter adapters[k]; a1 twice, apart, so its rows are not one run
    adapters = [2, 0, 1, 3, 1]
    data = seqs(2, [11, 6, 17, 9, 1])
    page_sets = [[0, 1, 2], [10, 11], [20, 21, 22, 23, 24], [30, 31, 32], [40]]
    results = runner.execute([request(s, 0, p, a) for s, p, a in zip(data, page_sets, adapters)])
    for k, (res, s, a) in enumerate(zip(results, data, adapters)):
        diff = (torch.stack(res.outputs) - logits_of(models[a], s)).abs().max().item()
        assert diff <= TOL, f"request {k} (adapter {a})"
    # then one decode step each (plus a fresh prefill), mixed again: the cache holds each adapter's K/V
    longer = [s + seqs(3 + k, [1])[0] for k, s in enumerate(data)]
    batch = [request(s, len(s) - 1, p, a) for s, p, a in zip(longer, page_sets, adapters)]
    extra = seqs(9, [5])[0]
    batch.append(request(extra, 0, [50, 51], 2))
    results = runner.execute(batch)
    for k, (res, s, a) in enumerate(zip(results, longer + [extra], adapters + [2])):
        want = logits_of(models[a], s)[len(s) - len(res.outputs):]
        assert (torch.stack(res.outputs) - want).abs().max().item() <= TOL, f"step 2, request {k}"


def test_merged_model_matches(setup):
    """The adapter applied on the fly equals peft's merged weights (merge_and_unload)."""
    _, peft_models, runner, _ = setup
    [ids] = seqs(4, [10])
    for i, name in enumerate(NAMES, start=1):
        merged = copy.deepcopy(peft_models[name]).merge_and_unload().eval()
        [res] = runner.execute([request(ids, 0, [60, 61, 62], i)])
        assert (torch.stack(res.outputs) - logits_of(merged, ids)).abs().max().item() <= TOL, name


def test_unknown_adapter_index_is_refused(setup):
    _, _, runner, _ = setup
    with pytest.raises(BatchError, match="adapter: 4 is not a loaded adapter"):
        runner.execute([request([1, 2], 0, [70], 4)])


def test_table_names_and_indices(setup):
    _, _, runner, folders = setup
    assert runner.adapters.names == NAMES
    assert runner.adapters.index("a2") == 2 and runner.adapters.index("nope") is None
    assert runner.load_adapter("a2", folders["a2"]) == 2  # loaded once
    assert len(runner.adapters) == 4


# ---- refusals ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
    hf, cfg = tiny_hf_model("llama")
    folder = tmp_path_factory.mktemp("lora-ok") / "a1"
    tiny_lora_adapter(hf, folder, "a1")
    return ModelConfig.from_hf(cfg), folder


def _copy(folder, tmp_path):
    import shutil

    dst = tmp_path / "adapter"
    shutil.copytree(folder, dst)
    return dst


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _edit_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _load(config, folder):
    from pie.engine.lora import AdapterTable

    return AdapterTable(config, torch.float32).load("x", folder)


def test_refuses_missing_files(llama_adapter, tmp_path):
    config, folder = llama_adapter
    with pytest.raises(AdapterError, match="no such folder"):
        _load(config, tmp_path / "nothing")
    d = _copy(folder, tmp_path)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        _load(config, d)
    (d / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        _load(config, d)


@pytest.mark.parametrize("rank", [0, -2, 2.5, None])
def test_refuses_bad_rank_in_config(llama_adapter, tmp_path, rank):
    config, folder = llama_adapter
    d = _copy(folder, tmp_path)
    _edit_config(d, r=rank)
    with pytest.raises(AdapterError, match="r must be a positive integer"):
        _load(config, d)


def test_refuses_rank_that_disagrees_with_the_weights(llama_adapter, tmp_path):
    config, folder = llama_adapter
    d = _copy(folder, tmp_path)
    _edit_config(d, r=8)  # the weights are rank 4
    with pytest.raises(AdapterError, match="does not match r = 8"):
        _load(config, d)


def test_refuses_adapter_of_another_base_shape(tmp_path):
    """An adapter made for llama (hidden 64) on a base with hidden 64 but q/k/v of another size."""
    hf, _ = tiny_hf_model("llama")
    tiny_lora_adapter(hf, tmp_path / "a2", "a2")
    _, other = tiny_hf_model("qwen3")  # head_dim 32: q_proj (128, 64)
    with pytest.raises(AdapterError, match="do not fit the base model's"):
        _load(ModelConfig.from_hf(other), tmp_path / "a2")


def test_refuses_layers_the_base_lacks_and_unknown_modules(llama_adapter, tmp_path):
    config, folder = llama_adapter
    d = _copy(folder, tmp_path)
    _edit_weights(d, lambda t: t.update({k.replace("layers.1.", "layers.5."): v.clone() for k, v in t.items()}))
    with pytest.raises(AdapterError, match="layer 5 .* the base model has 2 layers"):
        _load(config, d)
    d2 = _copy(folder, tmp_path / "x")
    _edit_weights(d2, lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}))
    with pytest.raises(AdapterError, match="not a LoRA weight of a supported projection"):
        _load(config, d2)


def test_refuses_half_a_pair(llama_adapter, tmp_path):
    config, folder = llama_adapter
    d = _copy(folder, tmp_path)
    _edit_weights(d, lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"))
    with pytest.raises(AdapterError, match="layer 0 q_proj: lora_B is missing"):
        _load(config, d)


@pytest.mark.parametrize("key,value", [("use_dora", True), ("bias", "all"), ("peft_type", "IA3"),
                                       ("modules_to_save", ["lm_head"])])
def test_refuses_what_is_not_plain_lora(llama_adapter, tmp_path, key, value):
    config, folder = llama_adapter
    d = _copy(folder, tmp_path)
    _edit_config(d, **{key: value})
    with pytest.raises(AdapterError) as e:
        _load(config, d)
    assert "\n" not in str(e.value)
