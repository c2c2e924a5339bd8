"""One choice of an OpenAI-style request: what `pie serve` runs for /v1/chat/completions, /v1/completions
and /v1/responses (n > 1: one instance per choice, batched by the server).

argv[1] is the request, checked and normalised by the server (pie/server/openai_api.py), as JSON:
    {"messages": [{"role", "content"}] | "prompt": str, "max_tokens": int, "temperature": float,
     "top_p": float, "seed": int | null, "stop": [str], "logprobs": bool, "top_logprobs": int,
     "json_schema": str | null, "tools": [{"name", "description", "parameters"}], "tool_choice": "auto" |
     "required" | "none" | <a tool's name>, "parallel_tool_calls": bool}
(messages may carry an assistant's "tool_calls" [{"id", "name", "arguments"}] and a tool result's
"tool_call_id"). With tools it also sends {"tool_call": {"index", "name", "arguments"}} as each call is
complete, and its final message has "tool_calls" and finish_reason "tool_calls" when it made any.
It sends JSON messages: {"delta": str, "logprobs": [{"token", "logprob", "top": [[token, logprob]]}]}
as it generates (the host runs the decode loop: a generation stream with the top 20 tokens of each
step; a token drawn outside them gets its logprob from one more pass at the end), then {"text", "finish_reason": "stop" | "length", "prompt_tokens", "completion_tokens", "cached_tokens"}.
Automatic prefix caching: the prompt's full pages already computed by an earlier request (the server's /v1
instances share one prefix cache) are reused, not computed again (`cached_tokens` of them); when the
generation ends the SDK files the sequence's full pages (prompt and answer) for later requests.
A greedy chat request generates exactly what `text_completion` generates for the same prompt.

    pie run openai_chat -- '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16,
                              "temperature": 0, "top_p": 1, "seed": null, "stop": [], "logprobs": false,
                              "top_logprobs": 0, "json_schema": null}'
"""

import json
import math
import sys

import inferlet

TOP_K_CHECK = 20  # the drawn token's log-probability comes from the top 20 when it is among them

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


def token_text(token: int) -> str:
    return inferlet.decode([token], skip_special=False)


def logprob_entry(token: int, top: tuple, lp: float) -> dict:
    """{"token", "logprob", "top"} of a token drawn where `top` ((ids, probabilities), temperature 1) is
    the distribution it was drawn from."""
    ids, probs = top
    return {"token": token_text(token), "logprob": lp,
            "top": [[token_text(t), math.log(max(p, 1e-45))] for t, p in list(zip(ids, probs))[:num_top]]}


def logprob_in_top(token: int, top: tuple) -> float | None:
    probs = dict(zip(*top))
    return math.log(max(probs[token], 1e-45)) if token in probs else None


def logprob_by_pass(ctx, position: int, token: int) -> float:
    """log p(token at `position`): one pass running the token before it again (its K/V is rewritten
    with the same values), for a drawn token outside the top distribution the stream gave."""
    ps = ctx.page_size
    num_pages = -(-position // ps)
    fwd = inferlet.raw.forward
    out = fwd.wait(fwd.submit(0, fwd.ForwardPass(
        tokens=[ctx.tokens[position - 1]], input_embeddings=[], positions=[position - 1],
        pages=ctx.pages[:num_pages], last_page_len=position - (num_pages - 1) * ps, mask=[],
        output_indices=[0], samplers=[inferlet.logprobs([token])], output_masks=[])))
    return out[0].values[0]


tools = spec.get("tools") or []
with_tool_history = any(m.get("tool_calls") or m["role"] == "tool" for m in spec.get("messages", []))

ctx = inferlet.Context(adapter=spec.get("adapter"))  # a LoRA adapter named by the request's model
if tools or with_tool_history:  # the tools and the earlier calls and results in the prompt
    from inferlet.tool_calls import generate_with_tools, tool_prompt

    ctx.fill(tool_prompt(spec["messages"], tools))
elif "messages" in spec:
    if inferlet.model_facts().has_chat_template:
        ctx.fill(inferlet.chat_prompt(spec["messages"]))
    else:
        ctx.fill_tokens(inferlet.encode("\n\n".join(m["content"] for m in spec["messages"])))
else:
    ctx.fill_tokens(inferlet.encode(spec["prompt"]))
prompt_tokens = len(ctx.tokens)
cached_tokens = ctx.use_prefix_cache()

if tools and spec["tool_choice"] != "none":  # tool calling (docs/tool_calling.md): text, then calls
    # generated under the tools' grammar (with "none" the tools are in the prompt, and the answer is text)
    sampler = inferlet.sample(temperature, 0, top_p, 0.0, seed)
    text, calls, finish = generate_with_tools(
        ctx, tools, spec["tool_choice"], spec["parallel_tool_calls"], max_tokens, sampler, stop,
        on_text=lambda piece: emit({"delta": piece}),
        on_call=lambda index, call: emit({"tool_call": {"index": index, **call}}))
    emit({"text": text, "tool_calls": calls, "finish_reason": finish, "prompt_tokens": prompt_tokens,
          "completion_tokens": len(ctx.tokens) - prompt_tokens, "cached_tokens": cached_tokens})
    sys.exit(0)

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
          "prompt_tokens": prompt_tokens, "completion_tokens": num_generated, "cached_tokens": cached_tokens})
    sys.exit(0)

# The host runs the decode loop (a generation stream); this program turns its tokens into deltas.
sampler = inferlet.sample(temperature, 0, top_p, 0.0, seed)
stream = ctx.stream(max_tokens, sampler, stop, top_logprobs=max(TOP_K_CHECK, num_top) if want_logprobs else 0)
hold = max((len(s) for s in stop), default=1) - 1  # characters kept back: a stop string may be starting
generated: list = []
entries: list = []  # one per generated token (want_logprobs); None until its logprob is known
outside_top: dict = {}  # index of a token drawn outside its top distribution -> that distribution
num_sent = num_entries_sent = 0
text = ""


def send_ready(final: bool) -> None:
    """Sends the text that can no longer change (all of it once final), and the logprob entries known
    in order (a token outside the top distribution holds the later ones until the end)."""
    global num_sent, num_entries_sent
    safe = len(text) if final else len(text) - hold
    while not final and safe > num_sent and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 sequence
        safe -= 1
    ready = num_entries_sent
    while ready < len(entries) and entries[ready] is not None:
        ready += 1
    if ready < len(entries) and not final:  # the text goes with its tokens' entries: hold the rest too
        safe = min(safe, len(inferlet.decode(generated[:ready])))
    new_entries = entries[num_entries_sent:ready]
    if safe > num_sent or new_entries:
        emit({"delta": text[num_sent:max(safe, num_sent)], **({"logprobs": new_entries} if new_entries else {})})
        num_sent = max(safe, num_sent)
        num_entries_sent = ready


for chunk in stream:
    for i, token in enumerate(chunk.tokens):
        generated.append(token)
        if want_logprobs:
            lp = logprob_in_top(token, chunk.top[i])
            entries.append(None if lp is None else logprob_entry(token, chunk.top[i], lp))
            if lp is None:
                outside_top[len(entries) - 1] = chunk.top[i]
    text = stream.text if stream.ended else inferlet.decode(generated)
    send_ready(final=False)
for i, top in outside_top.items():  # tokens drawn outside the top distribution: one pass each
    entries[i] = logprob_entry(generated[i], top, logprob_by_pass(ctx, prompt_tokens + i, generated[i]))
text = stream.text
send_ready(final=True)
finish = "length" if stream.reason == "length" else "stop"
emit({"text": text, "finish_reason": finish, "prompt_tokens": prompt_tokens, "completion_tokens": len(generated),
      "cached_tokens": cached_tokens})
ctx.free()
