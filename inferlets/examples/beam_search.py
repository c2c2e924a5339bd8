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

import json
import math

import inferlet

parser = inferlet.ArgParser("beam_search", omit=("temperature", "top_p", "top_k", "min_p", "seed", "stop"), max_tokens=32,
                            helps={"ignore_eos": "EOS is an ordinary token"})
parser.add_argument("--beams", type=int, default=4, help="beam width N")
parser.add_argument("--length-penalty", type=float, default=0.0,
                    help="rank final beams by logprob / length**ALPHA (0 = total logprob)")
parser.add_argument("--json", action="store_true", help="print a JSON object with the score and the beams")
parser.add_argument("--stats", action="store_true", help="log steps and the peak pages in use to stderr")
args = parser.parse_args()
if args.beams < 1 or args.length_penalty < 0:
    parser.error("--beams must be >= 1 and --length-penalty >= 0")
N, eos, free0, root = args.beams, inferlet.model_facts().eos_ids, inferlet.num_free_pages(), args.context()
prompt, rank = list(root.tokens), lambda score, length: score / max(length, 1) ** args.length_penalty
live, finished, steps, peak = [(0.0, root)], [], 0, 0  # (score, context) / (score, generated tokens)
while steps < args.max_tokens:
    outs = inferlet.step_all([ctx for _, ctx in live], [inferlet.top_k_distribution(N)])
    peak, steps, parents, live, chosen = max(peak, free0 - inferlet.num_free_pages()), steps + 1, live, [], []
    for score, i, token in sorted(((s + (math.log(p) if p > 0 else -math.inf), i, t) for i, ((s, _), (out,))
                                   in enumerate(zip(parents, outs)) for t, p in zip(out.ids, out.values)),
                                  key=lambda c: -c[0])[:2 * N]:
        if token in eos and not args.ignore_eos and len(chosen) < N:  # a finished beam
            finished.append((score, parents[i][1].tokens[len(prompt):]))
        elif len(chosen) < N:
            chosen.append((score, i, token))
    for k, (score, i, token) in enumerate(chosen):  # the last use of a parent takes it over, others fork it
        ctx = parents[i][1] if all(j != i for _, j, _ in chosen[k + 1:]) else parents[i][1].fork()
        ctx.fill_tokens([token])
        live.append((score, ctx))
    for i, (_, ctx) in enumerate(parents):
        if all(j != i for _, j, _ in chosen):
            ctx.free()  # dropped: its unshared pages go back to the pool
    best_finished = max((rank(s, len(t) + 1) for s, t in finished), default=-math.inf)
    if not live or best_finished >= max(rank(s, args.max_tokens) for s, _ in live):  # scores only decrease
        break
# finished beams are ranked with their EOS counted in the length (it was scored), live ones without
results = sorted([(s, t, len(t) + 1, True) for s, t in finished] +
                 [(s, ctx.tokens[len(prompt):], len(ctx.tokens) - len(prompt), False) for s, ctx in live],
                 key=lambda r: -rank(r[0], r[2]))
for _, ctx in live:
    ctx.free()
score, tokens = results[0][:2]
beams = [{"text": inferlet.decode(t), "logprob": s, "tokens": t, "finished": f} for s, t, _, f in results[:N]]
print(json.dumps({"text": inferlet.decode(tokens), "logprob": score, "tokens": tokens, "prompt_tokens": prompt,
                  "beams": beams if steps else []}) if args.json else inferlet.decode(tokens))
if args.stats:
    inferlet.log(json.dumps({"steps": steps, "peak_pages_in_use": peak, "finished": len(finished)}))
