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

import argparse
import json
import math

import inferlet
from inferlet import Context

F = inferlet.raw.forward
KV = inferlet.raw.kv
QUEUES = inferlet.raw.queues
PRIORITY = inferlet.raw.types.Priority


# ---- contexts decoding side by side (helpers shared by the fork-based examples) ----------------------

def step_sampler(sampler, step):
    """The step-th token's sampler: a seeded one derives one seed per step, as Context.generate does."""
    if isinstance(sampler, F.Sampler_Sample) and sampler.value.seed is not None:
        p = sampler.value
        seed = (p.seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF
        return F.Sampler_Sample(F.SampleParams(p.temperature, p.top_k, p.top_p, p.min_p, seed))
    return sampler


def submit(ctx, samplers, queue=0):
    """Queues the pass over ctx's pending tokens with `samplers` at the last one (a pending run longer than
    one pass may carry is first computed in full-size passes) and returns its future; the tokens count as
    computed (ctx.num_cached) from now on."""
    budget = inferlet.model_facts().max_batch_tokens
    if ctx.num_cached >= len(ctx.tokens):
        raise ValueError("submit: no pending token")
    while len(ctx.tokens) - ctx.num_cached > budget:
        F.wait(_submit(ctx, ctx.num_cached + budget, [], queue))
    return _submit(ctx, len(ctx.tokens), samplers, queue)


def _submit(ctx, end, samplers, queue):
    ps = ctx.page_size
    num_pages = -(-end // ps)
    if num_pages > len(ctx.pages):
        ctx.pages += KV.allocate(num_pages - len(ctx.pages))
    start = ctx.num_cached
    fwd = F.ForwardPass(tokens=ctx.tokens[start:end], input_embeddings=[], positions=list(range(start, end)),
                        pages=ctx.pages[:num_pages], last_page_len=end - (num_pages - 1) * ps, mask=[],
                        output_indices=[end - start - 1] * len(samplers), samplers=list(samplers),
                        output_masks=[])
    ctx.num_cached = end
    return F.submit(queue, fwd)


class Branch:
    """One context generating on its own queue; `accept` takes the outputs of one step. A stop string
    (searched for after any leading whitespace) ends the text; the token that carried it is replaced by
    the tokens of the text before it (free: that last token was never run), so the context holds exactly
    `text`."""

    def __init__(self, ctx, sampler, max_tokens, stop=(), ignore_eos=False, top_k_dist=0):
        self.ctx = ctx
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.stop = list(stop)
        self.ignore_eos = ignore_eos
        self.top_k_dist = top_k_dist  # > 0: also take the top-k distribution, for log-probabilities
        self.inherited = ctx.num_cached  # tokens whose K/V came with the fork
        self.generated = []
        self.logprobs = []
        self.steps = 0
        self.done = max_tokens <= 0
        self.text = ""
        self.queue = None

    def samplers(self):
        out = [step_sampler(self.sampler, self.steps)]
        if self.top_k_dist:
            out.append(F.Sampler_TopKDistribution((self.top_k_dist, 1.0)))
        return out

    def accept(self, outputs):
        token = outputs[0].ids[0]
        self.steps += 1
        if self.top_k_dist:
            probs = dict(zip(outputs[1].ids, outputs[1].values))
            self.logprobs.append(math.log(max(probs.get(token, min(outputs[1].values)), 1e-45)))
        if token in inferlet.model_facts().eos_ids and not self.ignore_eos:
            self.done = True
            return
        self.ctx.tokens.append(token)
        self.generated.append(token)
        self.text = inferlet.decode(self.generated)
        if self.stop:  # searched for after any leading whitespace
            lead = len(self.text) - len(self.text.lstrip())
            cut = min((i for i in (self.text.find(s, lead) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.done = True
                before = inferlet.decode(self.generated[:-1])
                if self.text[:cut].startswith(before):
                    piece = inferlet.encode(self.text[len(before):cut], False)
                    del self.ctx.tokens[-1], self.generated[-1]
                    self.ctx.tokens += piece
                    self.generated += piece
                self.text = self.text[:cut]
        if len(self.generated) >= self.max_tokens:
            self.done = True

    @property
    def computed(self):
        """Tokens this branch has sent to the model itself."""
        return self.ctx.num_cached - self.inherited


def decode_all(branches):
    """Steps every unfinished branch until all are done; each step submits all their passes (one queue per
    branch) before waiting on any, so the server runs them as one batch."""
    for b in branches:
        b.queue = QUEUES.create(PRIORITY.NORMAL)
    try:
        while True:
            live = [b for b in branches if not b.done]
            if not live:
                return
            futures = [submit(b.ctx, b.samplers(), b.queue) for b in live]
            for b, f in zip(live, futures):
                b.accept(F.wait(f))
    finally:
        for b in branches:
            if b.queue is not None:
                QUEUES.destroy(b.queue)
                b.queue = None


# ---- best-of-n --------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(prog="best_of_n")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--system", default=None)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[])
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.n < 1:
        parser.error("--n must be at least 1")
    if not 1 <= args.top_k <= 200:
        parser.error("--top-k must be in 1..200 (the scores need the drawn token among the top k)")

    ctx = Context()
    if args.raw or not inferlet.model_facts().has_chat_template:
        ctx.fill_tokens(inferlet.encode(args.prompt if args.system is None else f"{args.system}\n\n{args.prompt}"))
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
                   [{"role": "user", "content": args.prompt}]
        ctx.fill(inferlet.chat_prompt(messages))
    prompt_tokens = len(ctx.tokens)

    def sampler(i):
        seed = None if args.seed is None else args.seed + i
        if args.temperature == 0:
            return inferlet.greedy()
        return inferlet.sample(args.temperature, args.top_k, args.top_p, 0.0, seed)

    samplers = [sampler(i) for i in range(args.n)]
    # One pass computes the prompt and draws every branch's first token (+ one distribution for the scores).
    outs = ctx.step([step_sampler(s, 0) for s in samplers] + [F.Sampler_TopKDistribution((args.top_k, 1.0))])
    free_before = KV.num_free_pages()
    contexts = [ctx] + [ctx.fork() for _ in range(args.n - 1)]
    free_after = KV.num_free_pages()
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
