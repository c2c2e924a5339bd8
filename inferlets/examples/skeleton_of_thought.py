"""Skeleton of thought: the model first writes a short skeleton of the answer (`--points` numbered points,
one line each: a regex grammar holds every point to one line), then every point is expanded in parallel.

The skeleton is generated in one context (prompt + "Skeleton:"); the header "Details:" is added and the
whole context (prompt, skeleton, header) is computed once and forked per point (`Context.fork`: the
points share its KV pages copy-on-write). Each fork adds only "N. <point>:" and writes that point's
expansion; all of them decode concurrently (one queue each, every step's passes submitted before any is
waited on, so the server batches them).

    pie run skeleton_of_thought -- --question "How do I start running?" --points 3 --point-tokens 32

Arguments: --question (required), --points (3, 1..9), --skeleton-tokens (per point, 16),
--point-tokens (32), --temperature (0 = greedy, the default), --seed, --json.

Output: "Skeleton:" with the numbered points, then every point again followed by its expansion. With
--json, one JSON line: {"prompt_tokens", "skeleton": [points], "expansions": [texts], "contexts": [...],
"computed", "computed_unshared"} (contexts: every context with its parent, the tokens it inherited by
fork and those it computed).

API: Context (fill, generate with Grammar.regex, fork, free), forward.submit / wait, queues.create /
destroy, kv.allocate.
"""

import argparse
import json

import inferlet
from inferlet import Context
from inferlet.branches import Branch, decode_all, numbered_lines, Trace


# ---- skeleton of thought ------------------------------------------------------------------------------



def main():
    parser = argparse.ArgumentParser(prog="skeleton_of_thought")
    parser.add_argument("--question", required=True)
    parser.add_argument("--points", type=int, default=3)
    parser.add_argument("--skeleton-tokens", type=int, default=16, help="per point")
    parser.add_argument("--point-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.points <= 9:
        parser.error("--points must be in 1..9")

    trace = Trace()
    root = trace.add(Context(), "skeleton")
    root.fill(inferlet.chat_prompt([
        {"role": "system", "content": "First write a skeleton of the answer: a few short numbered points. "
                                      "Then explain each point."},
        {"role": "user", "content": args.question}]))
    prompt_tokens = len(root.tokens)

    # 1. The skeleton: numbered one-line points.
    root.fill("Skeleton:\n")
    points = numbered_lines(root, args.points, args.skeleton_tokens, inferlet.sample(args.temperature, seed=args.seed))

    # 2. Every point expanded in a fork of the whole skeleton, all at once.
    root.fill("Details:\n")
    branches = []
    for i, (ctx, point) in enumerate(zip(trace.fork(root, len(points), "point"), points), 1):
        ctx.fill(f"{i}. {point}:")
        seed = None if args.seed is None else args.seed + i
        branches.append(Branch(ctx, inferlet.sample(args.temperature, seed=seed), args.point_tokens,
                               stop=["\n"]))
    decode_all(branches)
    expansions = [b.text.strip() for b in branches]

    report = trace.report()
    if args.json:
        print(json.dumps({"prompt_tokens": prompt_tokens, "skeleton": points, "expansions": expansions,
                          **report}))
    else:
        print("Skeleton:")
        for i, point in enumerate(points, 1):
            print(f"{i}. {point}")
        print()
        for i, (point, expansion) in enumerate(zip(points, expansions), 1):
            print(f"{i}. {point}\n   {expansion}")


main()
