"""Tensor parallelism (pie.engine.tensor_parallel) on the CPU with gloo: tiny random-weight models split
over 2 processes give the logits of one process within 1e-5 (prefill, decode over scattered pages, a
mixed batch with BRLE attention and vocabulary masks, page copies) and its greedy tokens; configurations
that do not divide are refused naming the numbers; a killed worker is a clear error, not a hang; the
default model at TP=3 gives `pie generate`'s TP=1 text."""

import os
import signal
import time
from types import SimpleNamespace

import pytest
import torch

from cli_helpers import run_pie
from pie.engine.batch import ForwardRequest, Greedy, RawLogits
from pie.engine.config import EngineConfig, ModelConfig, UnsupportedModelError
from pie.engine.runner import ModelRunner
from pie.engine.tensor_parallel import (TensorParallelError, TensorParallelRunner, check_tensor_parallel,
                                        padded_vocab, shard_config, shard_state_dict, vocab_shard)
from tiny_models import TINY, tiny_hf_model

TOL = 1e-5
ENGINE = EngineConfig(num_pages=64, page_size=4)
V = TINY["vocab_size"]  # 211: prime, so the LM head is padded to 212 at TP=2


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def pair(request):
    """(TP=1 runner, TP=2 runner) of one tiny model: llama (untied LM head), qwen2 (q/k/v biases, LM head
    tied to the embeddings), qwen3 (q/k norms per head, head_dim 32)."""
    hf, cfg = tiny_hf_model(request.param)
    config = ModelConfig.from_hf(cfg)
    tp = TensorParallelRunner(config, hf.state_dict(), ENGINE, world_size=2)
    yield ModelRunner(config, hf.state_dict(), ENGINE), tp
    tp.close()


def seq_request(ids, start, pages, outputs="all", **fields):
    """The request for ids[start:] of a sequence laid out over `pages` (page size 4)."""
    n, used = len(ids), -(-len(ids) // 4)
    outs = [(i, RawLogits()) for i in range(n - start)] if outputs == "all" else outputs
    return ForwardRequest(token_ids=ids[start:], positions=list(range(start, n)), kv_page_ids=pages[:used],
                          kv_last_page_len=n - (used - 1) * 4, outputs=outs, **fields)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def logits_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Max |a - b| over stacked (M, V) logits; -inf (masked) entries must agree and count as 0."""
    a, b = torch.stack(a), torch.stack(b)
    assert a.shape == b.shape == (len(a), V)
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    finite = torch.isfinite(a)
    return (a[finite] - b[finite]).abs().max().item()


def both(pair, requests):
    """The results of TP=1 and TP=2 for the same requests."""
    ref, tp = pair
    return ref.execute(requests), tp.execute(requests)


def test_prefill_matches_tp1(pair):
    ids = tokens(37, 1)
    [a], [b] = both(pair, [seq_request(ids, 0, [5, 9, 2, 40, 41, 7, 8, 60, 61, 62])])
    assert logits_diff(a.outputs, b.outputs) <= TOL
    assert torch.stack(b.outputs).abs().max() > 0.1  # real logits, not zeros


def test_decode_over_scattered_pages_matches_tp1(pair):
    ids = tokens(23, 2)
    pages = [11, 3, 17, 29, 30, 31]  # non-contiguous, out of order
    [a], [b] = both(pair, [seq_request(ids[:9], 0, pages, outputs=[(8, RawLogits())])])
    assert logits_diff(a.outputs, b.outputs) <= TOL
    for n in range(10, len(ids) + 1):
        [a], [b] = both(pair, [seq_request(ids[:n], n - 1, pages)])
        assert logits_diff(a.outputs, b.outputs) <= TOL, f"step {n}"


def brle_rows(num_tokens: int, kv_len: int) -> list[list[int]]:
    """Token at sequence index s (the last num_tokens of kv_len) sees [0, 2) and [5, s]: runs
    (seen, hidden, seen, hidden)."""
    return [[2, 3, s - 4, kv_len - s - 1] for s in range(kv_len - num_tokens, kv_len)]


def test_mixed_batch_with_brle_masks_matches_tp1(pair):
    seqs = [tokens(n, 10 + i) for i, n in enumerate((1, 17, 8, 30, 14))]
    pages = [[0], [10, 11, 12, 13, 14], [20, 21], [30, 31, 32, 33, 34, 35, 36, 37], [50, 51, 52, 53]]
    context = [seq_request(seqs[2][:7], 0, pages[2], outputs=[]), seq_request(seqs[3][:22], 0, pages[3], outputs=[]),
               seq_request(seqs[4][:10], 0, pages[4], outputs=[])]
    both(pair, context)
    vocab_mask = [50, 100, V - 150]  # tokens 0..49 and 150..210 allowed
    batch = [
        seq_request(seqs[0], 0, pages[0]),  # one-token prefill
        seq_request(seqs[1], 0, pages[1], outputs=[(i, RawLogits()) for i in range(17)] + [(16, Greedy())],
                    output_masks=[None] * 16 + [vocab_mask, vocab_mask]),  # plain prefill, vocabulary masks
        seq_request(seqs[2], 7, pages[2]),  # decode
        seq_request(seqs[3], 22, pages[3]),  # prefill over cached context
        seq_request(seqs[4], 10, pages[4], mask=brle_rows(4, 14)),  # BRLE attention mask over cached context
    ]
    results_1, results_2 = both(pair, batch)
    for k, (a, b) in enumerate(zip(results_1, results_2)):
        raw_a = [x for x in a.outputs if isinstance(x, torch.Tensor)]
        raw_b = [x for x in b.outputs if isinstance(x, torch.Tensor)]
        assert logits_diff(raw_a, raw_b) <= TOL, f"request {k}"
    masked = results_2[1].outputs[16]
    assert torch.isinf(masked[50:150]).all() and torch.isfinite(masked[:50]).all()
    assert results_1[1].outputs[17] == results_2[1].outputs[17] == int(masked.argmax())
    # the BRLE mask changed the logits: the default (causal) mask gives others
    both(pair, context[2:])
    [causal] = pair[1].execute([seq_request(seqs[4], 10, pages[4])])
    assert logits_diff(causal.outputs, results_2[4].outputs) > 1e-3


def test_greedy_tokens_equal_tp1(pair):
    ref, tp = pair
    runs = []
    for runner in (ref, tp):
        got, pages = tokens(11, 7), [7, 2, 55, 19, 38, 6, 63]
        [res] = runner.execute([seq_request(got, 0, pages, outputs=[(len(got) - 1, Greedy())])])
        for _ in range(14):
            got.append(res.outputs[0])
            [res] = runner.execute([seq_request(got, len(got) - 1, pages, outputs=[(0, Greedy())])])
        runs.append(got)
    assert runs[0] == runs[1]


def test_page_copies_reach_every_rank(pair):
    """A sequence copied to other pages (the control layer's COPY_PAGES, through runner.cache) decodes
    there as in one process: each rank copied its own KV heads."""
    ids = tokens(13, 8)
    both(pair, [seq_request(ids[:12], 0, [1, 2, 3], outputs=[])])
    spans = [SimpleNamespace(src_page=s, src_offset=0, dst_page=d, dst_offset=0, count=4)
             for s, d in ((1, 44), (2, 45), (3, 46))]
    for runner in pair:
        runner.cache.copy_spans(spans)
    [a], [b] = both(pair, [seq_request(ids, 12, [44, 45, 46, 47])])
    assert logits_diff(a.outputs, b.outputs) <= TOL


def test_shards_reassemble_the_model():
    hf, cfg = tiny_hf_model("qwen2")
    config, sd = ModelConfig.from_hf(cfg), hf.state_dict()
    shards = [shard_state_dict(config, sd, r, 2) for r in range(2)]
    p = "model.layers.1."
    for name, dim in (("self_attn.q_proj.weight", 0), ("self_attn.k_proj.bias", 0), ("mlp.up_proj.weight", 0),
                      ("self_attn.o_proj.weight", 1), ("mlp.down_proj.weight", 1)):
        assert torch.equal(torch.cat([s[p + name] for s in shards], dim=dim), sd[p + name]), name
    local = shard_config(config, 2)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (2, 1, 48)
    assert shards[1][p + "self_attn.k_proj.weight"].shape == (local.kv_size, config.hidden_size)
    lm_head = sd["model.embed_tokens.weight"]
    assert padded_vocab(V, 2) == 212
    parts = [vocab_shard(lm_head, r, 2) for r in range(2)]
    assert [tuple(x.shape) for x in parts] == [(106, 64), (106, 64)]
    assert torch.equal(torch.cat(parts)[:V], lm_head) and not parts[1][-1].any()


@pytest.mark.parametrize("heads, kv_heads, inter, world, message", [
    (9, 3, 1536, 2, "tensor parallel 2: attention heads 9 is not divisible by 2"),
    (4, 2, 96, 4, "tensor parallel 4: KV heads 2 is not divisible by 4"),
    (4, 2, 95, 2, "tensor parallel 2: MLP intermediate size 95 is not divisible by 2"),
])
def test_configurations_that_do_not_divide_are_refused(heads, kv_heads, inter, world, message):
    _, cfg = tiny_hf_model("llama")
    config = ModelConfig.from_hf({**cfg, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                                  "intermediate_size": inter, "head_dim": 16})
    with pytest.raises(UnsupportedModelError, match=message) as info:
        check_tensor_parallel(config, world)
    assert "\n" not in str(info.value)
    started = time.monotonic()
    with pytest.raises(UnsupportedModelError, match=message):  # before any process starts
        TensorParallelRunner(config, {}, ENGINE, world_size=world)
    assert time.monotonic() - started < 1


def test_experts_are_refused():
    _, cfg = tiny_hf_model("mixtral")
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts models"):
        check_tensor_parallel(ModelConfig.from_hf(cfg), 2)


def test_killed_worker_is_a_clear_error():
    """A worker killed in the middle of a pass (rank 0 in its first all-reduce) makes the pass raise
    TensorParallelError naming it within seconds, and every later call too."""
    hf, cfg = tiny_hf_model("llama")
    tp = TensorParallelRunner(ModelConfig.from_hf(cfg), hf.state_dict(), ENGINE, world_size=2)
    try:
        request = seq_request(tokens(6, 9), 0, [0, 1])
        tp.execute([request])
        worker = tp.processes[0]
        ops = tp.attention.ops
        linear = ops.linear

        def kill_then_linear(x, w, bias=None):  # rank 0's first row-parallel layer: the worker waits in it
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGKILL)
                worker.join(5)
            return linear(x, w, bias)

        ops.linear = kill_then_linear
        started = time.monotonic()
        with pytest.raises(TensorParallelError, match=rf"worker 1 \(pid {worker.pid}\) died \(exit code -9\)"):
            tp.execute([request])
        assert time.monotonic() - started < 5
        with pytest.raises(TensorParallelError, match="worker 1"):
            tp.execute([request])
    finally:
        tp.close()


def test_worker_that_cannot_load_is_a_clear_error(tmp_path):
    hf, cfg = tiny_hf_model("llama")
    with pytest.raises(TensorParallelError, match=r"(?s)worker 1 \(pid \d+\) failed to load its shard:.*no config.json"):
        TensorParallelRunner(ModelConfig.from_hf(cfg), hf.state_dict(), ENGINE, world_size=2, source=str(tmp_path))


def test_smollm2_tp3_generates_tp1_text(smollm2_entry):
    """The default model (9 heads, 3 KV heads) split over 3 processes: `pie generate`'s greedy text."""
    args = ("generate", "--prompt", "What is the capital of France?", "--temperature", "0", "--max-tokens", "12",
            "--kv-cache-mb", "64")
    one = run_pie(*args)
    three = run_pie(*args, "--tensor-parallel", "3")
    assert one.returncode == 0 and three.returncode == 0, one.stderr + three.stderr
    assert three.stdout == one.stdout == "The capital of France is Paris.\n"
    two = run_pie(*args, "--tensor-parallel", "2")
    assert two.returncode == 1 and "attention heads 9 is not divisible by 2" in two.stderr


def test_tensor_parallel_setting_is_checked():
    from pie.server.config import ConfigError, load_config

    assert load_config(text="[model]\ntensor_parallel = 3\n").model.tensor_parallel == 3
    with pytest.raises(ConfigError, match=r"model.tensor_parallel must be in \[1, 64\], got 0"):
        load_config(text="[model]\ntensor_parallel = 0\n")
