"""Graph of thought: several drafts of an answer generated in parallel from one prompt, scored, and the
best of them aggregated into one merged context that writes the final answer (a graph: the merged node
has several parents).

The prompt is prefilled once, in a pass that also draws the first token of every draft; the prompt's
context is forked per draft (`Context.fork`: shared KV pages, copy-on-write) and the drafts decode
concurrently (one queue each; every step submits all passes before waiting on any, so the server batches
them). Each draft is scored by the model in one more batched pass (" Is this answer correct? Answer yes or
no:" with a `logprobs([" yes", " no"])` sampler; the question is truncated away again). The merged context
is a fork of the best draft (so the prompt and that draft are not computed again) to which the other kept
drafts are added as text ("Other answers: - ..."), followed by "Combined answer:"; it generates the final
answer greedily. `--refine N` adds N refinement nodes, each a fork of the previous one asked for an
"Improved answer:".

    pie run graph_of_thought -- --problem "Give three tips for learning a language." --drafts 3

Arguments: --problem (required), --drafts (3), --merge (drafts aggregated, best first; default all),
--refine (0), --draft-tokens (32), --answer-tokens (48), --temperature (0.8), --seed (draft i draws with
seed + i), --json.

Output: the drafts with their scores ("*" marks the merged ones), then "Combined answer: ..." (and any
"Improved answer: ..."). With --json, one JSON line: {"prompt_tokens", "drafts": [{"text", "score",
"merged"}], "merged_from", "answer", "refinements", "contexts": [...], "computed", "computed_unshared"}
(contexts: every context with its parent, the tokens it inherited by fork and those it computed).

API: Context (fill, step, fork, generate, free), forward.submit / wait with sample and logprobs samplers,
queues.create / destroy, kv.allocate / free.
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


# ---- graph of thought -----------------------------------------------------------------------------------

QUESTION = " Is this answer correct? Answer yes or no:"


def score_all(contexts, trace):
    """P(yes) / (P(yes) + P(no)) of each context after QUESTION; one pass each, all submitted before any
    is waited on. The question is dropped again (truncated), the contexts' own tokens stay computed."""
    yes, no = inferlet.encode(" yes", False)[0], inferlet.encode(" no", False)[0]
    question = inferlet.encode(QUESTION, False)
    futures = []
    for ctx in contexts:
        keep = len(ctx.tokens)
        ctx.fill_tokens(question)
        futures.append((ctx, keep, submit(ctx, [inferlet.logprobs([yes, no])])))
    scores = []
    for ctx, keep, future in futures:
        lp_yes, lp_no = F.wait(future)[0].values
        scores.append(1.0 / (1.0 + math.exp(lp_no - lp_yes)))
        trace.discard(ctx, len(ctx.tokens) - keep)
        truncate(ctx, keep)
    return scores


def main():
    parser = argparse.ArgumentParser(prog="graph_of_thought")
    parser.add_argument("--problem", required=True)
    parser.add_argument("--drafts", type=int, default=3)
    parser.add_argument("--merge", type=int, default=0, help="drafts aggregated, best first (0 = all)")
    parser.add_argument("--refine", type=int, default=0, help="refinement rounds after the merge")
    parser.add_argument("--draft-tokens", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.drafts < 1:
        parser.error("--drafts must be at least 1")
    merge = args.drafts if args.merge <= 0 else min(args.merge, args.drafts)

    trace = Trace()
    root = trace.add(Context(), "prompt")
    root.fill(inferlet.chat_prompt([
        {"role": "system", "content": "Answer briefly, in one or two sentences."},
        {"role": "user", "content": args.problem}]))
    prompt_tokens = len(root.tokens)

    # Generate: one pass computes the prompt and draws every draft's first token; then the drafts decode.
    samplers = [inferlet.sample(args.temperature, seed=None if args.seed is None else args.seed + i)
                for i in range(args.drafts)]
    outs = root.step([step_sampler(s, 0) for s in samplers])
    drafts = []
    for ctx, sampler, out in zip(trace.fork(root, args.drafts, "draft"), samplers, outs):
        branch = Branch(ctx, sampler, args.draft_tokens, stop=["\n"])
        branch.accept([out])
        drafts.append(branch)
    decode_all(drafts)

    # Score every draft; aggregate the best `merge` of them onto a fork of the best one.
    scores = score_all([b.ctx for b in drafts], trace)
    order = sorted(range(args.drafts), key=lambda i: -scores[i])[:merge]
    [merged] = trace.fork(drafts[order[0]].ctx, 1, "merged")
    trace.nodes[trace.node(merged)]["parents"] = [trace.node(drafts[i].ctx) for i in order]
    others = [drafts[i].text.strip() for i in order[1:]]
    if others:
        merged.fill("\nOther answers:\n" + "".join(f"- {t}\n" for t in others))
    merged.fill("\nCombined answer:")
    answer = merged.generate(max_tokens=args.answer_tokens, sampler=inferlet.greedy(), stop=["\n"]).strip()
    for b in drafts:
        trace.close(b.ctx)

    # Refine: each round a fork of the previous node.
    refinements = []
    node = merged
    for _ in range(args.refine):
        [nxt] = trace.fork(node, 1, "refined")
        trace.close(node)
        node = nxt
        node.fill("\nImproved answer:")
        refinements.append(node.generate(max_tokens=args.answer_tokens, sampler=inferlet.greedy(),
                                         stop=["\n"]).strip())

    report = trace.report()
    if args.json:
        print(json.dumps({"prompt_tokens": prompt_tokens,
                          "drafts": [{"text": b.text.strip(), "score": s, "merged": i in order}
                                     for i, (b, s) in enumerate(zip(drafts, scores))],
                          "merged_from": order, "answer": answer, "refinements": refinements, **report}))
    else:
        print("Drafts:")
        for i, (b, s) in enumerate(zip(drafts, scores)):
            print(f"  {'*' if i in order else ' '} [{s:.2f}] {b.text.strip()}")
        print(f"Combined answer: {answer}")
        for text in refinements:
            print(f"Improved answer: {text}")


main()
