"""An inferlet selects a LoRA adapter by name (models.adapter, Context(adapter=...)): its passes and
its generation streams run on the adapter, the same as the runner's own passes with it."""

import json
import textwrap

import pytest

from pie.engine.batch import ForwardRequest, Greedy
from pie.engine.lora import save_random_adapter

GUEST = """
import json, sys
import inferlet
from wit_world.imports import models

prompt = sys.argv[1]
out = {"adapters": inferlet.adapters(), "id": models.adapter("tiny-lora"), "none": models.adapter("nope")}
for name in (None, "tiny-lora"):
    ctx = inferlet.Context(adapter=name)
    ctx.fill_tokens(json.loads(prompt))
    first = ctx.next_token()  # one forward pass (forward.submit / submit-with-adapter)
    ctx.fill_tokens([first])
    ctx.generate(max_tokens=3, ignore_eos=True)  # a generation stream
    out[str(name)] = ctx.tokens[-4:]
    ctx.free()
try:
    inferlet.Context(adapter="nope")
except ValueError as e:
    out["error"] = str(e)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def lora_runtime(model, tmp_path_factory):
    """A runtime over the session model with a random adapter loaded as "tiny-lora" (index 1)."""
    from pie.runtime import Runtime, RuntimeConfig

    folder = save_random_adapter(model.runner.model_config, tmp_path_factory.mktemp("lora") / "tiny",
                                 rank=4, alpha=8, std=0.3, seed=3)
    assert model.runner.load_adapter("tiny-lora", folder) == 1
    rt = Runtime(model, RuntimeConfig(deadline_s=120))
    yield rt
    rt.close()


def greedy_tokens(runner, tokens, adapter, n):
    """n greedy tokens after `tokens`, one pass per token on the runner (pages 0.. are free meanwhile)."""
    seq = list(tokens)
    for _ in range(n):
        pages = list(range(-(-len(seq) // runner.page_size)))
        [res] = runner.execute([ForwardRequest(
            token_ids=seq, positions=list(range(len(seq))), kv_page_ids=pages,
            kv_last_page_len=len(seq) - (len(pages) - 1) * runner.page_size,
            outputs=[(len(seq) - 1, Greedy())], adapter=adapter)])
        seq.append(res.outputs[0])
    return seq[len(tokens):]


def test_inferlet_selects_an_adapter(model, lora_runtime):
    tokens = model.tokenizer.encode("The capital of France is", add_bos=False)
    r = lora_runtime.run_source(textwrap.dedent(GUEST), [json.dumps(tokens)], filename="guest.py")
    assert r.error is None, r.error
    out = json.loads(r.output)
    assert out["adapters"] == ["tiny-lora"] and out["id"] == 1 and out["none"] is None
    assert "no adapter 'nope'" in out["error"]
    base, lora = greedy_tokens(model.runner, tokens, 0, 4), greedy_tokens(model.runner, tokens, 1, 4)
    assert base != lora  # the adapter matters, so the next asserts can tell which one ran
    assert out["None"] == base
    assert out["tiny-lora"] == lora


def test_unknown_adapter_id_traps(model, lora_runtime):
    src = """
    from wit_world.imports import forward, kv
    pages = kv.allocate(1)
    forward.submit_with_adapter(0, forward.ForwardPass([1, 2], [], [0, 1], pages, 2, [], [], [], []), 7)
    """
    r = lora_runtime.run_source(textwrap.dedent(src), [], filename="guest.py")
    assert r.error is not None and "forward.submit-with-adapter: adapter: 7 is not a loaded adapter" in r.error
