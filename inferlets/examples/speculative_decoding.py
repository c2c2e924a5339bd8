"""Speculative decoding with a prompt-lookup (n-gram) drafter: text_completion's output, in fewer passes.

    pie run speculative_decoding -- --prompt "Repeat this list: apple, banana, cherry" --max-tokens 64 --temperature 0

Takes exactly text_completion's arguments (plus the optional tuning flags below) and prints only the
generated text: with `--temperature 0` the text is the same as text_completion's greedy output.

How it works (greedy):
- Drafter: the last n tokens of the sequence (n = --ngram down to --min-ngram) are looked up in the
  earlier text (prompt and generated tokens); the up to k tokens that followed their latest earlier
  occurrence are the draft (none if no such n-gram occurs: then the pass is a plain decode step). No
  draft model is needed, and text that repeats (lists, code, quotes of the prompt) is drafted well. The
  draft length k starts at --draft-tokens, grows by 2 (up to --draft-tokens) after a fully accepted draft
  and shrinks by 1 (down to 1) after a rejection, so poorly predictable text costs little extra compute.
- Verifier: ONE forward pass runs the pending token(s) followed by the k draft tokens, with a greedy
  sampler at the last pending token and at every draft token (k + 1 output indices). The longest draft
  prefix that matches the model's own greedy choices is accepted, plus the model's next token after it
  (the correction, or a bonus token when the whole draft matched): 1 to k + 1 tokens per pass.
- Rejected slots: the pass also wrote K/V for the rejected draft tokens. Only the Context's bookkeeping
  changes: `num_cached` stops after the accepted prefix and `tokens` drops the rejected ones, so the next
  pass writes its inputs at those positions again (a pass's positions and slots are derived from
  `num_cached`) and the stale slots are overwritten before anything attends to them. The pages stay
  allocated (they are needed again right away) and are freed with the Context.
- Termination is token by token, as in `Context.generate`: EOS (not printed, unless --ignore-eos), stop
  strings (cut from the text) and --max-tokens.
- With --temperature != 0 there is nothing to verify greedily: it falls back to plain sampling with the
  same sampler as text_completion (so seeded output matches text_completion's too).

Extra flags: --draft-tokens K (8), --ngram N (3, the longest n-gram looked up), --min-ngram (2, the
shortest), --stats (logs passes, generated, drafted and accepted tokens to stderr as one JSON line).
"""

import argparse
import json

import inferlet
from inferlet import raw

parser = argparse.ArgumentParser(prog="speculative_decoding")
parser.add_argument("--prompt", required=True)
parser.add_argument("--max-tokens", type=int, default=256)
parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (the speculative path)")
parser.add_argument("--top-p", type=float, default=1.0)
parser.add_argument("--top-k", type=int, default=0)
parser.add_argument("--min-p", type=float, default=0.0)
parser.add_argument("--seed", type=int, default=None)
parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
parser.add_argument("--system", default=None, help="system message")
parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
parser.add_argument("--ignore-eos", action="store_true", help="generate max-tokens tokens even past EOS")
parser.add_argument("--draft-tokens", type=int, default=8, help="most draft tokens verified per pass")
parser.add_argument("--ngram", type=int, default=3, help="longest n-gram the drafter looks up")
parser.add_argument("--min-ngram", type=int, default=2, help="shortest n-gram the drafter looks up")
parser.add_argument("--stats", action="store_true", help="log pass / acceptance counts to stderr")
args = parser.parse_args()
if args.draft_tokens < 0 or not 1 <= args.min_ngram <= args.ngram:
    parser.error("--draft-tokens must be >= 0 and 1 <= --min-ngram <= --ngram")

ctx = inferlet.Context()
if args.raw or not inferlet.model_facts().has_chat_template:
    ctx.fill_tokens(inferlet.encode(args.prompt if args.system is None else f"{args.system}\n\n{args.prompt}"))
else:
    messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
               [{"role": "user", "content": args.prompt}]
    ctx.fill(inferlet.chat_prompt(messages))


def draft(tokens, k, max_n, min_n):
    """Up to k tokens that followed the latest earlier occurrence of the sequence's last n tokens
    (n = max_n .. min_n, longest match first); [] if none occurs earlier."""
    if k <= 0:
        return []
    L = len(tokens)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        tail = tokens[L - n:]
        first = tail[0]
        # scan backwards for the latest earlier occurrence (its end strictly before the tail's start)
        i = L - n - 1
        while i >= 0:
            if tokens[i] == first and tokens[i:i + n] == tail:
                follow = tokens[i + n:i + n + k]
                if follow:
                    return follow
            i -= 1
    return []


def verify(ctx, proposal):
    """One pass over ctx's pending tokens + `proposal`, greedy outputs at the last pending token and at
    every proposal token. Returns the model's k + 1 greedy tokens. Leaves num_cached unchanged."""
    ps = ctx.page_size
    seq = ctx.tokens + proposal
    end = len(seq)
    need = -(-end // ps) - len(ctx.pages)
    if need > 0:
        ctx.pages += raw.kv.allocate(need)
    num_pages = -(-end // ps)
    start = ctx.num_cached
    first_out = len(ctx.tokens) - 1 - start
    outs = list(range(first_out, end - start))
    fwd = raw.forward.ForwardPass(
        tokens=seq[start:], input_embeddings=[], positions=list(range(start, end)),
        pages=ctx.pages[:num_pages], last_page_len=end - (num_pages - 1) * ps, mask=[],
        output_indices=outs, samplers=[inferlet.greedy()] * len(outs), output_masks=[])
    return [o.ids[0] for o in raw.forward.wait(raw.forward.submit(0, fwd))]


if args.temperature != 0:
    sampler = inferlet.sample(args.temperature, args.top_k, args.top_p, args.min_p, args.seed)
    print(ctx.generate(max_tokens=args.max_tokens, sampler=sampler, stop=args.stop, ignore_eos=args.ignore_eos))
    if args.stats:
        inferlet.log(json.dumps({"mode": "sampling (no speculation)"}))
    raise SystemExit(0)

eos = inferlet.model_facts().eos_ids
budget = inferlet.model_facts().max_batch_tokens
start = len(ctx.tokens)
passes = drafted = accepted = 0
k = args.draft_tokens  # the current draft length: grows by 2 after a fully accepted draft, shrinks by 1 after
text = None
if args.max_tokens > 0:
    # a prompt longer than one pass can carry (with room for a draft) is prefilled first
    while len(ctx.tokens) - ctx.num_cached > budget - args.draft_tokens - 1:
        end = ctx.num_cached + budget - args.draft_tokens - 1
        pending = ctx.tokens[end:]
        del ctx.tokens[end:]
        ctx.flush()
        passes += 1
        ctx.tokens += pending
    while text is None:
        left = args.max_tokens - (len(ctx.tokens) - start)
        proposal = draft(ctx.tokens, min(k, left - 1), args.ngram, args.min_ngram)
        base = len(ctx.tokens)  # the tokens before the proposal; ctx.tokens[num_cached:] are pending
        model = verify(ctx, proposal)
        passes += 1
        drafted += len(proposal)
        m = 0
        while m < len(proposal) and proposal[m] == model[m]:
            m += 1
        accepted += m
        if proposal:  # adapt the draft length to how well drafts have been doing (as HF's heuristic)
            k = min(args.draft_tokens, k + 2) if m == len(proposal) else max(1, k - 1)
        # K/V of the pending tokens and of the accepted draft are valid; the slots of the rejected draft
        # tokens are stale and get overwritten by the next pass, which starts at num_cached
        ctx.num_cached = base + m
        # the accepted draft tokens, then the model's own next token, each through the usual stop checks
        for token in proposal[:m] + [model[m]]:
            if token in eos and not args.ignore_eos:
                text = inferlet.decode(ctx.tokens[start:])
                break
            ctx.tokens.append(token)
            if args.stop:
                so_far = inferlet.decode(ctx.tokens[start:])
                cut = min((i for i in (so_far.find(s) for s in args.stop) if i >= 0), default=-1)
                if cut >= 0:
                    text = so_far[:cut]
                    break
            if len(ctx.tokens) - start >= args.max_tokens:
                text = inferlet.decode(ctx.tokens[start:])
                break
else:
    text = ""
print(text)
ctx.free()
if args.stats:
    generated = len(ctx.tokens) - start
    inferlet.log(json.dumps({"passes": passes, "generated": generated, "drafted": drafted, "accepted": accepted,
                             "acceptance": round(accepted / drafted, 3) if drafted else None}))
