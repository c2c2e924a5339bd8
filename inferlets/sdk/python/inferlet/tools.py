"""Tools as plain Python functions: `@inferlet.tool` derives a function's JSON schema from its type hints
and docstring; a Context given tools renders them into its prompt through the chat template, generates
calls under the tools' grammar and appends what the tools return.

    @inferlet.tool
    def add(a: int, b: int) -> int:
        \"\"\"Adds two integers.

        a: the first
        b: the second
        \"\"\"
        return a + b

    ctx = inferlet.Context(tools=[add])
    ctx.user("What is 2 + 3?")
    print(ctx.run_tools(max_rounds=2))      # calls add(2, 3), appends its result, answers

HTTP tools (`http_tool`) are called with `http.fetch`: only hosts the server allows (`--http-allow`)
answer; any other failure (a refused host, an HTTP error status) becomes the tool's result text, for the
model to read, never an exception. Calls and results are written as `tool_calls.py` renders them (the
template's own tool format when it reads `tools`, else `<tool_call>` / `<tool_response>` in the messages).
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import inferlet
from componentize_py_types import Err
from wit_world.imports import http

_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object", list: "array",
               type(None): "null"}


def json_schema_of(hint: Any) -> dict:
    """The JSON schema of a type hint: int, float, str, bool, None, list[T], dict[str, T], Optional[T] /
    T | None, Literal[...]; anything else (no hint) is unconstrained.

    >>> inferlet.tools.json_schema_of(list[int])
    {'type': 'array', 'items': {'type': 'integer'}}
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (Union, types.UnionType):
        options = [json_schema_of(a) for a in args]
        return options[0] if len(options) == 1 else {"anyOf": options}
    if origin in (list, tuple, set, frozenset, Sequence):
        return {"type": "array", **({"items": json_schema_of(args[0])} if args else {})}
    if origin is dict:
        return {"type": "object", **({"additionalProperties": json_schema_of(args[1])} if len(args) == 2 else {})}
    return {}


def _param_docs(doc: str) -> tuple[str, dict[str, str]]:
    """(summary, name -> description) of a docstring whose lines "name: description" (or "name (type):
    description", Google style, under "Args:" or not) describe the parameters."""
    lines = inspect.cleandoc(doc or "").splitlines()
    summary = " ".join(line.strip() for line in lines[:next((i for i, l in enumerate(lines) if not l.strip()),
                                                             len(lines))])
    params = {}
    for line in lines[1:]:
        m = re.match(r"\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(\S.*)$", line)
        if m and m.group(1) != "Args":
            params[m.group(1)] = m.group(2).strip()
    return summary, params


@dataclass
class Tool:
    """A function the model may call: `name`, `description`, `parameters` (the JSON schema of its
    arguments object) and `run(arguments) -> str` (the text the model reads back)."""

    name: str
    description: str
    parameters: dict
    run: Callable[[dict], str] = field(repr=False)

    @property
    def spec(self) -> dict:
        """{"name", "description", "parameters"}: the form of `tool_calls.py` and of OpenAI's tools."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def __call__(self, **arguments: Any) -> str:
        return self.run(arguments)


def tool(fn: Callable) -> Tool:
    """A Tool of a plain function: its name, its docstring's first paragraph as the description, its
    parameters' type hints as the schema (a parameter with a default is optional; the docstring's "name:
    description" lines describe them); its return value is sent back as text (JSON unless a str).

    >>> @inferlet.tool
    ... def weather(city: str, unit: Literal["C", "F"] = "C") -> str: ...
    """
    signature = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    summary, docs = _param_docs(fn.__doc__ or "")
    properties, required = {}, []
    for name, p in signature.parameters.items():
        properties[name] = dict(json_schema_of(hints.get(name, Any)), **({"description": docs[name]}
                                                                        if name in docs else {}))
        if p.default is inspect.Parameter.empty:
            required.append(name)
    schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}

    def run(arguments: dict) -> str:
        try:
            result = fn(**arguments)
        except Exception as e:  # the model reads what went wrong
            return f"error: {type(e).__name__}: {e}"
        return result if isinstance(result, str) else json.dumps(result)

    return Tool(fn.__name__, summary, schema, run)


def fetch(url: str, body: str, method: str = "POST", content_type: str = "text/plain",
          max_chars: int = 2000) -> str:
    """The text of an HTTP reply (whitespace collapsed, at most max_chars), or what went wrong ("error:
    ..."): never an exception, so an agent reads a failure as an observation.

    >>> inferlet.tools.fetch("http://127.0.0.1:8000/calculator", "17 * 23")
    '391'
    """
    try:
        reply = http.fetch(http.Request(method=method, url=url, headers=[("Content-Type", content_type)],
                                        body=body.encode()))
    except Err as e:
        return f"error: {e.value}"
    text = bytes(reply.body).decode("utf-8", "replace").strip()
    if reply.status >= 400:
        return f"error: HTTP {reply.status} {text}"[:max_chars]
    return " ".join(text.split())[:max_chars] or "(empty reply)"


def http_tool(name: str, url: str, description: str, parameters: Optional[dict] = None,
              max_chars: int = 300) -> Tool:
    """A Tool served over HTTP (POST to `url`): without `parameters`, one string argument "input" sent as
    the body; with them, the arguments object as a JSON body. Replies are cut to max_chars.

    >>> calc = inferlet.http_tool("calculator", "http://127.0.0.1:8000/calculator", "Evaluates arithmetic.")
    >>> calc(input="17 * 23")
    """
    if parameters is None:
        schema = {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"],
                  "additionalProperties": False}
        return Tool(name, description, schema,
                    lambda arguments: fetch(url, str(arguments.get("input", "")), max_chars=max_chars))
    return Tool(name, description, parameters,
                lambda arguments: fetch(url, json.dumps(arguments), content_type="application/json",
                                        max_chars=max_chars))


class ToolUse:
    """The tool methods of `inferlet.Context` (a mixin; the state lives on the Context).

    State: `tools` (the Tools the prompt offers, set before the first message; forks share them)."""

    tools: list[Tool]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """`messages` through the chat template, with this context's tools in the prompt."""
        from inferlet import tool_calls  # (imports inferlet's grammar: not at the module's import time)

        if not self.tools:
            return inferlet.chat_prompt(messages, add_generation_prompt)
        specs = [t.spec for t in self.tools]
        if tool_calls.template_reads_tools():
            return inferlet.raw.tokenizer.apply_chat_template_json(
                json.dumps(messages), json.dumps([tool_calls._tool_json(s) for s in specs]), add_generation_prompt)
        return inferlet.chat_prompt(tool_calls.default_messages(messages, specs), add_generation_prompt)

    def gen_tool_calls(self, max_tokens: int = 256, choice: str = "auto", parallel: bool = True,
                       sampler: Optional["inferlet.Sampler"] = None) -> tuple[str, list[dict]]:
        """In the assistant's turn: (text, calls): the text it writes, and the calls it makes
        ({"name", "arguments": a dict}), each drawn under the grammar of the tools' schemas. choice
        "auto", "required" or a tool's name (the answer starts with a call to it).

        >>> with ctx.assistant():
        ...     text, calls = ctx.gen_tool_calls(choice="required")
        """
        from inferlet import tool_calls

        text, calls, _ = tool_calls.generate_with_tools(self, [t.spec for t in self.tools], choice, parallel,
                                                        max_tokens, sampler or inferlet.greedy())
        return text, [{"name": c["name"], "arguments": json.loads(c["arguments"])} for c in calls]

    def call_tools(self, calls: Sequence[dict]) -> list[str]:
        """Runs each call's tool and appends its result as a tool message (the assistant's turn is closed
        first); returns the results in order.

        >>> results = ctx.call_tools(calls)
        """
        from inferlet import tool_calls

        self.close_role()
        by_name = {t.name: t for t in self.tools}
        results = []
        for call in calls:
            tool_ = by_name.get(call["name"])
            result = tool_.run(call["arguments"]) if tool_ else f"error: no tool named {call['name']!r}"
            results.append(result)
            if self.tools and not tool_calls.template_reads_tools():
                self.role("user", f"<tool_response>\n{result}\n</tool_response>")
            else:
                self.role("tool", result)
        return results

    def run_tools(self, max_rounds: int = 4, max_tokens: int = 256, first: str = "auto",
                  sampler: Optional["inferlet.Sampler"] = None) -> str:
        """The tool loop: the assistant answers, calling tools (the first round with tool choice `first`)
        and reading their results, until it answers without a call or max_rounds rounds have called
        tools (then it answers without tools); returns that final text.

        >>> ctx.user("What is 17 * 23?")
        >>> answer = ctx.run_tools(max_rounds=3, first="required")
        """
        for round_ in range(max_rounds):
            with self.assistant():
                text, calls = self.gen_tool_calls(max_tokens, first if round_ == 0 else "auto", True, sampler)
            if not calls:
                return text
            self.call_tools(calls)
        with self.assistant():
            return self.gen(max_tokens=max_tokens, sampler=sampler)
