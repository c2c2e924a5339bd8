"""WAT components for shim tests and microbenchmarks (hand-written: no toolchain needed)."""

# `calls(n)`: calls kv.page-size n times through the C++ shim; returns the sum.
# `ready(f)`: forward.ready(f) once.
HOT_CALLS = r"""
(component
  (import "pie:inferlet/kv@0.1.0" (instance $kv
    (export "page-size" (func (result u32)))
  ))
  (import "pie:inferlet/forward@0.1.0" (instance $fwd
    (export "ready" (func (param "f" u64) (result bool)))
  ))
  (core func $page_size (canon lower (func $kv "page-size")))
  (core func $ready (canon lower (func $fwd "ready")))
  (core module $m
    (import "host" "page-size" (func $ps (result i32)))
    (import "host" "ready" (func $ready (param i64) (result i32)))
    (func (export "calls") (param $n i32) (result i32)
      (local $acc i32)
      (block $done
        (loop $l
          (br_if $done (i32.eqz (local.get $n)))
          (local.set $acc (i32.add (local.get $acc) (call $ps)))
          (local.set $n (i32.sub (local.get $n) (i32.const 1)))
          (br $l)))
      (local.get $acc))
    (func (export "ready") (param $f i64) (result i32) (call $ready (local.get $f))))
  (core instance $i (instantiate $m (with "host" (instance
    (export "page-size" (func $page_size))
    (export "ready" (func $ready))))))
  (func (export "calls") (param "n" u32) (result u32) (canon lift (core func $i "calls")))
  (func (export "ready") (param "f" u64) (result bool) (canon lift (core func $i "ready")))
)
"""

# The same loop over a stock wasmtime-py Python callback (`bench:host/noop.page-size`), for comparison.
STOCK_CALLS = HOT_CALLS.replace("pie:inferlet/kv@0.1.0", "bench:host/noop").split('(import "pie:inferlet/forward')[0] + r"""
  (core func $page_size (canon lower (func $kv "page-size")))
  (core module $m
    (import "host" "page-size" (func $ps (result i32)))
    (func (export "calls") (param $n i32) (result i32)
      (local $acc i32)
      (block $done
        (loop $l
          (br_if $done (i32.eqz (local.get $n)))
          (local.set $acc (i32.add (local.get $acc) (call $ps)))
          (local.set $n (i32.sub (local.get $n) (i32.const 1)))
          (br $l)))
      (local.get $acc)))
  (core instance $i (instantiate $m (with "host" (instance (export "page-size" (func $page_size))))))
  (func (export "calls") (param "n" u32) (result u32) (canon lift (core func $i "calls")))
)
"""

# A standalone inferlet (world `inferlet`): `run` returns ok after one hot call.
RUN_OK = r"""
(component
  (import "pie:inferlet/kv@0.1.0" (instance $kv (export "page-size" (func (result u32)))))
  (core func $page_size (canon lower (func $kv "page-size")))
  (core module $m
    (import "host" "page-size" (func $ps (result i32)))
    (memory (export "mem") 1)
    ;; returns the address of a zeroed return area: result discriminant 0 = ok
    (func (export "run") (result i32) (drop (call $ps)) (i32.const 16)))
  (core instance $i (instantiate $m (with "host" (instance (export "page-size" (func $page_size))))))
  (alias core export $i "mem" (core memory $mem))
  (type $r (result (error string)))
  (func (export "run") (result $r) (canon lift (core func $i "run") (memory $mem)))
)
"""

# Imports an interface that is not part of the pie:inferlet world.
FOREIGN_IMPORT = r"""
(component
  (import "pie:inferlet/teleport@0.1.0" (instance $t (export "go" (func))))
  (core module $m (memory (export "mem") 1) (func (export "run") (result i32) (i32.const 16)))
  (core instance $i (instantiate $m))
  (alias core export $i "mem" (core memory $mem))
  (type $r (result (error string)))
  (func (export "run") (result $r) (canon lift (core func $i "run") (memory $mem)))
)
"""
