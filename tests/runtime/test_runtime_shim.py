"""Hot calls from a WAT guest through our C++ shim on the wasmtime C API; components and the cache."""

import time

import pytest
import wasmtime

from pie.runtime import InvalidComponent, components
from wat_guests import FOREIGN_IMPORT, HOT_CALLS, RUN_OK


@pytest.fixture
def bound(runtime):
    """A store + the C++ instance state bound to this thread, as an instance thread has."""
    state = runtime.bind_test_instance()
    store = wasmtime.Store(runtime.wasm_engine)
    store.set_epoch_deadline(1 << 40)
    yield store
    runtime.release_test_instance(state)


def test_hot_call_from_wat_guest(runtime, bound):
    inst = runtime.linker.instantiate(bound, runtime.load_component(HOT_CALLS.encode()))
    calls = inst.get_func(bound, "calls")
    assert calls(bound, 3) == 3 * runtime.page_size
    n = 20000
    t = time.perf_counter()
    assert calls(bound, n) == n * runtime.page_size
    per_call = (time.perf_counter() - t) / n
    assert per_call < 20e-6, f"{per_call * 1e9:.0f} ns per hot call"  # measured ~170 ns; generous for CI


def test_hot_call_error_traps_with_the_call_name(runtime, bound):
    inst = runtime.linker.instantiate(bound, runtime.load_component(HOT_CALLS.encode()))
    with pytest.raises(wasmtime.WasmtimeError, match=r"forward\.ready: f: 7 is not a pending future of this instance"):
        inst.get_func(bound, "ready")(bound, 7)


def test_hot_call_without_a_bound_instance_traps(runtime):
    store = wasmtime.Store(runtime.wasm_engine)
    store.set_epoch_deadline(1 << 40)
    inst = runtime.linker.instantiate(store, runtime.load_component(HOT_CALLS.encode()))
    with pytest.raises(wasmtime.WasmtimeError, match="kv.page-size: no inferlet instance is bound to this thread"):
        inst.get_func(store, "calls")(store, 1)


def test_standalone_component_runs(runtime, tmp_path):
    path = tmp_path / "ok.wat"
    path.write_text(RUN_OK)
    r = runtime.run(path)
    assert r.error is None and r.output == ""


def test_component_of_another_world_fails_clearly(runtime, tmp_path):
    path = tmp_path / "foreign.wat"
    path.write_text(FOREIGN_IMPORT)
    r = runtime.run(path)
    assert r.error.startswith("not a component of the pie:inferlet world: component imports instance "
                              "`pie:inferlet/teleport@0.1.0`"), r.error


def test_not_a_component(runtime, tmp_path):
    path = tmp_path / "junk.wasm"
    path.write_bytes(b"\0asm junk")
    with pytest.raises(InvalidComponent, match="not a WebAssembly component"):
        runtime.launch(path)


def test_compiled_component_cache(runtime, tmp_path):
    wasm = RUN_OK.encode()
    key = components.cache_key(wasm)
    assert key != components.cache_key(wasm + b" ")
    components.load_component(runtime.wasm_engine, wasm, tmp_path)
    cached = tmp_path / f"{key}.cwasm"
    assert cached.is_file()
    ino = cached.stat().st_ino
    comp = components.load_component(runtime.wasm_engine, wasm, tmp_path)  # deserialized, not rewritten
    assert cached.stat().st_ino == ino  # a rewrite replaces the file (a new inode); a load only touches it
    assert comp.get_export_index("run") is not None
    # a bad cache entry is replaced, not fatal (written as a new file: loaded components mmap theirs,
    # so cache files are never modified in place)
    (tmp_path / "bad").write_bytes(b"corrupt")
    (tmp_path / "bad").replace(cached)
    components.load_component(runtime.wasm_engine, wasm, tmp_path)
    assert cached.read_bytes() != b"corrupt"


def test_python_runtime_component_is_cached(runtime):
    from pie.runtime import python_runtime

    path = python_runtime.ensure_built(runtime.config.pie_home)
    assert path.is_file() and path.name == f"{python_runtime.source_key()}.wasm"
    key = components.cache_key(path.read_bytes())
    assert (runtime.config.components_dir / f"{key}.cwasm").is_file()
    t = time.perf_counter()
    runtime.python_runtime()
    assert time.perf_counter() - t < 1.0


def test_compiled_component_cache_is_trimmed_least_recently_used_first(tmp_path):
    import os

    files = []
    for i in range(5):
        f = tmp_path / f"{i}.cwasm"
        f.write_bytes(b"x" * 100)
        os.utime(f, (1000 + i, 1000 + i))
        files.append(f)
    os.utime(files[0], (5000, 5000))  # used most recently
    removed = components.trim_cache(tmp_path, keep=files[1], limit=250)
    assert [p.name for p in removed] == ["2.cwasm", "3.cwasm", "4.cwasm"]  # 1 is kept: it was just written
    assert {p.name for p in tmp_path.glob("*.cwasm")} == {"0.cwasm", "1.cwasm"}
