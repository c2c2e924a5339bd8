"""Recursion of thought: a problem is split into sub-questions; each sub-question is solved in its own
context, forked from the problem's, and only its answer is spliced back into the problem's context, which
then writes the answer. Sub-problems above `--depth` split again, recursively.

A context that splits writes "Sub-questions:" followed by `--subproblems` numbered questions (one line
each, of at most `--question-tokens` tokens; a regex grammar holds the format). It is then forked once
per sub-question (`Context.fork`: the forks share its KV pages, prompt and sub-questions included,
copy-on-write); each fork adds "Now solve only sub-question i: ..." and solves it (recursively, or
directly at the last level). The sub-problems of one level write their answers concurrently (one queue
each; every step's passes are submitted before any is waited on, so the server batches them). Their
answers are filled into the parent as "Answer i: ..." (the sub-problems' own reasoning stays in the forks,
which are freed), and the parent writes "Answer:".

    pie run recursion_of_thought -- --problem "What is the population of the capital of France?" \\
        --subproblems 2 --depth 1

Arguments: --problem (required), --subproblems (2, 1..9), --depth (levels of splitting, 1),
--question-tokens (per sub-question, 16), --answer-tokens (24), --temperature (0 = greedy, the default),
--seed, --json.

Output: the tree of questions, each with its answer ("1. question -> answer", nested), then
"Answer: ...". With --json, one JSON line: {"prompt_tokens", "tree": {"question", "answer", "subs":
[...]}, "contexts": [...], "computed", "computed_unshared"} (contexts: every context with its parent, the
tokens it inherited by fork and those it computed).

API: Context (fill, generate with Grammar.regex, fork, free), forward.submit / wait, queues.create /
destroy, kv.allocate.
"""

import argparse
import json
import math

import inferlet
from inferlet import Context, Grammar

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


# ---- recursion of thought -------------------------------------------------------------------------------

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


class Solver:
    def __init__(self, args, trace):
        self.args = args
        self.trace = trace
        self.draws = 0

    def sampler(self):
        self.draws += 1
        seed = None if self.args.seed is None else self.args.seed + self.draws
        return inferlet.sample(self.args.temperature, seed=seed)

    def solve(self, contexts, records, depth):
        """Answers the problem each context ends with (records get "answer" and "subs")."""
        args = self.args
        if depth < args.depth:
            for ctx, record in zip(contexts, records):
                ctx.fill("Sub-questions:\n")
                questions = numbered_lines(ctx, args.subproblems, args.question_tokens, self.sampler())
                subs = self.trace.fork(ctx, len(questions), f"sub-problem (depth {depth + 1})")
                for i, (sub, q) in enumerate(zip(subs, questions), 1):
                    sub.fill(f"Now solve only sub-question {i}: {q}\n")
                record["subs"] = [{"question": q} for q in questions]
                answers = self.solve(subs, record["subs"], depth + 1)
                for sub in subs:
                    self.trace.close(sub)
                # Splice the answers back: the parent sees the sub-problems' answers, not their work.
                ctx.fill("".join(f"Answer {i}: {a}\n" for i, a in enumerate(answers, 1)))
        branches = []
        for ctx in contexts:
            ctx.fill("Answer:")
            branches.append(Branch(ctx, self.sampler(), args.answer_tokens, stop=["\n"]))
        decode_all(branches)
        for record, b in zip(records, branches):
            record["answer"] = b.text.strip()
            record.setdefault("subs", [])
        return [b.text.strip() for b in branches]


def show(record, indent):
    for i, sub in enumerate(record["subs"], 1):
        print(f"{indent}{i}. {sub['question']} -> {sub['answer']}")
        show(sub, indent + "   ")


def main():
    parser = argparse.ArgumentParser(prog="recursion_of_thought")
    parser.add_argument("--problem", required=True)
    parser.add_argument("--subproblems", type=int, default=2)
    parser.add_argument("--depth", type=int, default=1, help="levels of splitting")
    parser.add_argument("--question-tokens", type=int, default=16, help="per sub-question")
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.subproblems <= 9 or args.depth < 0:
        parser.error("--subproblems must be in 1..9 and --depth at least 0")

    trace = Trace()
    root = trace.add(Context(), "problem")
    root.fill(inferlet.chat_prompt([
        {"role": "system", "content": "Split the problem into simpler sub-questions, answer them, then "
                                      "answer the problem in one sentence."},
        {"role": "user", "content": args.problem}]))
    prompt_tokens = len(root.tokens)
    tree = {"question": args.problem}
    Solver(args, trace).solve([root], [tree], 0)

    report = trace.report()
    if args.json:
        print(json.dumps({"prompt_tokens": prompt_tokens, "tree": tree, **report}))
    else:
        print(f"Problem: {args.problem}")
        show(tree, "  ")
        print(f"Answer: {tree['answer']}")


main()
