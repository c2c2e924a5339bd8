"""Tool calling: tools in the prompt, and calls generated under the grammar of the tools' JSON schemas
(what openai_chat runs for `tools` / `tool_choice` on /v1; docs/tool_calling.md).

A tool is {"name", "description", "parameters"} (parameters: a JSON schema of the arguments object). A
call is {"name", "arguments"} (arguments: the JSON text of the object).

- `tool_prompt(messages, tools)`: the prompt. The model's chat template renders the tools when it reads
  `tools`; otherwise the default rendering: the tools described in the system message, each earlier call
  as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in its assistant message, and each tool
  result as a user message `<tool_response>...</tool_response>`.
- `generate_with_tools(ctx, tools, choice, parallel, ...)`: text and calls. With choice "required" or a
  tool's name the answer starts with a call; with "auto" the model writes text until it starts a call
  (`<tool_call>`), and from that moment the call is generated under the grammar. A call's JSON is drawn
  under a schema that admits exactly the tools' names with their own argument schemas, so it always
  parses and its arguments match their schema.

    from inferlet.tool_calls import tool_prompt, generate_with_tools
"""

import json
from typing import Callable, Optional, Sequence

import inferlet
from inferlet import Grammar

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# Free text the model may write after a call, looking for another one (parallel calls), before it stops.
MAX_TEXT_BETWEEN_CALLS = 24

DEFAULT_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query. The functions, as JSON "
    "signatures, within <tools></tools>:\n<tools>\n{tools}\n</tools>\n\nTo call a function, answer with a JSON "
    "object of its name and arguments within <tool_call></tool_call> tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <arguments-object>}}\n</tool_call>')


def template_reads_tools() -> bool:
    """Whether the model's chat template renders `tools` itself."""
    source = inferlet.raw.tokenizer.chat_template()
    return source is not None and "tools" in source


def _tool_json(tool: dict) -> dict:
    return {"type": "function", "function": {"name": tool["name"], "description": tool.get("description", ""),
                                             "parameters": tool["parameters"]}}


def _call_text(call: dict) -> str:
    return f'{CALL_OPEN}\n{{"name": {json.dumps(call["name"])}, "arguments": {call["arguments"]}}}\n{CALL_CLOSE}'


def default_messages(messages: Sequence[dict], tools: Sequence[dict]) -> list:
    """The messages with the tools, the earlier calls and the tool results as plain text (roles system,
    user and assistant only), for a template that does not read `tools`."""
    out = []
    header = DEFAULT_TOOLS_HEADER.format(tools="\n".join(json.dumps(_tool_json(t)) for t in tools)) if tools else ""
    rest = list(messages)
    if header:
        if rest and rest[0]["role"] == "system":
            out.append({"role": "system", "content": rest[0]["content"] + "\n\n" + header})
            rest = rest[1:]
        else:
            out.append({"role": "system", "content": header})
    for m in rest:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            parts = ([m["content"]] if m.get("content") else []) + [_call_text(c) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def tool_prompt(messages: Sequence[dict], tools: Sequence[dict]) -> str:
    """The prompt of a conversation with tools, ending where the assistant's answer starts."""
    if not inferlet.model_facts().has_chat_template:
        return "\n\n".join(m["content"] for m in default_messages(messages, tools))
    if tools and template_reads_tools():
        msgs = []
        for m in messages:
            msg = {"role": m["role"], "content": m["content"]}
            if m.get("tool_calls"):
                msg["tool_calls"] = [{"type": "function", "function": {"name": c["name"],
                                                                       "arguments": json.loads(c["arguments"])}}
                                     for c in m["tool_calls"]]
            if m.get("tool_call_id"):
                msg["tool_call_id"] = m["tool_call_id"]
            msgs.append(msg)
        return inferlet.raw.tokenizer.apply_chat_template_json(
            json.dumps(msgs), json.dumps([_tool_json(t) for t in tools]), True)
    return inferlet.chat_prompt(default_messages(messages, tools))


def call_schema(tools: Sequence[dict]) -> dict:
    """The JSON schema of one call to one of `tools`: {"name": <its name>, "arguments": <its schema>}."""
    options = [{"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
                "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def generate_with_tools(ctx, tools: Sequence[dict], choice, parallel: bool, max_tokens: int, sampler,
                        stop: Sequence[str] = (), on_text: Optional[Callable[[str], None]] = None,
                        on_call: Optional[Callable[[int, dict], None]] = None) -> tuple:
    """(text, calls, finish_reason) of the answer to the prompt in `ctx`: choice "auto", "required" or a
    tool's name. finish_reason: "tool_calls" (at least one call), "length" (max_tokens ran out, a call
    cut short is dropped) or "stop". on_text(piece) gets the text before the first call as it comes;
    on_call(index, call) each call once complete."""
    allowed = [t for t in tools if choice in ("auto", "required") or t["name"] == choice]
    if not allowed:
        raise ValueError(f"tool_choice: no tool named {choice!r}")
    schema = Grammar.json_schema(call_schema(allowed))
    start = len(ctx.tokens)
    used = lambda: len(ctx.tokens) - start  # noqa: E731
    text, calls = "", []
    force = choice != "auto"
    while used() < max_tokens:
        if force:  # the answer starts with a call: the opening tag is the prompt's, the rest the grammar's
            ctx.fill(CALL_OPEN + "\n")
            force = False
        else:
            budget = max_tokens - used() if not calls else min(MAX_TEXT_BETWEEN_CALLS, max_tokens - used())
            stream = ctx.stream(budget, sampler, list(stop) + [CALL_OPEN])
            sent = 0
            for _ in stream:
                if not calls and on_text is not None:
                    piece = stream.text
                    safe = len(piece) - (len(CALL_OPEN) - 1)  # the opening tag may be starting
                    if stream.ended:
                        safe = len(piece)
                    if safe > sent:
                        on_text(piece[sent:safe])
                        sent = safe
            if not calls:
                text = stream.text
            if stream.reason != "stop-string" or CALL_OPEN not in inferlet.decode(stream.token_ids):
                return text, calls, ("tool_calls" if calls else "length" if stream.reason == "length" else "stop")
        remaining = max_tokens - used()
        if remaining <= 0:
            break
        arguments_start = len(ctx.tokens)
        ctx.generate(max_tokens=remaining, sampler=sampler, grammar=schema)
        raw = inferlet.decode(ctx.tokens[arguments_start:])
        try:
            call = json.loads(raw)
        except ValueError:  # cut short by max_tokens
            break
        calls.append({"name": call["name"], "arguments": json.dumps(call["arguments"])})
        if on_call is not None:
            on_call(len(calls) - 1, calls[-1])
        ctx.fill("\n" + CALL_CLOSE + "\n")
        if not parallel:
            return text, calls, "tool_calls"
    return text, calls, ("tool_calls" if calls else "length")
