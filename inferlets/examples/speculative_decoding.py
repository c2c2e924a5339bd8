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

import json

import inferlet

parser = inferlet.ArgParser("speculative_decoding", helps={"temperature": "0 = greedy (the speculative path)"})
parser.add_argument("--draft-tokens", type=int, default=8, help="most draft tokens verified per pass")
parser.add_argument("--ngram", type=int, default=3, help="longest n-gram the drafter looks up")
parser.add_argument("--min-ngram", type=int, default=2, help="shortest n-gram the drafter looks up")
parser.add_argument("--stats", action="store_true", help="log pass / acceptance counts to stderr")
args = parser.parse_args()
if args.draft_tokens < 0 or not 1 <= args.min_ngram <= args.ngram:
    parser.error("--draft-tokens must be >= 0 and 1 <= --min-ngram <= --ngram")
ctx = args.context()


def draft(tokens, k, max_n, min_n):
    """Up to k tokens that followed the latest earlier occurrence of the sequence's last n tokens
    (n = max_n .. min_n, longest match first); [] if none occurs earlier."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1) if k > 0 else ():
        tail = tokens[len(tokens) - n:]
        for i in range(len(tokens) - n - 1, -1, -1):  # the latest occurrence ending before the tail starts
            if tokens[i] == tail[0] and tokens[i:i + n] == tail and tokens[i + n:i + n + k]:
                return tokens[i + n:i + n + k]
    return []


if args.temperature != 0:
    print(ctx.generate(**args.generation()))
    if args.stats:
        inferlet.log(json.dumps({"mode": "sampling (no speculation)"}))
    raise SystemExit(0)

budget = inferlet.model_facts().max_batch_tokens
stopper = inferlet.Stopper(args.max_tokens, args.stop, args.ignore_eos)
passes = drafted = accepted = 0
k = args.draft_tokens  # the current draft length: grows by 2 after a fully accepted draft, shrinks by 1 after
# a prompt longer than one pass can carry (with room for a draft) is prefilled first
while not stopper.done and len(ctx.tokens) - ctx.num_cached > budget - args.draft_tokens - 1:
    end = ctx.num_cached + budget - args.draft_tokens - 1
    pending, ctx.tokens = ctx.tokens[end:], ctx.tokens[:end]
    ctx.flush()
    passes += 1
    ctx.fill_tokens(pending)
while not stopper.done:
    proposal = draft(ctx.tokens, min(k, args.max_tokens - len(stopper.tokens) - 1), args.ngram, args.min_ngram)
    model = ctx.speculate(proposal)  # the model's greedy token after each draft prefix: one pass
    passes += 1
    new = ctx.accept(proposal, model)  # the agreed draft prefix and the model's next token
    drafted, accepted = drafted + len(proposal), accepted + len(new) - 1
    if proposal:  # adapt the draft length to how well drafts have been doing (as HF's heuristic)
        k = min(args.draft_tokens, k + 2) if len(new) > len(proposal) else max(1, k - 1)
    for token in new:  # each through the usual stop checks
        if stopper.push(token):
            break
print(stopper.text)
ctx.free()
if args.stats:
    inferlet.log(json.dumps({"passes": passes, "generated": len(stopper.tokens), "drafted": drafted,
                             "accepted": accepted, "acceptance": round(accepted / drafted, 3) if drafted else None}))
