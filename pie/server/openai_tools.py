"""Tool calling on /v1: the `tools`, `tool_choice` and `parallel_tool_calls` of a request, and the messages
that carry calls and their results, checked the way OpenAI checks them (a bad value is a 400 naming the
parameter) and normalised for the openai_chat inferlet (docs/tool_calling.md).

A tool becomes {"name", "description", "parameters"}; tool_choice "none", "auto", "required" or a tool's
name; a message {"role", "content"} plus "tool_calls" ([{"id", "name", "arguments"}], an assistant's) or
"tool_call_id" (a tool result's).

>>> parse_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], "tools")
[{'name': 'f', 'description': '', 'parameters': {'type': 'object'}}]
"""

from __future__ import annotations

import json
import re
from typing import Any

from pie.server.openai_params import bad

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128
MAX_SCHEMA_BYTES = 64 << 10  # one tool's parameters, as JSON
SCHEMA_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def _check_schema(schema: Any, where: str, depth: int = 0) -> None:
    """What a grammar can be built from: objects all the way down, known types, sane nesting."""
    if depth > 32:
        raise bad(where, f"'{where}' nests deeper than 32 levels", "invalid_schema")
    if not isinstance(schema, dict):
        raise bad(where, f"'{where}' must be a JSON schema object", "invalid_schema")
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for k in kinds:
        if k not in SCHEMA_TYPES:
            raise bad(where, f"'{where}.type' {k!r} is not a JSON schema type ({', '.join(sorted(SCHEMA_TYPES))})",
                      "invalid_schema")
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise bad(where, f"'{where}.properties' must be an object", "invalid_schema")
        for name, sub in props.items():
            _check_schema(sub, f"{where}.properties.{name}", depth + 1)
    required = schema.get("required")
    if required is not None and (not isinstance(required, list) or not all(isinstance(r, str) for r in required)):
        raise bad(where, f"'{where}.required' must be a list of property names", "invalid_schema")
    items = schema.get("items")
    if items is not None and not isinstance(items, bool):
        _check_schema(items, f"{where}.items", depth + 1)
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if options is not None:
            if not isinstance(options, list) or not options:
                raise bad(where, f"'{where}.{key}' must be a non-empty list of schemas", "invalid_schema")
            for i, sub in enumerate(options):
                _check_schema(sub, f"{where}.{key}[{i}]", depth + 1)
    enum = schema.get("enum")
    if enum is not None and (not isinstance(enum, list) or not enum):
        raise bad(where, f"'{where}.enum' must be a non-empty list", "invalid_schema")


def parse_tools(tools: Any, param: str, flat: bool = False) -> list[dict]:
    """The request's tools. Chat: [{"type": "function", "function": {"name", "description", "parameters"}}];
    responses (`flat`): [{"type": "function", "name", "description", "parameters"}]."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad(param, f"'{param}' must be a list of tools", "invalid_type")
    if len(tools) > MAX_TOOLS:
        raise bad(param, f"'{param}' takes at most {MAX_TOOLS} tools, got {len(tools)}")
    out, names = [], set()
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad(where, f"'{where}' must be an object of type 'function' (the only tool type supported)",
                      "invalid_type")
        fn = tool if flat else tool.get("function")
        fn_where = where if flat else f"{where}.function"
        if not isinstance(fn, dict):
            raise bad(fn_where, f"'{fn_where}' must be an object", "invalid_type")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise bad(f"{fn_where}.name", f"'{fn_where}.name' must be 1-64 letters, digits, underscores or dashes",
                      "invalid_value")
        if name in names:
            raise bad(f"{fn_where}.name", f"'{fn_where}.name': the tool {name!r} is defined twice")
        names.add(name)
        description = fn.get("description", "")
        if not isinstance(description, str):
            raise bad(f"{fn_where}.description", f"'{fn_where}.description' must be a string", "invalid_type")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        _check_schema(params, f"{fn_where}.parameters")
        if params.get("type", "object") != "object":
            raise bad(f"{fn_where}.parameters", f"'{fn_where}.parameters' must describe an object (type 'object')",
                      "invalid_schema")
        if len(json.dumps(params)) > MAX_SCHEMA_BYTES:
            raise bad(f"{fn_where}.parameters", f"'{fn_where}.parameters' exceeds {MAX_SCHEMA_BYTES} bytes")
        out.append({"name": name, "description": description, "parameters": params})
    return out


def parse_tool_choice(choice: Any, tools: list[dict], param: str = "tool_choice", flat: bool = False) -> str:
    """"none", "auto", "required" or the name of a tool the request defines. Default: "auto" with tools,
    "none" without."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad(param, f"'{param}' must be 'none', 'auto', 'required' or a named function, got {choice!r}")
        if choice != "none" and not tools:
            raise bad(param, f"'{param}' {choice!r} needs 'tools'")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name") if flat else (choice.get("function") or {}).get("name")
        if not isinstance(name, str):
            raise bad(param, f"'{param}' names a function without a name", "invalid_type")
        if name not in {t["name"] for t in tools}:
            raise bad(param, f"'{param}' names the function {name!r}, which is not among the tools")
        return name
    raise bad(param, f"'{param}' must be 'none', 'auto', 'required' or {{'type': 'function', ...}}", "invalid_type")


def assistant_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's tool_calls: [{"id", "name", "arguments"}] (arguments: a JSON object's text)."""
    if not isinstance(calls, list):
        raise bad(where, f"'{where}' must be a list", "invalid_type")
    out = []
    for j, call in enumerate(calls):
        w = f"{where}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise bad(w, f"'{w}' must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}",
                      "invalid_type")
        out.append({"id": str(call.get("id", "")), "name": fn["name"], "arguments": _arguments(fn["arguments"], w)})
    return out


def _arguments(text: str, where: str) -> str:
    try:
        value = json.loads(text)
    except ValueError:
        raise bad(where, f"'{where}.function.arguments' is not JSON") from None
    if not isinstance(value, dict):
        raise bad(where, f"'{where}.function.arguments' must be a JSON object")
    return json.dumps(value)


def response_items_to_messages(items: list[dict], param: str = "input") -> list[dict]:
    """The /v1/responses input items as chat-format messages (checked again as chat messages): function_call
    items join an assistant message's tool_calls, function_call_output items become tool messages; other
    items pass through."""
    out: list[dict] = []
    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        kind = item.get("type")
        if kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("arguments"), str):
                raise bad(where, f"'{where}' (function_call) needs 'name' and 'arguments' strings", "invalid_type")
            call = {"id": str(item.get("call_id", "")), "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                raise bad(where, f"'{where}' (function_call_output) needs an 'output' string", "invalid_type")
            out.append({"role": "tool", "content": output, "tool_call_id": str(item.get("call_id", ""))})
        else:
            out.append(item)
    return out
