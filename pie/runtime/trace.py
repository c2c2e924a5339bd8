"""The trace of one instance as a Chrome / Perfetto trace (JSON "Trace Event Format"), for `pie run --trace
FILE` and the protocol's `trace` launch option (docs/traces.md says how to open one).

What a traced instance records, on its own thread, with the steady clock (time.monotonic_ns):
- every host call, hot (C++: csrc/runtime/host_calls.cpp) or cold (Python), with its start and end;
- for a forward.wait, the pass it waited for: its input tokens, the batch it ran in (commands, tokens)
  and when that batch ran (stamped by the engine's handler, pie/control/handlers.py);
- every output message (runtime.send), as an instant with its size.

Tracks of the one process ("pie instance N"): host calls (tid 1), forward passes (tid 2, one slice per pass
the instance waited for, from the batch's start to its end), outputs (tid 3). Times are microseconds from
the instance's launch.

>>> result = runtime.run("text_completion", ["--prompt", "Hi"], trace=True)    # doctest: +SKIP
>>> json.dump(result.trace, open("trace.json", "w"))                           # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

HOST_CALLS, FORWARD_PASSES, OUTPUTS = 1, 2, 3
MAX_EVENTS = 1 << 20  # a traced instance's default bound on its hot calls, and on its other events together


class ColdCallTrace:
    """What a traced instance records in Python: its cold calls and output messages, at most max_events
    of them together (later ones are counted, not kept)."""

    def __init__(self, max_events: int = MAX_EVENTS) -> None:
        self.calls: list[tuple[str, int, int, bool]] = []  # (iface.name, start_ns, end_ns, trapped)
        self.outputs: list[tuple[int, int]] = []  # (time_ns, UTF-8 bytes)
        self.max_events = max_events
        self.dropped = 0

    def call(self, name: str, start_ns: int, end_ns: int, trapped: bool) -> None:
        if self._full():
            return
        self.calls.append((name, start_ns, end_ns, trapped))

    def output(self, time_ns: int, size: int) -> None:
        if self._full():
            return
        self.outputs.append((time_ns, size))

    def _full(self) -> bool:
        if len(self.calls) + len(self.outputs) < self.max_events:
            return False
        self.dropped += 1
        return True


def bounded_trace(trace: dict, max_events: int) -> dict:
    """The trace with at most max_events events (the first ones; metadata kept), the rest counted as
    dropped: what a server sends back over the protocol."""
    events = trace["traceEvents"]
    if len(events) <= max_events:
        return trace
    other = dict(trace.get("otherData", {}))
    other["dropped_events"] = other.get("dropped_events", 0) + len(events) - max_events
    return {**trace, "traceEvents": events[:max_events], "otherData": other}


def chrome_trace(instance_id: int, started_ns: int, hot: list[tuple], hot_dropped: int, cold: ColdCallTrace) -> dict:
    """The Chrome trace (a JSON-serialisable dict) of one instance: `hot` from
    pie._ext._runtime.InstanceState.trace_events(), `cold` its Python side, started_ns its launch."""
    def us(ns: int) -> float:
        return (ns - started_ns) / 1e3

    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": instance_id, "tid": 0, "args": {"name": f"pie instance {instance_id}"}},
        {"name": "thread_name", "ph": "M", "pid": instance_id, "tid": HOST_CALLS, "args": {"name": "host calls"}},
        {"name": "thread_name", "ph": "M", "pid": instance_id, "tid": FORWARD_PASSES, "args": {"name": "forward passes"}},
        {"name": "thread_name", "ph": "M", "pid": instance_id, "tid": OUTPUTS, "args": {"name": "outputs"}},
    ]
    for name, start, end, run in hot:
        events.append({"name": name, "cat": "hot", "ph": "X", "pid": instance_id, "tid": HOST_CALLS,
                       "ts": us(start), "dur": (end - start) / 1e3})
        if run is not None:
            tokens, batch_size, batch_tokens, run_start, run_end = run
            events.append({"name": "forward pass", "cat": "pass", "ph": "X", "pid": instance_id, "tid": FORWARD_PASSES,
                           "ts": us(run_start), "dur": (run_end - run_start) / 1e3,
                           "args": {"tokens": tokens, "batch_commands": batch_size, "batch_tokens": batch_tokens,
                                    "waited_us": (end - start) / 1e3}})
    for name, start, end, trapped in cold.calls:
        events.append({"name": name, "cat": "cold", "ph": "X", "pid": instance_id, "tid": HOST_CALLS,
                       "ts": us(start), "dur": (end - start) / 1e3, **({"args": {"trapped": True}} if trapped else {})})
    for time_ns, size in cold.outputs:
        events.append({"name": "output", "cat": "output", "ph": "i", "s": "t", "pid": instance_id, "tid": OUTPUTS,
                       "ts": us(time_ns), "args": {"bytes": size}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"instance_id": instance_id, "dropped_events": hot_dropped + cold.dropped}}
