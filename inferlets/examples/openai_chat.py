"""One choice of an OpenAI-style request: what `pie serve` runs for /v1/chat/completions, /v1/completions
and /v1/responses (n > 1: one instance per choice, batched by the server).

argv[1] is the request, checked and normalised by the server (pie/server/openai_api.py), as JSON:
    {"messages": [{"role", "content"}] | "prompt": str, "max_tokens": int, "temperature": float,
     "top_p": float, "seed": int | null, "stop": [str], "logprobs": bool, "top_logprobs": int,
     "json_schema": str | null}
It sends JSON messages: {"delta": str, "logprobs": [{"token", "logprob", "top": [[token, logprob]]}]}
as it generates, then {"text", "finish_reason": "stop" | "length", "prompt_tokens", "completion_tokens"}.
A greedy chat request generates exactly what `text_completion` generates for the same prompt.

    pie run openai_chat -- '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16,
                              "temperature": 0, "top_p": 1, "seed": null, "stop": [], "logprobs": false,
                              "top_logprobs": 0, "json_schema": null}'
"""

import json
import math
import sys

import inferlet

TOP_K_CHECK = 20  # the chosen token's log-probability comes from the top 20 when it is among them

spec = json.loads(sys.argv[1])
max_tokens = spec["max_tokens"]
temperature = spec["temperature"]
top_p = spec["top_p"]
seed = spec["seed"]
stop = spec["stop"]
want_logprobs = spec["logprobs"]
num_top = spec["top_logprobs"]


def emit(message: dict) -> None:
    inferlet.send(json.dumps(message))


def step_sampler(step: int):
    """The step-th token's sampler: a seeded request derives one seed per step (as Context.generate)."""
    if temperature == 0:
        return inferlet.greedy()
    step_seed = None if seed is None else (seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF
    return inferlet.sample(temperature, 0, top_p, 0.0, step_seed)


def token_text(token: int) -> str:
    return inferlet.decode([token], skip_special=False)


def logprob_entry(ctx, token: int, dist) -> dict:
    """{"token", "logprob", "top"} of `token`, just drawn at the context's last position. `dist` is the
    top-k distribution (temperature 1) taken in the same pass; a token outside it costs one pass more
    (the last position run again with a logprobs sampler: its K/V is rewritten with the same values)."""
    probs = dict(zip(dist.ids, dist.values))
    if token in probs:
        lp = math.log(max(probs[token], 1e-45))
    else:
        ctx.num_cached -= 1
        lp = ctx.step([inferlet.logprobs([token])])[0].values[0]
    top = [[token_text(t), math.log(max(p, 1e-45))] for t, p in list(zip(dist.ids, dist.values))[:num_top]]
    return {"token": token_text(token), "logprob": lp, "top": top}


ctx = inferlet.Context()
if "messages" in spec:
    if inferlet.model_facts().has_chat_template:
        ctx.fill(inferlet.chat_prompt(spec["messages"]))
    else:
        ctx.fill_tokens(inferlet.encode("\n\n".join(m["content"] for m in spec["messages"])))
else:
    ctx.fill_tokens(inferlet.encode(spec["prompt"]))
prompt_tokens = len(ctx.tokens)

if spec.get("json_schema") is not None:
    if not hasattr(inferlet, "Grammar"):
        raise NotImplementedError("not implemented yet: grammar-constrained generation (inferlet.Grammar) "
                                  "is not in this SDK")
    grammar = inferlet.Grammar.json_schema(spec["json_schema"])
    sampler = inferlet.sample(temperature, 0, top_p, 0.0, seed)
    text = ctx.generate(max_tokens=max_tokens, sampler=sampler, stop=stop, grammar=grammar)
    num_generated = len(ctx.tokens) - prompt_tokens
    emit({"delta": text})
    emit({"text": text, "finish_reason": "length" if num_generated >= max_tokens else "stop",
          "prompt_tokens": prompt_tokens, "completion_tokens": num_generated})
    sys.exit(0)

eos = inferlet.model_facts().eos_ids
hold = max((len(s) for s in stop), default=1) - 1  # characters kept back: a stop string may be starting
generated: list = []
num_sent = 0
finish = "length"
text = ""
for step in range(max_tokens):
    samplers = [step_sampler(step)]
    if want_logprobs:
        samplers.append(inferlet.top_k_distribution(TOP_K_CHECK, 1.0))
    outs = ctx.step(samplers)
    token = outs[0].ids[0]
    if token in eos:
        finish = "stop"
        break
    entries = [logprob_entry(ctx, token, outs[1])] if want_logprobs else []
    ctx.tokens.append(token)
    generated.append(token)
    text = inferlet.decode(generated)
    if stop:
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
            finish = "stop"
            if entries or len(text) > num_sent:
                emit({"delta": text[num_sent:], **({"logprobs": entries} if entries else {})})
                num_sent = len(text)
            break
    safe = len(text) - hold
    while safe > num_sent and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 sequence: wait for its end
        safe -= 1
    if safe > num_sent or entries:
        emit({"delta": text[num_sent:max(safe, num_sent)], **({"logprobs": entries} if entries else {})})
        num_sent = max(safe, num_sent)
if len(text) > num_sent:
    emit({"delta": text[num_sent:]})
emit({"text": text, "finish_reason": finish, "prompt_tokens": prompt_tokens, "completion_tokens": len(generated)})
ctx.free()
