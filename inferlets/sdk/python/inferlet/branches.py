"""Contexts decoding side by side: the helpers of the fork-based inferlets (best_of_n, parallel_generation,
tree / graph / skeleton / recursion of thought, prefix_tree).

- `submit(ctx, samplers, queue)`: the pass over a context's pending tokens, queued without waiting;
- `Branch` + `decode_all(branches)`: every live branch's pass submitted (one queue per branch) before any
  is waited on, so the server batches the branches into one forward pass per step;
- `truncate(ctx, length)`: drops tokens and the pages only they used;
- `sprout(node, samplers, trace, name, max_tokens, stop)`: one pass drawing each branch's first token, then
  one fork of the node per branch;
- `Trace`: which context was forked from which, and what each inherited and computed (for reports);
- `score_yes_no(contexts, question, trace)`: a verifier's P(yes) for each context, all passes in flight;
- `numbered_lines(ctx, count, max_tokens, sampler)`: a plan of numbered one-line items (grammar-bound).

    from inferlet.branches import Branch, decode_all
"""

import math

import inferlet
from inferlet import Grammar, step_sampler  # noqa: F401  (step_sampler re-exported for the inferlets)

F = inferlet.raw.forward
KV = inferlet.raw.kv
QUEUES = inferlet.raw.queues
PRIORITY = inferlet.raw.types.Priority


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


def sprout(node, samplers, trace, name, max_tokens, stop=()):
    """Branches growing from `node`: one pass over its pending tokens draws every branch's first token (one
    sampler each, at the node's last token), then the node is forked once per branch (recorded in `trace`
    under `name`); returns the Branches, their first token taken, for `decode_all`."""
    outs = node.step([step_sampler(s, 0) for s in samplers])
    branches = []
    for ctx, sampler, out in zip(trace.fork(node, len(samplers), name), samplers, outs):
        branches.append(Branch(ctx, sampler, max_tokens, stop=stop))
        branches[-1].accept([out])
    return branches


def truncate(ctx, length):
    """Drops the tokens past `length` and the pages they alone used (the K/V before `length` stays valid:
    a pass reads only the slots before its own end)."""
    del ctx.tokens[length:]
    ctx.num_cached = min(ctx.num_cached, length)
    keep = -(-length // ctx.page_size)
    if len(ctx.pages) > keep:
        KV.free(ctx.pages[keep:])
        del ctx.pages[keep:]


class Trace:
    """Every context of the run: which one it was forked from, how many tokens' K/V it got with the fork
    (`inherited`) and how many it computed itself (`computed`, including `discarded` ones run and dropped
    again); `report()` adds them up (`computed_unshared`: each context computing its whole sequence)."""

    def __init__(self):
        self.nodes = []
        self._open = {}  # id(ctx) -> node index

    def add(self, ctx, name, parent=None):
        self.nodes.append({"name": name, "parent": parent, "inherited": ctx.num_cached, "discarded": 0,
                           "ctx": ctx})
        self._open[id(ctx)] = len(self.nodes) - 1
        return ctx

    def node(self, ctx):
        return self._open[id(ctx)]

    def fork(self, ctx, n, name):
        """n forks sharing all of ctx's KV: its pending tokens are computed first, once, so that no fork
        computes them again."""
        if ctx.num_cached < len(ctx.tokens):
            ctx.flush()
        parent = self.node(ctx)
        return [self.add(ctx.fork(), name, parent) for _ in range(n)]

    def discard(self, ctx, count):
        self.nodes[self.node(ctx)]["discarded"] += count

    def close(self, ctx):
        """Records the context's final state and frees it."""
        node = self.nodes[self._open.pop(id(ctx))]
        del node["ctx"]
        node["tokens"] = ctx.tokens[node["inherited"]:]
        node["pending"] = len(ctx.tokens) - ctx.num_cached
        node["computed"] = ctx.num_cached - node["inherited"] + node["discarded"]
        ctx.free()

    def report(self):
        for node in list(self.nodes):
            if "ctx" in node:
                self.close(node["ctx"])
        return {"contexts": self.nodes, "computed": sum(n["computed"] for n in self.nodes),
                "computed_unshared": sum(n["inherited"] + n["computed"] for n in self.nodes)}


def score_yes_no(contexts, question, trace):
    """P(yes) / (P(yes) + P(no)) of each context after `question` (text); one pass each, all submitted
    before any is waited on. The question is dropped again (truncated), the contexts' own tokens stay
    computed; `trace` records the discarded tokens."""
    yes, no = inferlet.encode(" yes", False)[0], inferlet.encode(" no", False)[0]
    question_ids = inferlet.encode(question, False)
    futures = []
    for ctx in contexts:
        keep = len(ctx.tokens)
        ctx.fill_tokens(question_ids)
        futures.append((ctx, keep, submit(ctx, [inferlet.logprobs([yes, no])])))
    scores = []
    for ctx, keep, future in futures:
        lp_yes, lp_no = F.wait(future)[0].values
        scores.append(1.0 / (1.0 + math.exp(lp_no - lp_yes)))
        trace.discard(ctx, len(ctx.tokens) - keep)
        truncate(ctx, keep)
    return scores


def numbered_lines(ctx, count, max_tokens, sampler):
    """Writes `count` numbered lines ("1. ...\\n") into ctx, each of at most max_tokens tokens (a regex
    grammar keeps each one a single non-empty line); returns their texts."""
    grammar = Grammar.regex(" [^\\n]+\\n")
    lines = []
    for i in range(1, count + 1):
        ctx.fill(f"{i}.")
        text = ctx.generate(max_tokens=max_tokens, sampler=sampler, grammar=grammar)
        if not text.endswith("\n"):  # cut off by the token limit
            ctx.fill("\n")
        lines.append(text.strip())
    return lines
