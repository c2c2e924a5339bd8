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

import inferlet
from inferlet import Context
from inferlet.branches import Branch, decode_all, numbered_lines, Trace


# ---- recursion of thought -------------------------------------------------------------------------------



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
