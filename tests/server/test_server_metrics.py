"""GET /metrics: the Prometheus text format (parsed with prometheus-client's own parser), every family
named pie_*, and what each counts moving by exactly what a request, an instance or a termination did."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

INFERLETS = Path(__file__).parent / "inferlets"


def scrape(server) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("pie_"), family.name
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, metric: str, **labels) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


def test_a_chat_request_moves_each_counter_by_what_it_did(server, openai_client, pool_whole):
    before = scrape(server)
    reply = openai_client.chat.completions.create(model="smollm2-135m", max_tokens=6, temperature=0,
                                                  messages=[{"role": "user", "content": "Count: 1, 2, 3,"}])
    pool_whole()
    after = scrape(server)
    delta = lambda metric, **labels: value(after, metric, **labels) - value(before, metric, **labels)  # noqa: E731
    assert delta("pie_requests_total", route="chat.completions", status="200") == 1
    assert delta("pie_time_to_first_token_seconds_count", route="chat.completions") == 1
    assert delta("pie_time_per_output_token_seconds_count", route="chat.completions") == \
        (1 if reply.usage.completion_tokens >= 2 else 0)
    assert 0 < delta("pie_time_to_first_token_seconds_sum", route="chat.completions") < 120
    assert delta("pie_instances_total", outcome="ok") == 1
    # the prompt but what the prefix cache had (an earlier test may have sent it), then one pass per
    # generated token but the last (whose K/V is not computed)
    computed = delta("pie_tokens_total", kind="computed")
    cached = reply.usage.prompt_tokens_details.cached_tokens
    assert computed == reply.usage.prompt_tokens - cached + reply.usage.completion_tokens - 1
    assert delta("pie_tokens_total", kind="cached") == cached
    assert delta("pie_forward_passes_total") >= reply.usage.completion_tokens
    assert delta("pie_batch_size_count", kind="forward") == delta("pie_forward_passes_total")
    assert delta("pie_batch_size_sum", kind="forward") >= delta("pie_batch_size_count", kind="forward")
    assert value(after, "pie_batch_size_bucket", kind="forward", le="+Inf") == value(after, "pie_batch_size_count",
                                                                                   kind="forward")
    assert delta("pie_host_calls_total", name="generation.start") == 1  # openai_chat decodes on a stream
    assert delta("pie_host_calls_total", name="runtime.send") >= 2  # a delta and the final message
    assert delta("pie_commands_total", outcome="completed") >= delta("pie_forward_passes_total")
    total, cached_pages = value(after, "pie_kv_pages_total"), value(after, "pie_prefix_cache_pages")
    assert cached_pages > 0  # the request's full pages were filed
    # all free again, but the pages the prefix cache keeps
    assert total > 0 and value(after, "pie_kv_pages", state="free") + cached_pages == total
    assert value(after, "pie_kv_pages", state="used") == cached_pages and value(after, "pie_queue_depth") == 0


def test_refused_requests_and_terminations_are_counted_by_status_and_reason(server, openai_client, pool_whole):
    import openai

    from pie.client import Client

    before = scrape(server)
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model="smollm2-135m", messages=[], max_tokens=2)
    with Client(server.ws_url) as client:
        inst = client.launch(str(INFERLETS / "echo.py"))
        assert next(inst.events(timeout=60)).data == "hello "
        inst.terminate("an operator stopped it")
        assert "an operator stopped it" in inst.wait(30).error
    pool_whole()
    after = scrape(server)
    delta = lambda metric, **labels: value(after, metric, **labels) - value(before, metric, **labels)  # noqa: E731
    assert delta("pie_requests_total", route="chat.completions", status="400") == 1
    assert delta("pie_time_to_first_token_seconds_count", route="chat.completions") == 0  # nothing generated
    assert delta("pie_instances_total", outcome="terminated") == 1
    assert delta("pie_terminations_total", reason="requested") == 1
    assert delta("pie_instances_total", outcome="ok") == 0


@pytest.mark.parametrize("reason, label", [
    ("deadline exceeded: the instance ran for 2.00 s (limit 2 s)", "deadline"),
    ("the client went away", "client_gone"),
    ("slow client: it did not read its messages for 1 s (64 messages queued)", "slow_client"),
    ("the HTTP request ended", "request_ended"),
    ("the server is shutting down (grace period of 0 s over)", "shutdown"),
    ("instance 4 terminated: the KV page pool is exhausted (instance 9 needed 2 KV pages)", "kv_pool_exhausted"),
    ("enough", "requested"),
])
def test_termination_reasons_are_labelled_from_the_layers_own_messages(reason, label):
    from pie.server.metrics import instance_outcome, termination_reason

    assert termination_reason(reason) == label
    assert instance_outcome("x: " + reason, reason) == ("terminated", label)
    assert instance_outcome(None, None) == ("ok", None)
    assert instance_outcome("forward.submit: fwd.tokens: empty", None) == ("error", None)
    assert instance_outcome("deadline exceeded: the instance ran for 3.00 s (limit 3 s)", None) == \
        ("terminated", "deadline")
