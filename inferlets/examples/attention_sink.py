"""Attention sinks (StreamingLLM, Xiao et al. 2023): long generation in bounded KV memory.

    pie run attention_sink -- --prompt "Tell me a long story." --max-tokens 2000 --window 256 --sink 4

Every token attends to the first --sink tokens of the sequence (the "attention sinks", which soak up the
attention mass the softmax has to put somewhere) and to the last --window tokens (itself included).
Only the pages holding those tokens are kept: the first ceil(sink / page_size) pages, which are never
freed, and the pages of the last --window tokens; a page whose tokens have all left the window is freed
at once. So at most ceil(sink / P) + ceil(window / P) + 1 pages are held (P = kv.page-size), however
long the generation. `windowed_attention` is the same without sinks.

Arguments: --prompt, --max-tokens (256), --window W (tokens, 256), --sink S (tokens, 4), and as in
text_completion --temperature (1.0; 0 = greedy), --top-k, --top-p, --min-p, --seed, --stop, --system,
--raw, --ignore-eos; --stats logs one JSON line to stderr ({"passes", "generated", "max_pages_held",
"max_pages_in_use", "pages_freed", "bound"}; max_pages_in_use is measured with kv.num-free-pages, so it
is exact only while no other instance allocates).

How it uses the raw API (inferlet.raw.kv / inferlet.raw.forward; no Context, whose pages only grow):
- Page j holds the tokens at positions [j*P, (j+1)*P). The pages held are kept in position order; a
  pass's `pages` list is that sequence (the evicted pages simply missing), all full but the last, and
  `last-page-len` makes the pass write its T inputs into the last T slots, which are the slots of
  positions [n, n+T) of the last page(s). Positions (`positions`, used by RoPE) keep increasing: they are
  independent of the slot index, and the cached keys keep the rotation of their original positions.
- Attention: tokens are exactly the sinks plus the last W tokens. As long as that is every held token,
  the pass is plain causal (`mask` empty), so a generation that never leaves the window is exactly
  text_completion's; otherwise each input row gets an explicit BRLE `mask` row over the sequence: attend
  the sink slots, hide the slots older than the window (the first window page is usually part-stale,
  as are the sink pages' slots after the first S tokens), attend the window up to the row itself.
- Prefill: the first min(len(prompt), W) tokens in one pass, the rest page by page (page-aligned
  chunks of at most P tokens, each row with its own exact window), so the bound holds during prefill too.
- Sampling: one sampler per pass at the last input (greedy, or a seeded draw whose seed per step is
  derived as the SDK's Context.generate does, so seeded output also matches text_completion's until the
  window is left).
"""

from inferlet.sliding import main

main("attention_sink", with_sink=True)
