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

import inferlet
from inferlet import Context
from inferlet.branches import step_sampler, submit, Branch, decode_all, Trace

F = inferlet.raw.forward
QUEUES = inferlet.raw.queues
PRIORITY = inferlet.raw.types.Priority


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
