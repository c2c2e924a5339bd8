"""/v1 selects a LoRA adapter by `model` (the base model's name or an adapter's, as vLLM does) and
/v1/models lists the adapters with their parent; the server loads them from `[model] adapters`."""

import pytest

from pie.engine.adapter_store import AdapterStore
from pie.engine.lora import save_random_adapter
from pie.engine.model_store import ModelStore

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def lora_server(server_config, tmp_path_factory):
    """A server of its own over a fresh model with the registered adapter "tiny-lora" loaded (a PIE_HOME
    of its own whose model cache links the default model)."""
    from pie.engine.model import Model
    from pie.server import ServerThread
    from pie.server.app import build_runtime

    home = tmp_path_factory.mktemp("pie-home")
    (home / "models").mkdir()
    (home / "models" / MODEL).symlink_to(ModelStore().root / MODEL)
    mp = pytest.MonkeyPatch()
    mp.setenv("PIE_HOME", str(home))
    config = server_config.replace(model={"adapters": ["tiny-lora"]})
    model = Model(config.model.name, config.model.engine_config(), progress=False)
    src = save_random_adapter(model.runner.model_config, home / "src", rank=4, alpha=8, std=0.3, seed=3)
    AdapterStore().add(src, "tiny-lora", base=MODEL)
    runtime = build_runtime(config, model, progress=False)
    srv = ServerThread(config, runtime=runtime, programs_dir=home / "programs").start()
    yield srv
    srv.stop()
    runtime.close()
    mp.undo()


@pytest.fixture
def client(lora_server):
    import openai

    c = openai.OpenAI(base_url=lora_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield c
    c.close()


def test_models_lists_the_adapter_with_its_parent(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {MODEL, "tiny-lora"}
    assert models["tiny-lora"].model_extra["parent"] == MODEL
    assert "parent" not in models[MODEL].model_extra
    assert client.models.retrieve("tiny-lora").id == "tiny-lora"


def test_chat_selects_the_adapter_by_model_name(client):
    def reply(model):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name a color."}],
                                           max_tokens=8, temperature=0)
        assert r.model == model
        return r.choices[0].message.content

    base, lora = reply(MODEL), reply("tiny-lora")
    assert base != lora  # the adapter ran (it changes the greedy tokens)
    assert reply("tiny-lora") == lora and reply(MODEL) == base  # and each is its own, every time


def test_unknown_model_is_404(client):
    import openai

    with pytest.raises(openai.NotFoundError, match="tiny-lora"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
