"""Prefix tree: many prompts that share nested prefixes (a system message; a document several questions
are about; ...), each prefix computed once.

The prompts' token sequences are arranged in a trie (a radix tree: each node holds the run of tokens that
all prompts below it share). The trie is computed top-down, one level at a time: a node's context is a
fork of its parent's (`Context.fork`: the parent's KV pages are shared, copy-on-write) to which it adds
only its own tokens; all nodes of a level are submitted (`forward.submit`, one queue each) before any is
waited on, so the server batches them. The pass of a node where prompts end also draws those prompts'
first tokens. Then every prompt's branch (a fork of its last node) decodes, all concurrently.

    pie run prefix_tree -- --system "Answer briefly." \\
        --prompt "Alice has 3 apples and 2 pears. How many apples?" \\
        --prompt "Alice has 3 apples and 2 pears. How many pears?" \\
        --prompt "Alice has 3 apples and a dog. What pet does she have?" --max-tokens 16

Arguments: --prompt (repeatable, required), --system, --max-tokens (64), --temperature (0.7; 0 =
greedy), --top-k, --top-p, --seed (prompt i draws with seed + i), --stop (repeatable), --ignore-eos,
--raw (no chat template: system and prompt joined by a blank line), --json.

Output: "[i] prompt" and its completion, per prompt. With --json, one JSON line: {"texts",
"prompt_tokens" (per prompt), "trie": [{"parent", "tokens", "ends"}], "trie_tokens" (tokens in the
trie: each shared prefix once), "contexts": [...], "computed" (tokens sent to the model),
"computed_unshared" (what independent completions of the prompts would have sent)}.

API: Context (fill_tokens, fork, free), forward.submit / wait, queues.create / destroy, kv.allocate,
tokenizer.
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


# ---- prefix tree ----------------------------------------------------------------------------------------

class Node:
    def __init__(self, tokens, parent):
        self.tokens = tokens
        self.parent = parent  # index in the node list, or None
        self.children = []
        self.ends = []  # prompts that end here


def build_trie(seqs):
    """The radix tree of `seqs`, as a list of nodes, parents before children."""
    nodes = []

    def add(indices, start, parent):
        groups = {}
        for i in indices:
            groups.setdefault(seqs[i][start], []).append(i)
        for group in groups.values():
            end = min(len(seqs[i]) for i in group)
            first = seqs[group[0]]
            for pos in range(start, end):
                if any(seqs[i][pos] != first[pos] for i in group):
                    end = pos
                    break
            node = Node(first[start:end], parent)
            nodes.append(node)
            index = len(nodes) - 1
            if parent is not None:
                nodes[parent].children.append(index)
            node.ends = [i for i in group if len(seqs[i]) == end]
            rest = [i for i in group if len(seqs[i]) > end]
            if rest:
                add(rest, end, index)

    add([i for i, s in enumerate(seqs) if s], 0, None)
    return nodes


def prompt_tokens(system, prompt, raw):
    if raw or not inferlet.model_facts().has_chat_template:
        return inferlet.encode(prompt if system is None else f"{system}\n\n{prompt}")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
               [{"role": "user", "content": prompt}]
    return inferlet.encode(inferlet.chat_prompt(messages))


def main():
    parser = argparse.ArgumentParser(prog="prefix_tree")
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--system", default=None)
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

    seqs = [prompt_tokens(args.system, p, args.raw) for p in args.prompt]
    if not all(seqs):
        parser.error("every prompt needs at least one token")
    samplers = [inferlet.sample(args.temperature, args.top_k, args.top_p, 0.0,
                                None if args.seed is None else args.seed + i) for i in range(len(seqs))]
    nodes = build_trie(seqs)

    # The trie, level by level: each node a fork of its parent plus its own tokens, a level at a time.
    trace = Trace()
    contexts = [None] * len(nodes)
    branches = [None] * len(seqs)
    level = [i for i, n in enumerate(nodes) if n.parent is None]
    while level:
        queues = [QUEUES.create(PRIORITY.NORMAL) for _ in level]
        futures = []
        for index, q in zip(level, queues):
            node = nodes[index]
            if node.parent is None:
                ctx = trace.add(Context(), "trie node")
            else:
                [ctx] = trace.fork(contexts[node.parent], 1, "trie node")
            ctx.fill_tokens(node.tokens)
            contexts[index] = ctx
            futures.append(submit(ctx, [step_sampler(samplers[i], 0) for i in node.ends], q))
        for index, future in zip(level, futures):
            outs = F.wait(future)
            for i, ctx, out in zip(nodes[index].ends, trace.fork(contexts[index], len(nodes[index].ends), "prompt"),
                                   outs):
                branches[i] = Branch(ctx, samplers[i], args.max_tokens, args.stop, args.ignore_eos)
                branches[i].accept([out])
        for q in queues:
            QUEUES.destroy(q)
        # The parents of this level are done (their children hold forks of them), and so are its leaves.
        for parent in sorted({nodes[i].parent for i in level if nodes[i].parent is not None}):
            trace.close(contexts[parent])
        for index in level:
            if not nodes[index].children:
                trace.close(contexts[index])
        level = [c for index in level for c in nodes[index].children]
    decode_all(branches)

    texts = [b.text for b in branches]
    unshared = sum(len(s) for s in seqs) + sum(b.computed for b in branches)
    report = trace.report()  # (frees every context)
    report["computed_unshared"] = unshared
    if args.json:
        print(json.dumps({"texts": texts, "prompt_tokens": [len(s) for s in seqs],
                          "trie": [{"parent": n.parent, "tokens": len(n.tokens), "ends": n.ends} for n in nodes],
                          "trie_tokens": sum(len(n.tokens) for n in nodes), **report}))
    else:
        for i, (p, text) in enumerate(zip(args.prompt, texts)):
            print(f"[{i}] {p}\n{text}\n")


main()
