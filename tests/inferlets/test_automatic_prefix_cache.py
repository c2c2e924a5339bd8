"""The SDK's automatic prefix caching: a Context adopts the cached pages of its prompt before its first pass
and files its full pages after a prefill and after a generation, so instances of one cache scope compute a
shared prompt once; an instance without a scope computes everything, and the text is the same."""

from __future__ import annotations

PROMPT = " ".join(f"Item {i}: the {w} of the {v} is kept in drawer {i * 7 % 31}."
                  for i, (w, v) in enumerate(zip(["key", "map", "coin", "book", "lamp", "cup"] * 4,
                                                 ["house", "ship", "tower", "garden", "school", "mill"] * 4)))
SCOPE = 9


def test_instances_of_one_scope_compute_a_shared_prompt_once(runtime, model):
    runner = model.runner
    args = ["--prompt", PROMPT, "--max-tokens", "8", "--temperature", "0", "--raw"]
    try:
        t0 = runner.num_tokens_processed
        first = runtime.run("text_completion", args, cache_scope=SCOPE)
        t1 = runner.num_tokens_processed
        second = runtime.run("text_completion", args, cache_scope=SCOPE)
        t2 = runner.num_tokens_processed
        plain = runtime.run("text_completion", args)
        t3 = runner.num_tokens_processed
        assert first.error is None and second.error is None and plain.error is None, (first.error, second.error)
        assert first.output == second.output == plain.output
        computed_first, computed_second, computed_plain = t1 - t0, t2 - t1, t3 - t2
        assert computed_first == computed_plain > 300
        assert computed_second < computed_first - 300  # the prompt's full pages came from the cache
        assert runtime.plane.kv_pages.stats()["num_cached"] > 0
    finally:
        runtime.plane.kv_pages.cache_clear(SCOPE)
    assert runtime.num_free_pages == runtime.num_pages  # nothing but the cache held pages
