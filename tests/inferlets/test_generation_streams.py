"""Generation streams from a guest (the `generation` interface, Context.generate's default path) against
the guest's own per-token loop and against `pie generate`: the same tokens, the same context afterwards;
and a stream's end however it ends (deadline, termination, quota): its reason, every page back."""

import json
import threading
import time

import pytest

from pie.control.generate import GenerationParams, generate

PROMPT = "Write a short poem about the sea."

BOTH_PATHS = """
import json, sys
import inferlet

prompt, kwargs = json.loads(sys.argv[1])
if kwargs.pop("grammar", None):
    kwargs["grammar"] = inferlet.Grammar.regex("(yes|no), because [a-z ]+\\\\.")
sampler = kwargs.pop("sampler")
sampler = inferlet.greedy() if sampler is None else inferlet.sample(*sampler)

def run(per_token):
    ctx = inferlet.Context()
    ctx.fill(inferlet.chat_prompt([{"role": "user", "content": prompt}]))
    start = len(ctx.tokens)
    seen = []
    text = ctx.generate(sampler=sampler, on_token=seen.append if per_token else None, **kwargs)
    if per_token:
        assert seen == ctx.tokens[start:], "on_token saw every appended token"
    state = {"text": text, "tokens": ctx.tokens[start:], "num_cached": ctx.num_cached, "pages": len(ctx.pages)}
    # the context goes on after either path: one more greedy token from it
    state["next"] = ctx.next_token(inferlet.greedy())
    ctx.free()
    return state

print(json.dumps({"stream": run(False), "per_token": run(True)}))
"""


def all_pages_come_back(rt, seconds: float = 30) -> bool:
    """Every page is free again: at once, or once the pass that was in flight when the instance ended
    has run (its pages stay pinned until then)."""
    deadline = time.monotonic() + seconds
    while rt.num_free_pages != rt.num_pages and time.monotonic() < deadline:
        time.sleep(0.01)
    return rt.num_free_pages == rt.num_pages


def both_paths(run_inferlet, prompt=PROMPT, **kwargs):
    kwargs.setdefault("sampler", None)
    out = json.loads(run_inferlet(None, json.dumps([prompt, kwargs]), source=BOTH_PATHS).output)
    return out["stream"], out["per_token"]


@pytest.mark.parametrize("kwargs", [
    {"max_tokens": 24},
    {"max_tokens": 40, "stop": [" the", "\n"]},
    {"max_tokens": 30, "ignore_eos": True},
    {"max_tokens": 20, "sampler": [0.9, 0, 0.95, 0.0, 1234]},  # seeded: reproducible across the paths
    {"max_tokens": 1},
])
def test_a_stream_generates_what_the_per_token_loop_generates(run_inferlet, kwargs):
    stream, per_token = both_paths(run_inferlet, **kwargs)
    assert stream == per_token
    assert stream["tokens"] and len(stream["tokens"]) <= kwargs["max_tokens"]


def test_a_grammar_stream_equals_the_per_token_loop(run_inferlet):
    stream, per_token = both_paths(run_inferlet, prompt="Is the sea blue? Answer yes or no, with a reason.",
                                   max_tokens=40, grammar=True)
    assert stream == per_token
    assert stream["text"].startswith(("yes, because ", "no, because "))


@pytest.mark.parametrize("stop", [(), ("Paris",), (" of",)])
def test_text_completion_on_a_stream_equals_pie_generate_and_the_per_token_loop(run_inferlet, model, runtime, stop):
    prompt = "What is the capital of France?"
    args = ["--prompt", prompt, "--temperature", "0", "--max-tokens", "32"] + [a for s in stop for a in ("--stop", s)]
    streamed = run_inferlet("text_completion", *args).output
    per_token = run_inferlet("text_completion", *args, "--per-token").output
    built_in = generate(model, prompt, GenerationParams(max_tokens=32, temperature=0, stop=stop), plane=runtime.plane)
    assert streamed == per_token == built_in.text + "\n"


def test_seeded_sampling_is_the_same_on_both_paths_and_pie_generate(run_inferlet, model, runtime):
    prompt = "Tell me a story about a dragon."
    args = ["--prompt", prompt, "--temperature", "0.8", "--top-p", "0.9", "--seed", "77", "--max-tokens", "24"]
    streamed = run_inferlet("text_completion", *args).output
    per_token = run_inferlet("text_completion", *args, "--per-token").output
    built_in = generate(model, prompt, GenerationParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=77),
                        plane=runtime.plane)
    assert streamed == per_token == built_in.text + "\n"


TOP_LOGPROBS = """
import inferlet, json, math
ctx = inferlet.Context()
ctx.fill(inferlet.chat_prompt([{"role": "user", "content": "Name a color."}]))
start = len(ctx.tokens)
stream = ctx.stream(max_tokens=8, top_logprobs=3)
tops = [top for chunk in stream for top in chunk.top]
tokens = ctx.tokens[start:]
# the same distributions, one pass per token
ref = inferlet.Context()
ref.fill_tokens(ctx.tokens[:start])
ref_tops = []
for t in tokens:
    out = ref.step([inferlet.top_k_distribution(3, 1.0)])[0]
    ref_tops.append([list(out.ids), list(out.values)])
    ref.fill_tokens([t])
print(json.dumps({"tops": [[list(i), list(p)] for i, p in tops], "ref": ref_tops, "tokens": tokens,
                  "reason": stream.reason}))
ctx.free(); ref.free()
"""


def test_top_logprobs_of_a_stream_are_the_per_token_distributions(run_inferlet):
    out = json.loads(run_inferlet(source=TOP_LOGPROBS).output)
    assert len(out["tops"]) == len(out["tokens"]) == len(out["ref"]) > 0
    for (ids, probs), (ref_ids, ref_probs), token in zip(out["tops"], out["ref"], out["tokens"]):
        assert ids == ref_ids and ids[0] == token  # greedy: the drawn token is the most likely
        assert probs == pytest.approx(ref_probs, abs=1e-5)


LONG_STREAM = """
import inferlet
ctx = inferlet.Context()
ctx.fill("Once upon a time")
print("started", flush=True)
ctx.generate(max_tokens=6000, ignore_eos=True)
print("never")
"""


def test_a_deadline_mid_stream_ends_the_instance_and_frees_every_page(runtime):
    r = runtime.run_source(LONG_STREAM, deadline_s=3)
    assert "deadline" in r.error and "never" not in r.output
    assert all_pages_come_back(runtime)


def test_terminating_an_instance_mid_stream_ends_it_with_the_reason_and_frees_every_page(runtime):
    started = threading.Event()
    inst = runtime.launch_source(LONG_STREAM, on_output=lambda m: started.set() if "started" in m else None)
    assert started.wait(60)
    time.sleep(0.5)  # the stream is running
    inst.terminate("the operator stopped it")
    r = inst.wait(60)
    assert "the operator stopped it" in r.error and "never" not in r.output
    assert all_pages_come_back(runtime)


def test_a_quota_reached_mid_stream_fails_the_generation_with_the_quota(model):
    from pie.runtime import Runtime, RuntimeConfig

    with Runtime(model, RuntimeConfig(kv_pages_per_instance=4)) as rt:
        r = rt.run_source(LONG_STREAM)
        assert "generation failed" in r.error and "quota of 4 KV pages exceeded" in r.error, r.error
        assert "never" not in r.output
        assert all_pages_come_back(rt)


PAGE_MASKS = """
import inferlet, json
from wit_world.imports import kv

def run(per_token, masked):
    ctx = inferlet.Context()
    ctx.fill(inferlet.chat_prompt([{"role": "user", "content": "Tell me about the moon, the sun and the stars."}]))
    ctx.flush()  # the prompt's K/V in its pages
    ps = ctx.page_size
    if masked:  # hide all of the second page but its first slot from the passes that follow
        kv.mask_page(ctx.pages[1], [1, ps - 1])
    start = len(ctx.tokens)
    ctx.generate(max_tokens=12, ignore_eos=True, on_token=(lambda t: None) if per_token else None)
    out = ctx.tokens[start:]
    if masked:
        kv.mask_page(ctx.pages[1], [ps])
    ctx.free()
    return out

print(json.dumps({"stream": run(False, True), "per_token": run(True, True), "unmasked": run(False, False)}))
"""


def test_a_stream_applies_the_instances_page_masks(run_inferlet):
    out = json.loads(run_inferlet(source=PAGE_MASKS).output)
    assert out["stream"] == out["per_token"]
    assert out["stream"] != out["unmasked"]  # the mask changed what the model saw
