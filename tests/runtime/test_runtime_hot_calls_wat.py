"""Every hot WIT call (runtime.instance-id, kv.page-size / allocate / free / fork / copy-tokens / mask-page,
forward.submit / wait / ready) from a hand-written WAT guest (tests/runtime/wat_hot_guest.py): the canonical
ABI written out by hand against the C++ host functions; right results (forward outputs equal the runner's)
and right errors (traps whose host message names the call and the argument)."""

import re
import time
from contextlib import contextmanager

import pytest
import torch
import wasmtime

from pie.engine.batch import ForwardRequest, Greedy, Logprobs, RawLogits, Sample, TopKDistribution
from pie.runtime.instance import explain_wasm_error
from wat_hot_guest import HOT_GUEST

PROMPT = "The capital of France is"
SEEDS = range(1000, 1016)
# sample-params (temperature, top-k, top-p, min-p) for the seeded draws; every filter but the first decides
SAMPLE_PARAMS = [(1.5, 0, 1.0, 0.0), (1.5, 1, 1.0, 0.0), (1.5, 0, 0.01, 0.0), (1.5, 0, 1.0, 0.9), (0.8, 20, 0.9, 0.0)]
GREEDY, SAMPLE, TOP_K, LOGPROBS, RAW_LOGITS, NO_OUTPUT = range(6)  # the guest's sampler codes


class Guest:
    """The WAT component instantiated with a C++ instance state bound to this thread, as on an instance
    thread. A component instance that trapped cannot be entered again: `reinstantiate` makes a new one on
    the same instance state (the pages stay held; the guest's handle table starts empty).
    guest.free_all() calls the export "free-all"."""

    def __init__(self, runtime, wat: str = HOT_GUEST):
        self.runtime = runtime
        self.component = runtime.load_component(wat.encode())
        self.state = runtime.bind_test_instance()
        self.reinstantiate()

    def reinstantiate(self) -> None:
        self.store = wasmtime.Store(self.runtime.wasm_engine)
        self.store.set_epoch_deadline(1 << 40)
        self.instance = self.runtime.linker.instantiate(self.store, self.component)

    def __getattr__(self, name):
        func = self.instance.get_func(self.store, name.replace("_", "-"))
        if func is None:
            raise AttributeError(name)
        return lambda *args: func(self.store, *args)

    def handles(self) -> list[int]:
        return [self.handle(i) for i in range(self.count())]


@pytest.fixture
def guest(runtime):
    assert runtime.num_free_pages == runtime.num_pages
    g = Guest(runtime)
    yield g
    runtime.release_test_instance(g.state)
    deadline = time.monotonic() + 10  # a copy the guest queued last may still be running: it holds its pages
    while runtime.num_free_pages != runtime.num_pages and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runtime.num_free_pages == runtime.num_pages, "pages leaked"


@contextmanager
def traps(pattern: str):
    """The block traps; the host's message (the line an instance would end with) matches `pattern` from
    its start."""
    with pytest.raises((wasmtime.WasmtimeError, wasmtime.Trap)) as e:
        yield
    message = explain_wasm_error(e.value, 0.0, 0.0)
    assert re.match(pattern, message), f"{message!r} does not match {pattern!r}"


@pytest.fixture(scope="module")
def prompt(model, runtime):
    tokens = model.tokenizer.encode(PROMPT, add_bos=False)
    assert 2 < len(tokens) < runtime.page_size - 2  # the tests below keep each sequence in one page
    return tokens


@pytest.fixture(scope="module")
def reference(model, runtime, prompt):
    """The prompt's pass run straight on the runner (no instance holds pages now: pages 0.. are free)."""
    assert runtime.num_free_pages == runtime.num_pages
    runner = model.runner
    n = len(prompt)

    def run(*samplers):
        [r] = runner.execute([ForwardRequest(token_ids=prompt, positions=list(range(n)), kv_page_ids=[0],
                                             kv_last_page_len=n, outputs=[(n - 1, s) for s in samplers])])
        return r.outputs

    greedy, topk, logits = run(Greedy(), TopKDistribution(5, 1.0), RawLogits())
    [logp] = run(Logprobs((greedy, 1, 2, 3)))
    sampled = {params: run(*(Sample(*params, seed) for seed in SEEDS)) for params in SAMPLE_PARAMS}
    return {"greedy": greedy, "sampled": sampled, "topk": topk, "logits": logits, "logp_greedy": logp[0],
            "logp_1": logp[1], "logp_2": logp[2], "logp_3": logp[3]}


# ---- runtime / kv ------------------------------------------------------------------------------------

def test_instance_id_and_page_size(guest, model):
    assert guest.instance_id() == guest.state.id
    assert guest.page_size() == model.runner.page_size


def test_allocate_and_free(runtime, guest):
    total = runtime.num_pages
    assert guest.alloc(3) == 0
    assert runtime.num_free_pages == total - 3
    assert guest.alloc(2) == 3
    assert runtime.num_free_pages == total - 5
    handles = guest.handles()
    assert len(set(handles)) == 5
    guest.free_range(0, 3)
    assert runtime.num_free_pages == total - 2
    guest.free_handles(handles[3:])
    assert runtime.num_free_pages == total
    guest.free_handles([])
    assert guest.alloc(0) == 5 and guest.count() == 5  # zero pages: an empty list
    assert runtime.num_free_pages == total


@pytest.mark.parametrize("case", ["freed twice", "listed twice", "bad handle", "good and bad", "too many"])
def test_kv_allocate_and_free_errors(runtime, guest, case):
    total = runtime.num_pages
    not_held = r"is not (held by|a page handle of) this instance"
    if case == "freed twice":
        guest.alloc(2)
        h = guest.handle(0)
        guest.free_range(0, 1)
        with traps(rf"kv\.free: pages: .*\b{h} {not_held}"):
            guest.free_range(0, 1)
    elif case == "listed twice":
        guest.alloc(1)
        h = guest.handle(0)
        with traps(rf"kv\.free: pages: .*\b{h} is listed twice"):
            guest.free_handles([h, h])
    elif case == "bad handle":
        with traps(rf"kv\.free: pages: .*\b12345 {not_held}"):
            guest.free_handles([12345])
    elif case == "good and bad":
        guest.alloc(1)
        with traps(rf"kv\.free: pages: .*\b12345 {not_held}"):
            guest.free_handles([guest.handle(0), 12345])
    else:
        with traps(r"kv\.allocate: count: .*\b1000000000 .*pages"):
            guest.alloc(10 ** 9)
    # a call that traps changes nothing (all or nothing)
    held = {"freed twice": 1, "listed twice": 1, "bad handle": 0, "good and bad": 1, "too many": 0}[case]
    assert runtime.num_free_pages == total - held


def test_fork_shares_pages_and_copies_on_write(runtime, guest, prompt, reference):
    n = len(prompt)
    assert guest.alloc(1) == 0
    g0 = guest.forward_greedy(prompt, 0, 0, 1, n)
    assert g0 == reference["greedy"]
    free = runtime.num_free_pages
    assert guest.fork(0, 1) == 1
    original, forked = guest.handles()
    assert forked != original
    assert runtime.num_free_pages == free  # shared, not copied
    # the forked handle's pass writes slot n of the shared page: it gets its own copy first (prompt included)
    t_fork = guest.forward_greedy([g0], n, 1, 1, n + 1)
    assert runtime.num_free_pages == free - 1
    t_orig = guest.forward_greedy([g0], n, 0, 1, n + 1)  # no longer shared: written in place
    assert runtime.num_free_pages == free - 1
    assert t_fork == t_orig
    # the two pages are separate now: rewriting slot n of the fork leaves the original's slot n as it was
    lp = guest.forward_logprob([t_orig], n + 1, 0, 1, n + 2, t_orig)
    assert guest.forward_logprob([t_orig], n + 1, 1, 1, n + 2, t_orig) == lp
    other = prompt[0] if prompt[0] != g0 else prompt[1]
    guest.forward_greedy([other], n, 1, 1, n + 1)
    assert guest.forward_logprob([t_orig], n + 1, 0, 1, n + 2, t_orig) == lp
    assert guest.forward_logprob([t_orig], n + 1, 1, 1, n + 2, t_orig) != lp
    # forks of both handles, then everything freed at once
    assert guest.fork(0, 2) == 2
    assert runtime.num_free_pages == free - 1
    assert len(set(guest.handles())) == 4
    guest.free_all()
    assert guest.count() == 0
    assert runtime.num_free_pages == runtime.num_pages


def test_forked_page_outlives_its_original(runtime, guest, prompt):
    n = len(prompt)
    guest.alloc(1)
    g0 = guest.forward_greedy(prompt, 0, 0, 1, n)
    lp = guest.forward_logprob([g0], n, 0, 1, n + 1, g0)
    free = runtime.num_free_pages
    assert guest.fork(0, 0) == 1 and guest.count() == 1  # fork of no pages: none
    guest.fork(0, 1)
    guest.free_range(0, 1)
    assert runtime.num_free_pages == free  # the forked handle still holds the page
    # the only handle of the page now: the pass writes in place, no copy
    assert guest.forward_logprob([g0], n, 1, 1, n + 1, g0) == lp
    assert runtime.num_free_pages == free
    guest.free_range(1, 1)
    assert runtime.num_free_pages == free + 1


def test_copy_tokens_into_a_shared_page_copies_it_first(runtime, guest, prompt):
    n = len(prompt)
    guest.alloc(1)
    g0 = guest.forward_greedy(prompt, 0, 0, 1, n)
    t1 = guest.forward_greedy([g0], n, 0, 1, n + 1)  # slot n holds g0's K/V
    lp = guest.forward_logprob([t1], n + 1, 0, 1, n + 2, t1)
    free = runtime.num_free_pages
    guest.fork(0, 1)
    guest.copy(0, 1, 0, n, 1)  # slot n of the fork := slot 0: the fork gets its own page first
    assert runtime.num_free_pages == free - 1
    assert guest.forward_logprob([t1], n + 1, 0, 1, n + 2, t1) == lp  # the original is untouched
    assert guest.forward_logprob([t1], n + 1, 1, 1, n + 2, t1) != lp
    guest.copy(1, 1, n, n, 1)  # within one page, unshared now: no copy
    assert runtime.num_free_pages == free - 1


def test_fork_errors(guest):
    guest.alloc(2)
    h = guest.handle(1)
    guest.free_range(1, 1)
    with traps(rf"kv\.fork: pages: .*\b{h} is not (held by|a page handle of) this instance"):
        guest.fork(0, 2)  # table[1] was freed


def test_copy_tokens_copies_the_slots(runtime, guest, prompt):
    n = len(prompt)
    assert guest.alloc(1) == 0
    # a copy is ordered after the passes submitted before it on queue 0: submit, copy, then wait
    f = guest.submit(prompt, 0, n, 0, 1, n, GREEDY, 0)
    assert guest.alloc(2) == 1
    guest.copy(0, 1, 0, 0, 2)  # in two spans, to check the offsets
    guest.copy(0, 1, 2, 2, n - 2)
    assert guest.wait(f) == 1
    [g0] = guest.out_ids(0)
    assert guest.out_values(0) == []
    lp = guest.forward_logprob([g0], n, 0, 1, n + 1, g0)
    assert guest.forward_logprob([g0], n, 1, 1, n + 1, g0) == lp
    assert guest.forward_greedy([g0], n, 1, 1, n + 1) == guest.forward_greedy([g0], n, 0, 1, n + 1)
    # the prompt copied one slot later (slot 0: a second copy of the first token), slot 0 hidden by a page
    # mask: the same keys and values at the same RoPE positions (written by the original pass), so the same
    # next-token distribution
    guest.copy(0, 2, 0, 1, n)
    guest.copy(0, 2, 0, 0, 1)
    guest.mask(2, [0, 1, runtime.page_size - 1])
    assert guest.forward_logprob([g0], n, 2, 1, n + 2, g0) == pytest.approx(lp, rel=1e-5)
    # with slot 0 visible, the value differs: the mask did it
    guest.mask(2, [runtime.page_size])
    assert guest.forward_logprob([g0], n, 2, 1, n + 2, g0) != pytest.approx(lp, rel=1e-5)
    guest.copy(0, 1, 0, 0, 0)  # count 0: nothing to do
    guest.free_all()
    assert runtime.num_free_pages == runtime.num_pages


@pytest.mark.parametrize("args, error", [
    ((0, 1, "PS-1", 0, 2), "kv.copy-tokens: src-offset + count = PS+1 exceeds the page size PS"),
    ((0, 1, 0, "PS", 1), "kv.copy-tokens: dst-offset + count = PS+1 exceeds the page size PS"),
    ((0, 1, 1, 0, 4294967295), "kv.copy-tokens: src-offset + count = 4294967296 exceeds the page size PS"),
    ((2, 1, 0, 0, 1), "kv.copy-tokens: src: H is not a page handle of this instance"),
    ((0, 2, 0, 0, 1), "kv.copy-tokens: dst: H is not a page handle of this instance"),
])
def test_copy_tokens_errors(runtime, guest, args, error):
    ps = runtime.page_size
    guest.alloc(3)
    h = guest.handle(2)
    guest.free_range(2, 1)  # table[2]: a freed handle
    args = [{"PS": ps, "PS-1": ps - 1}.get(a, a) for a in args]
    message = error.replace("PS+1", str(ps + 1)).replace("PS", str(ps)).replace("H", str(h))
    with traps(re.escape(message)):
        guest.copy(*args)


def test_mask_page_hides_slots(runtime, guest, prompt):
    n = len(prompt)
    ps = runtime.page_size
    guest.alloc(1)
    g0 = guest.forward_greedy(prompt, 0, 0, 1, n)
    lp = guest.forward_logprob([g0], n, 0, 1, n + 1, g0)
    guest.mask(0, [1, 2, ps - 3])  # slots 1 and 2 hidden
    lp_hidden = guest.forward_logprob([g0], n, 0, 1, n + 1, g0)
    assert lp_hidden != lp
    guest.mask(0, [ps])  # every slot visible again
    assert guest.forward_logprob([g0], n, 0, 1, n + 1, g0) == lp
    guest.mask(0, [1, 2, ps - 3])
    assert guest.forward_logprob([g0], n, 0, 1, n + 1, g0) == lp_hidden
    guest.mask(0, [ps, 0])  # runs of 0 are allowed: every slot visible
    assert guest.forward_logprob([g0], n, 0, 1, n + 1, g0) == lp


@pytest.mark.parametrize("runs, total", [([1, 2], 3), ([], 0), (["PS", 1], "PS+1"),
                                         ([4294967295, 4294967295], 8589934590)])
def test_mask_page_errors(runtime, guest, runs, total):
    ps = runtime.page_size
    guest.alloc(1)
    runs = [ps if r == "PS" else r for r in runs]
    total = ps + 1 if total == "PS+1" else total
    with traps(re.escape(f"kv.mask-page: mask: runs add up to {total}, not the page size {ps}")):
        guest.mask(0, runs)


def test_mask_page_of_a_freed_page_traps(runtime, guest):
    guest.alloc(1)
    h = guest.handle(0)
    guest.free_range(0, 1)
    with traps(re.escape(f"kv.mask-page: p: {h} is not a page handle of this instance")):
        guest.mask(0, [runtime.page_size])


# ---- forward ------------------------------------------------------------------------------------------

def test_forward_outputs_match_the_runner(runtime, guest, prompt, reference):
    n = len(prompt)
    assert guest.alloc(1) == 0
    assert guest.forward_greedy(prompt, 0, 0, 1, n) == reference["greedy"]
    logp = guest.forward_logprob(prompt, 0, 0, 1, n, reference["greedy"])
    assert logp == pytest.approx(reference["logp_greedy"], rel=1e-5)
    assert guest.forward_logprob(prompt, 0, 0, 1, n, 1) == pytest.approx(reference["logp_1"], rel=1e-5)

    def outputs(sampler, arg, repeat=1):
        guest.set_repeat(repeat)
        assert guest.wait(guest.submit(prompt, 0, n, 0, 1, n, sampler, arg)) == repeat
        outs = [(guest.out_ids(i), guest.out_values(i)) for i in range(repeat)]
        return outs[0] if repeat == 1 else outs

    assert outputs(GREEDY, 0) == ([reference["greedy"]], [])
    # seeded draws are a function of (seed, logits) only: the same as the runner's, for each sample-params
    # (one pass, an output per seed)
    for params in SAMPLE_PARAMS:
        guest.set_sample(*params, True)
        assert outputs(SAMPLE, SEEDS[0], len(SEEDS)) == [([t], []) for t in reference["sampled"][params]], params
    # ... which tells a misplaced field: unfiltered, some draws are not the greedy token, while each filter
    # alone (top-k 1, top-p 0.01, min-p 0.9) leaves the greedy token only
    assert set(reference["sampled"][SAMPLE_PARAMS[0]]) != {reference["greedy"]}
    for params in SAMPLE_PARAMS[1:4]:
        assert set(reference["sampled"][params]) == {reference["greedy"]}
    guest.set_sample(1.5, 0, 1.0, 0.0, False)  # seed: none
    [[token], []] = outputs(SAMPLE, 0)
    assert 0 <= token < runtime.vocab_size
    # several logprobs outputs in one pass, each with its own list: logprobs([1]), ([2]), ([3])
    outs = outputs(LOGPROBS, 1, 3)
    assert [ids for ids, _ in outs] == [[1], [2], [3]]
    assert [v for _, [v] in outs] == pytest.approx([reference[f"logp_{t}"] for t in (1, 2, 3)], rel=1e-5)
    ids, probs = outputs(TOP_K, 5)
    assert ids == list(reference["topk"][0]) and probs == pytest.approx(list(reference["topk"][1]), rel=1e-5)
    ids, values = outputs(LOGPROBS, reference["greedy"])
    assert ids == [reference["greedy"]] and values == pytest.approx([reference["logp_greedy"]], rel=1e-5)
    ids, logits = outputs(RAW_LOGITS, 0)
    assert ids == [] and len(logits) == runtime.vocab_size
    assert torch.allclose(torch.tensor(logits), reference["logits"].float(), atol=1e-4)
    assert int(torch.argmax(torch.tensor(logits))) == reference["greedy"]
    assert guest.wait(guest.submit(prompt, 0, n, 0, 1, n, NO_OUTPUT, 0)) == 0
    guest.free_all()


def test_passes_and_copies_run_in_submission_order(guest, prompt):
    """Commands of queue 0 submitted without waiting between them see each other's writes."""
    n = len(prompt)
    guest.alloc(1)
    g0 = guest.forward_greedy(prompt, 0, 0, 1, n)
    lp = guest.forward_logprob([g0], n, 0, 1, n + 1, g0)
    guest.free_all()
    guest.alloc(1)  # prefill, then the next token on the same page
    fa = guest.submit(prompt, 0, n, 0, 1, n, GREEDY, 0)
    fb = guest.submit([g0], n, 1, 0, 1, n + 1, LOGPROBS, g0)
    assert guest.wait(fa) == 1 and guest.out_ids(0) == [g0]
    assert guest.wait(fb) == 1 and guest.out_values(0) == [lp]
    guest.free_all()
    guest.alloc(2)  # prefill, copy to another page, the next token there
    fa = guest.submit(prompt, 0, n, 0, 1, n, GREEDY, 0)
    guest.copy(0, 1, 0, 0, n)
    fb = guest.submit([g0], n, 1, 1, 1, n + 1, LOGPROBS, g0)
    guest.wait(fa)
    assert guest.wait(fb) == 1 and guest.out_values(0) == [lp]
    guest.free_all()
    guest.alloc(1)  # prefill, fork, the next token on the fork (its copy of the page made in between)
    fa = guest.submit(prompt, 0, n, 0, 1, n, GREEDY, 0)
    guest.fork(0, 1)
    fb = guest.submit([g0], n, 1, 1, 1, n + 1, LOGPROBS, g0)
    guest.wait(fa)
    assert guest.wait(fb) == 1 and guest.out_values(0) == [lp]
    guest.free_all()
    guest.alloc(2)  # a copy reads the source before a later pass overwrites it
    guest.forward_greedy(prompt, 0, 0, 1, n)
    guest.copy(0, 1, 0, 0, n)
    fx = guest.submit([prompt[1]] * n, 0, n, 0, 1, n, NO_OUTPUT, 0)
    assert guest.forward_logprob([g0], n, 1, 1, n + 1, g0) == lp
    guest.wait(fx)


def test_forward_ready_and_wait(guest, prompt):
    n = len(prompt)
    guest.alloc(1)
    f = guest.submit(prompt, 0, n, 0, 1, n, GREEDY, 0)
    deadline = time.monotonic() + 60
    while not guest.ready(f):  # false until the pass has run, then true until waited for
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert guest.ready(f) is True
    assert guest.wait(f) == 1
    with traps(rf"forward\.ready: f: {f} is not a pending future of this instance$"):
        guest.ready(f)  # consumed by wait
    guest.reinstantiate()
    with traps(rf"forward\.wait: f: {f} is not a pending future of this instance$"):
        guest.wait(f)
    guest.reinstantiate()
    with traps(r"forward\.ready: f: 7 is not a pending future of this instance$"):
        guest.ready(7)


@pytest.mark.parametrize("tokens, call, error", [
    ([1, "V"], (0, 2, 0, 1, 2, GREEDY, 0), "fwd.tokens[1]: token id V is outside the vocabulary [0, V)"),
    ([], (0, 0, 0, 1, 1, NO_OUTPUT, 0), "fwd.tokens: empty"),
    ([1, 2], (0, 1, 0, 1, 2, GREEDY, 0), "fwd.positions: 1 positions for 2 tokens"),
    ([1], (0, 1, 0, 0, 1, GREEDY, 0), "fwd.pages: empty"),
    ([1], (0, 1, 1, 1, 1, GREEDY, 0), "fwd.pages: "),  # table[1]: a freed handle, named in the message
    ([1], (0, 1, 0, 1, 0, GREEDY, 0), "fwd.last-page-len: 0 is not in [1, PS]"),
    ([1], (0, 1, 0, 1, "PS+1", GREEDY, 0), "fwd.last-page-len: PS+1 is not in [1, PS]"),
    ([1, 2, 3], (0, 3, 0, 1, 2, GREEDY, 0), "fwd.pages: the sequence holds 2 tokens, fewer than the 3 input tokens"),
    ([1], (0, 1, 0, 1, 1, LOGPROBS, "V"), "fwd.samplers[0]: logprobs: token id V is outside the vocabulary"),
    ([1], (0, 1, 0, 1, 1, TOP_K, 0), "fwd.samplers[0]: top-k-distribution: k must be >= 1"),
    ([1], (0, 1, 0, 1, 1, TOP_K, "V+1"), "fwd.samplers[0]: top-k-distribution: k exceeds the vocabulary"),
])
def test_forward_submit_errors(runtime, guest, tokens, call, error):
    vocab, ps = runtime.vocab_size, runtime.page_size
    values = {"V": vocab, "V+1": vocab + 1, "PS+1": ps + 1}
    guest.alloc(2)
    h = guest.handle(1)
    guest.free_range(1, 1)
    message = "forward.submit: " + error.replace("PS+1", str(ps + 1)).replace("PS", str(ps)).replace("V", str(vocab))
    with traps(re.escape(message) + (rf".*\b{h}\b" if error == "fwd.pages: " else "")):
        guest.submit([values.get(t, t) for t in tokens], *(values.get(a, a) for a in call))


# ---- a guest whose imports do not match the WIT ---------------------------------------------------------
# Hot calls are registered untyped, so wasmtime hands the host whatever the guest declared: each call must
# check what it reads (a mismatch used to read past the argument array or dereference a missing payload).

PAGE_SIZE_WITHOUT_RESULT = r"""
(component
  (import "pie:inferlet/kv@0.1.0" (instance $kv (export "page-size" (func))))
  (core func $ps (canon lower (func $kv "page-size")))
  (core module $m (import "host" "page-size" (func $ps)) (memory (export "mem") 1)
    (func (export "run") (result i32) (call $ps) (i32.const 16)))
  (core instance $i (instantiate $m (with "host" (instance (export "page-size" (func $ps))))))
  (alias core export $i "mem" (core memory $mem))
  (type $r (result (error string)))
  (func (export "run") (result $r) (canon lift (core func $i "run") (memory $mem))))
"""


def test_mistyped_import_traps_instead_of_crashing(runtime, tmp_path):
    path = tmp_path / "mistyped.wat"
    path.write_text(PAGE_SIZE_WITHOUT_RESULT)
    r = runtime.run(path)
    assert r.error == "kv.page-size: the guest imports it with a type other than the WIT's (pie:inferlet@0.1.0)"
    assert runtime.num_free_pages == runtime.num_pages


@pytest.mark.parametrize("old, new, sampler, error", [
    ('(case "logprobs" (list u32))', '(case "logprobs")', LOGPROBS, "fwd.samplers[0]: logprobs: expected list<u32>"),
    ('(field "seed" (option u64))', '(field "seed" u64)', SAMPLE, "fwd.samplers[0]: sample: expected sample-params"),
    ('(case "top-k-distribution" (tuple u32 f32))', '(case "top-k-distribution" u32)', TOP_K,
     "fwd.samplers[0]: top-k-distribution: expected tuple<u32, f32>"),
])
def test_mistyped_forward_pass_traps(runtime, prompt, old, new, sampler, error):
    assert old in HOT_GUEST
    g = Guest(runtime, HOT_GUEST.replace(old, new))
    try:
        g.alloc(1)
        with traps(re.escape("forward.submit: " + error)):
            g.submit(prompt, 0, len(prompt), 0, 1, len(prompt), sampler, 1)
    finally:
        runtime.release_test_instance(g.state)
    assert runtime.num_free_pages == runtime.num_pages
