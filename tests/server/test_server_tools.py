"""Tool calling on /v1/chat/completions and /v1/responses, checked with the official `openai` client: calls
generated under the tools' grammar always parse and validate; required, named, auto and none; parallel
calls; tool results in later turns (a whole tool loop); streamed tool_calls deltas; OpenAI-shaped 400s."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

MODEL = "smollm2-135m"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city on a day from now.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24},
        "days": {"type": "integer", "minimum": 0, "maximum": 7},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "days", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
                   "required": ["zone"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
ASK = [{"role": "user", "content": "What is the weather in Paris tomorrow, in celsius?"}]


def assert_valid(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)  # always parses
        jsonschema.validate(args, SCHEMAS[call.function.name])  # and matches its tool's schema


def test_required_and_named_calls_parse_and_validate(openai_client):
    r = openai_client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, CLOCK],
                                              tool_choice="required", temperature=0, max_tokens=80)
    [choice] = r.choices
    assert choice.finish_reason == "tool_calls"
    assert_valid(choice.message.tool_calls)
    named = openai_client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, CLOCK], temperature=0.9, seed=3, max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False)
    [call] = named.choices[0].message.tool_calls  # one call: parallel calls are off
    assert call.function.name == "get_time"
    assert_valid([call])
    # sampled calls, several choices: every one parses and validates
    many = openai_client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                                 temperature=1.2, seed=11, n=4, max_tokens=80)
    for choice in many.choices:
        if choice.finish_reason == "tool_calls":
            assert_valid(choice.message.tool_calls)
        else:  # a call cut short by max_tokens is not returned
            assert choice.finish_reason == "length" and not choice.message.tool_calls


def test_a_whole_tool_loop_and_the_stream_agrees(openai_client, pool_whole):
    """call -> tool result -> answer, with the streamed deltas assembling the same calls."""
    first = openai_client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                                  temperature=0, max_tokens=80, parallel_tool_calls=False)
    [call] = first.choices[0].message.tool_calls
    stream = openai_client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                                   temperature=0, max_tokens=80, parallel_tool_calls=False, stream=True)
    pieces: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or []:
                p = pieces.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                p["id"] = d.id or p["id"]
                p["name"] += (d.function.name or "") if d.function else ""
                p["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and len(pieces) == 1
    assert (pieces[0]["name"], pieces[0]["arguments"]) == (call.function.name, call.function.arguments)
    assert pieces[0]["id"].startswith("call_")

    result = json.dumps({"temperature": 18, "sky": "clear"})
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": result}]
    answer = openai_client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                                   temperature=0, max_tokens=24)
    [choice] = answer.choices
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
    assert choice.message.content and answer.usage.prompt_tokens > first.usage.prompt_tokens  # + call and result
    # the tools, the question and the call are the prompt of the first turn and of the answer: cached
    assert answer.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 2 * 16
    auto = openai_client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="auto",
                                                 temperature=0, max_tokens=24)
    [choice] = auto.choices  # the model answers in text or calls again: either way, well formed
    if choice.finish_reason == "tool_calls":
        assert_valid(choice.message.tool_calls)
    else:
        assert choice.message.content and choice.message.tool_calls is None
    pool_whole()


def test_auto_the_model_starts_a_call_and_the_grammar_takes_over(openai_client):
    """With "auto" the model writes freely until it opens a call (`<tool_call>`); from there the call is
    drawn under the tools' grammar. Greedy, after three turns that each answered with a call, the model
    opens one of its own."""
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    messages = []
    for city in ("Paris", "Rome", "Oslo"):
        messages += [{"role": "user", "content": f"Weather in {city}?"},
                     {"role": "assistant", "content": None, "tool_calls": [{"id": f"c{city}", "type": "function",
                      "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]}]
    messages.append({"role": "user", "content": "Weather in Berlin?"})
    r = openai_client.chat.completions.create(model=MODEL, messages=messages, tools=[tool], tool_choice="auto",
                                              temperature=0, max_tokens=60)
    [choice] = r.choices
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Berlin"}


def test_parallel_calls_are_each_valid(openai_client):
    r = openai_client.chat.completions.create(
        model=MODEL, tools=[WEATHER, CLOCK], tool_choice="required", temperature=0, max_tokens=200,
        messages=[{"role": "user", "content": "Weather in Paris and in Rome today, and the time in UTC."}])
    [choice] = r.choices
    assert choice.finish_reason == "tool_calls"
    assert_valid(choice.message.tool_calls)
    assert len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)


def test_responses_with_tools_and_a_function_call_output(openai_client):
    tool = {"type": "function", **WEATHER["function"]}
    r = openai_client.responses.create(model=MODEL, input=ASK[0]["content"], tools=[tool], tool_choice="required",
                                       temperature=0, max_output_tokens=80, parallel_tool_calls=False)
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS["get_weather"])
    follow = openai_client.responses.create(
        model=MODEL, tools=[tool], tool_choice="none", temperature=0, max_output_tokens=24,
        input=[{"role": "user", "content": ASK[0]["content"]},
               {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name,
                "arguments": calls[0].arguments},
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C, clear"}])
    assert follow.output_text and not [i for i in follow.output if i.type == "function_call"]
    events = list(openai_client.responses.create(model=MODEL, input=ASK[0]["content"], tools=[tool],
                                                 tool_choice="required", temperature=0, max_output_tokens=80,
                                                 parallel_tool_calls=False, stream=True))
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    done = [e for e in events if e.type == "response.function_call_arguments.done"][0]
    assert done.arguments == calls[0].arguments


@pytest.mark.parametrize("kwargs, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "banana"}}}}}]}, "tools[0].function.parameters.properties.x"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools[0].function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0]"),
])
def test_bad_tools_and_tool_choices_get_openai_400s_naming_the_parameter(openai_client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **kwargs)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    assert e.value.body["type"] == "invalid_request_error"


def test_bad_tool_history_gets_a_400(openai_client):
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]}]
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert e.value.body["param"] == "messages[1].tool_calls[0]"
