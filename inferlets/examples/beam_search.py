"""Beam search: the N most likely continuations kept at every step, each a forked Context.

    pie run beam_search -- --prompt "What is the capital of France?" --beams 4 --max-tokens 32 [--json]

Prints the text of the best finished (or, at --max-tokens, surviving) beam; with --json prints one JSON
object instead: {"text", "logprob" (its total log-probability given the prompt), "tokens" (its token ids),
"prompt_tokens" (the prompt's token ids), "beams" (the N best final beams, best first: text, logprob,
tokens, and finished: whether it ended with EOS)}.

Arguments: --prompt, --beams N (4), --max-tokens (32), --system, --raw (no chat template, as in
text_completion), --ignore-eos (EOS is an ordinary token: every beam gets exactly --max-tokens tokens),
--length-penalty ALPHA (0), --json, --stats (logs {"steps", "peak_pages_in_use", "finished"} to stderr; the peak is measured with
kv.num-free-pages, exact while no other instance allocates).

Beam search usually, but not provably, finds a continuation at least as likely as greedy decoding's
(greedy's path can be pruned early in favour of prefixes that later fall behind).

How it uses the API:
- The prompt is filled into one root Context; its prefill pass asks for `top_k_distribution(N)` at the
  last token (the probabilities of the N most likely next tokens, a softmax over the whole vocabulary at
  temperature 1, so log(p) is the token's log-probability).
- Each beam is a Context forked from its parent (`Context.fork` = `kv.fork`: the new handles share the
  parent's pages; the first pass that writes into the shared, partly filled last page gives the writer its
  own copy of that one page, so a beam costs at most one page copy per step, never a prefix copy).
- One step: every live beam's pending token is submitted as its own forward pass (all submitted before
  any is waited on, so the scheduler batches them into one model pass), each asking for
  `top_k_distribution(N)`. The N * N candidates (beam score + log p) are ranked; the N best survive. A
  beam chosen once continues in place, a beam chosen k times is forked k - 1 times, a beam not chosen is
  freed (its pages return to the pool once no other beam shares them).
- A candidate that is EOS finishes its beam (score kept, EOS not part of the text). Scores only decrease,
  so the search stops as soon as the best finished beam scores at least as much as the best live one
  could still reach, or at --max-tokens; the result is the beam with the highest total log-probability
  among finished and live beams. Total log-probability favours short answers (an early EOS can beat
  every longer continuation); --length-penalty ALPHA ranks final beams by logprob / length**ALPHA
  instead (as HF's length_penalty; 1.0 is the per-token average; "logprob" in --json stays the total).
"""

import argparse
import json
import math

import inferlet
from inferlet import raw

parser = argparse.ArgumentParser(prog="beam_search")
parser.add_argument("--prompt", required=True)
parser.add_argument("--beams", type=int, default=4, help="beam width N")
parser.add_argument("--max-tokens", type=int, default=32)
parser.add_argument("--system", default=None, help="system message")
parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
parser.add_argument("--ignore-eos", action="store_true", help="EOS is an ordinary token")
parser.add_argument("--length-penalty", type=float, default=0.0,
                    help="rank final beams by logprob / length**ALPHA (0 = total logprob)")
parser.add_argument("--json", action="store_true", help="print a JSON object with the score and the beams")
parser.add_argument("--stats", action="store_true", help="log steps and the peak pages in use to stderr")
args = parser.parse_args()
if args.beams < 1 or args.length_penalty < 0:
    parser.error("--beams must be >= 1 and --length-penalty >= 0")

N = args.beams
free0 = raw.kv.num_free_pages()
peak = 0  # the most pages this instance held at once (exact while no other instance allocates)
eos = inferlet.model_facts().eos_ids
prompt = inferlet.Context()
if args.raw or not inferlet.model_facts().has_chat_template:
    prompt.fill_tokens(inferlet.encode(args.prompt if args.system is None else f"{args.system}\n\n{args.prompt}"))
else:
    messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
               [{"role": "user", "content": args.prompt}]
    prompt.fill(inferlet.chat_prompt(messages))
prompt_tokens = list(prompt.tokens)
prompt_len = len(prompt_tokens)


class Beam:
    def __init__(self, ctx, score):
        self.ctx, self.score = ctx, score

    @property
    def generated(self):
        return self.ctx.tokens[prompt_len:]


def submit(ctx):
    """Submits the pass over ctx's pending tokens with top_k_distribution(N) at the last one (does not
    wait). Returns the future. Allocates pages as needed (Context bookkeeping kept)."""
    ps = ctx.page_size
    end = len(ctx.tokens)
    need = -(-end // ps) - len(ctx.pages)
    if need > 0:
        ctx.pages += raw.kv.allocate(need)
    num_pages = -(-end // ps)
    start = ctx.num_cached
    fwd = raw.forward.ForwardPass(
        tokens=ctx.tokens[start:], input_embeddings=[], positions=list(range(start, end)),
        pages=ctx.pages[:num_pages], last_page_len=end - (num_pages - 1) * ps, mask=[],
        output_indices=[end - start - 1], samplers=[inferlet.top_k_distribution(N, 1.0)], output_masks=[])
    future = raw.forward.submit(0, fwd)
    ctx.num_cached = end
    return future


def norm(score, length):
    """The ranking score of a final beam: its total logprob, divided by length**alpha if --length-penalty."""
    return score / max(length, 1) ** args.length_penalty if args.length_penalty else score


def candidates(out):
    return [(tok, math.log(p) if p > 0 else -math.inf) for tok, p in zip(out.ids, out.values)]


# the prompt: prefill (in passes of at most max_batch_tokens), then the first expansion
budget = inferlet.model_facts().max_batch_tokens
if len(prompt.tokens) > budget:  # too long for one pass: compute all but the last token first
    last = prompt.tokens.pop()
    prompt.flush()
    prompt.tokens.append(last)
if args.max_tokens <= 0:
    prompt.free()
    print(json.dumps({"text": "", "logprob": 0.0, "tokens": [], "prompt_tokens": prompt_tokens, "beams": []})
          if args.json else "")
    raise SystemExit(0)
live = [Beam(prompt, 0.0)]
finished = []  # (score, generated tokens)
steps = 0
pending_futures = [submit(prompt)]
while True:
    outs = [raw.forward.wait(f)[0] for f in pending_futures]
    peak = max(peak, free0 - raw.kv.num_free_pages())
    steps += 1
    ranked = sorted(((b.score + lp, i, tok) for i, (b, out) in enumerate(zip(live, outs))
                     for tok, lp in candidates(out)), key=lambda c: -c[0])
    chosen = []  # (score, parent index, token)
    for score, i, tok in ranked:
        if len(chosen) == N:
            break
        if tok in eos and not args.ignore_eos:
            finished.append((score, live[i].generated))
        else:
            chosen.append((score, i, tok))
    uses = [0] * len(live)
    for _, i, _ in chosen:
        uses[i] += 1
    new_live = []
    for score, i, tok in chosen:
        parent = live[i]
        uses[i] -= 1
        ctx = parent.ctx.fork() if uses[i] > 0 else parent.ctx  # the last use takes the parent over
        ctx.fill_tokens([tok])
        new_live.append(Beam(ctx, score))
    for i, b in enumerate(live):
        if not any(c[1] == i for c in chosen):
            b.ctx.free()  # dropped: its unshared pages go back to the pool
    live = new_live
    best_finished = max((norm(s, len(t) + 1) for s, t in finished), default=-math.inf)
    # scores only decrease: a live beam can at best reach score / max_tokens**alpha (alpha >= 0)
    if (not live or steps >= args.max_tokens
            or best_finished >= max(norm(b.score, args.max_tokens) for b in live)):
        break
    pending_futures = [submit(b.ctx) for b in live]

# finished beams are ranked with their EOS counted in the length (it was scored), live ones without
results = sorted([(s, toks, len(toks) + 1, True) for s, toks in finished] +
                 [(b.score, b.generated, len(b.generated), False) for b in live],
                 key=lambda r: -norm(r[0], r[2]))
for b in live:
    b.ctx.free()
best_score, best_tokens, _, _ = results[0]
text = inferlet.decode(best_tokens)
if args.json:
    print(json.dumps({"text": text, "logprob": best_score, "tokens": list(best_tokens),
                      "prompt_tokens": prompt_tokens,
                      "beams": [{"text": inferlet.decode(t), "logprob": s, "tokens": list(t), "finished": f}
                                for s, t, _, f in results[:N]]}))
else:
    print(text)
if args.stats:
    inferlet.log(json.dumps({"steps": steps, "peak_pages_in_use": peak, "finished": len(finished)}))
