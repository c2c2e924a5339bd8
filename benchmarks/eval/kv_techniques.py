"""3. KV techniques: an inferlet that reuses KV (shares pages, keeps them across steps, exports a prefix,
verifies drafts) vs the same result obtained without that control.

- prefix cache (prefix_cache.py: the first launch computes and exports the system prompt's KV, later
  launches import it) vs text_completion with the same system + prompt (full prefill every time); the
  prompts one after another, then all at once. Greedy: the texts must be equal.
- beam search (beam_search.py: N beams forked from one context, every step's N passes batched) vs beam
  search driven from outside through the plain API: each beam expansion is a /v1/completions request of
  the full text with max_tokens=1 and logprobs=N (the N expansions of a step sent concurrently).
- tree of thought (tree_of_thought.py: children forked from their parent, scored with a question that is
  then truncated away) vs the same search from outside: per kept node one /v1/completions request with
  n=breadth (temperature 0.8, stop "\\n"), a max_tokens=1 / logprobs=5 request per child to score it
  (P(" yes") against P(" no")), the best kept, the answer requested on the best path.
- speculative decoding (speculative_decoding.py: prompt-lookup drafts verified in one pass) vs plain
  text_completion, greedy (the same text): tokens/s and forward passes per generated token.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics

from harness import Endpoint, Meter, launch_all

PREFIX_SYSTEM = (
    "You are the customer support assistant of Northwind Rail, a regional train company. Follow these rules. "
    "1. Be polite and brief: answer in one or two sentences. 2. Tickets can be refunded up to 24 hours before "
    "departure; after that, only a voucher is possible. 3. Children under 6 travel free; children from 6 to "
    "15 pay half price. 4. Bicycles need a bicycle ticket and are not allowed on trains between 7 and 9 in "
    "the morning. 5. Pets under 10 kg travel free in a carrier; larger dogs pay a child fare and must be on "
    "a leash. 6. Seat reservations cost 4 euros and can be changed for free until departure. 7. The first "
    "class lounge is open to first class ticket holders at the main stations. 8. Delays of more than 60 "
    "minutes give a refund of 25 percent, more than 120 minutes 50 percent. 9. Lost items are kept for 30 "
    "days at the central lost and found office. 10. Never make up information: if you do not know, say "
    "that the customer should call the service line.")
PREFIX_PROMPTS = ["Can I get my money back for a ticket for tomorrow?", "Does my 4 year old need a ticket?",
                  "Can I take my bike at 8 am?", "My dog weighs 20 kg. What does he pay?",
                  "How much is a seat reservation?", "My train was 90 minutes late. What do I get?",
                  "I lost my umbrella on the train.", "Can I use the lounge with a second class ticket?"]

BEAM_PROMPT = "Once upon a time, in a small village by the sea, there lived"
TOT_PROBLEM = "How can a student save 100 euros in one month?"
TOT_QUESTION = " Is this step correct? Answer yes or no:"  # tree_of_thought.py's scoring question
SPEC_PROMPT = ("Write a Python function that returns the sum of a list of numbers, with a docstring and three "
               "example calls.")  # code: the prompt-lookup drafter gets some, not all, of it right


def _row(rows, app, metric, baseline_name, base, inf, higher_is_better, details, goal="> 1x", c=1):
    ratio = (inf / base) if higher_is_better else (base / inf)
    rows.append({"section": "kv", "application": app, "concurrency": c, "metric": metric,
                 "baseline_name": baseline_name, "baseline": base, "inferlet": inf, "ratio": ratio,
                 "ratio_kind": "speedup", "goal": goal, "met": ratio > 1.0, "details": details})


# ---- prefix cache --------------------------------------------------------------------------------------------

def run_prefix(stack, p, rows, log) -> None:
    rt, model = stack.runtime, stack.model
    prompts = PREFIX_PROMPTS[:p.prefix_prompts]
    common = ["--system", PREFIX_SYSTEM, "--max-tokens", p.prefix_max_tokens, "--temperature", "0"]
    launch_all(rt, [("prefix_cache", ["--system", PREFIX_SYSTEM, "--drop"], {})])  # no stale export
    try:
        with Meter(model) as cold:
            first = launch_all(rt, [("prefix_cache", common + ["--prompt", prompts[0], "--json"], {})])[0]
        first_report = first.json()
        inf_seq, base_seq, inf_tok, base_tok, same = [], [], [], [], True
        for prompt in prompts[1:]:
            with Meter(model) as mi:
                r = launch_all(rt, [("prefix_cache", common + ["--prompt", prompt, "--json"], {})])[0]
            with Meter(model) as mb:
                b = launch_all(rt, [("text_completion", common + ["--prompt", prompt], {})])[0]
            report = r.json()
            assert report["imported"], report
            same &= report["text"] == b.output.removesuffix("\n")
            inf_seq.append(r.latency_s), base_seq.append(b.latency_s)
            inf_tok.append(mi.tokens), base_tok.append(mb.tokens)
        with Meter(model) as mi_burst:
            launch_all(rt, [("prefix_cache", common + ["--prompt", q], {}) for q in prompts[1:]])
        with Meter(model) as mb_burst:
            launch_all(rt, [("text_completion", common + ["--prompt", q], {}) for q in prompts[1:]])
    finally:
        launch_all(rt, [("prefix_cache", ["--system", PREFIX_SYSTEM, "--drop"], {})])
    details = {"prompts": len(prompts), "prefix_tokens": first_report["prefix_tokens"],
               "prompt_tokens_first": first_report["prompt_tokens"], "max_tokens": p.prefix_max_tokens,
               "first_launch": {"latency_s": first.latency_s, **cold.record()},
               "same_text_as_text_completion": same,
               "tokens_computed_per_request": {"baseline": statistics.mean(base_tok),
                                               "inferlet": statistics.mean(inf_tok)},
               "burst": {"baseline": mb_burst.record(), "inferlet": mi_burst.record()}}
    name = "text_completion, full prefill"
    _row(rows, "prefix cache", "mean latency s (warm, one at a time)", name, statistics.mean(base_seq),
         statistics.mean(inf_seq), False, details)
    _row(rows, "prefix cache", "tokens computed per request", name, statistics.mean(base_tok),
         statistics.mean(inf_tok), False, {})
    _row(rows, "prefix cache", f"wall s, {len(prompts) - 1} requests at once", name, mb_burst.wall, mi_burst.wall,
         False, {}, c=len(prompts) - 1)
    log(f"prefix cache: text_completion {statistics.mean(base_seq):.2f} s / {statistics.mean(base_tok):.0f} tokens, "
        f"prefix_cache {statistics.mean(inf_seq):.2f} s / {statistics.mean(inf_tok):.0f} tokens; same text: {same}")


# ---- beam search ---------------------------------------------------------------------------------------------

async def beam_client(ep: Endpoint, prompt: str, beams: int, steps: int) -> dict:
    """Beam search through /v1/completions: every step, one max_tokens=1 request with logprobs=N per live
    beam (the full text each time), all of a step's requests at once."""
    live = [(0.0, "")]
    for _ in range(steps):
        resps = await asyncio.gather(*(ep.complete(prompt + g, 1, logprobs=beams) for _, g in live))
        cands = []
        for (score, g), resp in zip(live, resps):
            lp = resp.choices[0].logprobs
            if lp is None or not lp.top_logprobs:  # the greedy token was EOS: the server returns no token
                continue
            cands += [(score + l, g + t) for t, l in lp.top_logprobs[0].items()]
        if not cands:
            break
        live = sorted(cands, key=lambda c: -c[0])[:beams]
    return {"text": live[0][1], "logprob": live[0][0]}


def run_beam(stack, p, rows, log) -> None:
    model = stack.model
    args = ["--prompt", BEAM_PROMPT, "--raw", "--beams", p.beams, "--max-tokens", p.beam_tokens, "--ignore-eos",
            "--json", "--stats"]
    with Meter(model) as mi:
        r = launch_all(stack.runtime, [("beam_search", args, {})])[0]
    report = r.json()

    async def client():
        async with Endpoint(stack.base_url, stack.model_name, stack.api_key) as ep:
            return await beam_client(ep, BEAM_PROMPT, p.beams, p.beam_tokens), ep.requests

    with Meter(model) as mb:
        (out, requests) = asyncio.run(client())
    details = {"beams": p.beams, "tokens": p.beam_tokens, "prompt_tokens": len(report["prompt_tokens"]),
               "same_best_beam": out["text"] == report["text"],
               "baseline": {**mb.record(), "requests": requests, "best_logprob": out["logprob"],
                            "text": out["text"]},
               "inferlet": {**mi.record(), "best_logprob": report["logprob"], "text": report["text"],
                            "stats": r.log.strip()[-300:]}}
    name = "client beam search over /v1/completions (max_tokens=1, logprobs=N)"
    _row(rows, f"beam search ({p.beams} beams)", "wall s", name, mb.wall, mi.wall, False, details)
    _row(rows, f"beam search ({p.beams} beams)", "tokens computed", name, mb.tokens, mi.tokens, False, {})
    log(f"beam search: client {mb.wall:.2f} s ({requests} requests, {mb.tokens} tokens computed), inferlet "
        f"{mi.wall:.2f} s ({mi.tokens} tokens computed)")


# ---- tree of thought -----------------------------------------------------------------------------------------

def _yes_score(resp) -> float:
    lp = resp.choices[0].logprobs
    top = lp.top_logprobs[0] if lp is not None and lp.top_logprobs else {}
    if " yes" not in top and " no" not in top:
        return 0.5
    floor = min(top.values()) - 1.0  # a token outside the top 5 is less likely than all of them
    yes, no = top.get(" yes", floor), top.get(" no", floor)
    return 1.0 / (1.0 + math.exp(no - yes))


async def tot_client(ep: Endpoint, stack, p) -> dict:
    root = stack.chat_text([{"role": "system", "content": "Solve the problem step by step, one short step per line."},
                            {"role": "user", "content": TOT_PROBLEM}])
    kept = [root]
    for depth in range(1, p.tot_depth + 1):
        heads = [node + ("" if depth == 1 else "\n") + f"Step {depth}:" for node in kept]
        resps = await asyncio.gather(*(ep.complete(h, p.tot_step_tokens, temperature=0.8, stop=["\n"],
                                                   n=p.tot_breadth, seed=p.seed + k) for k, h in enumerate(heads)))
        children = [h + c.text for h, r in zip(heads, resps) for c in r.choices]
        scores = [_yes_score(r) for r in await asyncio.gather(*(ep.complete(c + TOT_QUESTION, 1, logprobs=5)
                                                                 for c in children))]
        order = sorted(range(len(children)), key=lambda i: -scores[i])[:p.tot_beam]
        kept = [children[i] for i in order]
    resp = await ep.complete(kept[0] + "\nAnswer:", p.tot_answer_tokens, stop=["\n"])
    return {"answer": resp.choices[0].text.strip()}


def run_tot(stack, p, rows, log) -> None:
    model = stack.model
    args = ["--problem", TOT_PROBLEM, "--breadth", p.tot_breadth, "--depth", p.tot_depth, "--beam", p.tot_beam,
            "--step-tokens", p.tot_step_tokens, "--answer-tokens", p.tot_answer_tokens, "--temperature", "0.8",
            "--seed", p.seed, "--json"]
    with Meter(model) as mi:
        r = launch_all(stack.runtime, [("tree_of_thought", args, {})])[0]
    report = r.json()

    async def client():
        async with Endpoint(stack.base_url, stack.model_name, stack.api_key) as ep:
            return await tot_client(ep, stack, p), ep.requests

    with Meter(model) as mb:
        out, requests = asyncio.run(client())
    app = f"tree of thought ({p.tot_breadth}x{p.tot_depth}, beam {p.tot_beam})"
    details = {"breadth": p.tot_breadth, "depth": p.tot_depth, "beam": p.tot_beam, "step_tokens": p.tot_step_tokens,
               "baseline": {**mb.record(), "requests": requests, "answer": out["answer"]},
               "inferlet": {**mi.record(), "answer": report["answer"], "computed": report["computed"],
                            "computed_unshared": report["computed_unshared"]}}
    name = "client search over /v1/completions (n=breadth, logprobs scoring)"
    _row(rows, app, "wall s", name, mb.wall, mi.wall, False, details)
    _row(rows, app, "tokens computed", name, mb.tokens, mi.tokens, False, {})
    log(f"tree of thought: client {mb.wall:.2f} s ({requests} requests, {mb.tokens} tokens computed), inferlet "
        f"{mi.wall:.2f} s ({mi.tokens} tokens computed)")


# ---- speculative decoding --------------------------------------------------------------------------------------

def run_spec(stack, p, rows, log) -> None:
    model = stack.model
    args = ["--prompt", SPEC_PROMPT, "--max-tokens", p.spec_tokens, "--temperature", "0"]
    best_i = best_b = None
    for _ in range(p.repeats):
        with Meter(model) as mb:
            b = launch_all(stack.runtime, [("text_completion", args, {})])[0]
        with Meter(model) as mi:
            r = launch_all(stack.runtime, [("speculative_decoding", args + ["--stats"], {})])[0]
        if best_b is None or mb.wall < best_b[0].wall:
            best_b = (mb, b)
        if best_i is None or mi.wall < best_i[0].wall:
            best_i = (mi, r)
    (mb, b), (mi, r) = best_b, best_i
    stats = json.loads(r.log.strip().splitlines()[-1])
    generated = stats["generated"]
    same = r.output == b.output
    details = {"max_tokens": p.spec_tokens, "generated": generated, "same_text": same, "stats": stats,
               "baseline": mb.record(), "inferlet": mi.record(),
               "passes_per_token": {"baseline": mb.passes / generated, "inferlet": mi.passes / generated}}
    name = "text_completion, greedy"
    _row(rows, "speculative decoding (n-gram)", "tokens/s", name, generated / mb.wall, generated / mi.wall, True,
         details)
    _row(rows, "speculative decoding (n-gram)", "forward passes per token", name, mb.passes / generated,
         mi.passes / generated, False, {})
    log(f"speculative: text_completion {generated / mb.wall:.1f} tok/s ({mb.passes} passes), speculative "
        f"{generated / mi.wall:.1f} tok/s ({mi.passes} passes, acceptance {stats.get('acceptance')}); same: {same}")
