"""KV sharing and the calls around it, from Python guests: kv.fork (copy-on-write), kv.copy-tokens,
named exports, page masks, per-output vocabulary masks and input embeddings. Each result is compared
with the same computation done without the feature (a fresh prefill, an explicit attention mask, token
ids), so a wrong copy, a missed copy-on-write or a misplaced mask shows as a different number."""

import json
import re
import textwrap
import time

import pytest

# A guest prelude: `run(tokens, positions, pages, last, samplers, mask=[], out_masks=[], embeds=[])` -> outputs.
PRELUDE = """
import json, sys
from wit_world.imports import forward as F, kv, embeddings
PS = kv.page_size()
KEEP = kv.ExportOptions(persistent=True, shared=False)  # outlives the exporter, this client's only

def run(tokens, positions, pages, last, samplers, mask=(), out_masks=(), embeds=()):
    n = len(tokens) or len(embeds)
    fwd = F.ForwardPass(list(tokens), list(embeds), list(positions), list(pages), last, [list(r) for r in mask],
                        [n - 1] * len(samplers), list(samplers), [list(m) for m in out_masks])
    return [(list(o.ids), list(o.values)) for o in F.wait(F.submit(0, fwd))]

def pages_for(n):
    return kv.allocate(-(-n // PS))

def last_len(n):
    return n - (-(-n // PS) - 1) * PS
"""


@pytest.fixture
def prompt(model):
    """A prompt that spans more than one page and ends inside one (so its last page is partly filled)."""
    text = "The quick brown fox jumps over the lazy dog. " * 3 + "The capital of France is"
    ids = model.tokenizer.encode(text, add_bos=False)
    ps = model.runner.page_size
    assert len(ids) > ps and len(ids) % ps != 0
    return ids


def run_guest(run_py, body, *args):
    r = run_py(PRELUDE + body, *args)
    assert r.error is None, r.error
    return json.loads(r.output)


def run_exporter(runtime, body, *args):
    """Like run_guest, for a guest that leaves an export behind (its pages stay held)."""
    r = runtime.run_source(PRELUDE + body, list(args))
    assert r.error is None, r.error
    return json.loads(r.output)


def test_fork_shares_pages_and_copies_only_the_written_page(run_py, prompt):
    out = run_guest(run_py, """
toks = json.loads(sys.argv[1]); n = len(toks)
pages = pages_for(n)
probe = [F.Sampler_TopKDistribution((5, 1.0))]
run(toks[:-1], range(n - 1), pages, last_len(n - 1), [])       # the prefix, computed once
free0 = kv.num_free_pages()
forked = kv.fork(pages)
free1 = kv.num_free_pages()
a = run(toks[-1:], [n - 1], forked, last_len(n), probe)        # writes into the shared last page: one copy
free2 = kv.num_free_pages()
b = run(toks[-1:], [n - 1], pages, last_len(n), probe)         # the original page is now its own again
free3 = kv.num_free_pages()
fresh = pages_for(n)
c = run(toks, range(n), fresh, last_len(n), probe)             # reference: a fresh prefill
print(json.dumps([len(pages), free0 - free1, free1 - free2, free2 - free3, a, b, c, sorted(forked) != sorted(pages)]))
""", json.dumps(prompt))
    num_pages, fork_cost, cow_cost, second_cost, a, b, c, new_handles = out
    assert num_pages >= 2 and new_handles
    assert fork_cost == 0, "fork must not allocate"
    assert cow_cost == 1, "only the partly filled last page is copied"
    assert second_cost == 0, "the last holder writes in place"
    assert a[0][0] == c[0][0] and b[0][0] == c[0][0]
    assert a[0][1] == pytest.approx(c[0][1], abs=1e-4) and b[0][1] == pytest.approx(c[0][1], abs=1e-4)


def test_fork_write_does_not_leak_into_the_other_fork(run_py, prompt):
    """Two forks append different tokens at the same position: each sees only its own."""
    out = run_guest(run_py, """
toks = json.loads(sys.argv[1]); n = len(toks)
probe = [F.Sampler_TopKDistribution((3, 1.0))]
pages = pages_for(n)
run(toks[:-1], range(n - 1), pages, last_len(n - 1), [])
child = kv.fork(pages)
x = run([toks[-1]], [n - 1], pages, last_len(n), probe)   # parent appends the real token
y = run([13], [n - 1], child, last_len(n), probe)          # child appends another one
x2 = run([toks[-1]], [n - 1], pages, last_len(n), probe)   # parent again: unchanged by the child's write
ref = run(toks[:-1] + [13], range(n), pages_for(n), last_len(n), probe)
print(json.dumps([x, y, x2, ref]))
""", json.dumps(prompt))
    x, y, x2, ref = out
    assert x == x2
    assert y[0][0] == ref[0][0] and y[0][1] == pytest.approx(ref[0][1], abs=1e-4)
    assert x[0][0] != y[0][0] or x[0][1] != y[0][1]


def test_copy_tokens_moves_kv_between_pages(run_py, prompt):
    out = run_guest(run_py, """
toks = json.loads(sys.argv[1]); n = len(toks)
probe = [F.Sampler_TopKDistribution((5, 1.0))]
src = pages_for(n)
run(toks[:-1], range(n - 1), src, last_len(n - 1), [])
dst = pages_for(n)
# copy token by token ranges, shifted by 3 slots at the start of each page to exercise offsets
for i in range(len(src)):
    count = min(PS, n - 1 - i * PS)
    if count > 0:
        kv.copy_tokens(src[i], dst[i], 0, 0, count)
a = run(toks[-1:], [n - 1], dst, last_len(n), probe)
b = run(toks, range(n), pages_for(n), last_len(n), probe)
# within one page: move the first 4 slots to slots 5..8 and back into a third page at offset 0
p1, p2 = kv.allocate(2)
run(toks[:4], range(4), [p1], 4, [])
kv.copy_tokens(p1, p1, 0, 5, 4)
kv.copy_tokens(p1, p2, 5, 0, 4)
c = run(toks[4:5], [4], [p2], 5, probe)
d = run(toks[:5], range(5), pages_for(5), 5, probe)
print(json.dumps([a, b, c, d]))
""", json.dumps(prompt))
    a, b, c, d = out
    assert a[0][0] == b[0][0] and a[0][1] == pytest.approx(b[0][1], abs=1e-4)
    assert c[0][0] == d[0][0] and c[0][1] == pytest.approx(d[0][1], abs=1e-4)


@pytest.mark.parametrize("call, error", [
    ("kv.copy_tokens(p[0], p[1], PS - 1, 0, 2)", r"kv\.copy-tokens: src-offset \+ count = \d+ exceeds the page size"),
    ("kv.copy_tokens(p[0], p[1], 0, PS, 1)", r"kv\.copy-tokens: dst-offset \+ count = \d+ exceeds the page size"),
    ("kv.copy_tokens(999, p[1], 0, 0, 1)", r"kv\.copy-tokens: src: 999 is not a page handle of this instance"),
    ("kv.copy_tokens(p[0], 999, 0, 0, 1)", r"kv\.copy-tokens: dst: 999 is not a page handle of this instance"),
    ("kv.fork([p[0], 999])", r"kv\.fork: pages: .*999"),
    ("kv.mask_page(p[0], [1])", r"kv\.mask-page: mask: runs add up to 1, not the page size \d+"),
    ("kv.mask_page(999, [PS])", r"kv\.mask-page: p: 999 is not a page handle of this instance"),
    ("kv.export_pages('', p, KEEP)", r"kv\.export-pages: name: an export needs a non-empty name"),
    ("kv.export_pages('é' * 513, p, KEEP)", r"kv\.export-pages: name: an export name is at most 1024 bytes"),
    ("kv.export_pages('x', [999], KEEP)", r"kv\.export-pages: pages: .*999"),
    ("kv.export_pages('dup', p, KEEP); kv.export_pages('dup', p, KEEP)", r"kv\.export-pages: name: .*'dup' already exists"),
    ("kv.unexport_pages('no-such-export')", r"kv\.unexport-pages: name: no export named 'no-such-export'"),
])
def test_kv_sharing_errors(runtime, call, error):
    r = runtime.run_source(PRELUDE + "p = kv.allocate(2)\n" + call + "\nprint('not reached')\n")
    if "dup" in runtime.plane.kv_pages.export_names():  # the first export of that case succeeded
        runtime.plane.kv_pages.unexport("dup")
    assert r.output == "" and re.match(error, r.error), r.error
    assert runtime.num_free_pages == runtime.num_pages


def test_exports_outlive_their_owner_and_are_shared_read_only(runtime, run_py, prompt):
    toks = json.dumps(prompt)
    owner = run_exporter(runtime, """
toks = json.loads(sys.argv[1]); n = len(toks)
pages = pages_for(n - 1)
run(toks[:-1], range(n - 1), pages, last_len(n - 1), [])
kv.export_pages("test-prefix", pages, KEEP)
print(json.dumps([len(pages), kv.list_exports()]))
""", toks)
    assert owner[1] == ["test-prefix"]
    held = owner[0]
    try:
        assert runtime.num_free_pages == runtime.num_pages - held  # the export holds them after the owner ended
        out = run_exporter(runtime, """
toks = json.loads(sys.argv[1]); n = len(toks)
probe = [F.Sampler_TopKDistribution((5, 1.0))]
imp = kv.import_pages("test-prefix")
missing = kv.import_pages("no-such-prefix")
pages = list(imp) + (kv.allocate(1) if len(imp) * PS < n else [])
a = run(toks[-1:], [n - 1], pages, last_len(n), probe)       # appends into the imported last page: a copy
again = kv.import_pages("test-prefix")                          # the export itself is unchanged
b = run(toks[-1:], [n - 1], list(again) + pages[len(again):], last_len(n), probe)
ref = run(toks, range(n), pages_for(n), last_len(n), probe)
print(json.dumps([missing, a, b, ref]))
""", toks)
        missing, a, b, ref = out
        assert missing is None
        assert a[0][0] == ref[0][0] and a[0][1] == pytest.approx(ref[0][1], abs=1e-4)
        assert b == a
        assert runtime.num_free_pages == runtime.num_pages - held  # importers' copies went back
        r = run_py("from wit_world.imports import kv\nkv.unexport_pages('test-prefix')\nprint(kv.list_exports())\n")
        assert r.error is None and r.output == "[]\n"
    finally:
        if "test-prefix" in runtime.plane.kv_pages.export_names():
            runtime.plane.kv_pages.unexport("test-prefix")
    assert runtime.num_free_pages == runtime.num_pages


def test_only_the_owner_unexports_while_it_lives(runtime):
    owner = runtime.launch_source(PRELUDE + """
kv.export_pages("owned", kv.allocate(1), KEEP)
print("exported", flush=True)
from wit_world.imports import runtime as R
R.receive()
""")
    try:
        for _ in range(200):
            if "owned" in runtime.plane.kv_pages.export_names():
                break
            owner.done.wait(0.05)
        other = runtime.run_source("from wit_world.imports import kv\nkv.unexport_pages('owned')\n")
        assert re.match(r"kv\.unexport-pages: name: export 'owned' belongs to instance \d+", other.error), other.error
    finally:
        owner.send("")
        assert owner.wait(30).error is None
    after = runtime.run_source("from wit_world.imports import kv\nkv.unexport_pages('owned')\n")
    assert after.error is None
    assert runtime.num_free_pages == runtime.num_pages


def test_mask_page_equals_an_explicit_attention_mask(run_py, prompt):
    out = run_guest(run_py, """
toks = json.loads(sys.argv[1]); n = len(toks)
probe = [F.Sampler_TopKDistribution((5, 1.0))]
pages = pages_for(n)
run(toks[:-1], range(n - 1), pages, last_len(n - 1), [])
plain = run(toks[-1:], [n - 1], pages, last_len(n), probe)
# hide slots 2..5 of page 0 and slot 1 of page 1 through page masks
kv.mask_page(pages[0], [2, 4, PS - 6])
kv.mask_page(pages[1], [1, 1, PS - 2])
masked = run(toks[-1:], [n - 1], pages, last_len(n), probe)
# the same with an explicit mask row over the sequence
row = [2, 4, PS - 6 + 1, 1, n - (PS + 2)]
explicit = run(toks[-1:], [n - 1], pages, last_len(n), probe, mask=[row])
kv.mask_page(pages[0], [PS]); kv.mask_page(pages[1], [PS])     # everything visible again
restored = run(toks[-1:], [n - 1], pages, last_len(n), probe)
print(json.dumps([plain, masked, explicit, restored]))
""", json.dumps(prompt))
    plain, masked, explicit, restored = out
    assert masked[0][0] == explicit[0][0] and masked[0][1] == pytest.approx(explicit[0][1], abs=1e-5)
    assert masked != plain
    assert restored[0][0] == plain[0][0] and restored[0][1] == pytest.approx(plain[0][1], abs=1e-5)


def test_output_masks_restrict_the_sampled_tokens(run_py, model, prompt):
    vocab = model.runner.vocab_size
    out = run_guest(run_py, """
toks = json.loads(sys.argv[1]); V = int(sys.argv[2]); n = len(toks)
pages = pages_for(n)
top = run(toks, range(n), pages, last_len(n), [F.Sampler_TopKDistribution((8, 1.0))])[0][0]
allowed = sorted(top[3:6])                                   # three tokens of similar probability
# runs alternate allowed / forbidden, starting with allowed
runs = [0, allowed[0], 1, allowed[1] - allowed[0] - 1, 1, allowed[2] - allowed[1] - 1, 1, V - allowed[2] - 1]
lp = run(toks[-1:], [n - 1], pages, last_len(n), [F.Sampler_Logprobs(allowed)])[0][1]
g = run(toks[-1:], [n - 1], pages, last_len(n), [F.Sampler_Greedy()], out_masks=[runs])[0][0]
seeded = [run(toks[-1:], [n - 1], pages, last_len(n),
              [F.Sampler_Sample(F.SampleParams(1.5, 0, 1.0, 0.0, s))], out_masks=[runs])[0][0][0] for s in range(12)]
dist = run(toks[-1:], [n - 1], pages, last_len(n), [F.Sampler_TopKDistribution((5, 1.0)), F.Sampler_Greedy()],
           out_masks=[runs, []])
print(json.dumps([allowed, lp, g, seeded, dist]))
""", json.dumps(prompt), str(vocab))
    allowed, lp, greedy, seeded, dist = out
    assert greedy == [allowed[max(range(3), key=lambda i: lp[i])]]
    assert set(seeded) <= set(allowed) and len(set(seeded)) >= 2
    (ids, probs), (unmasked, _) = dist
    assert set(ids[:3]) == set(allowed) and all(p == 0.0 for p in probs[3:])
    import math
    z = sum(math.exp(v) for v in lp)
    want = {t: math.exp(v) / z for t, v in zip(allowed, lp)}
    assert [probs[i] for i in range(3)] == pytest.approx([want[t] for t in ids[:3]], rel=1e-4)
    assert unmasked[0] not in allowed or unmasked[0] == greedy[0]


@pytest.mark.parametrize("masks, error", [
    ("[[V - 1]]", "forward.submit: fwd.output-masks[0]: runs add up to V - 1, not the vocabulary size V"),
    ("[[0, V]]", "forward.submit: fwd.output-masks[0]: no token is allowed"),
    ("[[V], [V]]", "forward.submit: fwd.output-masks: 2 masks for 1 outputs"),
])
def test_output_mask_errors(run_py, model, masks, error):
    vocab = model.runner.vocab_size
    r = run_py(PRELUDE + f"V = {vocab}\nrun([1], [0], kv.allocate(1), 1, [F.Sampler_Greedy()], out_masks={masks})\n")
    assert r.error.startswith(error.replace("V - 1", str(vocab - 1)).replace("V", str(vocab))), r.error


def test_input_embeddings_equal_token_inputs(run_py, runtime, model):
    text = "The capital of France is"
    out = run_guest(run_py, """
text = sys.argv[1]
from wit_world.imports import tokenizer
toks = list(tokenizer.encode(text, False)); n = len(toks)
probe = [F.Sampler_TopKDistribution((5, 1.0))]
slots = embeddings.allocate(n)
echo = list(embeddings.embed_text(slots, text))
a = run([], range(n), pages_for(n), n, probe, embeds=slots)
other = embeddings.allocate(n)
embeddings.embed_tokens(other, toks)
b = run([], range(n), pages_for(n), n, probe, embeds=other)
c = run(toks, range(n), pages_for(n), n, probe)
mixed_slots = embeddings.allocate(1)
embeddings.embed_tokens(mixed_slots, toks[-1:])
p = pages_for(n)
run(toks[:-1], range(n - 1), p, n - 1, [])
d = run([], [n - 1], p, n, probe, embeds=mixed_slots)     # decode step from an embedding
embeddings.free(other)
print(json.dumps([echo == toks, a, b, c, d]))
""", text)
    same, a, b, c, d = out
    assert same
    for x in (a, b, d):
        assert x[0][0] == c[0][0] and x[0][1] == pytest.approx(c[0][1], abs=1e-4)
    assert runtime.plane.embed_slots.stats()["num_free"] == runtime.plane.embed_slots.num_pages


@pytest.mark.parametrize("call, error", [
    ("embeddings.embed_text(embeddings.allocate(1), 'two words')",
     r"embeddings\.embed-text: text: it has 2 tokens, not one per slot \(1 slots\)"),
    ("embeddings.embed_tokens(embeddings.allocate(2), [1])", r"embeddings\.embed-tokens: tokens: 1 tokens for 2 slots"),
    ("embeddings.embed_tokens(embeddings.allocate(1), [10**9])", r"embeddings\.embed-tokens: tokens\[0\]: token id"),
    ("embeddings.free([4242])", r"embeddings\.free: slots: .*4242"),
    ("embeddings.allocate(10**9)", r"embeddings\.allocate: count: 1000000000 slots requested"),
    ("run([], [0], kv.allocate(1), 1, [], embeds=[4242])", r"forward\.submit: fwd\.input-embeddings: .*4242"),
])
def test_embedding_errors(run_py, call, error):
    r = run_py(PRELUDE + call + "\nprint('not reached')\n")
    assert r.output == "" and re.match(error, r.error), r.error


def test_sdk_fork_save_and_open(runtime, run_py):
    """Context.fork shares the prompt's pages (no allocation); Context.save / open hands a computed
    prefix to a later instance, which prefills only its suffix and generates what a fresh context does."""
    r = runtime.run_source(textwrap.dedent("""
        import json, inferlet
        from inferlet import Context, raw
        ctx = Context()
        ctx.fill_system("You are a geography assistant.")
        ctx.fill_user("What is the capital of France?")
        ctx.fill("<|im_start|>assistant\\n")
        ctx.flush()
        free = raw.kv.num_free_pages()
        kids = [ctx.fork() for _ in range(3)]
        fork_cost = free - raw.kv.num_free_pages()
        outs = [k.generate(max_tokens=8) for k in kids]
        ctx.save("sdk-prefix")
        print(json.dumps([fork_cost, outs, ctx.num_cached]))
    """))
    assert r.error is None, r.error
    fork_cost, outs, cached = json.loads(r.output)
    assert fork_cost == 0 and outs[0] == outs[1] == outs[2] and outs[0].startswith("The capital of France")
    try:
        r2 = runtime.run_source(textwrap.dedent("""
            import json
            from inferlet import Context, raw
            before = raw.kv.num_free_pages()
            ctx = Context.open("sdk-prefix")
            assert Context.open("missing") is None
            ctx.fill("")  # nothing new: the saved prefix ends right before the pending last token
            text = ctx.generate(max_tokens=8)
            print(json.dumps([text, ctx.num_cached]))
            Context.drop_saved("sdk-prefix")
        """))
        assert r2.error is None, r2.error
        text, _ = json.loads(r2.output)
        assert text == outs[0]
    finally:
        if "sdk-prefix" in runtime.plane.kv_pages.export_names():
            runtime.plane.kv_pages.unexport("sdk-prefix")
    assert runtime.num_free_pages == runtime.num_pages


def test_sdk_fork_computes_pending_tokens_once(run_py, model):
    """Forking a context with a pending prompt computes the prompt (but its last token) once; each fork
    computes only that last token; both continue exactly as a fresh context does."""
    runner = model.runner
    before = runner.num_tokens_processed
    r = run_py("""
        import json
        from inferlet import Context
        ctx = Context()
        ctx.fill_user("Name a color.")
        ctx.fill("<|im_start|>assistant\\n")
        n = len(ctx.tokens)
        a, b = ctx.fork(), ctx.fork()
        texts = [c.generate(max_tokens=4) for c in (a, b, ctx)]
        print(json.dumps([n, texts]))
    """)
    assert r.error is None, r.error
    n, texts = json.loads(r.output)
    assert texts[0] == texts[1] == texts[2]
    # prompt once (n - 1) + its last token once per context (3) + 3 generated tokens each, minus the last
    assert runner.num_tokens_processed - before == (n - 1) + 3 + 3 * 3


def test_sdk_submit_overlaps_contexts_and_truncate(run_py, runtime):
    r = run_py("""
        import json
        from inferlet import Context, greedy, raw
        ctxs = [Context() for _ in range(3)]
        for c in ctxs:
            c.fill_user("Count to three.")
            c.fill("<|im_start|>assistant\\n")
        pending = [c.submit([greedy()]) for c in ctxs]        # all three in flight before any wait
        firsts = [p.wait()[0].ids[0] for p in pending]
        c = ctxs[0]
        n = len(c.tokens)
        c.fill(" and then some more words")
        c.flush()
        c.truncate(n)                                          # back to the prompt: the words are gone
        again = c.next_token(greedy())
        print(json.dumps([firsts, again, c.num_cached == n - 1 or c.num_cached == n]))
    """)
    assert r.error is None, r.error
    firsts, again, cached_ok = json.loads(r.output)
    assert firsts[0] == firsts[1] == firsts[2] == again
    assert cached_ok


PASS_THEN_FREE = """
from wit_world.imports import forward as F, kv
pages = kv.allocate(2)
f = F.submit(0, F.ForwardPass([1, 2], [], [0, 1], pages[:1], 2, [], [1], [F.Sampler_Greedy()], []))
g = F.submit(0, F.ForwardPass([3], [], [0], pages[1:], 1, [], [0], [F.Sampler_Greedy()], []))
kv.free(pages)  # before the passes ran
print("freed")
print(len(F.wait(f)), len(F.wait(g)))
"""


def test_pages_freed_under_a_queued_pass_stay_out_of_the_pool_until_it_ran(model):
    """The attack: free the pages a queued pass reads and writes, hoping another tenant gets them. The
    passes wait in the queue (fixed_wait policy) while the guest frees its pages: the pool keeps them
    pinned, and they come free once the passes have run."""
    import threading

    from pie.control import SchedulerConfig
    from pie.runtime import Runtime, RuntimeConfig

    with Runtime(model, RuntimeConfig(scheduler=SchedulerConfig(policy="fixed_wait", max_wait=1.5))) as rt:
        pool = rt.plane.kv_pages
        free_before = pool.stats()["num_free"]
        freed, seen = threading.Event(), {}

        def on_output(text):
            if text.startswith("freed"):
                seen.update(pool.stats())
                freed.set()

        inst = rt.launch_source(PASS_THEN_FREE, on_output=on_output)
        assert freed.wait(30)
        assert seen["num_pinned"] == 2 and seen["num_free"] == free_before - 2  # freed, yet not reusable
        result = inst.wait(60)
        assert result.error is None and result.output == "freed\n1 1\n"
        deadline = time.monotonic() + 10  # the batch loop drops its copy of the commands just after
        while pool.stats()["num_pinned"] and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = pool.stats()
        assert stats["num_pinned"] == 0 and stats["num_free"] == free_before
        pool.check_invariants()
