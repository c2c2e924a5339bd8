"""best_of_n and parallel_generation: the prompt (or the prompts' common prefix) is computed once and its
pages shared by every branch through forks, which allocate nothing; the branches decode in shared batches;
and what they generate is what independent completions generate."""

import json
import textwrap

import pytest

PROMPT = "What is the capital of France?"
SYSTEM = "You are a helpful assistant. Answer in one short sentence."


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_best_of_n_greedy_prefills_once_shares_pages_and_matches_text_completion(runtime, measure, chat_tokens,
                                                                                  completion):
    n, max_tokens = 3, 8
    reference = completion(PROMPT, max_tokens)
    prompt = chat_tokens(None, PROMPT)
    pool = {}

    def on_output(message):  # runs on the instance thread, inside its send: the branches exist, nothing decoded
        if '"event": "forked"' in message:
            pool["at_fork"] = runtime.plane.kv_pages.stats()

    before = runtime.plane.kv_pages.stats()
    r = measure("best_of_n", "--prompt", PROMPT, "--n", n, "--max-tokens", max_tokens, "--temperature", 0,
                "--json", on_output=on_output)
    forked, result = r.json("forked"), r.json("result")

    # Outputs: n greedy branches, each exactly the greedy text_completion.
    texts = [c["text"] for c in result["candidates"]]
    assert texts == [reference] * n
    assert result["candidates"][result["best"]]["text"] == reference

    # Forks allocate nothing: every page in use at the fork is the prompt's, shared by all n branches.
    prompt_pages = -(-len(prompt) // runtime.page_size)
    assert forked["pages_before"] == forked["pages_after"]
    at_fork = pool["at_fork"]
    assert at_fork["num_used"] - before["num_used"] == prompt_pages
    assert at_fork["num_shared"] - before["num_shared"] == prompt_pages

    # The prompt was computed once: the engine ran the prompt once plus each branch's own tokens (a branch
    # computes every token it appended; the last one too when EOS, not the token limit, ended it).
    assert result["prompt_tokens"] == len(prompt)
    own = [c["num_tokens"] - (c["num_tokens"] == max_tokens) for c in result["candidates"]]
    assert [c["computed"] for c in result["candidates"]] == own
    assert r.tokens == len(prompt) + sum(own) == result["computed"]
    assert result["computed_unshared"] == n * len(prompt) + sum(own) > r.tokens
    # ... in shared batches: one pass per step (the prefill draws every first token), not one per branch
    batched, unbatched = 1 + max(own), 1 + sum(own)
    assert batched <= r.passes <= (batched + unbatched) // 2, (r.passes, batched, unbatched)


def test_best_of_n_seeded_branches_differ_and_the_best_mean_logprob_wins(runtime, measure, chat_tokens):
    n, max_tokens = 3, 8
    args = ["--prompt", "Write a line about the sea.", "--n", n, "--max-tokens", max_tokens,
            "--temperature", "1.0", "--seed", 7, "--ignore-eos", "--json"]
    r = measure("best_of_n", *args)
    result = r.json("result")
    cands = result["candidates"]
    assert len({c["text"] for c in cands}) > 1, "branches with different seeds drew the same text"
    assert all(c["num_tokens"] == max_tokens and c["mean_logprob"] < 0 for c in cands)
    assert result["best"] == max(range(n), key=lambda i: cands[i]["mean_logprob"])
    prompt = chat_tokens(None, "Write a line about the sea.")
    assert r.tokens == len(prompt) + n * (max_tokens - 1)
    # Seeded: the same again.
    assert measure("best_of_n", *args).json("result") == result

    # Each score is the exact mean log-probability of the branch's tokens: recompute them with one
    # independent pass over prompt + tokens (a logprobs sampler at every position).
    guest = textwrap.dedent("""
        import json, sys
        from wit_world.imports import forward as F, kv
        prompt, tokens = json.loads(sys.argv[1]), json.loads(sys.argv[2])
        seq = prompt + tokens
        ps = kv.page_size()
        pages = kv.allocate(-(-len(seq) // ps))
        idx = list(range(len(prompt) - 1, len(seq) - 1))
        fwd = F.ForwardPass(seq, [], list(range(len(seq))), pages, len(seq) - (len(pages) - 1) * ps, [], idx,
                            [F.Sampler_Logprobs([t]) for t in tokens], [])
        print(json.dumps([o.values[0] for o in F.wait(F.submit(0, fwd))]))
    """)
    for c in cands:
        ref = runtime.run_source(guest, [json.dumps(prompt), json.dumps(c["tokens"])])
        assert ref.error is None, ref.error
        lps = json.loads(ref.output)
        assert c["mean_logprob"] == pytest.approx(sum(lps) / len(lps), abs=2e-3)


def test_parallel_generation_shares_the_system_prefix_and_matches_text_completion(measure, chat_tokens,
                                                                                 completion):
    prompts, max_tokens = ["Name a fruit.", "Name a color."], 6
    seqs = [chat_tokens(SYSTEM, p) for p in prompts]
    prefix = common_prefix(*seqs)
    assert 0 < prefix < min(map(len, seqs))
    r = measure("parallel_generation", "--system", SYSTEM, *[a for p in prompts for a in ("--prompt", p)],
                "--max-tokens", max_tokens, "--temperature", 0, "--ignore-eos", "--json")
    forked, result = r.json("forked"), r.json("result")
    assert forked["prefix_tokens"] == result["prefix_tokens"] == prefix
    assert forked["pages_before"] == forked["pages_after"]
    for p, branch in zip(prompts, result["branches"]):
        assert branch["text"] == completion(p, max_tokens, "--system", SYSTEM, "--ignore-eos")
    # The prefix once, then each branch's own suffix and the tokens it generated (all but the last run).
    suffixes = [len(s) - prefix for s in seqs]
    assert [b["suffix_tokens"] for b in result["branches"]] == suffixes
    assert r.tokens == prefix + sum(suffixes) + len(prompts) * (max_tokens - 1) == result["computed"]
    assert result["computed_unshared"] == r.tokens + (len(prompts) - 1) * prefix


def test_parallel_generation_seeded_samples_match_independent_seeded_completions(measure, chat_tokens,
                                                                                 completion):
    n, max_tokens, seed = 3, 8, 11
    r = measure("parallel_generation", "--prompt", PROMPT, "--n", n, "--max-tokens", max_tokens,
                "--temperature", "0.9", "--seed", seed, "--ignore-eos", "--json")
    result = r.json("result")
    prompt = chat_tokens(None, PROMPT)
    assert result["prefix_tokens"] == len(prompt)  # one prompt: all of it is shared
    texts = [b["text"] for b in result["branches"]]
    assert [b["seed"] for b in result["branches"]] == [seed, seed + 1, seed + 2]
    assert len(set(texts)) > 1
    # Branch i draws exactly what text_completion draws with seed + i (same per-step seed derivation).
    for i in range(2):
        assert texts[i] == completion(PROMPT, max_tokens, "--temperature", "0.9", "--seed", seed + i,
                                      "--ignore-eos")
    assert r.tokens == len(prompt) + n * (max_tokens - 1)
