"""Every implemented WIT call, exercised from a Python guest: right results, and errors that fail only
the offending instance with a message naming the call and the argument."""

import json
import re

import pytest
import torch

from pie.engine.batch import ForwardRequest, Greedy, Logprobs, RawLogits, Sample, TopKDistribution
from pie.runtime import api

EXPECTED_UNIMPLEMENTED = {
    "runtime": set(),
    "models": set(),
    "tokenizer": set(),
    "kv": set(),
    "forward": set(),
    "generation": set(),
    "queues": set(),
    "embeddings": set(),
    "grammar": set(),
    "messaging": set(),
    "kv-store": set(),
    "http": set(),
}


def test_every_wit_function_is_defined_hot_cold_or_trapping():
    funcs = api.wit_functions()
    assert set(funcs) == set(EXPECTED_UNIMPLEMENTED)
    for iface, names in funcs.items():
        missing = {n for n in names if api.implementation(iface, n) == "missing"}
        assert missing == EXPECTED_UNIMPLEMENTED[iface], iface
    hot = {f"{i}.{n}" for i, names in funcs.items() for n in names if api.implementation(i, n) == "hot"}
    assert hot == {"runtime.instance-id", "kv.page-size", "kv.allocate", "kv.free", "kv.fork", "kv.copy-tokens",
                   "kv.mask-page", "forward.submit", "forward.wait", "forward.ready", "forward.submit-with-adapter"}


def test_host_calls_are_counted_by_function_hot_and_cold(runtime, run_py):
    """What pie_host_calls_total reads: every hot function's calls (C++ counters), and every cold function
    called at least once, whatever the instance."""
    from pie._ext import _runtime

    before = _runtime.host_call_counts()
    assert set(before) >= {"kv.allocate", "kv.free", "forward.submit", "runtime.instance-id"}
    r = run_py("""
        from wit_world.imports import kv, runtime
        pages = [kv.allocate(1) for _ in range(7)]
        for p in pages:
            kv.free(p)
        for _ in range(3):
            runtime.version()
    """)
    assert r.error is None
    after = _runtime.host_call_counts()
    assert after["kv.allocate"] - before["kv.allocate"] == 7 and after["kv.free"] - before["kv.free"] == 7
    assert after["runtime.version"] - before.get("runtime.version", 0) == 3
    assert after["forward.submit"] == before["forward.submit"]


def test_runtime_calls(runtime, run_py):
    r = run_py("""
        import sys, inferlet
        from wit_world.imports import runtime
        inferlet.send("sent;")
        print("argv", sys.argv[1:], inferlet.arguments())
        print("version", runtime.version())
        print("id", runtime.instance_id())
        print("to the log", file=sys.stderr)
        runtime.log("logged")
        inferlet.set_return("the value")
    """, "--flag", "two words")
    assert r.error is None
    lines = r.output.splitlines()
    assert lines[0] == "sent;argv ['--flag', 'two words'] ['--flag', 'two words']"
    assert lines[1] == "version 0.1.0"
    assert lines[2] == f"id {r.instance_id}"
    assert r.log == "to the log\nlogged"
    assert r.return_value == "the value"


def test_runtime_receive_from_client(runtime):
    inst = runtime.launch_source("from wit_world.imports import runtime\nprint('echo:', runtime.receive())\n")
    inst.send("ping")
    r = inst.wait(30)
    assert r.error is None and r.output == "echo: ping\n"


def test_models_and_tokenizer_calls(model, run_py):
    tok = model.tokenizer
    r = run_py("""
        import json
        from wit_world.imports import models, tokenizer, types
        info = models.info()
        sp = tokenizer.special_tokens()
        ids = tokenizer.encode("Hello, world!", False)
        print(json.dumps({
            "models": models.list_models(),
            "info": [info.name, info.architecture, info.vocab_size, info.num_layers, info.page_size,
                     info.max_batch_tokens],
            "ids": ids, "ids_bos": tokenizer.encode("Hi", True),
            "text": tokenizer.decode(ids, True),
            "vocab": tokenizer.vocab_size(),
            "special": [sp.bos, sp.add_bos, sp.eos, sp.pad],
            "t2i": tokenizer.token_to_id("Hello"), "t2i_missing": tokenizer.token_to_id("no such token at all"),
            "i2t": tokenizer.id_to_token(ids[0]),
            "template": tokenizer.chat_template(),
            "chat": tokenizer.apply_chat_template([types.Message("user", "Hi")], True),
        }))
    """)
    assert r.error is None, r.error
    out = json.loads(r.output)
    runner = model.runner
    assert out["models"] == [model.name]
    assert out["info"] == [model.name, runner.model_config.architecture, runner.vocab_size,
                           runner.model_config.num_layers, runner.page_size, runner.max_batch_tokens]
    assert out["ids"] == tok.encode("Hello, world!", add_bos=False)
    assert out["ids_bos"] == tok.encode("Hi", add_bos=True)
    assert out["text"] == "Hello, world!"
    assert out["vocab"] == runner.vocab_size
    assert out["special"] == [tok.special.bos_id, tok.special.add_bos, sorted(model.eos_ids), None]
    assert out["t2i"] == tok.token_to_id("Hello") and out["t2i_missing"] is None
    assert out["i2t"] == tok.id_to_token(out["ids"][0])
    assert out["template"] == tok.chat_template.source
    assert out["chat"] == tok.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_tokenizer_decode_out_of_range_fails_the_instance(run_py, model):
    r = run_py("from wit_world.imports import tokenizer\ntokenizer.decode([1, 999999], True)\n")
    vocab = model.runner.vocab_size
    assert r.error == f"tokenizer.decode: tokens[1]: token id 999999 is outside the vocabulary [0, {vocab})"


def test_kv_calls(runtime, run_py):
    total = runtime.num_pages
    r = run_py("""
        import json
        from wit_world.imports import kv
        free0 = kv.num_free_pages()
        a = kv.allocate(3)
        b = kv.allocate(2)
        free1 = kv.num_free_pages()
        kv.free(a)
        free2 = kv.num_free_pages()
        kv.allocate(4)  # not freed: the host takes it back when the instance ends
        print(json.dumps([kv.page_size(), free0, a, b, free1, free2]))
    """)
    assert r.error is None, r.error
    page_size, free0, a, b, free1, free2 = json.loads(r.output)
    assert page_size == runtime.page_size
    assert free0 == total and free1 == total - 5 and free2 == total - 2
    assert len(set(a + b)) == 5
    assert runtime.num_free_pages == total


@pytest.mark.parametrize("source, error", [
    ("kv.free([12345])", r"kv\.free: pages: .*\b12345 is not (held by|a page handle of) this instance"),
    ("p = kv.allocate(1); kv.free(p + p)", r"kv\.free: pages: .*is listed twice"),
    ("kv.allocate(10**9)", r"kv\.allocate: count: .*1000000000 .*pages"),
])
def test_kv_errors_fail_the_instance(run_py, source, error):
    r = run_py("from wit_world.imports import kv\n" + source + "\nprint('not reached')\n")
    assert r.output == ""
    assert re.match(error, r.error), r.error


FORWARD_GUEST = """
import json, sys
from wit_world.imports import forward, kv
tokens = json.loads(sys.argv[1])
pages = kv.allocate(-(-len(tokens) // kv.page_size()))
last = len(tokens) - (len(pages) - 1) * kv.page_size()
S = forward
samplers = [S.Sampler_Greedy(), S.Sampler_TopKDistribution((5, 1.0)), S.Sampler_Logprobs([1, 2, 3]),
            S.Sampler_RawLogits(), S.Sampler_Sample(S.SampleParams(0.8, 20, 0.9, 0.0, 1234)),
            S.Sampler_Greedy()]
f = forward.submit(0, forward.ForwardPass(tokens, [], list(range(len(tokens))), pages, last, [],
                                          [len(tokens) - 1] * 5 + [0], samplers, []))
outs = forward.wait(f)
print(json.dumps([[list(o.ids), list(o.values)] for o in outs]))
"""


def test_forward_outputs_match_the_runner(model, run_py):
    tokens = model.tokenizer.encode("The capital of France is", add_bos=False)
    r = run_py(FORWARD_GUEST, json.dumps(tokens))
    assert r.error is None, r.error
    outs = json.loads(r.output)
    # the same pass straight on the runner (no instance runs now: pages 0.. are free)
    runner = model.runner
    n = len(tokens)
    pages = list(range(-(-n // runner.page_size)))
    [ref] = runner.execute([ForwardRequest(
        token_ids=tokens, positions=list(range(n)), kv_page_ids=pages,
        kv_last_page_len=n - (len(pages) - 1) * runner.page_size,
        outputs=[(n - 1, Greedy()), (n - 1, TopKDistribution(5, 1.0)), (n - 1, Logprobs((1, 2, 3))),
                 (n - 1, RawLogits()), (n - 1, Sample(0.8, 20, 0.9, 0.0, 1234)), (0, Greedy())])])
    greedy, topk, logp, logits, sampled, first = ref.outputs
    assert outs[0] == [[greedy], []]
    assert outs[1][0] == list(topk[0]) and outs[1][1] == pytest.approx(list(topk[1]), rel=1e-5)
    assert outs[2][0] == [1, 2, 3] and outs[2][1] == pytest.approx(list(logp), rel=1e-5)
    assert outs[3][0] == [] and torch.allclose(torch.tensor(outs[3][1]), logits.float(), atol=1e-4)
    assert outs[4] == [[sampled], []]  # seeded: a function of (seed, logits) only
    assert outs[5] == [[first], []]
    assert outs[0][0][0] == int(torch.argmax(logits))


@pytest.mark.parametrize("fwd, error", [
    ("[1, VOCAB], [], [0, 1], pages, 2, [], [1], [S.Sampler_Greedy()]",
     "forward.submit: fwd.tokens[1]: token id VOCAB is outside the vocabulary [0, VOCAB)"),
    ("[], [], [], pages, 1, [], [], []", "forward.submit: fwd.tokens: empty"),
    ("[1, 2], [], [0], pages, 2, [], [], []", "forward.submit: fwd.positions: 1 positions for 2 tokens"),
    ("[1], [], [0], [777], 1, [], [], []", "forward.submit: fwd.pages: "),
    ("[1], [], [0], pages, 0, [], [], []", "forward.submit: fwd.last-page-len: 0 is not in [1, PAGE]"),
    ("[1, 2], [], [0, 1], pages, 2, [[1]], [], []", "forward.submit: fwd.mask: 1 rows for 2 tokens"),
    ("[1, 2], [], [0, 1], pages, 2, [[1, 0], [1, 1]], [], []",
     "forward.submit: fwd.mask[0]: runs add up to 1, not the sequence length 2"),
    ("[1], [], [0], pages, 1, [], [3], [S.Sampler_Greedy()]",
     "forward.submit: fwd.output-indices[0]: 3 is not in [0, 1)"),
    ("[1], [], [0], pages, 1, [], [0], []", "forward.submit: fwd.samplers: 0 samplers for 1 output indices"),
    ("[1], [], [0], pages, 1, [], [0], [S.Sampler_Sample(S.SampleParams(0.0, 0, 1.0, 0.0, None))]",
     "forward.submit: fwd.samplers[0]: sample: temperature 0.000000 must be > 0"),
    ("[1], [], [0], pages, 1, [], [0], [S.Sampler_Logprobs([VOCAB])]",
     "forward.submit: fwd.samplers[0]: logprobs: token id VOCAB is outside the vocabulary"),
    ("[1], [5], [0], pages, 1, [], [], []",
     "forward.submit: fwd.tokens: give either tokens or input-embeddings, not both"),
    ("[], [5], [0], pages, 1, [], [], []", "forward.submit: fwd.input-embeddings: "),
])
def test_forward_submit_errors(run_py, model, fwd, error):
    vocab, page = model.runner.vocab_size, model.runner.page_size
    fwd = fwd.replace("VOCAB", str(vocab))
    r = run_py(f"""
        from wit_world.imports import forward as S, kv
        pages = kv.allocate(1)
        S.submit(0, S.ForwardPass({fwd}, []))
        print("not reached")
    """)
    assert r.output == ""
    assert r.error.startswith(error.replace("VOCAB", str(vocab)).replace("PAGE", str(page))), r.error
    if "fwd.pages: " in error:
        assert "777" in r.error


def test_forward_wait_and_ready(run_py):
    r = run_py("""
        from wit_world.imports import forward as S, kv
        pages = kv.allocate(1)
        f = S.submit(0, S.ForwardPass([1, 2], [], [0, 1], pages, 2, [], [1], [S.Sampler_Greedy()], []))
        S.wait(f)
        S.ready(f)
    """)
    assert re.fullmatch(r"forward\.ready: f: \d+ is not a pending future of this instance", r.error), r.error
    r = run_py("from wit_world.imports import forward\nforward.wait(42)\n")
    assert r.error == "forward.wait: f: 42 is not a pending future of this instance"


def test_failing_instance_does_not_disturb_its_neighbour(runtime, model):
    good = runtime.launch("text_completion", ["--prompt", "What is the capital of France?", "--max-tokens", "16",
                                              "--temperature", "0"])
    bad = runtime.launch_source("from wit_world.imports import forward as S, kv\np = kv.allocate(1)\n"
                                "S.submit(0, S.ForwardPass([1, 10**9], [], [0, 1], p, 2, [], [], [], []))\n")
    rb, rg = bad.wait(60), good.wait(60)
    assert rb.error.startswith("forward.submit: fwd.tokens[1]: token id 1000000000 is outside the vocabulary")
    assert rg.error is None and rg.output == "The capital of France is Paris.\n"
    assert runtime.num_free_pages == runtime.num_pages


def test_sdk_context_generate_fork_and_samplers(run_py):
    r = run_py("""
        import json, inferlet
        ctx = inferlet.Context()
        ctx.fill(inferlet.chat_prompt([{"role": "user", "content": "What is the capital of France?"}]))
        child = ctx.fork()
        a = ctx.generate(max_tokens=32, sampler=inferlet.greedy())
        b = child.generate(max_tokens=32, sampler=inferlet.sample(0))
        grand = ctx.fork()  # continues after a's tokens: K/V recomputed for the whole history
        grand.fill_user("And of Germany?")
        dist, lp = grand.step([inferlet.top_k_distribution(3), inferlet.logprobs([1, 2])])
        stop = inferlet.Context()
        stop.fill(inferlet.chat_prompt([{"role": "user", "content": "What is the capital of France?"}]))
        d = stop.generate(max_tokens=32, stop=["France"])
        print(json.dumps([a, b, d, len(ctx.pages) > 0, len(dist.ids), sum(dist.values), len(lp.values),
                          grand.tokens[:len(ctx.tokens)] == ctx.tokens]))
        ctx.free()
    """)
    assert r.error is None, r.error
    a, b, d, has_pages, num_dist, dist_mass, num_lp, prefix_kept = json.loads(r.output)
    assert a == b == "The capital of France is Paris."
    assert d == "The capital of "
    assert has_pages and prefix_kept
    assert num_dist == 3 and 0 < dist_mass <= 1.0001 and num_lp == 2


def test_python_exception_is_one_line_with_location(run_py):
    r = run_py("x = 1\n\nraise ValueError('boom')\n")
    assert r.error == "ValueError: boom (guest.py:3)"
    assert "Traceback" in r.log
    r = run_py("def f(:\n")
    assert r.error.startswith("SyntaxError") and r.error.endswith("(guest.py:1)")


def test_bundled_standard_library(run_py):
    r = run_py("""
        import json, re, math, random, collections, itertools, functools, dataclasses, typing, heapq, string
        import textwrap, hashlib, base64, time, statistics, argparse
        print(hashlib.sha256(b"pie").hexdigest()[:8], statistics.mean([1, 2, 3]), base64.b64encode(b"x").decode())
    """)
    assert r.error is None, r.error
    import hashlib

    assert r.output == f"{hashlib.sha256(b'pie').hexdigest()[:8]} 2 eA==\n"


def test_chat_example_multi_turn_over_client_messages(runtime, model):
    from pie.control.generate import GenerationParams, generate, generate_batch

    inst = runtime.launch("chat", ["--temperature", "0", "--max-tokens", "24"])
    for line in ["What is the capital of France?\n", "And of Germany?\n", ""]:
        inst.send(line)
    r = inst.wait(120)
    assert r.error is None, r.error
    first, second = r.output.splitlines()
    # reference: the built-in loop on the whole conversation, rendered by the chat template
    tok = model.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert first == generate(model, messages[0]["content"], GenerationParams(max_tokens=24, temperature=0)).text
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And of Germany?"}]
    ids = tok.encode(tok.apply_chat_template(messages), add_bos=False)
    assert second == generate_batch(model, [ids], GenerationParams(max_tokens=24, temperature=0))[0].text
    assert runtime.num_free_pages == runtime.num_pages


def test_kv_store_shared_between_instances(run_py):
    r = run_py("""
        from wit_world.imports import kv_store
        kv_store.set("greeting/en", "hello")
        kv_store.set("greeting/fr", "bonjour")
        kv_store.set("other", "x")
        print(kv_store.delete("other"), kv_store.delete("other"))
    """)
    assert r.error is None and r.output == "True False\n"
    r = run_py("""
        from wit_world.imports import kv_store
        print(kv_store.get("greeting/fr"), kv_store.get("missing"), kv_store.list_keys("greeting/"))
    """)
    assert r.error is None and r.output == "bonjour None ['greeting/en', 'greeting/fr']\n"


def test_messaging_between_instances(runtime):
    import threading

    ready = threading.Event()
    listener = runtime.launch_source("""
from wit_world.imports import messaging
s = messaging.subscribe("news")
print("ready")
print(messaging.receive(s), messaging.receive(s))
messaging.unsubscribe(s)
messaging.receive(s)
""", on_output=lambda m: ready.set())
    assert ready.wait(30)
    r = runtime.run_source("from wit_world.imports import messaging\nmessaging.broadcast('news', 'a')\n"
                           "messaging.broadcast('other', 'x')\nmessaging.broadcast('news', 'b')\n")
    assert r.error is None
    r = listener.wait(30)
    assert r.output == "ready\na b\n"
    assert re.fullmatch(r"messaging\.receive: s: \d+ is not a subscription of this instance", r.error), r.error


def test_queues(run_py):
    r = run_py("""
        import json
        from wit_world.imports import forward as S, kv, queues, types
        pages = kv.allocate(1)
        def greedy(q):
            return S.wait(S.submit(q, S.ForwardPass([1, 2, 3], [], [0, 1, 2], pages, 3, [], [2], [S.Sampler_Greedy()], [])))[0].ids
        q = queues.create(types.Priority.HIGH)
        a, b = greedy(0), greedy(q)
        queues.set_priority(q, types.Priority.LOW)
        queues.set_priority(0, types.Priority.NORMAL)
        S.submit(q, S.ForwardPass([1], [], [0], pages, 1, [], [], [], []))
        queues.synchronize(q)
        queues.synchronize(0)
        queues.destroy(q)
        print(json.dumps([q, a == b]), flush=True)
        S.submit(q, S.ForwardPass([1], [], [0], pages, 1, [], [], [], []))
    """)
    assert r.output == "[1, true]\n"
    assert r.error == "forward.submit: q: 1 is not a queue of this instance"
    r = run_py("from wit_world.imports import queues\nqueues.destroy(0)\n")
    assert r.error == "queues.destroy: q: the default queue 0 cannot be destroyed"
    r = run_py("from wit_world.imports import queues\nqueues.synchronize(9)\n")
    assert r.error == "queues.synchronize: q: 9 is not a queue of this instance"
