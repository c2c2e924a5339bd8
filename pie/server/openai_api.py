"""OpenAI-compatible routes, served by an inferlet: each choice of a request is one instance of the
configured inferlet (openai_chat by default), which streams JSON deltas back; this module turns them into
OpenAI objects or server-sent events.

    POST /v1/chat/completions   POST /v1/completions   POST /v1/responses   GET /v1/models[/{id}]
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from aiohttp import web

from pie.runtime import resolve_inferlet
from pie.server.config import PieConfig
from pie.server.instances import InstanceManager, LaunchError
from pie.server.metrics import ServerMetrics
from pie.server.openai_params import APIError, Meta, chat_specs, completion_specs, responses_specs
from pie.server.outbox import Outbox

FINGERPRINT = "pie-0.1"


# the route of each kind of request, as pie_requests_total labels it
# The prefix cache scope of the /v1 routes' instances: theirs alone (protocol clients' programs launch
# without one, so they can neither read nor fill it).
OPENAI_CACHE_SCOPE = 1

ROUTES = {"chat": "chat.completions", "completion": "completions", "responses": "responses"}


def error_response(e: APIError) -> web.Response:
    return web.json_response(e.body(), status=e.status)


class ChoiceRun:
    """The instances of one request's choices: launched on entry, terminated on exit (whatever the
    reason: done, an error, the HTTP client went away)."""

    def __init__(self, config: PieConfig, instances: InstanceManager, inferlet: Path, specs: list[dict]):
        self.config = config
        self.instances = instances
        self.inferlet = inferlet
        self.specs = specs
        cfg = config.server
        self.outbox = Outbox(asyncio.get_running_loop(), cfg.outbox_messages, cfg.slow_client_s)
        self.index: dict[int, int] = {}  # instance id -> choice index
        self.first_output_at: float | None = None  # time.monotonic() of the first text, and of the last output
        self.last_output_at: float | None = None
        self.completion_tokens = [0] * len(specs)  # per choice, from its final message

    async def __aenter__(self) -> "ChoiceRun":
        try:
            for i, spec in enumerate(self.specs):
                inst = await self.instances.launch(
                    self, self.outbox, [json.dumps(spec)], inferlet=self.inferlet, forward_log=False,
                    cache_scope=OPENAI_CACHE_SCOPE if self.config.openai.prefix_caching else 0)
                self.index[inst.id] = i
        except LaunchError as e:
            await self.__aexit__(None, None, None)
            status = 503 if e.code in ("busy", "shutting_down") else 500
            raise APIError(status, str(e), type="server_error", code=e.code) from None
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.instances.end_owner(self, "the HTTP request ended")
        self.outbox.close()

    async def events(self) -> AsyncIterator[tuple[int, dict]]:
        """(choice index, inferlet message) in arrival order, until every choice is done. An instance that
        fails raises APIError."""
        pending = set(self.index)
        while pending:
            kind, instance_id, payload = await self.outbox.get()
            i = self.index[instance_id]
            if kind == "output":
                try:
                    message = json.loads(payload)
                except ValueError:
                    raise APIError(500, f"the inferlet sent a message that is not JSON: {payload[:200]!r}",
                                   type="server_error") from None
                self._timed(i, message)
                yield i, message
            elif kind == "done":
                pending.discard(instance_id)
                if payload.error is not None:
                    raise inferlet_error(payload.error)


    def _timed(self, i: int, message: Any) -> None:
        now = time.monotonic()
        if isinstance(message, dict) and "delta" in message:
            if self.first_output_at is None and message["delta"]:
                self.first_output_at = now
        elif isinstance(message, dict) and isinstance(message.get("completion_tokens"), int):
            self.completion_tokens[i] = message["completion_tokens"]
        self.last_output_at = now

    def time_per_output_token(self) -> float | None:
        """(last output - first text) / (tokens of the longest choice - 1), or None without two tokens."""
        tokens = max(self.completion_tokens, default=0)
        if self.first_output_at is None or self.last_output_at is None or tokens < 2:
            return None
        return (self.last_output_at - self.first_output_at) / (tokens - 1)


def inferlet_error(error: str) -> APIError:
    if "grammar." in error and "not implemented" not in error:  # the host could not compile the schema
        return APIError(400, f"the JSON schema could not be used: {error}", param="response_format",
                        code="invalid_schema")
    return APIError(500, f"generation failed: {error}", type="server_error")


class Collected:
    """Per choice: the text, the inferlet's final message and the log-probability entries."""

    def __init__(self, n: int):
        self.texts = [""] * n
        self.finals: list[dict | None] = [None] * n
        self.logprobs: list[list[dict]] = [[] for _ in range(n)]
        self.calls: list[list[dict]] = [[] for _ in range(n)]  # {"id", "name", "arguments"}, in order

    def add(self, i: int, message: dict) -> dict | None:
        """Takes one message of choice i; a tool call comes back with the id it was given."""
        if "delta" in message:
            self.texts[i] += message["delta"]
            self.logprobs[i] += message.get("logprobs", [])
        elif "tool_call" in message:
            call = message["tool_call"]
            self.calls[i].append({"id": f"call_{uuid.uuid4().hex[:24]}", "name": call["name"],
                                  "arguments": call["arguments"]})
            return self.calls[i][-1]
        else:
            self.finals[i] = message
        return None

    def tool_calls(self, i: int) -> list[dict] | None:
        """OpenAI's message.tool_calls of choice i, or None."""
        if not self.calls[i]:
            return None
        return [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in self.calls[i]]

    def text(self, i: int) -> str:
        final = self.finals[i]
        return final["text"] if final is not None else self.texts[i]

    def finish_reason(self, i: int) -> str:
        final = self.finals[i]
        return final["finish_reason"] if final is not None else "stop"

    def usage(self, choices_per_prompt: int) -> dict:
        """OpenAI's usage; prompt_tokens_details.cached_tokens: the prompt tokens the prefix cache supplied
        (of each prompt's first choice, as its prompt tokens are counted)."""
        finals = [f for f in self.finals if f is not None]
        firsts = [f for k, f in enumerate(finals) if k % choices_per_prompt == 0]
        prompt = sum(f["prompt_tokens"] for f in firsts)
        cached = sum(int(f.get("cached_tokens", 0)) for f in firsts)
        completion = sum(f["completion_tokens"] for f in finals)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


def chat_logprobs(entries: list[dict], top: int) -> dict:
    def one(token: str, lp: float) -> dict:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**one(e["token"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"][:top]]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: list[dict], top: int, offset: int = 0) -> dict:
    offsets, pos = [], offset
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict((t, lp) for t, lp in e["top"][:top]) for e in entries], "text_offset": offsets}


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + "data: " + (data if isinstance(data, str) else json.dumps(data)) + "\n\n").encode()


class OpenAIRoutes:
    """The /v1 routes of one server: its configuration, its instances, the model it serves."""

    def __init__(self, config: PieConfig, instances: InstanceManager, model_name: str, started_at: float,
                 metrics: ServerMetrics | None = None, adapters: tuple[str, ...] = ()):
        """adapters: the LoRA adapters loaded on the model, which `model` may name instead of it."""
        self.config = config
        self.instances = instances
        self.model_name = model_name
        self.adapters = adapters
        self.started_at = started_at
        self.metrics = metrics
        self.inferlet = resolve_inferlet(config.openai.inferlet)  # the operator's choice: a name or a path

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)

    # ---- common ----------------------------------------------------------------------------------
    async def _body(self, request: web.Request) -> dict:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise APIError(413, f"the request body exceeds this server's limit of "
                                f"{self.config.server.max_body_bytes} bytes", code="request_too_large") from None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "We could not parse the JSON body of your request. (The body must be a JSON "
                                "object.)", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    async def _run(self, request: web.Request, kind: str) -> web.StreamResponse:
        """Runs the request and records it (pie_requests_total, the latency histograms)."""
        arrived = time.monotonic()
        runs: list[ChoiceRun] = []
        status = 500
        try:
            response = await self._respond(request, kind, runs)
            status = response.status
            return response
        finally:
            if self.metrics is not None:
                run = runs[0] if runs else None
                ttft = None if run is None or run.first_output_at is None else run.first_output_at - arrived
                tpot = None if run is None else run.time_per_output_token()
                self.metrics.request_done(ROUTES[kind], status, ttft, tpot)

    async def _respond(self, request: web.Request, kind: str, runs: list[ChoiceRun]) -> web.StreamResponse:
        try:
            body = await self._body(request)
            openai = self.config.openai
            if kind == "chat":
                specs, meta = chat_specs(body, model=self.model_name, default_max_tokens=openai.default_max_tokens,
                                         max_n=openai.max_n, adapters=self.adapters)
            elif kind == "completion":
                specs, meta = completion_specs(body, model=self.model_name, max_n=openai.max_n, adapters=self.adapters)
            else:
                specs, meta = responses_specs(body, model=self.model_name, default_max_tokens=openai.default_max_tokens,
                                              adapters=self.adapters)
            async with ChoiceRun(self.config, self.instances, self.inferlet, specs) as run:
                runs.append(run)
                if meta.stream:
                    return await getattr(self, f"_{kind}_stream")(request, run, meta)
                collected = Collected(len(specs))
                async for i, message in run.events():
                    collected.add(i, message)
                return web.json_response(getattr(self, f"_{kind}_object")(collected, meta))
        except APIError as e:
            return error_response(e)
        except ConnectionError:  # the client went away mid-stream; its instances are already terminated
            return web.Response(status=499)

    # ---- chat ------------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._run(request, "chat")

    def _chat_object(self, c: Collected, meta: Meta) -> dict:
        choices = []
        for i in range(meta.n):
            message = {"role": "assistant", "content": c.text(i), "refusal": None}
            calls = c.tool_calls(i)
            if calls:
                message.update(content=c.text(i) or None, tool_calls=calls)
            choices.append({"index": i, "message": message,
                            "logprobs": chat_logprobs(c.logprobs[i], meta.top_logprobs) if meta.logprobs else None,
                            "finish_reason": c.finish_reason(i)})
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": meta.model, "system_fingerprint": FINGERPRINT, "choices": choices, "usage": c.usage(meta.n)}

    async def _chat_stream(self, request: web.Request, run: ChoiceRun, meta: Meta) -> web.StreamResponse:
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": meta.model, "system_fingerprint": FINGERPRINT}
        extra = {"usage": None} if meta.include_usage else {}

        def chunk(i: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> bytes:
            return sse({**base, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                        **extra})

        resp = await self._start_sse(request)
        collected = Collected(meta.n)
        try:
            for i in range(meta.n):
                await resp.write(chunk(i, {"role": "assistant", "content": ""}))
            async for i, message in run.events():
                call = collected.add(i, message)
                if "delta" in message:
                    lp = chat_logprobs(message.get("logprobs", []), meta.top_logprobs) if meta.logprobs else None
                    await resp.write(chunk(i, {"content": message["delta"]}, logprobs=lp))
                elif call is not None:  # the call's name and id first, then its arguments
                    index = len(collected.calls[i]) - 1
                    await resp.write(chunk(i, {"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                                               "function": {"name": call["name"], "arguments": ""}}]}))
                    await resp.write(chunk(i, {"tool_calls": [{"index": index,
                                                               "function": {"arguments": call["arguments"]}}]}))
                else:
                    await resp.write(chunk(i, {}, message["finish_reason"]))
            if meta.include_usage:
                await resp.write(sse({**base, "choices": [], "usage": collected.usage(meta.n)}))
            await resp.write(sse("[DONE]"))
        except APIError as e:
            await resp.write(sse(e.body()))
        return resp

    # ---- completions -----------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._run(request, "completion")

    def _completion_object(self, c: Collected, meta: Meta) -> dict:
        choices = []
        for i in range(len(c.texts)):
            echo = meta.echo_prompts[i // meta.n] if meta.echo_prompts else ""
            choices.append({"index": i, "text": echo + c.text(i), "finish_reason": c.finish_reason(i),
                            "logprobs": completion_logprobs(c.logprobs[i], meta.top_logprobs) if meta.logprobs
                            else None})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": meta.model, "system_fingerprint": FINGERPRINT, "choices": choices, "usage": c.usage(meta.n)}

    async def _completion_stream(self, request: web.Request, run: ChoiceRun, meta: Meta) -> web.StreamResponse:
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": meta.model, "system_fingerprint": FINGERPRINT}

        def chunk(i: int, text: str, finish: str | None = None, logprobs: dict | None = None) -> bytes:
            return sse({**base, "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

        resp = await self._start_sse(request)
        collected = Collected(len(run.specs))
        try:
            for k, prompt in enumerate(meta.echo_prompts):
                for j in range(meta.n):
                    await resp.write(chunk(k * meta.n + j, prompt))
            async for i, message in run.events():
                collected.add(i, message)
                if "delta" in message:
                    lp = completion_logprobs(message.get("logprobs", []), meta.top_logprobs) if meta.logprobs else None
                    await resp.write(chunk(i, message["delta"], logprobs=lp))
                else:
                    await resp.write(chunk(i, "", message["finish_reason"]))
            if meta.include_usage:
                await resp.write(sse({**base, "choices": [], "usage": collected.usage(meta.n)}))
            await resp.write(sse("[DONE]"))
        except APIError as e:
            await resp.write(sse(e.body()))
        return resp

    # ---- responses -------------------------------------------------------------------------------
    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._run(request, "responses")

    def _response_shell(self, meta: Meta, status: str, rid: str, created: int) -> dict:
        return {"id": rid, "object": "response", "created_at": created, "status": status, "model": meta.model,
                "output": [], "error": None, "incomplete_details": None, "instructions": None, "metadata": {},
                "parallel_tool_calls": False, "tool_choice": "none", "tools": [], "temperature": None, "top_p": None,
                "usage": None}

    def _message_item(self, item_id: str, text: str, status: str = "completed") -> dict:
        return {"type": "message", "id": item_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}

    @staticmethod
    def _call_item(call: dict, status: str = "completed") -> dict:
        return {"type": "function_call", "id": "fc_" + call["id"][5:], "call_id": call["id"], "name": call["name"],
                "arguments": call["arguments"], "status": status}

    def _responses_object(self, c: Collected, meta: Meta, rid: str | None = None, created: int | None = None,
                          item_id: str | None = None) -> dict:
        obj = self._response_shell(meta, "completed", rid or f"resp_{uuid.uuid4().hex}", created or int(time.time()))
        if c.finish_reason(0) == "length":
            obj["status"] = "incomplete"
            obj["incomplete_details"] = {"reason": "max_output_tokens"}
        # the message first (its text may be empty when the answer is calls), then one item per call
        obj["output"] = [self._message_item(item_id or f"msg_{uuid.uuid4().hex}", c.text(0))]
        obj["output"] += [self._call_item(call) for call in c.calls[0]]
        u = c.usage(1)
        obj["usage"] = {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
                        "total_tokens": u["total_tokens"],
                        "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"]},
                        "output_tokens_details": {"reasoning_tokens": 0}}
        return obj

    async def _responses_stream(self, request: web.Request, run: ChoiceRun, meta: Meta) -> web.StreamResponse:
        rid, item_id, created = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}", int(time.time())
        seq = 0
        resp = await self._start_sse(request)

        async def event(kind: str, **fields: Any) -> None:
            nonlocal seq
            await resp.write(sse({"type": kind, "sequence_number": seq, **fields}, event=kind))
            seq += 1

        collected = Collected(1)
        try:
            shell = self._response_shell(meta, "in_progress", rid, created)
            await event("response.created", response=shell)
            await event("response.in_progress", response=shell)
            await event("response.output_item.added", output_index=0, item=self._message_item(item_id, "", "in_progress"))
            await event("response.content_part.added", item_id=item_id, output_index=0, content_index=0,
                        part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            async for _, message in run.events():
                call = collected.add(0, message)
                if "delta" in message and message["delta"]:
                    await event("response.output_text.delta", item_id=item_id, output_index=0, content_index=0,
                                delta=message["delta"], logprobs=[])
                elif call is not None:  # each call its own output item, after the message
                    index = len(collected.calls[0])
                    item = self._call_item(call, "in_progress")
                    await event("response.output_item.added", output_index=index, item={**item, "arguments": ""})
                    await event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                delta=call["arguments"])
                    await event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                arguments=call["arguments"])
                    await event("response.output_item.done", output_index=index, item=self._call_item(call))
            text = collected.text(0)
            await event("response.output_text.done", item_id=item_id, output_index=0, content_index=0, text=text,
                        logprobs=[])
            await event("response.content_part.done", item_id=item_id, output_index=0, content_index=0,
                        part={"type": "output_text", "text": text, "annotations": [], "logprobs": []})
            await event("response.output_item.done", output_index=0, item=self._message_item(item_id, text))
            final = self._responses_object(collected, meta, rid, created, item_id)
            await event("response.completed" if final["status"] == "completed" else "response.incomplete",
                        response=final)
        except APIError as e:
            await event("error", code=e.code, message=e.message, param=e.param)
        return resp

    async def _start_sse(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        return resp

    # ---- models ----------------------------------------------------------------------------------
    def _model_object(self, name: str) -> dict:
        """The base model, or an adapter of it (with `parent`, as vLLM lists LoRA adapters)."""
        obj = {"id": name, "object": "model", "created": int(self.started_at), "owned_by": "pie"}
        if name != self.model_name:
            obj["parent"] = self.model_name
        return obj

    async def models(self, request: web.Request) -> web.Response:
        names = [self.model_name, *self.adapters]
        return web.json_response({"object": "list", "data": [self._model_object(n) for n in names]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        try:
            if name != self.model_name and name not in self.adapters:
                raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        except APIError as e:
            return error_response(e)
        return web.json_response(self._model_object(name))
