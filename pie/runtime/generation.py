"""The `generation` interface: an inferlet hands a decode loop to the control layer.

`generation.start` turns the WIT record into a `pie.control.GenerationStream` on the instance's queue
and pages (csrc/control/generation_stream.h); from then on the control layer runs it pass after pass,
with no guest call per token. The guest reads tokens with `next` (blocks until at least one is ready),
`poll` (at once) or `finish` (blocks until the end), and `cancel`s it. The read that sees the end
returns the `stream-end` and forgets the handle.

What the host lends a stream: the instance's grammar matcher (llguidance, pie/runtime/grammar.py: the
stream calls it on the batch loop's thread after each token) and its page masks (kv.mask-page). Streams
end with their instance: its queues close, the pass in flight is cancelled, the stream ends "failed"
with the reason, and the pool takes back every page.

>>> h = generation.start(params)                  # doctest: +SKIP  (in a guest)
>>> chunk = generation.next(h)                    # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pie.control import Sampler, SamplerKind

if TYPE_CHECKING:
    from pie.runtime.instance import Instance

MAX_STREAMS_PER_INSTANCE = 256  # live (not yet read to the end) streams one instance may hold
_MAX_HANDLE = (1 << 32) - 1

_U32_LIST = ("list", "u32")
STREAM_END = ("record", (("reason", ("enum",)), ("message", "string"), ("new-pages", _U32_LIST),
                         ("num-cached", "u32")))
CHUNK = ("record", (("tokens", _U32_LIST), ("top", ("list", ("tuple", (_U32_LIST, ("list", "f32"))))),
                    ("end", ("option", STREAM_END))))


def _sampler(value: tuple[str, Any]) -> Sampler:
    case, payload = value
    if case == "greedy":
        return Sampler(SamplerKind.GREEDY)
    if case == "sample":
        temperature, top_k, top_p, min_p, seed = payload
        if not temperature > 0:
            raise ValueError(f"params.sampler: sample: temperature {temperature} must be > 0 (use greedy for 0)")
        return Sampler(SamplerKind.SAMPLE, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    raise ValueError(f"params.sampler: a stream draws tokens: greedy or sample, not {case}")


def _grammar_hook(inst: "Instance", matcher: int) -> tuple[Any, list[int]]:
    """(hook, first mask) of a stream drawing from `matcher`: the hook accepts a token and says whether
    the grammar is complete, and if not, the next token's mask (the SDK's fine-grained loop's steps).
    It holds the grammar host and the instance id, not the instance."""
    host, instance_id = inst.services.grammar, inst.id
    first = host.token_mask(instance_id, matcher)  # a bad handle raises here, before the stream starts

    def step(token: int) -> tuple[bool, bool, list[int]]:
        if not host.accept(instance_id, matcher, token):
            return False, False, []
        if host.is_terminated(instance_id, matcher):
            return True, True, []
        return True, False, host.token_mask(instance_id, matcher)

    return step, first


def generation_start(inst: "Instance", params: tuple, adapter: int = 0) -> int:
    pending, num_cached, pages, sampler, stop, grammar, top_logprobs, q = params
    eos, stop_tokens, stop_strings, max_tokens = stop
    if len(inst.streams) >= MAX_STREAMS_PER_INSTANCE:
        raise ValueError(f"the instance already has {MAX_STREAMS_PER_INSTANCE} streams not read to the end")
    if not pending:
        raise ValueError("params.pending: empty: run at least one token (the last one again, if all are cached)")
    if max_tokens < 1:
        raise ValueError("params.stop.max-tokens: must be >= 1")
    from pie.runtime.api import _control_queue

    queue = _control_queue(inst, q)
    services = inst.services
    hook, first_mask = _grammar_hook(inst, grammar) if grammar is not None else (None, [])
    try:
        stream = services.plane.start_stream(
            inst.id, queue, pending=pending, num_cached=num_cached, handles=pages, sampler=_sampler(sampler),
            max_tokens=max_tokens, eos_ids=services.eos_ids if eos else (), stop_tokens=stop_tokens,
            stop_strings=stop_strings, top_logprobs=top_logprobs,
            token_bytes=services.token_bytes() if stop_strings else None,
            grammar=hook, first_mask=first_mask,
            page_masks=inst.state.fold_page_masks if inst.state.has_page_masks else None, adapter=adapter)
    except (TypeError, OverflowError) as error:
        raise ValueError(f"params: {error}") from None
    handle = inst.next_stream_handle
    if handle > _MAX_HANDLE:
        stream.cancel()
        raise ValueError("the instance has used up its stream handles")
    inst.next_stream_handle += 1
    inst.streams[handle] = stream
    return handle


def _stream(inst: "Instance", s: int) -> Any:
    stream = inst.streams.get(s)
    if stream is None:
        raise ValueError(f"s: {s} is not a running stream of this instance")
    return stream


def _chunk(inst: "Instance", s: int, chunk: dict) -> tuple:
    end = None
    if chunk["end"] is not None:
        inst.streams.pop(s, None)
        end = (chunk["end"], chunk["message"], chunk["new_handles"], chunk["num_cached"])
    return chunk["tokens"], chunk["top"], end


def _timeout(inst: "Instance") -> float | None:
    left = inst.state.seconds_left
    return None if left < 0 else max(left, 0.0)


def generation_next(inst: "Instance", s: int) -> tuple:
    """Blocks (GIL released) until a token is ready, the stream ends, or the instance's deadline."""
    chunk = _stream(inst, s).next(_timeout(inst))
    if chunk["end"] is None and not chunk["tokens"]:
        raise TimeoutError("the instance's deadline passed while waiting for a stream")
    return _chunk(inst, s, chunk)


def generation_poll(inst: "Instance", s: int) -> tuple:
    return _chunk(inst, s, _stream(inst, s).poll())


def generation_finish(inst: "Instance", s: int) -> tuple:
    """Blocks (GIL released) until the stream has ended (or the instance's deadline)."""
    stream = _stream(inst, s)
    if not stream.wait(_timeout(inst)):
        raise TimeoutError("the instance's deadline passed while waiting for a stream")
    return _chunk(inst, s, stream.poll())


def generation_cancel(inst: "Instance", s: int) -> None:
    _stream(inst, s).cancel()


GENERATION_COLD = {
    ("generation", "start"): (generation_start, "u32"),
    ("generation", "start-with-adapter"): (generation_start, "u32"),
    ("generation", "next"): (generation_next, CHUNK),
    ("generation", "poll"): (generation_poll, CHUNK),
    ("generation", "finish"): (generation_finish, CHUNK),
    ("generation", "cancel"): (generation_cancel, None),
}
