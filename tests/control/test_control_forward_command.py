"""The one form of a forward pass: ForwardCommand, checked once (check_forward), submitted to a queue,
run by the FORWARD handler with its results written into it; and the page pools one runner's planes
share."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pie.control import (
    BatchLoop,
    CommandKind,
    ControlPlane,
    CopySpan,
    ForwardCommand,
    ForwardLimits,
    ForwardOutput,
    PageCopyCommand,
    Policy,
    Sampler,
    SamplerKind,
    SchedulerConfig,
)
from pie.control import _control
from pie.control.handlers import forward_handlers, pack_forward
from pie.engine.batch import ForwardRequest, Greedy, Logprobs, RawLogits, Sample, TopKDistribution
from pie.engine.runner import ModelRunner

from control_fakes import FakeRunner

LIMITS = ForwardLimits(vocab_size=100, page_size=4, num_pages=16, max_tokens=32, num_embed_slots=8,
                       max_position=1000)
GREEDY = Sampler(SamplerKind.GREEDY)


def command(**changes) -> ForwardCommand:
    fields = dict(token_ids=[1, 2, 3], positions=[0, 1, 2], kv_page_ids=[5], kv_last_page_len=3,
                  outputs=[ForwardOutput(2, GREEDY)])
    fields.update(changes)
    return ForwardCommand(**fields)


BAD = {
    "empty": (dict(token_ids=[], positions=[]), "token_ids: empty request"),
    "too many tokens": (dict(token_ids=[1] * 33, positions=list(range(33)), kv_page_ids=list(range(9)),
                             kv_last_page_len=1), "token_ids: 33 tokens exceed max-batch-tokens 32"),
    "token >= vocab": (dict(token_ids=[1, 100, 3]), "token_ids[1]: token id 100 is outside the vocabulary [0, 100)"),
    "positions": (dict(positions=[0, 1]), "positions: 2 positions for 3 tokens"),
    "position >= max": (dict(positions=[998, 999, 1000]), "positions[2]: position 1000 is past the model's 1000 positions"),
    "no pages": (dict(kv_page_ids=[]), "kv_page_ids: empty"),
    "page >= pool": (dict(kv_page_ids=[16]), "kv_page_ids[0]: page id 16 is out of range [0, 16)"),
    "last page len": (dict(kv_last_page_len=5), "kv_last_page_len: 5 is not in [1, 4]"),
    "sequence too short": (dict(kv_last_page_len=2), "the sequence holds 2 tokens, fewer than the 3 input tokens"),
    "mask rows": (dict(mask=[[3]]), "mask: 1 rows for 3 tokens"),
    "mask runs": (dict(mask=[[3], [2, 1], [1, 1]]), "mask[2]: runs add up to 2, not the sequence length 3"),
    "embed slots": (dict(embed_slots=[0, 1, 8]), "embed_slots[2]: slot 8 is out of range [0, 8)"),
    "output index": (dict(outputs=[ForwardOutput(3, GREEDY)]), "outputs[0].index: 3 is not in [0, 3)"),
    "top-p": (dict(outputs=[ForwardOutput(0, GREEDY), ForwardOutput(1, Sampler(SamplerKind.SAMPLE, top_p=1.5))]),
              "outputs[1].sampler: sample: top-p 1.5"),
    "top-k k": (dict(outputs=[ForwardOutput(0, Sampler(SamplerKind.TOP_K_DISTRIBUTION, top_k=0))]),
                "outputs[0].sampler: top-k-distribution: k must be >= 1"),
    "logprobs": (dict(outputs=[ForwardOutput(0, Sampler(SamplerKind.LOGPROBS, token_ids=[7, 100]))]),
                 "outputs[0].sampler: logprobs: token id 100 is outside the vocabulary"),
    "vocab mask sum": (dict(outputs=[ForwardOutput(0, GREEDY, [50, 49])]),
                       "outputs[0].vocab_mask: runs add up to 99, not the vocabulary size 100"),
    "vocab mask empty": (dict(outputs=[ForwardOutput(0, GREEDY, [0, 100])]), "outputs[0].vocab_mask: no token is allowed"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_command_is_refused_naming_the_field(case, make_scheduler):
    changes, words = BAD[case]
    command().check(LIMITS)  # the unchanged command is fine
    bad = command(**changes)
    with pytest.raises(ValueError) as e:
        bad.check(LIMITS)
    assert words in str(e.value)
    queue = make_scheduler(policy=Policy.EAGER).create_queue(instance_id=1)
    with pytest.raises(ValueError, match="commands\\[1\\]: "):
        queue.submit_forward_all([command(), bad], LIMITS)
    assert queue.submit_forward(command(), LIMITS) is not None


def test_submitted_together_means_one_batch(make_scheduler):
    """Each group arrives while the consumer is blocked in take() (woken by the first command it sees):
    it takes the whole group, never a part of it (one lock-free push)."""
    scheduler = make_scheduler(policy=Policy.EAGER, max_batch_requests=1000)
    queue = scheduler.create_queue(instance_id=3)
    sizes, waiting = [], threading.Event()

    def consume():
        for _ in range(50):
            waiting.set()
            batch = scheduler.take(5.0)
            assert batch is not None and batch.kind == int(CommandKind.FORWARD)
            sizes.append(len(batch))
            batch.complete([None] * len(batch))

    consumer = threading.Thread(target=consume)
    consumer.start()
    futures = []
    for _ in range(50):
        assert waiting.wait(5)
        waiting.clear()
        time.sleep(0.001)  # inside take() by now
        group = [command() for _ in range(5)]
        futures += queue.submit_forward_all(group, LIMITS)
    consumer.join(30)
    assert sizes == [5] * 50
    assert all(f.result(1) is None for f in futures)
    group = [command() for _ in range(3)]
    queue.submit_forward_all(group, LIMITS)
    assert all(a is b for a, b in zip(scheduler.take(2.0).payloads, group))  # the submitted objects


class RecordingRunner(FakeRunner):
    """`run_batch` of the engine's interface: records the batch; each output's value as the engine gives it."""

    class Table:
        def read(self, slots):
            return torch.full((len(slots), 2), float(slots[0]))

    embeddings = Table()

    def run_batch(self, batch):
        self.batch = batch
        values = {Greedy: 42, Sample: 43, TopKDistribution: ([4, 5], [0.75, 0.25]), Logprobs: [-0.5, -1.5],
                  RawLogits: torch.arange(4, dtype=torch.float32)}
        return [values[type(s)] for s in batch.samplers]


def test_the_handler_runs_commands_and_writes_their_results():
    runner = RecordingRunner()
    samplers = [Sampler(SamplerKind.GREEDY), Sampler(SamplerKind.SAMPLE, temperature=0.5, top_k=3, seed=2**64 - 1),
                Sampler(SamplerKind.TOP_K_DISTRIBUTION, top_k=2, temperature=0.7),
                Sampler(SamplerKind.LOGPROBS, token_ids=[9, 8]), Sampler(SamplerKind.RAW_LOGITS)]
    cmd = command(outputs=[ForwardOutput(i % 3, s, [60, 40] if i == 0 else None) for i, s in enumerate(samplers)],
                  embed_slots=[6, 6, 6], mask=[[1, 2], [2, 1], [3]])
    forward_handlers(runner)[CommandKind.FORWARD].execute([cmd])
    batch = runner.batch
    assert batch.token_ids == [1, 2, 3] and [p.tolist() for p in batch.pages] == [[5]] and batch.masks == [[[1, 2], [2, 1], [3]]]
    assert list(batch.samplers) == [Greedy(), Sample(0.5, 3, 1.0, 0.0, 2**63 - 1),
                                    TopKDistribution(2, pytest.approx(0.7)), Logprobs((9, 8)), RawLogits()]
    assert batch.output_mask_rows == [0] and batch.output_mask_runs == [[60, 40]]
    assert torch.equal(batch.embed_values, torch.full((3, 2), 6.0)) and batch.embed_rows.tolist() == [0, 1, 2]
    got = [(r.ids, r.values.tolist()) for r in cmd.results]
    assert got == [([42], []), ([43], []), ([4, 5], [0.75, 0.25]), ([9, 8], [-0.5, -1.5]), ([], [0.0, 1.0, 2.0, 3.0])]
    plain = pack_forward([command()], LIMITS.page_size)
    assert plain.masks == [None] and plain.embed_rows is None and plain.embed_values is None


def test_a_packed_batch_equals_the_runners_own_flattening_of_the_same_requests():
    """pack_forward (C++, from commands) and ModelRunner.flatten (Python, from ForwardRequests) are two
    producers of the engine's one input: field for field the same batch, over awkward shapes."""
    rng = np.random.default_rng(3)
    commands, requests = [], []
    for r in range(7):
        t = int(rng.integers(1, 9))
        kv_len = t + int(rng.integers(0, 11))
        pages = [int(p) for p in rng.choice(16, size=-(-kv_len // 4), replace=False)]
        last = kv_len - (len(pages) - 1) * 4
        tokens = [int(x) for x in rng.integers(0, 100, size=t)]
        positions = list(range(kv_len - t, kv_len))
        outs = [(int(i), Sampler(SamplerKind.GREEDY) if i % 2 else Sampler(SamplerKind.SAMPLE, temperature=0.9,
                                                                            top_p=0.5, seed=r))
                for i in sorted(rng.choice(t, size=int(rng.integers(0, t + 1)), replace=False))]
        vocab_masks = [[50, 50] if r == 3 and j == 0 else None for j in range(len(outs))]
        mask = [[kv_len - t + i + 1, t - i - 1] for i in range(t)] if r == 5 else None
        commands.append(ForwardCommand(tokens, positions, pages, last, mask=mask,
                                       outputs=[ForwardOutput(i, s, m) for (i, s), m in zip(outs, vocab_masks)]))
        to_engine = {SamplerKind.GREEDY: lambda s: Greedy(),
                     SamplerKind.SAMPLE: lambda s: Sample(s.temperature, s.top_k, s.top_p, s.min_p, s.seed)}
        requests.append(ForwardRequest(tokens, positions, pages, last, mask=mask,
                                       outputs=[(i, to_engine[s.kind](s)) for i, s in outs],
                                       output_masks=vocab_masks if any(vocab_masks) else None))
    packed = pack_forward(commands, 4)
    flat = ModelRunner.flatten(SimpleNamespace(page_size=4), requests)
    for name in ("token_ids", "positions", "output_rows", "qo_lens", "last_page_len", "masks", "output_mask_rows"):
        assert list(getattr(packed, name)) == list(getattr(flat, name)), name
    assert [list(p) for p in packed.pages] == [list(p) for p in flat.pages]
    assert packed.page_ids.tolist() == flat.page_ids.tolist() and packed.page_indptr.tolist() == flat.page_indptr.tolist()
    assert packed.kv_lens == flat.kv_lens == [c.kv_len(4) for c in commands]
    indptr, slots = packed.kv_slots([6, 0, 3])  # every position of three sequences, in that order
    expected = [p * 4 + i for r in (6, 0, 3) for j, p in enumerate(commands[r].kv_page_ids) for i in range(4)
                if j * 4 + i < commands[r].kv_len(4)]
    assert slots.tolist() == expected and indptr.tolist() == [0, *np.cumsum([commands[r].kv_len(4) for r in (6, 0, 3)])]
    assert torch.equal(packed.write_slots, flat.write_slots) and packed.write_slots.dtype == torch.int64
    assert [list(r) for r in packed.output_mask_runs] == [list(r) for r in flat.output_mask_runs]
    assert [type(s) for s in packed.samplers] == [type(s) for s in flat.samplers]
    drawn = [(s.temperature, s.top_p, s.seed) for s in packed.samplers if isinstance(s, Sample)]
    assert drawn == [(pytest.approx(0.9), pytest.approx(0.5), s.seed) for s in flat.samplers if isinstance(s, Sample)]
    assert packed.num_tokens == sum(len(c.token_ids) for c in commands) > len(commands)


def test_a_ragged_batch_from_fields_refuses_a_missing_or_unknown_field():
    """RaggedBatch.from_fields (pack_forward's fast construction) holds what __init__ would, and is no
    looser than __init__ about the fields it is given."""
    from pie.engine.ragged_batch import RaggedBatch

    fields = _control.pack_forward([ForwardCommand([5, 6], [0, 1], [2], 2)], 4, Greedy(), lambda s: None)
    fields["write_slots"] = torch.from_numpy(fields["write_slots"])
    fields.pop("embed_slots")
    batch = RaggedBatch.from_fields(dict(fields))
    assert batch.token_ids == [5, 6] and batch.embed_rows is None and batch.kv_lens == [2]
    assert batch.write_slots.tolist() == [8, 9] and batch.is_decode is False
    with pytest.raises(TypeError, match="missing.*qo_lens"):
        RaggedBatch.from_fields({k: v for k, v in fields.items() if k != "qo_lens"})
    with pytest.raises(TypeError, match="unknown.*colour"):
        RaggedBatch.from_fields({**fields, "colour": 1})
    with pytest.raises(AttributeError):  # frozen, as one __init__ made
        batch.page_size = 8


def test_batch_outputs_are_written_command_by_command():
    first = command(outputs=[ForwardOutput(0, GREEDY), ForwardOutput(2, GREEDY)])
    second = command(outputs=[])
    third = command(outputs=[ForwardOutput(1, Sampler(SamplerKind.TOP_K_DISTRIBUTION, top_k=2))])
    _control.write_batch_outputs([first, second, third], [11, 12, ([3, 4], [0.5, 0.25])])
    assert [r.ids for r in first.results] == [[11], [12]] and second.results == []
    assert third.results[0].ids == [3, 4] and third.results[0].values.tolist() == [0.5, 0.25]
    with pytest.raises(ValueError, match="2 outputs for 3 samplers"):
        _control.write_batch_outputs([first, second, third], [1, 2])


def test_copy_commands_run_their_spans_in_order():
    class Cache:
        copied = []

        def copy_spans(self, spans):
            self.copied += [(s.src_page, s.src_offset, s.dst_page, s.dst_offset, s.count) for s in spans]

    class Done(PageCopyCommand):  # records that the handler released the command's pages
        finished = 0

        def done(self):
            Done.finished += 1
            super().done()

    runner = FakeRunner()
    runner.cache = Cache()
    commands = [Done([CopySpan(1, 0, 2, 0, 4), CopySpan(2, 1, 2, 3, 1)]), Done([CopySpan(3, 0, 4, 0, 2)])]
    forward_handlers(runner)[CommandKind.COPY_PAGES].execute(commands)
    assert runner.cache.copied == [(1, 0, 2, 0, 4), (2, 1, 2, 3, 1), (3, 0, 4, 0, 2)]
    assert Done.finished == 2


def test_planes_over_one_runner_share_its_pages():
    runner = FakeRunner(num_pages=8)
    told = []
    a = ControlPlane.for_runner(runner, SchedulerConfig(policy="eager"), on_terminate=lambda i, m: told.append(("a", i)))
    b = ControlPlane.for_runner(runner, SchedulerConfig(policy="eager"), on_terminate=lambda i, m: told.append(("b", i)))
    assert a.kv_pages is b.kv_pages
    first, second = a.open_instance(), b.open_instance()
    assert first != second
    pages_a = set(a.kv_pages.resolve(first, a.kv_pages.allocate(first, 5)))
    pages_b = set(b.kv_pages.resolve(second, b.kv_pages.allocate(second, 3)))
    assert not pages_a & pages_b and a.kv_pages.stats()["num_free"] == 0
    a.kv_pages.allocate(first, 2)  # exhausted: the newer instance (b's) is terminated, and b is told
    assert told == [("b", second)]
    assert b.stats()["live_instances"] == [] and a.stats()["live_instances"] == [first]
    b.stop()
    a.stop()  # a plane that stops ends what it still holds: the shared pool is whole again
    assert a.kv_pages.stats()["num_free"] == 8
    a.kv_pages.check_invariants()


def test_a_plane_over_another_runner_has_its_own_pages():
    one, two = ControlPlane.for_runner(FakeRunner(num_pages=4)), ControlPlane.for_runner(FakeRunner(num_pages=4))
    assert one.kv_pages is not two.kv_pages


def test_values_copy_out_of_the_command():
    cmd = command(outputs=[ForwardOutput(2, Sampler(SamplerKind.RAW_LOGITS))])
    values = np.arange(6, dtype=np.float32)
    cmd.write_outputs([values])
    values[0] = 99  # the command holds its own copy
    assert cmd.results[0].values.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    cmd.write_outputs([torch.arange(3, dtype=torch.float64)])  # a tensor (converted to float32)
    assert cmd.results[0].values.tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="2 outputs for 1 samplers"):
        cmd.write_outputs([values, values])


def test_batch_loop_resolves_forward_commands_after_writing_results(make_scheduler):
    runner = RecordingRunner()
    scheduler = make_scheduler(policy=Policy.EAGER)
    queue = scheduler.create_queue(instance_id=9)
    cmd = command()
    with BatchLoop(scheduler, forward_handlers(runner)):
        assert queue.submit_forward(cmd, LIMITS).result(5) is None
    assert cmd.results[0].ids == [42]
