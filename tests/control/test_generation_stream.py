"""Generation streams (csrc/control/generation_stream.h) over a fake engine: the decode loop the control
layer runs itself. The fake's next token is a function of the pass's last input token and position, so
every property (tokens, pages, positions, stop conditions, ends, seeds, masks) can be checked exactly."""

from __future__ import annotations

import threading
import time

import pytest

from pie.control import (
    BatchLoop,
    CommandKind,
    ForwardLimits,
    GenerationStream,
    PagePool,
    Policy,
    QuotaExceeded,
    Sampler,
    SamplerKind,
    TokenBytes,
)
from pie.control._control import step_seed

VOCAB = 64
PAGE = 4


def next_token(last: int, position: int) -> int:
    """The fake model: token after `last` at `position`."""
    return (last * 7 + position + 3) % VOCAB


class FakeEngine:
    """FORWARD and COPY_PAGES handlers: a greedy/sample output is next_token(...), a top-k output is
    ([tok, tok + 1], [0.75, 0.25]). Records every pass (tokens, positions, pages, last page length,
    samplers, vocabulary masks) and every copy."""

    def __init__(self):
        self.passes: list[dict] = []
        self.copies: list[list] = []
        self.lock = threading.Lock()
        self.fail_on_pass: int | None = None  # a pass index whose command the engine rejects
        self.pass_seconds = 0.0  # how long a batch takes (a stream that must still run when it is acted on)

    def forward(self, commands):
        if self.pass_seconds:
            time.sleep(self.pass_seconds)
        outs = []
        for command in commands:
            with self.lock:
                index = len(self.passes)
                self.passes.append({
                    "tokens": list(command.token_ids), "positions": list(command.positions),
                    "pages": list(command.kv_page_ids), "last_len": command.kv_last_page_len,
                    "samplers": [o.sampler for o in command.outputs],
                    "masks": [list(o.vocab_mask or []) for o in command.outputs]})
            if index == self.fail_on_pass:
                error = ValueError("the fake engine rejects this pass")
                error.request_index = commands.index(command)
                raise error
            values = []
            for output in command.outputs:
                token = next_token(command.token_ids[output.index], command.positions[output.index])
                if output.sampler.kind == SamplerKind.TOP_K_DISTRIBUTION:
                    values.append(([token, (token + 1) % VOCAB], [0.75, 0.25]))
                else:
                    values.append(token)
            command.write_outputs(values)
            outs.append(None)
        return outs

    def copy(self, commands):
        for command in commands:
            self.copies.append([(s.src_page, s.dst_page, s.count) for s in command.spans])
            command.done()
        return [None] * len(commands)


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def setup(make_scheduler, engine, terminations):
    """(scheduler, pool, limits) with a running batch loop over the fake engine."""
    scheduler = make_scheduler(max_batch_tokens=16)
    pool = PagePool(num_pages=32, page_size=PAGE, on_terminate=lambda i, m: terminations.append((i, m)))
    limits = ForwardLimits(vocab_size=VOCAB, page_size=PAGE, num_pages=32, max_tokens=16)
    loop = BatchLoop(scheduler, {CommandKind.FORWARD: engine.forward, CommandKind.COPY_PAGES: engine.copy})
    loop.start()
    yield scheduler, pool, limits
    loop.stop()
    pool.check_invariants()


def expected_chain(prompt: list[int], n: int, first_position: int = 0) -> list[int]:
    """The n tokens the fake generates after `prompt`, whose first token is at first_position."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens[-1], first_position + len(tokens) - 1))
    return tokens[len(prompt):]


def start(setup, instance=1, prompt=(5, 9, 11), handles=(), num_cached=0, quota=0, **kwargs):
    scheduler, pool, limits = setup
    if not pool.has_instance(instance):
        pool.add_instance(instance, quota)
    queue = scheduler.create_queue(instance)
    kwargs.setdefault("sampler", Sampler(SamplerKind.GREEDY))
    kwargs.setdefault("max_tokens", 6)
    return GenerationStream.start(queue, pool, instance, limits, list(prompt), num_cached, list(handles), **kwargs)


def read_all(stream) -> tuple[list[int], dict]:
    tokens = []
    while True:
        chunk = stream.next(timeout=10)
        tokens += chunk["tokens"]
        if chunk["end"] is not None:
            return tokens, chunk


def test_a_stream_runs_the_decode_loop_pass_after_pass(setup, engine):
    _, pool, _ = setup
    stream = start(setup, prompt=[5, 9, 11], max_tokens=6)
    tokens, end = read_all(stream)
    assert tokens == expected_chain([5, 9, 11], 6) == stream.generated
    assert end["end"] == "length" and end["message"] == ""
    # the sequence is 3 + 6 tokens; every token but the last generated one has run
    assert end["num_cached"] == 8
    assert len(end["new_handles"]) == 2  # ceil(8 / 4): pages of the tokens run (the SDK reserves the same)
    assert sorted(pool.handles(1)) == sorted(end["new_handles"])
    # one prefill pass, then one pass per generated token but the last, each at the next position
    assert [p["positions"] for p in engine.passes] == [[0, 1, 2]] + [[i] for i in range(3, 8)]
    assert [p["tokens"][-1] for p in engine.passes[1:]] == tokens[:-1]
    pages = pool.resolve(1, end["new_handles"])
    for p in engine.passes:
        end_pos = p["positions"][-1] + 1
        assert p["pages"] == pages[:-(-end_pos // PAGE)]
        assert p["last_len"] == end_pos - (len(p["pages"]) - 1) * PAGE


def test_eos_ends_the_stream_without_the_eos_token(setup):
    chain = expected_chain([5, 9, 11], 10)
    eos = chain[3]
    stream = start(setup, max_tokens=10, eos_ids=[eos])
    tokens, end = read_all(stream)
    assert eos not in chain[:3]
    assert tokens == chain[:3] and end["end"] == "eos"
    assert end["num_cached"] == 3 + 3  # the EOS pass ran every token of the sequence


def test_stop_strings_are_found_across_tokens_and_stop_token_sequences(setup):
    chain = expected_chain([5, 9, 11], 12)
    table = TokenBytes([bytes([ord("a") + t % 26]) + (b"!" if t % 5 == 0 else b"") for t in range(VOCAB)])
    text = b"".join(table[t] for t in chain)
    # a stop string spanning the bytes of tokens 4 and 5
    stop = text[len(b"".join(table[t] for t in chain[:4])) - 1:][:2].decode()
    cut_at = next(i for i in range(1, 13) if stop.encode() in b"".join(table[t] for t in chain[:i]))
    tokens, end = read_all(start(setup, max_tokens=12, stop_strings=[stop], token_bytes=table))
    assert tokens == chain[:cut_at] and end["end"] == "stop-string"
    tokens, end = read_all(start(setup, instance=2, max_tokens=12, stop_tokens=[chain[5:7], [99 % VOCAB, 1, 2]]))
    assert tokens == chain[:7] and end["end"] == "stop-tokens"


def test_a_long_prompt_runs_in_chunks_of_the_token_budget(setup, engine):
    prompt = list(range(1, 40))  # 39 tokens, budget 16
    tokens, end = read_all(start(setup, prompt=prompt, max_tokens=3))
    assert tokens == expected_chain(prompt, 3)
    assert [len(p["tokens"]) for p in engine.passes[:3]] == [16, 16, 7]
    assert [p["samplers"] for p in engine.passes[:2]] == [[], []]  # no output before the prompt's end


def test_a_forked_context_gets_its_own_copy_of_the_shared_last_page(setup, engine):
    scheduler, pool, limits = setup
    pool.add_instance(1, 0)
    handles = pool.allocate(1, 2)  # a context of 6 cached tokens: the second page half full
    forked = pool.fork(1, handles)
    shared_page = pool.resolve(1, [forked[1]])[0]
    tokens, end = read_all(start(setup, prompt=[7], num_cached=6, handles=forked, max_tokens=3))
    assert tokens == expected_chain([7], 3, first_position=6)
    assert len(engine.copies) == 1 and engine.copies[0][0][0] == shared_page
    assert engine.copies[0][0][1] != shared_page  # the stream writes into its own copy
    assert pool.resolve(1, [handles[1]])[0] == shared_page  # the original keeps its page


def test_cancel_ends_after_the_pass_in_flight(setup, engine):
    engine.pass_seconds = 0.01
    stream = start(setup, max_tokens=1000)
    first = stream.next(timeout=10)
    stream.cancel()
    tokens, end = read_all(stream)
    tokens = first["tokens"] + tokens
    assert end["end"] == "cancelled" and 1 <= len(tokens) < 1000
    assert tokens == expected_chain([5, 9, 11], len(tokens))
    assert end["num_cached"] == 3 + len(tokens) - 1


def test_ending_the_instance_mid_stream_ends_it_failed_and_frees_every_page(setup, engine):
    engine.pass_seconds = 0.01
    scheduler, pool, _ = setup
    stream = start(setup, max_tokens=100_000)
    stream.next(timeout=10)
    scheduler.end_instance(1, "client went away")
    pool.end_instance(1)
    tokens, end = read_all(stream)
    assert end["end"] == "failed" and "client went away" in end["message"]
    deadline = time.monotonic() + 10  # the pass in flight keeps its pages pinned until it has run
    while pool.stats()["num_used"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.stats()["num_used"] == 0


def test_a_quota_reached_mid_stream_fails_it_with_the_quota_message(setup):
    _, pool, _ = setup
    with pytest.raises(QuotaExceeded):  # the first pass's pages do not fit: start raises
        start(setup, instance=3, prompt=list(range(9)), quota=2)
    stream = start(setup, instance=4, prompt=[1, 2, 3], quota=2, max_tokens=50)  # 8 tokens fit
    tokens, end = read_all(stream)
    assert end["end"] == "failed" and "quota" in end["message"]
    assert len(tokens) == 6  # the 6th token, at position 8, would need a third page for its pass
    assert len(pool.handles(4)) == 2


def test_an_engine_failure_ends_the_stream_failed(setup, engine):
    engine.fail_on_pass = 3
    tokens, end = read_all(start(setup, max_tokens=10))
    assert end["end"] == "failed" and "rejects" in end["message"]
    assert tokens == expected_chain([5, 9, 11], 3)


def test_seeded_samplers_derive_one_seed_per_step(setup, engine):
    seed = 2**64 - 12345  # wraps in u64 arithmetic
    read_all(start(setup, sampler=Sampler(SamplerKind.SAMPLE, temperature=0.7, top_k=5, seed=seed), max_tokens=4))
    seeds = [p["samplers"][0].seed for p in engine.passes]
    assert seeds == [(seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF for step in range(4)]
    assert seeds == [step_seed(seed, step) for step in range(4)]
    assert all(p["samplers"][0].temperature == pytest.approx(0.7) for p in engine.passes)


def test_top_logprobs_come_with_each_token(setup, engine):
    stream = start(setup, max_tokens=4, top_logprobs=2)
    tops, tokens = [], []
    while True:
        chunk = stream.next(timeout=10)
        tokens += chunk["tokens"]
        tops += chunk["top"]
        if chunk["end"]:
            break
    assert [ids for ids, _ in tops] == [[t, (t + 1) % VOCAB] for t in tokens]
    assert all(probs == pytest.approx([0.75, 0.25]) for _, probs in tops)
    assert [p["samplers"][1].kind for p in engine.passes] == [SamplerKind.TOP_K_DISTRIBUTION] * 4


def test_a_grammar_masks_every_token_and_ends_the_stream(setup, engine):
    seen = []

    def grammar(token):
        seen.append(token)
        if len(seen) == 3:
            return True, True, []
        return True, False, [len(seen) + 1, VOCAB - len(seen) - 1]

    tokens, end = read_all(start(setup, max_tokens=10, grammar=grammar, first_mask=[1, VOCAB - 1]))
    assert end["end"] == "grammar" and tokens == seen == expected_chain([5, 9, 11], 3)
    assert [p["masks"][0] for p in engine.passes] == [[1, VOCAB - 1], [2, VOCAB - 2], [3, VOCAB - 3]]

    def refuses(token):
        return False, False, []

    tokens, end = read_all(start(setup, instance=2, max_tokens=10, grammar=refuses, first_mask=[VOCAB]))
    assert end["end"] == "failed" and "rejected" in end["message"] and len(tokens) == 1

    def raises(token):
        raise KeyError("no such matcher")

    tokens, end = read_all(start(setup, instance=3, max_tokens=10, grammar=raises, first_mask=[VOCAB]))
    assert end["end"] == "failed" and "no such matcher" in end["message"]


def test_bad_specs_are_refused_naming_the_field(setup):
    with pytest.raises(ValueError, match="pending"):
        start(setup, prompt=[])
    with pytest.raises(ValueError, match="max_tokens"):
        start(setup, max_tokens=0)
    with pytest.raises(ValueError, match="sampler"):
        start(setup, sampler=Sampler(SamplerKind.RAW_LOGITS))
    with pytest.raises(ValueError, match="stop_strings"):
        start(setup, stop_strings=["x"])
    with pytest.raises(ValueError, match="stop_strings: more than 64"):
        start(setup, stop_strings=["x"] * 65, token_bytes=TokenBytes([b"a"] * VOCAB))
    with pytest.raises(ValueError, match=r"stop_tokens\[1\]: longer than 1024"):
        start(setup, stop_tokens=[[1], [2] * 1025])
    with pytest.raises(ValueError, match="top_logprobs"):
        start(setup, top_logprobs=65)
    _, pool, _ = setup
    with pytest.raises(ValueError, match="token id 99"):
        start(setup, instance=5, prompt=[1, 99])
    assert pool.handles(5) == []  # the page its first pass would have used went back


def test_streams_keep_batches_whole_when_some_end(make_scheduler, engine):
    """First-class streams: a fixed-size policy waits for batch_size commands unless nobody could add
    one; the queue of a stream that ended is not a producer, so the other streams go on at once (without
    the scheduler knowing streams, they would wait for it forever)."""
    scheduler = make_scheduler(max_batch_tokens=64, policy=Policy.FIXED_SIZE, batch_size=4)
    pool = PagePool(num_pages=32, page_size=PAGE)
    limits = ForwardLimits(vocab_size=VOCAB, page_size=PAGE, num_pages=32, max_tokens=64)
    with BatchLoop(scheduler, {CommandKind.FORWARD: engine.forward, CommandKind.COPY_PAGES: engine.copy}):
        streams = []
        for instance, n in zip(range(1, 5), (2, 5, 5, 5)):
            pool.add_instance(instance, 0)
            streams.append(GenerationStream.start(scheduler.create_queue(instance), pool, instance, limits,
                                                  [instance], 0, [], Sampler(SamplerKind.GREEDY), n))
        assert all(s.wait(timeout=10) for s in streams), "streams stalled after one of them ended"
    assert [len(s.generated) for s in streams] == [2, 5, 5, 5]


def test_a_stream_stops_at_the_models_last_position_before_allocating_for_it(setup):
    scheduler, pool, _ = setup
    limits = ForwardLimits(vocab_size=VOCAB, page_size=PAGE, num_pages=32, max_tokens=16, max_position=10)
    pool.add_instance(7, 0)
    with pytest.raises(ValueError, match="12 tokens exceeds the model's 10 positions"):
        GenerationStream.start(scheduler.create_queue(7), pool, 7, limits, list(range(12)), 0, [],
                               Sampler(SamplerKind.GREEDY), 5)
    assert pool.handles(7) == []
    stream = GenerationStream.start(scheduler.create_queue(7), pool, 7, limits, [1, 2, 3], 0, [],
                                    Sampler(SamplerKind.GREEDY), 100)
    tokens, end = read_all(stream)
    assert end["end"] == "failed" and "11 tokens exceeds the model's 10 positions" in end["message"]
    assert len(tokens) == 8 and len(pool.handles(7)) == 3  # positions 0..9 ran, in ceil(10 / 4) pages


def test_a_handle_freed_under_a_running_stream_ends_it_and_its_page_returns_after_the_stream(setup, engine):
    """A step resolves only its new pages while no handle of the instance moved (PagePool.resolve_more);
    freeing one is a change: the next step resolves them all again and fails on the freed handle. The
    freed page stays pinned while passes of the stream may read it, and is free once the stream ended."""
    _, pool, _ = setup
    engine.pass_seconds = 0.01
    pool.add_instance(1, 0)
    context = pool.allocate(1, 2)  # 6 cached tokens
    free_before = pool.stats()["num_free"]
    stream = start(setup, prompt=[7], num_cached=6, handles=context, max_tokens=1000)
    first = stream.next(timeout=10)
    pool.free(1, [context[0]])
    tokens, end = read_all(stream)
    assert end["end"] == "failed" and f"handle {context[0]} is not held by this instance" in end["message"]
    assert first["tokens"] + tokens == expected_chain([7], len(first["tokens"] + tokens), first_position=6)
    deadline = time.monotonic() + 5
    while pool.stats()["num_pinned"] and time.monotonic() < deadline:  # the last pass's pins go with it
        time.sleep(0.01)
    stats = pool.stats()
    assert stats["num_pinned"] == 0
    assert stats["num_free"] == 32 - len(pool.handles(1))  # the freed page is back
    assert free_before == 30 and context[0] not in pool.handles(1)
    pool.free(1, pool.handles(1))
    assert pool.stats()["num_free"] == 32


def test_a_page_shared_under_a_running_stream_is_copied_and_the_next_passes_use_the_copy(setup, engine):
    """A fork of the instance's pages in mid-stream makes the page the stream writes next shared: that
    pass copies it first (copy-on-write moves the stream's handle to a new page) and it and every later
    pass use the copy, never the forked page."""
    _, pool, _ = setup
    engine.pass_seconds = 0.05
    pool.add_instance(1, 0)
    context = pool.allocate(1, 1)  # 2 cached tokens; the prompt's token at position 2
    stream = start(setup, prompt=[7], num_cached=2, handles=context, max_tokens=12)
    # with k tokens read, the pass at position k + 2 is in flight and the next one writes position k + 3:
    # fork when that position is in a page already allocated (not the first of a new page)
    k = 0
    while k < 2 or (k + 3) % PAGE == 0:
        k += len(stream.next(timeout=10)["tokens"])
    handles = pool.handles(1)
    forked = pool.fork(1, handles)
    written_next = pool.resolve(1, [handles[(k + 3) // PAGE]])[0]
    tokens, end = read_all(stream)
    assert end["end"] == "length"
    assert [c for c in engine.copies if c[0][0] == written_next], "no copy-on-write of the page shared in mid-stream"
    position_of = {pos: p for p in engine.passes for pos in p["positions"]}
    assert position_of[k + 3]["pages"][(k + 3) // PAGE] != written_next  # the pass wrote into the copy
    assert all(p["pages"][(k + 3) // PAGE] != written_next for p in engine.passes if p["positions"][0] > k + 3)
    assert pool.resolve(1, [forked[(k + 3) // PAGE]])[0] == written_next  # the fork keeps the page
    pool.free(1, forked)
