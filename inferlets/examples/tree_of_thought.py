"""Tree of thought: a search over reasoning steps, each level proposing several next steps from the best
ones so far, scored by the model itself.

Level d: every kept node (at first the prompt) fills the header "Step d:" and runs it in one pass that also
draws the first token of each of its `--breadth` children; the node is then forked once per child
(`Context.fork`: the children share its KV pages copy-on-write, so nothing before the fork is ever computed
again). All children of the level decode their step concurrently (one queue each, every step's passes
submitted before any is waited on: the server batches them) up to a newline. Each child is then scored in
one more batched pass: its step followed by the question "Is this step correct? Answer yes or no:" with a
`logprobs([" yes", " no"])` sampler (score = P(yes) / (P(yes) + P(no))); the question's tokens are dropped
again afterwards (the context is truncated: its KV stays valid), so only the step itself is kept. The
`--beam` best children of the level are expanded next, the others freed. After `--depth` levels the best
path writes the answer ("Answer:", greedy).

    pie run tree_of_thought -- --problem "How can I get from Paris to Rome cheaply?" --breadth 3 --depth 2

Arguments: --problem (required), --breadth (3), --depth (2), --beam (1), --step-tokens (24),
--answer-tokens (32), --temperature (0.8), --seed (child i of a level draws with seed + its index),
--json.

Output: each level's steps with their scores ("*" marks the kept ones), then the chosen path and
"Answer: ...". With --json, one JSON line: {"prompt_tokens", "levels": [[{"step", "score", "kept",
"parent"}]], "path", "answer", "contexts": [{"name", "parent", "inherited", "computed", "discarded",
"pending", "tokens"}], "computed", "computed_unshared"}: every context's tokens are either inherited
from its parent by a fork or computed by itself, once.

API: Context (fill, step, fork, generate, free), forward.submit / wait with sample and logprobs samplers,
queues.create / destroy, kv.allocate / free.
"""

import argparse
import json

import inferlet
from inferlet import Context
from inferlet.branches import Trace, decode_all, score_yes_no, sprout


# ---- tree of thought ----------------------------------------------------------------------------------

QUESTION = " Is this step correct? Answer yes or no:"


def main():
    parser = argparse.ArgumentParser(prog="tree_of_thought")
    parser.add_argument("--problem", required=True)
    parser.add_argument("--breadth", type=int, default=3, help="steps proposed per kept node")
    parser.add_argument("--depth", type=int, default=2, help="levels of steps")
    parser.add_argument("--beam", type=int, default=1, help="nodes kept per level")
    parser.add_argument("--step-tokens", type=int, default=24)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if min(args.breadth, args.depth, args.beam) < 1:
        parser.error("--breadth, --depth and --beam must be at least 1")

    trace = Trace()
    root = trace.add(Context(), "prompt")
    root.system("Solve the problem step by step, one short step per line.")
    root.user(args.problem)
    root.assistant()
    prompt_tokens, kept, paths, levels = len(root.tokens), [root], {id(root): []}, []
    for depth in range(1, args.depth + 1):
        proposals = []  # (parent, Branch): each kept node runs its header and draws its children's first tokens
        for node in kept:
            node += ("" if depth == 1 else "\n") + f"Step {depth}:"
            samplers = inferlet.samplers(args.breadth, args.temperature, args.seed,
                                         first_seed_offset=len(proposals) * args.breadth)
            proposals += [(node, b) for b in sprout(node, samplers, trace, f"step {depth}", args.step_tokens, ["\n"])]
        decode_all([b for _, b in proposals])
        scores = score_yes_no([b.ctx for _, b in proposals], QUESTION, trace)
        order = sorted(range(len(proposals)), key=lambda i: -scores[i])[:args.beam]
        levels.append([{"step": b.text.strip(), "score": score, "kept": i in order, "parent": trace.node(parent)}
                       for i, ((parent, b), score) in enumerate(zip(proposals, scores))])
        for parent, b in proposals:
            paths[id(b.ctx)] = paths[id(parent)] + [b.text.strip()]
        for node in kept + [b.ctx for i, (_, b) in enumerate(proposals) if i not in order]:
            trace.close(node)  # the expanded nodes and the children not kept
        kept = [proposals[i][1].ctx for i in order]

    kept[0] += "\nAnswer:"
    answer, path = kept[0].gen(max_tokens=args.answer_tokens, stop=["\n"]).strip(), paths[id(kept[0])]
    if args.json:
        print(json.dumps({"prompt_tokens": prompt_tokens, "levels": levels, "path": path, "answer": answer,
                          **trace.report()}))
    else:
        for depth, level in enumerate(levels, 1):
            print(f"Level {depth}:\n" + "\n".join(f"  {'*' if e['kept'] else ' '} [{e['score']:.2f}] {e['step']}"
                                                  for e in level))
        print("Path:\n" + "".join(f"  Step {d}: {step}\n" for d, step in enumerate(path, 1)) + f"Answer: {answer}")
        trace.report()


main()
