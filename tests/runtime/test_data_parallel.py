"""Data-parallel replicas behind one Runtime (pie/runtime/replicas.py): concurrent inferlets spread over
both replicas and print what one replica prints, instance ids stay unique, every page of both pools is
free at the end, exports stay on their replica, and replicas that are not the same model are refused."""

import threading
from types import SimpleNamespace

import pytest

from pie.engine.config import EngineConfig
from pie.runtime.replicas import least_loaded

PROMPTS = [f"Write one short sentence about the number {i}." for i in range(32)]
GUEST_EXPORT = """
import sys
from inferlet import Context
ctx = Context()
ctx.fill("A prefix kept for later, on one replica.")
ctx.flush()
ctx.save(sys.argv[1])
print("exported")
"""
GUEST_IMPORT = """
import sys
from inferlet import Context
print("missing" if Context.open(sys.argv[1]) is None else "found")
"""


@pytest.fixture(scope="module")
def replicated(runtime):  # runtime: the Python runtime component is built already
    from pie.engine.model import Model
    from pie.runtime import Runtime, RuntimeConfig

    models = [Model(config=EngineConfig(kv_cache_mb=64), progress=False) for _ in range(2)]
    rt = Runtime(models, RuntimeConfig(deadline_s=300))
    yield rt
    rt.close()


def run_all(rt, prompts, on_launch=None) -> list[str]:
    """Every prompt through text_completion at once (greedy, 8 tokens); the outputs in prompt order."""
    instances = [rt.launch("text_completion", ["--prompt", p, "--max-tokens", "8", "--temperature", "0"])
                 for p in prompts]
    if on_launch is not None:
        on_launch(instances)
    results = [inst.wait() for inst in instances]
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    return [r.output for r in results]


def test_32_inferlets_spread_over_both_replicas_print_what_one_prints(runtime, replicated):
    placed = {}

    def where(instances):
        placed.update({inst.id: inst.replica for inst in instances})

    two = run_all(replicated, PROMPTS, where)
    one = run_all(runtime, PROMPTS)
    assert two == one
    assert len(placed) == len(PROMPTS)  # ids unique across replicas
    counts = [list(placed.values()).count(i) for i in (0, 1)]
    assert min(counts) >= 8, counts  # both replicas took a share
    assert all(i % 2 == (1 if r == 0 else 0) for i, r in placed.items())  # replica r numbers r + 1 + 2k
    for replica in replicated.replicas:  # every page back in both pools
        assert replica.num_free_pages == replica.num_pages
    assert replicated.num_free_pages == replicated.num_pages == sum(r.num_pages for r in replicated.replicas)
    assert all(r.runner.num_forward_passes > 0 for r in replicated.replicas)


def test_least_loaded_counts_launched_instances_and_free_pages():
    replicas = [SimpleNamespace(index=0, num_free_pages=100), SimpleNamespace(index=1, num_free_pages=100)]
    assert least_loaded(replicas, [0, 0]).index == 0  # a tie: the lowest index
    assert least_loaded(replicas, [1, 0]).index == 1  # launched, no pages yet: still counted
    replicas[1].num_free_pages = 40
    assert least_loaded(replicas, [2, 0]).index == 1  # 100 / 3 < 40 / 1
    assert least_loaded(replicas, [1, 0]).index == 0  # 100 / 2 > 40 / 1


def test_an_export_stays_on_its_replica(replicated):
    """The importer on the exporter's replica finds the prefix; the one on the other replica finds nothing
    (the SDK then recomputes). Launched together, the two importers land on different replicas."""
    exporter = replicated.launch_source(GUEST_EXPORT, ["dp-prefix"])
    assert exporter.wait().output.strip() == "exported"
    importers = [replicated.launch_source(GUEST_IMPORT, ["dp-prefix"]) for _ in range(2)]
    seen = {inst.replica: inst.wait().output.strip() for inst in importers}
    assert seen == {exporter.replica: "found", 1 - exporter.replica: "missing"}


def test_replicas_must_be_separate_runners_of_one_model(replicated):
    from pie.runtime import Runtime

    model = replicated.replicas[0].model
    with pytest.raises(ValueError, match="replica 1 is the same model runner as replica 0"):
        Runtime([model, model])
    wider = SimpleNamespace(name=model.name, runner=SimpleNamespace(vocab_size=model.runner.vocab_size,
                                                                     page_size=model.runner.page_size * 2))
    with pytest.raises(ValueError, match="replica 1 differs from replica 0 in its page size"):
        Runtime([model, wider])


def test_concurrent_launches_keep_the_counts(replicated):
    threads = [threading.Thread(target=lambda: replicated.run_source("print('hi')")) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert replicated._live_per_replica == [0, 0]


def test_a_server_over_replicas_reports_each_and_their_sum(replicated, tmp_path):
    """/v1 requests on a server over the replicated runtime; its stats list each replica and add them up,
    and /metrics has each replica's families beside the summed ones."""
    import json
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from pie.server import ServerThread
    from pie.server.config import load_config

    config = load_config(text="[server]\nport = 0\n")
    server = ServerThread(config, runtime=replicated, programs_dir=tmp_path).start()
    try:
        def complete(prompt: str) -> str:
            body = json.dumps({"model": "smollm2-135m", "prompt": prompt, "max_tokens": 4, "temperature": 0})
            request = urllib.request.Request(server.url + "/v1/completions", body.encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as resp:
                return json.loads(resp.read())["choices"][0]["text"]

        texts = [complete(p) for p in PROMPTS[:4]]
        assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
        stats = server.stats()
        assert len(stats["replicas"]) == 2
        assert stats["kv_pages"]["num_pages"] == sum(r["kv_pages"]["num_pages"] for r in stats["replicas"])
        assert stats["scheduler"]["num_completed"] == sum(r["scheduler"]["num_completed"] for r in stats["replicas"])
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
            families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
        passes = {s.labels["replica"]: s.value for s in families["pie_replica_forward_passes"].samples
                  if s.name == "pie_replica_forward_passes_total"}
        assert set(passes) == {"0", "1"} and all(v > 0 for v in passes.values())
        [total] = [s.value for s in families["pie_forward_passes"].samples if s.name == "pie_forward_passes_total"]
        assert total == sum(passes.values())
        free = {s.labels["replica"]: s.value for s in families["pie_replica_kv_pages_free"].samples}
        assert free == {str(r.index): r.num_free_pages for r in replicated.replicas}
    finally:
        server.stop()


def test_data_parallel_setting_is_checked():
    from pie.server.config import ConfigError, load_config

    assert load_config(text="[model]\ndata_parallel = 3\n").model.data_parallel == 3
    with pytest.raises(ConfigError, match=r"model.data_parallel must be in \[1, 64\], got 0"):
        load_config(text="[model]\ndata_parallel = 0\n")
