"""The server's Prometheus metrics: `GET /metrics` in the text exposition format (prometheus-client),
every name prefixed `pie_` (the list, with what each counts: docs/metrics.md).

Nothing is added to a hot path for them. Most values are counters the layers keep anyway (the
scheduler's, the page pool's, the runner's, the batch loop's batch-size buckets, the host-call counts)
and are read only when /metrics is scraped, by `RuntimeCollector`. The server itself observes once per
/v1 request (status, time to first token, time per output token) and once per instance that ends
(its outcome and, for a terminated one, the reason).

>>> metrics = ServerMetrics(runtime)                                            # doctest: +SKIP
>>> metrics.request_done("chat.completions", 200, ttft_s=0.05, tpot_s=0.03)     # doctest: +SKIP
>>> metrics.exposition()[:40]                                                   # doctest: +SKIP
b'# HELP pie_requests_total HTTP requests t'
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from pie.control.batch_loop import BATCH_SIZE_BUCKETS

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Latency buckets (seconds): a CPU token takes tens of milliseconds, a GPU token a few.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)

# Why an instance was terminated, from the reason the layers gave (the server's own reasons are fixed
# strings; anything else was asked for by a client or an operator): (label, text the reason contains).
TERMINATION_REASONS = (
    ("deadline", "deadline"),
    ("client_gone", "the client went away"),
    ("slow_client", "slow client"),
    ("request_ended", "the HTTP request ended"),
    ("shutdown", "the server is shutting down"),
    ("kv_pool_exhausted", "pool is exhausted"),
)


def termination_reason(reason: str) -> str:
    """The pie_terminations_total label of a termination reason."""
    for label, text in TERMINATION_REASONS:
        if text in reason:
            return label
    return "requested"


def instance_outcome(error: str | None, terminate_reason: str | None) -> tuple[str, str | None]:
    """(outcome, termination reason label or None) of an instance that ended: ok, error, or terminated
    (asked to stop, or past its deadline)."""
    if error is None:
        return "ok", None
    if terminate_reason is not None:
        return "terminated", termination_reason(terminate_reason)
    if error.startswith("deadline exceeded"):
        return "terminated", "deadline"
    return "error", None


class ServerMetrics:
    """The metrics of one server over one Runtime, in a registry of its own (servers in one process,
    as in tests, do not share counters)."""

    def __init__(self, runtime: Any):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("pie_requests", "HTTP requests to the OpenAI-compatible routes, by route and "
                                "status code (499: the client went away)", ["route", "status"], registry=r)
        self.instances = Counter("pie_instances", "Instances that ended, by outcome (ok, error, terminated)",
                                 ["outcome"], registry=r)
        self.terminations = Counter("pie_terminations", "Instances terminated, by reason", ["reason"], registry=r)
        self.ttft = Histogram("pie_time_to_first_token_seconds", "Time from a /v1 request's arrival to its "
                              "first generated text", ["route"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("pie_time_per_output_token_seconds", "Per /v1 request: time from its first to its "
                              "last output over its output tokens after the first (the longest choice)",
                              ["route"], buckets=TPOT_BUCKETS, registry=r)
        r.register(RuntimeCollector(runtime))

    def request_done(self, route: str, status: int, ttft_s: float | None = None, tpot_s: float | None = None) -> None:
        self.requests.labels(route, str(status)).inc()
        if ttft_s is not None:
            self.ttft.labels(route).observe(ttft_s)
        if tpot_s is not None:
            self.tpot.labels(route).observe(tpot_s)

    def instance_ended(self, error: str | None, terminate_reason: str | None) -> None:
        outcome, reason = instance_outcome(error, terminate_reason)
        self.instances.labels(outcome).inc()
        if reason is not None:
            self.terminations.labels(reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RuntimeCollector:
    """Reads the layers' own counters at scrape time: queue depth, batches and their sizes, tokens
    computed, forward passes, KV pages, host calls by name."""

    def __init__(self, runtime: Any):
        self.runtime = runtime

    def describe(self) -> list[Metric]:
        return []  # reserves no names in the registry; the families are built at each collect

    def collect(self) -> Iterator[Metric]:
        from pie._ext import _runtime

        rt = self.runtime
        planes = [r.plane.stats() for r in rt.replicas]
        runners = [r.runner for r in rt.replicas]

        def total(part: str, key: str) -> float:  # a counter of every replica together
            return sum(p[part][key] for p in planes)

        yield _gauge("pie_queue_depth", "Commands queued and not yet in a batch", total("scheduler", "num_pending"))
        yield _gauge("pie_commands_in_flight", "Commands in a batch being run", total("scheduler", "num_in_flight"))
        yield _gauge("pie_live_instances", "Instances the control plane holds", sum(len(p["live_instances"]) for p in planes))
        commands = CounterMetricFamily("pie_commands", "Commands the scheduler resolved, by outcome", labels=["outcome"])
        for outcome in ("completed", "failed", "cancelled"):
            commands.add_metric([outcome], total("scheduler", f"num_{outcome}"))
        yield commands
        pages = GaugeMetricFamily("pie_kv_pages", "KV cache pages by state (used: held by an instance, an export "
                                  "or the prefix cache; exported: listed by an export; shared: held more than "
                                  "once; pinned: read by a command in flight)", labels=["state"])
        for state in ("used", "free", "exported", "shared", "pinned"):
            pages.add_metric([state], total("kv_pages", f"num_{state}"))
        yield pages
        yield _gauge("pie_kv_pages_total", "KV cache pages of the pool", total("kv_pages", "num_pages"))
        yield _counter("pie_kv_pool_terminations", "Instances the page pool terminated to free pages",
                       total("kv_pages", "num_terminations"))
        yield _counter("pie_kv_export_evictions", "Exports evicted under pool pressure", total("kv_pages", "num_evictions"))
        yield _gauge("pie_prefix_cache_pages", "KV pages held by the prefix cache (one entry each)",
                     total("kv_pages", "num_cached"))
        yield _counter("pie_prefix_cache_evictions", "Prefix cache entries dropped under pool pressure",
                       total("kv_pages", "num_cache_evictions"))
        yield _counter("pie_forward_passes", "Forward passes the model runner ran",
                       sum(r.num_forward_passes for r in runners))
        tokens = CounterMetricFamily("pie_tokens", "Input tokens: computed by the model runner (their K/V written "
                                     "by a forward pass), or cached (their K/V found in the prefix cache)",
                                     labels=["kind"])
        tokens.add_metric(["computed"], sum(r.num_tokens_processed for r in runners))
        tokens.add_metric(["cached"], sum(p["kv_pages"]["num_cache_hits"] * p["kv_pages"]["page_size"] for p in planes))
        yield tokens
        yield self._batch_sizes([r.plane.loop for r in rt.replicas])
        yield from self._per_replica(planes, runners)
        calls = CounterMetricFamily("pie_host_calls", "Host calls of the inferlets, by WIT function (hot: C++; "
                                    "cold: Python), every instance together", labels=["name"])
        for name, count in sorted(_runtime.host_call_counts().items()):
            calls.add_metric([name], count)
        yield calls

    @staticmethod
    def _batch_sizes(loops: list[Any]) -> Metric:
        """The batch-size histogram of every replica's batch loop together."""
        family = HistogramMetricFamily("pie_batch_size", "Commands per batch the batch loop ran, by command kind "
                                       "(forward: requests per forward pass)", labels=["kind"])
        kinds = {0: "forward", 1: "copy_pages"}
        counts_of: dict[int, list[int]] = {}
        sums_of: dict[int, float] = {}
        for loop in loops:
            for kind, counts in dict(loop.batch_size_counts).items():
                merged = counts_of.setdefault(kind, [0] * len(counts))
                counts_of[kind] = [a + b for a, b in zip(merged, counts)]
                sums_of[kind] = sums_of.get(kind, 0) + loop.batch_size_sums.get(kind, 0)
        for kind, counts in sorted(counts_of.items()):
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, BATCH_SIZE_BUCKETS), "+Inf"], counts):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric([kinds.get(kind, str(kind))], buckets, sums_of[kind])
        return family

    @staticmethod
    def _per_replica(planes: list[dict], runners: list[Any]) -> Iterator[Metric]:
        """Each data-parallel replica's load (pie/runtime/replicas.py), labelled by its index."""
        live = GaugeMetricFamily("pie_replica_live_instances", "Instances each replica holds", labels=["replica"])
        free = GaugeMetricFamily("pie_replica_kv_pages_free", "Free KV pages of each replica's pool", labels=["replica"])
        queued = GaugeMetricFamily("pie_replica_queue_depth", "Commands queued on each replica", labels=["replica"])
        passes = CounterMetricFamily("pie_replica_forward_passes", "Forward passes each replica ran", labels=["replica"])
        for index, (plane, runner) in enumerate(zip(planes, runners)):
            label = [str(index)]
            live.add_metric(label, len(plane["live_instances"]))
            free.add_metric(label, plane["kv_pages"]["num_free"])
            queued.add_metric(label, plane["scheduler"]["num_pending"])
            passes.add_metric(label, runner.num_forward_passes)
        yield from (live, free, queued, passes)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
