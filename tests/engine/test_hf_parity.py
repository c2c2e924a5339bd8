"""Our runner's logits against HF transformers on tiny random-weight models of every supported
architecture (fp32, max abs diff <= 1e-4): prefill, decode, mixed batches, paged == contiguous,
batched == alone."""

import pytest
import torch

from pie.engine.batch import ForwardRequest, Greedy, RawLogits
from pie.engine.config import EngineConfig, ModelConfig
from pie.engine.runner import ModelRunner
from pie.engine.kernels import decode_attention_supported
from tiny_models import ARCHS, tiny_hf_model

TOL = 1e-4
# family -> (q/k/v bias, q/k norm, norm layout, experts per token)
FAMILY_SETTINGS = {
    "llama": (False, None, "pre", 0), "qwen2": (True, None, "pre", 0), "qwen3": (False, "per_head", "pre", 0),
    "olmo2": (False, "whole", "post", 0), "gemma2": (False, None, "sandwich", 0),
    "gemma3": (False, "per_head", "sandwich", 0), "phi3": (False, None, "pre", 0), "mixtral": (False, None, "pre", 2),
    "qwen2_moe": (True, None, "pre", 2), "qwen3_moe": (False, "per_head", "pre", 3),
}


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    hf, cfg = tiny_hf_model(request.param)
    runner = ModelRunner(ModelConfig.from_hf(cfg), hf.state_dict(), EngineConfig(num_pages=96, page_size=4))
    return hf, runner


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]  # (T, V)


def seq_request(ids, start, pages, page_size, outputs="all"):
    """Request for ids[start:] of a sequence laid out over `pages`."""
    n = len(ids)
    used = -(-n // page_size)
    outs = [(i, RawLogits()) for i in range(n - start)] if outputs == "all" else outputs
    return ForwardRequest(token_ids=ids[start:], positions=list(range(start, n)), kv_page_ids=pages[:used],
                          kv_last_page_len=n - (used - 1) * page_size, outputs=outs)


def test_config_matches_family(pair):
    hf, runner = pair
    cfg = runner.model_config
    assert (cfg.attention_bias, cfg.qk_norm, cfg.norm_layout, cfg.num_experts_per_token) == FAMILY_SETTINGS[cfg.family]


def test_prefill_matches_hf(pair):
    hf, runner = pair
    ids = torch.randint(0, 211, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    [res] = runner.execute([seq_request(ids, 0, [5, 9, 2, 40, 41, 7, 8, 60, 61, 62], 4)])
    got = torch.stack(res.outputs)
    assert (got - hf_logits(hf, ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("decode_kernel", [True, False], ids=["decode-kernel", "padded-sdpa"])
def test_decode_token_by_token_matches_hf(pair, decode_kernel):
    hf, runner = pair
    if decode_kernel and not decode_attention_supported(torch.float32, "cpu"):
        pytest.skip("no decode kernel on this CPU")
    ids = torch.randint(0, 211, (23,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = hf_logits(hf, ids)
    pages = [11, 3, 17, 29, 30, 31]  # non-contiguous, out of order
    default = runner.use_decode_kernel
    runner.use_decode_kernel = decode_kernel
    try:
        [res] = runner.execute([seq_request(ids[:9], 0, pages, 4, outputs=[(8, RawLogits())])])
        assert (res.outputs[0] - ref[8]).abs().max().item() <= TOL
        for n in range(10, len(ids) + 1):
            [res] = runner.execute([seq_request(ids[:n], n - 1, pages, 4)])
            assert (res.outputs[0] - ref[n - 1]).abs().max().item() <= TOL, f"step {n}"
    finally:
        runner.use_decode_kernel = default


def test_mixed_batch_matches_hf_and_alone(pair):
    hf, runner = pair
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 211, (n,), generator=gen).tolist() for n in (1, 17, 8, 30, 5)]
    refs = [hf_logits(hf, s) for s in seqs]
    # first fill the context of sequences 2 and 3 (they then decode / extend in the mixed batch)
    page_sets = [[0], [10, 11, 12, 13, 14], [20, 21], [30, 31, 32, 33, 34, 35, 36, 37], [50, 51]]
    runner.execute([seq_request(seqs[2][:7], 0, page_sets[2], 4, outputs=[]),
                    seq_request(seqs[3][:22], 0, page_sets[3], 4, outputs=[])])
    batch = [
        seq_request(seqs[0], 0, page_sets[0], 4),  # one-token prefill
        seq_request(seqs[1], 0, page_sets[1], 4),  # plain prefill
        seq_request(seqs[2], 7, page_sets[2], 4),  # decode
        seq_request(seqs[3], 22, page_sets[3], 4),  # prefill over cached context
        seq_request(seqs[4], 0, page_sets[4], 4),
    ]
    results = runner.execute(batch)
    starts = [0, 0, 7, 22, 0]
    for k, (res, ref, st) in enumerate(zip(results, refs, starts)):
        got = torch.stack(res.outputs)
        assert (got - ref[st:]).abs().max().item() <= TOL, f"request {k}"
    # batched == one request at a time
    runner.execute([seq_request(seqs[2][:7], 0, page_sets[2], 4, outputs=[]),
                    seq_request(seqs[3][:22], 0, page_sets[3], 4, outputs=[])])
    for k, req in enumerate(batch):
        [alone] = runner.execute([req])
        assert (torch.stack(alone.outputs) - torch.stack(results[k].outputs)).abs().max().item() <= 1e-5


def test_greedy_tokens_match_hf(pair):
    """Greedy decoding, one token per pass over scattered pages, gives HF's greedy tokens (HF recomputes
    the whole sequence at every step)."""
    hf, runner = pair
    ids = torch.randint(0, 211, (11,), generator=torch.Generator().manual_seed(7)).tolist()
    want = list(ids)
    for _ in range(14):
        want.append(int(hf_logits(hf, want)[-1].argmax()))
    pages = [71, 2, 55, 19, 38, 6, 90]
    got = list(ids)
    [res] = runner.execute([seq_request(got, 0, pages, 4, outputs=[(len(got) - 1, Greedy())])])
    for _ in range(14):
        got.append(res.outputs[0])
        [res] = runner.execute([seq_request(got, len(got) - 1, pages, 4, outputs=[(0, Greedy())])])
    assert got == want


def test_paged_equals_contiguous(pair):
    hf, runner = pair
    ids = torch.randint(0, 211, (29,), generator=torch.Generator().manual_seed(4)).tolist()
    [contig] = runner.execute([seq_request(ids, 0, list(range(8)), 4)])
    # same sequence scattered over pages, filled in three chunks
    pages = [77, 3, 64, 12, 90, 41, 5, 88]
    runner.execute([seq_request(ids[:6], 0, pages, 4, outputs=[])])
    runner.execute([seq_request(ids[:19], 6, pages, 4, outputs=[])])
    [paged] = runner.execute([seq_request(ids, 19, pages, 4)])
    diff = (torch.stack(paged.outputs) - torch.stack(contig.outputs)[19:]).abs().max().item()
    assert diff <= TOL


def test_other_page_sizes_agree():
    hf, cfg = tiny_hf_model("llama")
    ids = torch.randint(0, 211, (21,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = hf_logits(hf, ids)
    for page_size in (1, 7, 16, 32):
        runner = ModelRunner(ModelConfig.from_hf(cfg), hf.state_dict(), EngineConfig(num_pages=64, page_size=page_size))
        pages = list(range(63, 63 - -(-21 // page_size), -1))
        runner.execute([seq_request(ids[:20], 0, pages, page_size, outputs=[])])
        [res] = runner.execute([seq_request(ids, 20, pages, page_size)])
        assert (res.outputs[0] - ref[20]).abs().max().item() <= TOL, f"page_size {page_size}"


def test_sliding_window_matches_hf():
    import transformers

    from tiny_models import TINY

    torch.manual_seed(0)
    cfg = transformers.MistralConfig(**TINY, sliding_window=5, head_dim=16)
    cfg.architectures = ["MistralForCausalLM"]
    cfg._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    runner = ModelRunner(ModelConfig.from_hf(cfg.to_dict()), hf.state_dict(), EngineConfig(num_pages=16, page_size=4))
    assert runner.model_config.sliding_window == 5
    ids = torch.randint(0, 211, (14,), generator=torch.Generator().manual_seed(6)).tolist()
    ref = hf_logits(hf, ids)
    [res] = runner.execute([seq_request(ids, 0, [1, 2, 3, 4], 4)])
    assert (torch.stack(res.outputs) - ref).abs().max().item() <= TOL
    runner.execute([seq_request(ids[:13], 0, [5, 6, 7, 8], 4, outputs=[])])
    [res] = runner.execute([seq_request(ids, 13, [5, 6, 7, 8], 4)])
    assert (res.outputs[0] - ref[13]).abs().max().item() <= TOL
