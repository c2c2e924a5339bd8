"""OpenAI request bodies -> the specs the openai_chat inferlet runs (one per choice), checked the way
OpenAI checks them: a bad value is a 400 `invalid_request_error` naming the parameter.

>>> specs, meta = chat_specs({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "n": 2, "seed": 7},
...                          model="m", default_max_tokens=64, max_n=4)
>>> [s["seed"] for s in specs], specs[0]["max_tokens"], meta.stream
([7, 8], 64, False)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence


class APIError(Exception):
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Meta:
    """What the HTTP layer needs besides the specs."""

    model: str
    n: int
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    echo_prompts: tuple[str, ...] = ()  # completions with echo: the prompts, one per prompt
    num_prompts: int = 1


# Parameters accepted and ignored (they change nothing here), besides those each route reads.
IGNORED = {"user", "metadata", "store", "service_tier", "prediction", "modalities",
           "reasoning_effort", "safety_identifier", "prompt_cache_key", "background", "truncation", "reasoning",
           "include", "previous_response_id"}


def _unknown(body: dict, known: set[str]) -> None:
    for key in body:
        if key not in known and key not in IGNORED:
            raise bad(key, f"Unrecognized request argument supplied: {key}", "unknown_parameter")


def _present(body: dict, key: str) -> bool:
    return body.get(key) is not None


def _number(body: dict, key: str, lo: float, hi: float, default: float, *, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(key, f"'{key}' must be a number, got {type(v).__name__}", "invalid_type")
    if not (lo < v if lo_open else lo <= v) or v > hi:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise bad(key, f"{v} is not in {interval} - '{key}'")
    return float(v)


def _int(body: dict, key: str, lo: int, hi: int | None, default: Any) -> Any:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(key, f"'{key}' must be an integer, got {type(v).__name__}", "invalid_type")
    if v < lo or (hi is not None and v > hi):
        raise bad(key, f"{v} is not in [{lo}, {hi if hi is not None else 'inf'}] - '{key}'")
    return v


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(key, f"'{key}' must be a boolean, got {type(v).__name__}", "invalid_type")
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "'stop' must be a string or a list of strings", "invalid_type")
    if len(stops) > 4:
        raise bad("stop", f"'stop' takes at most 4 sequences, got {len(stops)}")
    if any(s == "" for s in stops):
        raise bad("stop", "'stop' sequences must not be empty")
    return stops


def _model(body: dict, model: str, adapters: Sequence[str]) -> tuple[str, str | None]:
    """(the model named, the LoRA adapter it names or None): the served model or one of its adapters."""
    v = body.get("model")
    if not isinstance(v, str) or not v:
        raise bad("model", "you must provide a model parameter", "missing_required_parameter")
    if v != model and v not in adapters:
        served = ", ".join(f"'{m}'" for m in (model, *adapters))
        raise APIError(404, f"The model '{v}' does not exist; this server serves {served}", param="model",
                       code="model_not_found")
    return v, (v if v != model else None)


def _penalties(body: dict) -> None:
    for key in ("frequency_penalty", "presence_penalty"):
        if _number(body, key, -2.0, 2.0, 0.0) != 0.0:
            raise bad(key, f"'{key}' other than 0 is not supported by this server", "unsupported_value")
    bias = body.get("logit_bias")
    if bias:
        raise bad("logit_bias", "'logit_bias' is not supported by this server", "unsupported_value")


def _schema(fmt: Any, param: str) -> str | None:
    """A JSON-schema string for the grammar, from a response_format / text.format object (None: free text)."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise bad(param, f"'{param}' must be an object with a 'type'", "invalid_type")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json.dumps({"type": "object"})
    if kind == "json_schema":
        spec = fmt.get("json_schema", fmt)  # chat: {"json_schema": {"name", "schema"}}; responses: flat
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad(param, f"'{param}' of type json_schema needs a 'schema' object", "invalid_type")
        return json.dumps(schema)
    raise bad(param, f"'{param}.type' must be text, json_object or json_schema, got {kind!r}")


def _content(content: Any, where: str) -> str:
    """A message content: a string, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "output_text") \
                    or not isinstance(part.get("text"), str):
                raise bad(where, f"'{where}': only text content parts are supported", "unsupported_value")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(where, f"'{where}' must be a string or a list of text parts", "invalid_type")


ROLES = {"system", "developer", "user", "assistant", "tool"}


def _messages(messages: Any, param: str = "messages") -> list[dict[str, Any]]:
    """{"role", "content"} each; an assistant's tool calls as "tool_calls" ([{"id", "name", "arguments"}]),
    a tool result's "tool_call_id"."""
    from pie.server.openai_tools import assistant_calls

    if not isinstance(messages, list) or not messages:
        raise bad(param, f"'{param}' must be a non-empty list of messages",
                  "missing_required_parameter" if messages is None else "invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"{param}[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(where, f"'{where}' must be an object with a role in {sorted(ROLES)}", "invalid_type")
        role = "system" if m["role"] == "developer" else m["role"]
        message: dict[str, Any] = {"role": role, "content": _content(m.get("content"), f"{where}.content")}
        if role == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = assistant_calls(m["tool_calls"], f"{where}.tool_calls")
        if role == "tool":
            if not isinstance(m.get("tool_call_id", ""), str):
                raise bad(f"{where}.tool_call_id", f"'{where}.tool_call_id' must be a string", "invalid_type")
            message["tool_call_id"] = m.get("tool_call_id", "")
        out.append(message)
    return out


def _tools(body: dict, flat: bool = False) -> dict[str, Any]:
    """The spec's "tools", "tool_choice" and "parallel_tool_calls" (docs/tool_calling.md)."""
    from pie.server.openai_tools import parse_tool_choice, parse_tools

    tools = parse_tools(body.get("tools"), "tools", flat)
    choice = parse_tool_choice(body.get("tool_choice"), tools, flat=flat)
    return {"tools": tools, "tool_choice": choice,
            "parallel_tool_calls": _bool(body, "parallel_tool_calls", True)}


def _sampling(body: dict, max_tokens_keys: tuple[str, ...], default_max_tokens: int) -> dict[str, Any]:
    max_tokens = default_max_tokens
    for key in max_tokens_keys:
        v = _int(body, key, 1, None, None)
        if v is not None:
            max_tokens = v
    return {"max_tokens": max_tokens, "temperature": _number(body, "temperature", 0.0, 2.0, 1.0),
            "top_p": _number(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
            "seed": _int(body, "seed", -(1 << 63), (1 << 63) - 1, None)}


def _stream_options(body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
    if not isinstance(opts, dict):
        raise bad("stream_options", "'stream_options' must be an object", "invalid_type")
    return bool(opts.get("include_usage", False))


def _choices(base: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """n specs; choice i of a seeded request draws with seed + i (choice 0 = the same request with n=1)."""
    seed = base["seed"]
    return [{**base, "seed": None if seed is None else (seed + i) & 0x7FFF_FFFF_FFFF_FFFF} for i in range(n)]


CHAT_KEYS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
             "stream", "stream_options", "logprobs", "top_logprobs", "response_format", "frequency_penalty",
             "presence_penalty", "logit_bias", "tools", "tool_choice", "functions", "function_call",
             "parallel_tool_calls"}


def chat_specs(body: dict, *, model: str, default_max_tokens: int, max_n: int,
               adapters: Sequence[str] = ()) -> tuple[list[dict], Meta]:
    _unknown(body, CHAT_KEYS)
    model, adapter = _model(body, model, adapters)
    messages = _messages(body.get("messages"))
    _penalties(body)
    if body.get("functions") or body.get("function_call") not in (None, "none"):
        raise bad("functions", "the deprecated 'functions' / 'function_call' are not supported; use 'tools'",
                  "unsupported_parameter")
    tools = _tools(body)
    n = _int(body, "n", 1, max_n, 1)
    stream = _bool(body, "stream")
    logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, 20, 0)
    if _present(body, "top_logprobs") and not logprobs:
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs' set to true")
    schema = _schema(body.get("response_format"), "response_format")
    if schema is not None and logprobs:
        raise bad("logprobs", "'logprobs' cannot be combined with a JSON response_format here", "unsupported_value")
    if tools["tool_choice"] != "none" and (schema is not None or logprobs):
        raise bad("tools", "'tools' cannot be combined with a JSON response_format or logprobs here",
                  "unsupported_value")
    base = {"messages": messages, **_sampling(body, ("max_tokens", "max_completion_tokens"), default_max_tokens),
            "stop": _stop(body), "logprobs": logprobs, "top_logprobs": top, "json_schema": schema, **tools,
            "adapter": adapter}
    meta = Meta(model, n, stream, _stream_options(body, stream), logprobs, top)
    return _choices(base, n), meta


COMPLETION_KEYS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
                   "stream_options", "logprobs", "echo", "best_of", "suffix", "frequency_penalty", "presence_penalty",
                   "logit_bias", "response_format"}


def completion_specs(body: dict, *, model: str, max_n: int, adapters: Sequence[str] = ()) -> tuple[list[dict], Meta]:
    _unknown(body, COMPLETION_KEYS)
    model, adapter = _model(body, model, adapters)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise bad("prompt", "'prompt' must be a string or a non-empty list of strings (token arrays are not "
                            "supported)", "invalid_type" if prompt is not None else "missing_required_parameter")
    if any(p == "" for p in prompts):
        raise bad("prompt", "'prompt' must not be empty")
    _penalties(body)
    if _present(body, "suffix"):
        raise bad("suffix", "'suffix' is not supported by this server", "unsupported_parameter")
    n = _int(body, "n", 1, max_n, 1)
    best_of = _int(body, "best_of", 1, max_n, n)
    if best_of != n:
        raise bad("best_of", "'best_of' other than n is not supported by this server", "unsupported_value")
    if n * len(prompts) > max_n * 8:
        raise bad("n", f"n x prompts = {n * len(prompts)} choices; this server takes at most {max_n * 8}")
    stream = _bool(body, "stream")
    top = _int(body, "logprobs", 0, 5, None)
    echo = _bool(body, "echo")
    if echo and top is not None:
        raise bad("echo", "'echo' with 'logprobs' is not supported by this server", "unsupported_value")
    schema = _schema(body.get("response_format"), "response_format")
    sampling = _sampling(body, ("max_tokens",), 16)
    specs = []
    for p in prompts:
        base = {"prompt": p, **sampling, "stop": _stop(body), "logprobs": top is not None, "top_logprobs": top or 0,
                "json_schema": schema, "adapter": adapter}
        specs += _choices(base, n)
    meta = Meta(model, n, stream, _stream_options(body, stream), top is not None, top or 0,
                tuple(prompts) if echo else (), len(prompts))
    return specs, meta


RESPONSES_KEYS = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "text",
                  "seed", "tools", "tool_choice", "stream_options", "parallel_tool_calls"}


def responses_specs(body: dict, *, model: str, default_max_tokens: int,
                    adapters: Sequence[str] = ()) -> tuple[list[dict], Meta]:
    from pie.server.openai_tools import response_items_to_messages

    _unknown(body, RESPONSES_KEYS)
    model, adapter = _model(body, model, adapters)
    tools = _tools(body, flat=True)
    inp = body.get("input")
    if isinstance(inp, str):
        messages = [{"role": "user", "content": inp}]
    else:
        items = [dict(i, role=i.get("role")) for i in inp if isinstance(i, dict)] if isinstance(inp, list) else inp
        if isinstance(items, list) and len(items) != len(inp):
            raise bad("input", "'input' items must be message objects", "invalid_type")
        if isinstance(items, list):
            items = response_items_to_messages(items)
        messages = _messages(items, "input")
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad("instructions", "'instructions' must be a string", "invalid_type")
        messages = [{"role": "system", "content": instructions}] + messages
    text = body.get("text")
    if text is not None and not isinstance(text, dict):
        raise bad("text", "'text' must be an object", "invalid_type")
    schema = _schema((text or {}).get("format"), "text.format")
    stream = _bool(body, "stream")
    if tools["tool_choice"] != "none" and schema is not None:
        raise bad("tools", "'tools' cannot be combined with a JSON text.format here", "unsupported_value")
    base = {"messages": messages, **_sampling(body, ("max_output_tokens",), default_max_tokens), "stop": [],
            "logprobs": False, "top_logprobs": 0, "json_schema": schema, **tools, "adapter": adapter}
    return [base], Meta(model, 1, stream)
