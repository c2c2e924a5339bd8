"""Best-of-n: n completions of one prompt decoded side by side; prints the one with the best mean
log-probability.

The prompt is prefilled once: that single pass also draws each branch's first token (n samplers at its last
position, plus a top-k distribution for the log-probabilities). Then the context is forked n - 1 times
(`Context.fork`: the branches share the prompt's KV pages, copy-on-write; only the partly filled last page
is copied, when a branch first writes into it). Every branch decodes on its own command queue
(`queues.create`), and each step submits every live branch's pass (`forward.submit`) before waiting on any
(`forward.wait`), so the server batches the branches into one forward pass per step.

A branch's score is the mean log-probability (at temperature 1) of its tokens; it is exact because the
sampler keeps only the top-k tokens (`--top-k`, default 50) and every pass also returns the top-k
distribution, which therefore always holds the drawn token.

    pie run best_of_n -- --prompt "Write a haiku about the sea." --n 4 --max-tokens 48 --temperature 0.8

Arguments: --prompt (required), --system, --n (4), --max-tokens (64), --temperature (0.8; 0 = greedy),
--top-k (50, 1..200), --top-p (1.0), --seed (branch i draws with seed + i; none: unseeded draws),
--stop (repeatable), --ignore-eos, --raw (no chat template), --json.

Output: the best completion; with --json, JSON lines instead: {"event": "forked", "branches",
"pages_before", "pages_after", "prompt_tokens"} right after the forks, then {"event": "result", "best",
"prompt_tokens", "candidates": [{"text", "mean_logprob", "num_tokens", "tokens", "computed"}], "computed",
"computed_unshared"}; "computed" counts the tokens this instance sent to the model, "computed_unshared" what
n independent completions would have sent.

API: Context (fill, step, fork, free), forward.submit / forward.wait with greedy / sample /
top-k-distribution samplers, queues.create / destroy, kv.allocate / num-free-pages.
"""

import json

import inferlet
from inferlet.branches import step_sampler, Branch, decode_all


# ---- best-of-n --------------------------------------------------------------------------------------

def main():
    parser = inferlet.ArgParser("best_of_n", omit=("min_p",), max_tokens=64, temperature=0.8, top_k=50)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.n < 1:
        parser.error("--n must be at least 1")
    if not 1 <= args.top_k <= 200:
        parser.error("--top-k must be in 1..200 (the scores need the drawn token among the top k)")

    ctx = args.context()
    prompt_tokens = len(ctx.tokens)

    samplers = [inferlet.sample(args.temperature, args.top_k, args.top_p, 0.0,
                                None if args.seed is None else args.seed + i) for i in range(args.n)]
    # One pass computes the prompt and draws every branch's first token (+ one distribution for the scores).
    outs = ctx.step([step_sampler(s, 0) for s in samplers] + [inferlet.top_k_distribution(args.top_k, 1.0)])
    free_before = inferlet.num_free_pages()
    contexts = [ctx] + [ctx.fork() for _ in range(args.n - 1)]
    free_after = inferlet.num_free_pages()
    if args.json:
        inferlet.send(json.dumps({"event": "forked", "branches": args.n, "pages_before": free_before,
                                  "pages_after": free_after, "prompt_tokens": prompt_tokens}) + "\n")

    branches = [Branch(c, s, args.max_tokens, args.stop, args.ignore_eos, args.top_k)
                for c, s in zip(contexts, samplers)]
    for i, b in enumerate(branches):
        if not b.done:
            b.accept([outs[i], outs[-1]])
    decode_all(branches)

    def score(b):
        return sum(b.logprobs) / len(b.logprobs) if b.logprobs else float("-inf")

    best = max(range(args.n), key=lambda i: score(branches[i]))
    if args.json:
        computed = prompt_tokens + sum(b.computed for b in branches)
        inferlet.send(json.dumps({
            "event": "result", "best": best, "prompt_tokens": prompt_tokens,
            "candidates": [{"text": b.text, "mean_logprob": score(b), "num_tokens": len(b.generated),
                            "tokens": b.generated, "computed": b.computed} for b in branches],
            "computed": computed, "computed_unshared": sum(prompt_tokens + b.computed for b in branches),
        }) + "\n")
    else:
        print(branches[best].text)
    for b in branches:
        b.ctx.free()


main()
