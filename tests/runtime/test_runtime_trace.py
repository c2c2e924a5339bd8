"""Traces of one instance (pie/runtime/trace.py): its host calls (hot and cold), the forward passes it
waited for with their batches, its outputs, as a Chrome trace; nothing recorded unless asked."""

from __future__ import annotations

import json

GUEST = """
from wit_world.imports import forward as F, kv, runtime
pages = kv.allocate(1)
tokens = [1, 2, 3]
f = F.submit(0, F.ForwardPass(tokens, [], [0, 1, 2], pages, 3, [], [2], [F.Sampler_Greedy()], []))
out = F.wait(f)
for step in range(2):
    f = F.submit(0, F.ForwardPass([out[0].ids[0]], [], [3 + step], pages, 4 + step, [], [0], [F.Sampler_Greedy()], []))
    out = F.wait(f)
runtime.send("a")
runtime.send("bcd")
kv.free(pages)
"""


def test_a_traced_instance_records_its_calls_passes_and_outputs(runtime):
    result = runtime.run_source(GUEST, trace=True)
    assert result.error is None, result.error
    trace = json.loads(json.dumps(result.trace))  # plain JSON
    events = trace["traceEvents"]
    assert {e["name"] for e in events if e["ph"] == "M"} == {"process_name", "thread_name"}
    assert all(e["pid"] == result.instance_id for e in events)
    calls = [e for e in events if e["ph"] == "X" and e["tid"] == 1]
    names = [e["name"] for e in sorted(calls, key=lambda e: e["ts"])]
    assert names.count("forward.submit") == names.count("forward.wait") == 3
    assert names.count("kv.allocate") == names.count("kv.free") == 1 and names.count("runtime.send") == 2
    assert {e["cat"] for e in calls if e["name"].startswith(("forward.", "kv."))} == {"hot"}
    assert {e["cat"] for e in calls if e["name"] == "runtime.send"} == {"cold"}
    assert names.index("kv.allocate") < names.index("forward.submit") < names.index("kv.free")
    waits = sorted((e for e in calls if e["name"] == "forward.wait"), key=lambda e: e["ts"])
    passes = sorted((e for e in events if e["name"] == "forward pass"), key=lambda e: e["ts"])
    assert [p["args"]["tokens"] for p in passes] == [3, 1, 1]
    for wait, p in zip(waits, passes):
        assert p["tid"] == 2 and p["args"]["batch_commands"] >= 1 and p["args"]["batch_tokens"] >= p["args"]["tokens"]
        assert p["dur"] >= 0 and p["ts"] + p["dur"] <= wait["ts"] + wait["dur"] + 1  # ran before the wait returned
        assert p["args"]["waited_us"] == wait["dur"]
    outputs = [e for e in events if e["name"] == "output"]
    assert [o["args"]["bytes"] for o in outputs] == [1, 3] and all(o["ph"] == "i" and o["tid"] == 3 for o in outputs)
    assert min(e["ts"] for e in events if "ts" in e) >= 0 and trace["otherData"]["dropped_events"] == 0


def test_an_untraced_instance_records_nothing(runtime):
    result = runtime.run_source(GUEST)
    assert result.error is None and result.trace is None


def test_a_trace_sent_back_is_bounded():
    from pie.runtime.trace import bounded_trace

    trace = {"traceEvents": [{"name": str(i)} for i in range(10)], "otherData": {"dropped_events": 2}}
    cut = bounded_trace(trace, 4)
    assert [e["name"] for e in cut["traceEvents"]] == ["0", "1", "2", "3"] and cut["otherData"]["dropped_events"] == 8
    assert bounded_trace(trace, 10) is trace


def test_a_trace_is_bounded_while_it_is_recorded(runtime):
    """trace_max_events bounds the hot calls kept, and the cold calls and outputs together; the rest are
    counted as dropped (a server records at most what it sends back)."""
    result = runtime.run_source(GUEST, trace=True, trace_max_events=3)
    assert result.error is None, result.error
    events = [e for e in result.trace["traceEvents"] if e["ph"] != "M"]
    hot = [e for e in events if e.get("cat") == "hot"]
    others = [e for e in events if e.get("cat") in ("cold", "output")]
    assert len(hot) == 3 and len(others) == 3
    # 8 hot calls (allocate, 3 submits, 3 waits, free) and at least 4 other events (2 sends, 2 outputs) ran
    assert result.trace["otherData"]["dropped_events"] >= (8 - 3) + (4 - 3)
