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

import inferlet
from inferlet import Context
from inferlet.branches import decode_all, score_yes_no, sprout, Trace


# ---- graph of thought -----------------------------------------------------------------------------------

QUESTION = " Is this answer correct? Answer yes or no:"


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
    drafts = sprout(root, inferlet.samplers(args.drafts, args.temperature, args.seed), trace, "draft",
                    args.draft_tokens, ["\n"])
    decode_all(drafts)

    # Score every draft; aggregate the best `merge` of them onto a fork of the best one.
    scores = score_yes_no([b.ctx for b in drafts], QUESTION, trace)
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
