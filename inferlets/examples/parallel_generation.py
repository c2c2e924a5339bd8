"""Parallel generation: several completions that share a prompt prefix, decoded side by side.

Every branch is one chat prompt (`--system` + one `--prompt`; `--prompt` repeatable) sampled `--n` times.
The branches' token sequences are compared and their longest common prefix (e.g. the system message, or
the whole prompt when there is one) is prefilled once, in one pass that also draws the first token of
every branch that has nothing more to add. The prefix is then forked per branch (`Context.fork`: the KV
pages are shared copy-on-write, the fork allocates nothing), each branch fills its own rest of the prompt,
and all branches decode concurrently: one command queue each (`queues.create`), and every step submits all
live branches' passes (`forward.submit`) before waiting on any (`forward.wait`), so the server batches
them (the first step of the branches also carries their distinct prompt suffixes).

    pie run parallel_generation -- --system "Be brief." --prompt "Name a fruit." --prompt "Name a color." \\
        --n 2 --max-tokens 16 --temperature 0.7 --seed 1

Arguments: --prompt (repeatable, required), --system, --n (samples per prompt, 1), --max-tokens (64),
--temperature (0.7; 0 = greedy), --top-k (0), --top-p (1.0), --seed (branch i draws with seed + i, so a
lone branch with seed s generates what `text_completion --seed s` does), --stop (repeatable),
--ignore-eos, --raw (no chat template: system and prompt joined by a blank line), --json.

Output: one block per branch, "[i] prompt" then the completion; with --json, JSON lines instead:
{"event": "forked", "branches", "prefix_tokens", "pages_before", "pages_after"} after the forks, then
{"event": "result", "prefix_tokens", "branches": [{"prompt", "seed", "text", "suffix_tokens", "num_tokens",
"computed"}], "computed", "computed_unshared"} (tokens sent to the model, and what independent
completions would have sent).

API: Context (fill_tokens, step, flush, fork, free), forward.submit / forward.wait, queues.create /
destroy, kv.allocate / num-free-pages, tokenizer (chat template, encode, decode).
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


# ---- parallel generation ----------------------------------------------------------------------------

def prompt_tokens(system, prompt, raw):
    if raw or not inferlet.model_facts().has_chat_template:
        return inferlet.encode(prompt if system is None else f"{system}\n\n{prompt}")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
               [{"role": "user", "content": prompt}]
    return inferlet.encode(inferlet.chat_prompt(messages))


def common_prefix_len(seqs):
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs):
            return i
    return n


def main():
    parser = argparse.ArgumentParser(prog="parallel_generation")
    parser.add_argument("--prompt", action="append", required=True, help="one branch per prompt (repeatable)")
    parser.add_argument("--system", default=None)
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[])
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.n < 1:
        parser.error("--n must be at least 1")

    prompts = [p for p in args.prompt for _ in range(args.n)]
    seqs = [prompt_tokens(args.system, p, args.raw) for p in prompts]
    seeds = [None if args.seed is None else args.seed + i for i in range(len(prompts))]
    samplers = [inferlet.sample(args.temperature, args.top_k, args.top_p, 0.0, s) for s in seeds]
    prefix = common_prefix_len(seqs)

    # The shared prefix: computed once; the branches that add nothing to it get their first token here.
    first = [i for i, s in enumerate(seqs) if len(s) == prefix]
    root = Context()
    outs = []
    if prefix:
        root.fill_tokens(seqs[0][:prefix])
        if first:
            outs = root.step([step_sampler(samplers[i], 0) for i in first])
        else:
            root.flush()
    free_before = KV.num_free_pages()
    contexts = [root.fork() for _ in prompts]
    free_after = KV.num_free_pages()
    root.free()
    if args.json:
        inferlet.send(json.dumps({"event": "forked", "branches": len(prompts), "prefix_tokens": prefix,
                                  "pages_before": free_before, "pages_after": free_after}) + "\n")

    branches = []
    for ctx, seq, s in zip(contexts, seqs, samplers):
        ctx.fill_tokens(seq[prefix:])
        branches.append(Branch(ctx, s, args.max_tokens, args.stop, args.ignore_eos))
    for i, out in zip(first, outs):
        if not branches[i].done:
            branches[i].accept([out])
    decode_all(branches)

    if args.json:
        inferlet.send(json.dumps({
            "event": "result", "prefix_tokens": prefix,
            "branches": [{"prompt": p, "seed": s, "text": b.text, "suffix_tokens": len(seq) - prefix,
                          "num_tokens": len(b.generated), "computed": b.computed}
                         for p, s, seq, b in zip(prompts, seeds, seqs, branches)],
            "computed": prefix + sum(b.computed for b in branches),
            "computed_unshared": sum(prefix + b.computed for b in branches),
        }) + "\n")
    else:
        for i, (p, b) in enumerate(zip(prompts, branches)):
            print(f"[{i}] {p}\n{b.text}\n")
    for b in branches:
        b.ctx.free()


main()
