"""The SDK's program-level API, run in the sandbox: role blocks, `gen` captures, `select` / `score` against
log-probabilities computed independently (one teacher-forced pass per option, raw WIT calls), `fork(n)` +
`gen_all` against decoding each fork alone, and `@inferlet.tool` schemas and a tool loop."""

import json

import pytest

# Scores every option twice: with ctx.score (all options in one masked pass) and independently, one
# plain causal pass over prompt + option on fresh pages with a logprobs sampler at every position that
# predicts an option token. Then select / gen(choices=...) on forks of the same context.
SELECT = """
import json, sys
import inferlet
from inferlet import raw

prompt, options, pending_text = json.loads(sys.argv[1])
P = raw.kv.page_size()

def independent(prefix, option):
    opt = inferlet.encode(option, False)
    seq = prefix + opt
    pages = raw.kv.allocate(-(-len(seq) // P))
    outs = raw.forward.wait(raw.forward.submit(0, raw.forward.ForwardPass(
        tokens=seq, input_embeddings=[], positions=list(range(len(seq))), pages=pages,
        last_page_len=len(seq) - (len(pages) - 1) * P, mask=[],
        output_indices=[len(prefix) - 1 + i for i in range(len(opt))],
        samplers=[inferlet.logprobs([t]) for t in opt], output_masks=[])))
    raw.kv.free(pages)
    return sum(o.values[0] for o in outs)

ctx = inferlet.Context()
ctx.user(prompt)
ctx.assistant()
ctx.flush()                      # the prompt computed: the scoring pass reruns only the last token
ctx += pending_text              # ... plus these pending tokens, when given
reference = [independent(list(ctx.tokens), o) for o in options]
a, b = ctx.fork(2)
before = list(ctx.tokens)
scores = ctx.score(options)
unchanged = ctx.tokens == before
chosen = a.select(options, name="pick")
via_gen = b.gen("pick", choices=options)
after = a.tokens[len(before):] == inferlet.encode(chosen, False)
print(json.dumps({"scores": scores, "reference": reference, "chosen": chosen, "via_gen": via_gen,
                  "capture": a["pick"], "capture_gen": b["pick"], "unchanged": unchanged, "appended": after}))
for c in (ctx, a, b):
    c.free()
"""


@pytest.mark.parametrize("prompt, options, pending", [
    ("What is the capital of France? Answer with one word.", ["Paris", "London", "The capital is Rome"], ""),
    ("Is the sky blue? Answer yes or no.", [" yes", " no", "Yes", "No, it is green"], "My answer:"),
])
def test_select_agrees_with_independent_logprobs(run_inferlet, prompt, options, pending):
    r = json.loads(run_inferlet(None, json.dumps([prompt, options, pending]), source=SELECT).output)
    assert r["scores"] == pytest.approx(r["reference"], abs=2e-3)
    best = options[max(range(len(options)), key=lambda i: r["reference"][i])]
    # the options' scores are far enough apart here that the choice does not hinge on rounding
    assert sorted(r["reference"])[-1] - sorted(r["reference"])[-2] > 0.01
    assert r["chosen"] == r["via_gen"] == r["capture"] == r["capture_gen"] == best
    assert r["unchanged"] and r["appended"]
    assert len(set(round(s, 3) for s in r["scores"])) == len(options)  # distinct options, distinct scores


ROLES = """
import json, sys
import inferlet

system, user, follow_up = json.loads(sys.argv[1])
ctx = inferlet.Context()
ctx.system(system)
ctx.user(user)
with ctx.assistant():
    first = ctx.gen("first", max_tokens=12, stop=["\\n"])
ctx.user(follow_up)
ctx.assistant()
second = ctx.gen("second", max_tokens=8)
ctx.close_role()
# the same conversation rendered whole by the chat template, and generated with the plain Context calls
msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
plain = inferlet.Context()
plain.fill(inferlet.chat_prompt(msgs))
plain_first = plain.generate(max_tokens=12, stop=["\\n"])
print(json.dumps({
    "messages": ctx.messages, "captures": ctx.captures, "first": first, "second": second,
    "plain_first": plain_first,
    "prompt_tokens_match": ctx.tokens[:len(inferlet.encode(inferlet.chat_prompt(msgs), False))]
                           == inferlet.encode(inferlet.chat_prompt(msgs), False),
    "text": ctx.text,
    "rendered": inferlet.chat_prompt(ctx.messages, False),
}))
ctx.free()
plain.free()
"""


def test_role_blocks_and_captures(run_inferlet, runtime):
    system, user, follow_up = "Be brief.", "Name a color.", "Another one?"
    r = json.loads(run_inferlet(None, json.dumps([system, user, follow_up]), source=ROLES).output)
    assert r["prompt_tokens_match"]
    assert r["first"] == r["plain_first"] and r["first"].strip()  # role blocks hold chat_prompt's tokens
    assert r["captures"] == {"first": r["first"], "second": r["second"]}
    assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in r["messages"]][:2] == [system, user]
    assert r["messages"][3]["content"] == follow_up
    # each assistant message is what was generated in its block (the second ran to EOS or 8 tokens)
    assert r["messages"][2]["content"].startswith(r["first"])
    assert r["messages"][4]["content"].startswith(r["second"])
    # the context holds the conversation as the template renders it whole (closing tags included)
    expected = runtime.tokenizer.apply_chat_template(r["messages"], False)
    assert r["text"] == r["rendered"] == expected


PARALLEL = """
import json
import inferlet

ctx = inferlet.Context()
ctx.user("Write one sentence about the sea.")
ctx.assistant()
forks = ctx.fork(3)
together = inferlet.gen_all(forks, "line", max_tokens=10, temperature=0.9, seed=5)
alone = []
for i in range(3):
    c = ctx.fork()
    alone.append(c.gen(max_tokens=10, temperature=0.9, seed=5 + i))
    c.free()
print(json.dumps({"together": together, "alone": alone, "captures": [f["line"] for f in forks]}))
for c in forks + [ctx]:
    c.free()
"""


def test_gen_all_decodes_forks_together_as_each_alone(run_inferlet):
    r = json.loads(run_inferlet(None, source=PARALLEL).output)
    assert r["together"] == r["alone"] == r["captures"]
    assert len(set(r["together"])) > 1  # differently seeded branches


TOOLS = """
import json
from typing import Literal, Optional
import inferlet

calls = []

@inferlet.tool
def get_weather(city: str, unit: Literal["C", "F"] = "C", days: Optional[int] = None) -> dict:
    '''Gets the weather forecast of a city.

    city: the city's name
    unit: the temperature unit
    '''
    calls.append({"city": city, "unit": unit, "days": days})
    return {"city": city, "forecast": "sunny", "temperature": 21}

@inferlet.tool
def add(a: int, b: float, tags: list[str] = ()) -> float:
    '''Adds two numbers.'''
    return a + b

ctx = inferlet.Context(tools=[get_weather, add])
ctx.system("You are a helpful assistant with tools.")
ctx.user("What is the weather in Paris?")
answer = ctx.run_tools(max_rounds=1, max_tokens=48, first="get_weather")
print(json.dumps({"schemas": [get_weather.spec, add.spec], "calls": calls, "answer": answer,
                  "messages": ctx.messages, "direct": add(a=2, b=0.5), "error": add(a=1)}))
ctx.free()
"""


def test_tool_schemas_and_a_tool_loop(run_inferlet):
    r = json.loads(run_inferlet(None, source=TOOLS).output)
    weather, add = r["schemas"]
    assert weather == {"name": "get_weather", "description": "Gets the weather forecast of a city.", "parameters": {
        "type": "object", "required": ["city"], "additionalProperties": False, "properties": {
            "city": {"type": "string", "description": "the city's name"},
            "unit": {"enum": ["C", "F"], "description": "the temperature unit"},
            "days": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}}}
    assert add["parameters"]["properties"] == {"a": {"type": "integer"}, "b": {"type": "number"},
                                               "tags": {"type": "array", "items": {"type": "string"}}}
    assert add["parameters"]["required"] == ["a", "b"]
    assert r["direct"] == "2.5" and r["error"].startswith("error: TypeError")
    # the forced first call went to get_weather, with arguments its schema admits
    assert len(r["calls"]) >= 1
    call = r["calls"][0]
    assert isinstance(call["city"], str) and call["unit"] in ("C", "F")
    assert call["days"] is None or isinstance(call["days"], int)
    roles = [m["role"] for m in r["messages"]]
    assert roles[:3] == ["system", "user", "assistant"]
    assert "<tool_call>" in r["messages"][2]["content"]  # the call, as the prompt renders calls
    # the tool's result was appended (as a tool response) before the final answer
    result = next(m for m in r["messages"][3:] if "sunny" in m["content"])
    assert json.loads(result["content"].split("<tool_response>")[-1].split("</tool_response>")[0]) == \
        {"city": call["city"], "forecast": "sunny", "temperature": 21}
    assert roles[-1] == "assistant" and r["messages"][-1]["content"].startswith(r["answer"])
