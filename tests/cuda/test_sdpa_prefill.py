"""Fresh causal prefill through SDPA (pie.engine.attention.sdpa_prefill), the CUDA backend's route for
requests whose KV sequence is exactly their input tokens: grouping and padding, and attention against
the paged-attention reference on scattered pages, on the CPU (and on the GPU when there is one)."""

from __future__ import annotations

import pytest
import torch

from pie.engine.attention.sdpa_prefill import MAX_PADDING, plan_sdpa_prefill, sdpa_prefill_attention
from pie.engine.cuda_ops import reference as ref
from pie.engine.kv_cache import sequence_slots

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fresh_batch(lengths, page_size, seed, extra_rows=()):
    """Fresh requests (qo == kv) over shuffled pages, with other requests' rows (`extra_rows` tokens
    each: a cached-prefix or decode request this route does not own) interleaved between them.
    Returns the reference batch, the SDPA requests' (starts, lengths, slots) and the owned rows."""
    qo_lens, kv_lens, owned = [], [], []
    for i, n in enumerate(lengths):
        qo_lens.append(n)
        kv_lens.append(n)
        owned.append(True)
        if i < len(extra_rows):
            qo_lens.append(extra_rows[i])
            kv_lens.append(extra_rows[i] + 50)
            owned.append(False)
    batch = ref.make_paged_batch(qo_lens, kv_lens, page_size, generator=torch.Generator().manual_seed(seed))
    qo, kp, pages = batch["qo_indptr"].tolist(), batch["kv_page_indptr"].tolist(), batch["kv_page_indices"].tolist()
    starts, lens, slots = [], [], []
    for r, mine in enumerate(owned):
        if mine:
            starts.append(qo[r])
            lens.append(qo_lens[r])
            slots.append(sequence_slots(pages[kp[r]:kp[r + 1]], qo_lens[r], page_size))
    return batch, starts, lens, slots


def test_groups_cover_each_request_once_with_bounded_padding():
    lengths = [300, 17, 290, 16, 9, 3, 128, 129, 2]
    batch, starts, lens, slots = fresh_batch(lengths, 16, seed=1, extra_rows=[5, 1])
    groups = plan_sdpa_prefill(starts, lens, slots, torch.device("cpu"))
    seen = []
    for g in groups:
        count, longest = g.rows.shape
        assert g.slots.shape == g.rows.shape
        real = count * longest if g.real is None else g.real.numel()
        assert count * longest - real <= MAX_PADDING * real
        assert g.out_rows.numel() == real
        rows = g.rows.reshape(-1) if g.real is None else g.rows.reshape(-1)[g.real]
        assert rows.tolist() == g.out_rows.tolist()
        seen += g.out_rows.tolist()
    want = sorted(row for s, n in zip(starts, lens) for row in range(s, s + n))
    assert sorted(seen) == want  # every owned row exactly once, no foreign row
    assert len(groups) < len(lengths)  # near-equal lengths share a call
    assert [g.rows.shape[1] for g in groups] == sorted((g.rows.shape[1] for g in groups), reverse=True)


def test_sequence_slots_follow_the_pages():
    assert sequence_slots([7, 2, 9], 9, 4).tolist() == [28, 29, 30, 31, 8, 9, 10, 11, 36]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads", [(8, 2), (6, 6), (9, 3)], ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("page_size", [16, 5])
def test_attention_matches_paged_reference(device, heads, page_size):
    hq, hkv = heads
    head_dim = 64
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lengths = [37, 2, 35, 64, 129, 16]
    batch, starts, lens, slots = fresh_batch(lengths, page_size, seed=2, extra_rows=[4, 1, 9])
    g = torch.Generator().manual_seed(3)
    num_tokens = int(batch["qo_indptr"][-1])
    q = torch.randn(num_tokens, hq, head_dim, generator=g).to(device, dtype)
    cache_shape = (batch["num_pages"], page_size, hkv, head_dim)
    k_cache = torch.randn(cache_shape, generator=g).to(device, dtype)
    v_cache = torch.randn(cache_shape, generator=g).to(device, dtype)
    out = torch.full_like(q, float("nan"))
    groups = plan_sdpa_prefill(starts, lens, slots, torch.device(device))
    flat = (-1, hkv, head_dim)
    sdpa_prefill_attention(q, k_cache.view(flat), v_cache.view(flat), groups, 0.125, out)
    want = ref.paged_attention(q, k_cache, v_cache, *(batch[k].to(device) for k in
                               ("qo_indptr", "kv_page_indptr", "kv_page_indices", "kv_last_page_len")),
                               sm_scale=0.125)
    owned = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    for s, n in zip(starts, lens):
        owned[s:s + n] = True
    assert torch.isnan(out[~owned]).all()  # other requests' rows untouched
    err = (out[owned].double() - want[owned].double()).norm() / want[owned].double().norm()
    assert err < (1e-5 if dtype == torch.float32 else 1.2e-2)
