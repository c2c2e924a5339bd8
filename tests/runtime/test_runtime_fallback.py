"""The runtime's own fallback path (no control layer): a free list and one serialising engine thread."""

from pie.runtime import Runtime, RuntimeConfig


def test_fallback_backend(engine, runtime):  # `runtime` idle meanwhile: one runner, used by one at a time
    rt = Runtime(engine, RuntimeConfig(control=False))
    try:
        r = rt.run("text_completion", ["--prompt", "What is the capital of France?", "--max-tokens", "32",
                                       "--temperature", "0"])
        assert r.error is None and r.output == "The capital of France is Paris.\n"
        r = rt.run_source("from wit_world.imports import kv\nkv.free([12345])\n")
        assert r.error == "kv.free: pages[0]: 12345 is not a page handle of this instance"
        r = rt.run_source("from wit_world.imports import kv\np = kv.allocate(2)\nkv.free([p[0], p[0]])\n")
        assert r.error.startswith("kv.free: pages[1]: page ") and r.error.endswith(" is listed twice")
        r = rt.run_source("from wit_world.imports import forward as S, kv\np = kv.allocate(1)\n"
                          "S.submit(3, S.ForwardPass([1], [], [0], p, 1, [], [], [], []))\n")
        assert r.error == "forward.submit: q: 3 is not a queue of this instance (queues need the control layer)"
        r = rt.run_source("from wit_world.imports import queues, types\nqueues.create(types.Priority.LOW)\n")
        assert r.error == "queues.create: command queues need the control layer (RuntimeConfig.control)"
        assert rt.num_free_pages == rt.num_pages
    finally:
        rt.close()
