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

import inferlet
from inferlet import Context
from inferlet.branches import step_sampler, Branch, decode_all


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
    free_before = inferlet.num_free_pages()
    contexts = [root.fork() for _ in prompts]
    free_after = inferlet.num_free_pages()
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
