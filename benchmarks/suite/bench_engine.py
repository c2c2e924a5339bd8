"""Engine (pie/engine, CPU kernels in pie._ext._kernels_cpu): the linear and decode-attention kernels at
SmolLM2-135M's decode shapes, one decode step of the model at batch 1 and 32, a 512-token prefill,
sampling of 32 rows, and a grammar's token mask per token. Inputs are seeded.

- linear: pie.engine.kernels.linear (the streaming AVX2 kernel for up to 8 rows in float32), x (M, K) @
  w (N, K)^T for the model's layers: qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536, lm_head
  49152x576; M = 1 and 8.
- decode attention: pie.engine.kernels.decode_attention, 9 query / 3 KV heads of 64, 512 cached tokens
  per request, batch 1 and 32.
- decode step: ModelRunner.run of one-token requests at position 127 (a 112-token prefix prefilled once
  and shared, each request's own last page), greedy; batch 1 and 32.
- prefill: one request of 512 seeded token ids, greedy output at the last.
- sampling: pie.engine.sampling.Sampling over (32, 49152) float32 logits: greedy rows, and seeded
  temperature 0.8 / top-k 50 / top-p 0.9 rows.
- grammar: pie.runtime.grammar.GrammarHost (llguidance) over the model's vocabulary, a JSON schema; one
  round = the token mask (BRLE runs) and accept of each token of a fixed matching document.
"""

from __future__ import annotations

import json

import pytest
import torch

from pie.engine.batch import ForwardRequest, Greedy, Sample
from pie.engine.kernels import decode_attention, decode_attention_supported, linear, linear_kernel_max_rows
from pie.engine.sampling import Sampling
from pie_bench import ops

HIDDEN, HQ, HKV, D = 576, 9, 3, 64
LAYERS = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_linear_kernel(benchmark, layer, rows):
    n, k = LAYERS[layer]
    if linear_kernel_max_rows(torch.float32) < rows:
        pytest.skip("the streaming linear kernel needs AVX2 + FMA")
    g = seeded()
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    benchmark(linear, x, w)


@pytest.mark.parametrize("batch", [1, 32])
def test_decode_attention_kernel(benchmark, batch):
    if not decode_attention_supported(torch.float32, "cpu"):
        pytest.skip("the decode-attention kernel needs AVX2 + FMA")
    kv_len = 512
    g = seeded()
    q = torch.randn(batch, HQ, D, generator=g)
    k_cache = torch.randn(batch * kv_len, HKV, D, generator=g)
    v_cache = torch.randn(batch * kv_len, HKV, D, generator=g)
    indptr = torch.arange(batch + 1, dtype=torch.int64) * kv_len
    slots = torch.arange(batch * kv_len, dtype=torch.int64)
    q_rows = torch.arange(batch, dtype=torch.int64)
    out = torch.empty_like(q)
    benchmark(decode_attention, q, k_cache, v_cache, indptr, slots, q_rows, D ** -0.5, out)


# ---- the model ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pages(model):
    """(allocate(n) -> page ids) from the runner's pool, under an instance of a plane over the runner (so
    the runtime's tenants never get them); and the runner's execute lock."""
    from pie.control import ControlPlane

    plane = ControlPlane.serving(model.runner)
    instance = plane.open_instance()

    def allocate(n: int) -> list[int]:
        return plane.kv_pages.resolve(instance, plane.kv_pages.allocate(instance, n))

    yield allocate, plane.pools.execute_lock
    plane.end_instance(instance)


def run_locked(runner, lock, requests):
    with lock:
        return runner.run(requests)


@pytest.fixture(scope="module")
def prefix(model, pages):
    """7 pages holding a prefilled, seeded 112-token prefix (shared, read-only, by the decode requests)."""
    allocate, lock = pages
    runner = model.runner
    ps = runner.page_size
    n = 7 * ps
    ids = torch.randint(100, 40000, (n,), generator=seeded(1)).tolist()
    prefix_pages = allocate(7)
    run_locked(runner, lock, [ForwardRequest(ids, list(range(n)), prefix_pages, ps, outputs=[(n - 1, Greedy())])])
    return prefix_pages


@pytest.mark.parametrize("batch", [1, 32])
def test_decode_step(benchmark, model, pages, prefix, batch):
    allocate, lock = pages
    runner = model.runner
    ps = runner.page_size
    last = allocate(batch)  # each request's own last page: it writes its token at the page's last slot
    position = len(prefix) * ps + ps - 1
    tokens = torch.randint(100, 40000, (batch,), generator=seeded(2)).tolist()
    requests = [ForwardRequest([tokens[i]], [position], prefix + [last[i]], ps, outputs=[(0, Greedy())])
                for i in range(batch)]
    ops(benchmark, batch, "sequence")
    benchmark.pedantic(run_locked, args=(runner, lock, requests), rounds=25 if batch == 1 else 12, warmup_rounds=1)


def test_prefill_512(benchmark, model, pages):
    allocate, lock = pages
    runner = model.runner
    ps = runner.page_size
    n = 512
    ids = torch.randint(100, 40000, (n,), generator=seeded(3)).tolist()
    request = ForwardRequest(ids, list(range(n)), allocate(n // ps), ps, outputs=[(n - 1, Greedy())])
    ops(benchmark, n, "token")
    benchmark.pedantic(run_locked, args=(runner, lock, [request]), rounds=7, warmup_rounds=1)


# ---- sampling ---------------------------------------------------------------------------------------------
SAMPLERS = {
    "greedy": lambda i: Greedy(),
    "top_k_top_p": lambda i: Sample(temperature=0.8, top_k=50, top_p=0.9, seed=i),
}


@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_sampling_32_rows(benchmark, kind):
    logits = torch.randn(32, 49152, generator=seeded(4)) * 3
    samplers = [SAMPLERS[kind](i) for i in range(32)]
    sampling = Sampling(seed=0)
    ops(benchmark, 32, "row")
    benchmark(sampling, logits, samplers)


# ---- grammar ----------------------------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}
DOCUMENT = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "engine"]})


def test_grammar_mask_per_token(benchmark, model):
    from pie.runtime.grammar import GrammarHost

    host = GrammarHost(model.tokenizer, model.runner.vocab_size, model.eos_ids)
    instance = 1
    m = host.from_json_schema(instance, json.dumps(SCHEMA))
    tokens = model.tokenizer.encode(DOCUMENT, add_bos=False)
    for t in tokens:  # the document is one the grammar accepts, token by token
        assert host.accept(instance, m, t), (t, model.tokenizer.decode([t]))
    host.reset(instance, m)

    def masks_and_accepts():
        for t in tokens:
            host.token_mask(instance, m)
            host.accept(instance, m, t)
        host.reset(instance, m)

    ops(benchmark, len(tokens), "token")
    benchmark(masks_and_accepts)
    host.end_instance(instance)
