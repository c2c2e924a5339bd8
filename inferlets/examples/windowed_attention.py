"""Windowed (sliding-window) attention: long generation in bounded KV memory.

    pie run windowed_attention -- --prompt "Tell me a long story." --max-tokens 2000 --window 256

Every token attends only to the last --window tokens (itself included). Only the pages holding those
tokens are kept; a page whose tokens have all left the window is freed at once, so at most
ceil(window / P) + 1 pages are held (P = kv.page-size), however long the generation. Without the first
tokens a model not trained with a sliding window tends to lose fluency once they leave the window (the
"attention sink" effect): `attention_sink` keeps them too.

Arguments: --prompt, --max-tokens (256), --window W (tokens, 256), and as in text_completion
--temperature (1.0; 0 = greedy), --top-k, --top-p, --min-p, --seed, --stop, --system, --raw,
--ignore-eos; --stats logs one JSON line to stderr ({"passes", "generated", "max_pages_held",
"max_pages_in_use", "pages_freed", "bound"}; max_pages_in_use is measured with kv.num-free-pages, so it
is exact only while no other instance allocates).

How it uses the raw API (inferlet.raw.kv / inferlet.raw.forward; no Context, whose pages only grow):
- Page j holds the tokens at positions [j*P, (j+1)*P). The pages held are kept in position order; a
  pass's `pages` list is that sequence (the evicted pages simply missing), all full but the last, and
  `last-page-len` makes the pass write its T inputs into the last T slots, which are the slots of
  positions [n, n+T) of the last page(s). Positions (`positions`, used by RoPE) keep increasing: they are
  independent of the slot index, and the cached keys keep the rotation of their original positions.
- Attention: exactly the last W tokens. As long as that is every held token, the pass is plain causal
  (`mask` empty), so a generation that never leaves the window is exactly text_completion's; otherwise
  each input row gets an explicit BRLE `mask` row over the sequence hiding the slots older than the
  window (the first held page is usually part-stale) and attending the window up to the row itself.
- Prefill: the first min(len(prompt), W) tokens in one pass, the rest page by page (page-aligned
  chunks of at most P tokens, each row with its own exact window), so the bound holds during prefill too.
- Sampling: one sampler per pass at the last input (greedy, or a seeded draw whose seed per step is
  derived as the SDK's Context.generate does, so seeded output also matches text_completion's until the
  window is left).
"""

from inferlet.sliding import main

main("windowed_attention", with_sink=False)
