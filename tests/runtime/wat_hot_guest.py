"""A hand-written WAT component that calls every hot host function (runtime.instance-id, kv.page-size,
kv.allocate, kv.free, kv.fork, kv.copy-tokens, kv.mask-page, forward.submit, forward.wait, forward.ready)
with the exact WIT types, through the canonical ABI written out by hand: no toolchain, no bindings.

Layout of the guest's linear memory (one memory, owned by the small `$alloc` module so that `canon lower`
can name it and its `realloc` before the main module is instantiated):
- 16..24     return area of allocate / fork / wait: (ptr, len) of the returned list
- 1024..5120 the handle table: the page handles this guest keeps (up to 1024), appended by alloc / fork
- 8192..     a bump allocator (`realloc`, never frees; grows the memory when needed)

Canonical ABI of the calls:
- forward.submit(q: u32, fwd: forward-pass) flattens to 18 core values (> 16), so the lowered import takes
  one pointer to the tuple<u32, forward-pass> in memory (align 4, 72 bytes):
    +0 q | +4 tokens (ptr, len) | +12 input-embeddings | +20 positions | +28 pages | +36 last-page-len
    | +40 mask (list<list<u32>>) | +48 output-indices | +56 samplers | +64 output-masks
- sampler: discriminant u8 at +0, payload at +8 (the payload's alignment is 8 because of
  sample-params.seed: option<u64>); size 40, align 8. sample-params at +8: temperature +8, top-k +12,
  top-p +16, min-p +20, seed: discriminant +24, u64 +32. top-k-distribution(tuple<u32, f32>): +8, +12.
  logprobs(list<u32>): (ptr, len) at +8, +12.
- forward.wait(f) -> list<output>: (i64 f, i32 retptr); output = { ids: list<u32> +0, values: list<f32> +8 },
  16 bytes.

Component exports (what the tests call):
- instance-id() -> u64, page-size() -> u32
- alloc(n) -> u32: allocates n pages, appends their handles to the table, returns the table index of the
  first; count() -> u32 and handle(i) -> u32 read the table
- free-range(i, n): kv.free of table[i..i+n] (the table is not changed); free-all(): kv.free of the whole
  table, then empties it; free-handles(pages: list<u32>): kv.free of raw handles
- fork(i, n) -> u32: kv.fork of table[i..i+n], new handles appended; returns the index of the first
- copy(src, dst, src-offset, dst-offset, count): kv.copy-tokens on table[src], table[dst]
- mask(page, runs: list<u32>): kv.mask-page on table[page]
- submit(tokens, first-position, num-positions, first-page, num-pages, last-page-len, sampler, arg) -> u64:
  builds the forward-pass (positions first-position.., pages table[first-page..+num-pages], causal mask,
  n outputs at the last input (set-repeat(n), initially 1), the i-th with the sampler for arg + i:
  0 greedy, 1 sample(the set-sample parameters, seed some(arg + i) or none), 2 top-k-distribution
  ((arg + i, 1.0)), 3 logprobs([arg + i]), 4 raw-logits, 5 none (no outputs)); submits on queue 0
- set-sample(temperature: f32, top-k: u32, top-p: f32, min-p: f32, seeded: bool): the sample-params of
  sampler 1 (initially 0.8, 20, 0.9, 0.0, seeded)
- wait(f) -> u32: forward.wait; keeps the outputs, returns their number; out-ids(i) -> list<u32> and
  out-values(i) -> list<f32> return the kept outputs' fields straight from the list the host wrote
- ready(f) -> bool
- forward-greedy(tokens, first-position, first-page, num-pages, last-page-len) -> u32: submit + wait with one
  greedy sampler; the token read from the returned list in the guest
- forward-logprob(tokens, first-position, first-page, num-pages, last-page-len, token) -> f32: the same with
  logprobs([token]); the value read in the guest
"""

HOT_GUEST = r"""
(component
  (import "pie:inferlet/runtime@0.1.0" (instance $rt
    (export "instance-id" (func (result u64)))
  ))
  (import "pie:inferlet/kv@0.1.0" (instance $kv
    (export "page-size" (func (result u32)))
    (export "allocate" (func (param "count" u32) (result (list u32))))
    (export "free" (func (param "pages" (list u32))))
    (export "fork" (func (param "pages" (list u32)) (result (list u32))))
    (export "copy-tokens" (func (param "src" u32) (param "dst" u32) (param "src-offset" u32)
                                (param "dst-offset" u32) (param "count" u32)))
    (export "mask-page" (func (param "p" u32) (param "mask" (list u32))))
  ))
  (import "pie:inferlet/forward@0.1.0" (instance $fwd
    (type $sample-params-def (record
      (field "temperature" f32)
      (field "top-k" u32)
      (field "top-p" f32)
      (field "min-p" f32)
      (field "seed" (option u64))))
    (export "sample-params" (type $sample-params (eq $sample-params-def)))
    (type $sampler-def (variant
      (case "greedy")
      (case "sample" $sample-params)
      (case "top-k-distribution" (tuple u32 f32))
      (case "logprobs" (list u32))
      (case "raw-logits")))
    (export "sampler" (type $sampler (eq $sampler-def)))
    (type $forward-pass-def (record
      (field "tokens" (list u32))
      (field "input-embeddings" (list u32))
      (field "positions" (list u32))
      (field "pages" (list u32))
      (field "last-page-len" u32)
      (field "mask" (list (list u32)))
      (field "output-indices" (list u32))
      (field "samplers" (list $sampler))
      (field "output-masks" (list (list u32)))))
    (export "forward-pass" (type $forward-pass (eq $forward-pass-def)))
    (type $output-def (record
      (field "ids" (list u32))
      (field "values" (list f32))))
    (export "output" (type $output (eq $output-def)))
    (export "submit" (func (param "q" u32) (param "fwd" $forward-pass) (result u64)))
    (export "wait" (func (param "f" u64) (result (list $output))))
    (export "ready" (func (param "f" u64) (result bool)))
  ))

  ;; The memory and its allocator, instantiated first so that the lowered imports can use them.
  (core module $alloc
    (memory (export "memory") 1)
    (global $bump (mut i32) (i32.const 8192))
    (func (export "realloc") (param $old i32) (param $old-size i32) (param $align i32) (param $size i32)
                             (result i32)
      (local $p i32) (local $end i32) (local $have i32)
      (local.set $p (i32.and (i32.add (global.get $bump) (i32.sub (local.get $align) (i32.const 1)))
                             (i32.sub (i32.const 0) (local.get $align))))
      (local.set $end (i32.add (local.get $p) (local.get $size)))
      (local.set $have (i32.shl (memory.size) (i32.const 16)))
      (if (i32.gt_u (local.get $end) (local.get $have))
        (then
          (if (i32.eq (memory.grow (i32.shr_u (i32.add (i32.sub (local.get $end) (local.get $have))
                                                       (i32.const 0xffff))
                                              (i32.const 16)))
                      (i32.const -1))
            (then unreachable))))
      (global.set $bump (local.get $end))
      (if (local.get $old)
        (then (memory.copy (local.get $p) (local.get $old)
                           (select (local.get $old-size) (local.get $size)
                                   (i32.lt_u (local.get $old-size) (local.get $size))))))
      (local.get $p)))
  (core instance $a (instantiate $alloc))
  (alias core export $a "memory" (core memory $mem))
  (alias core export $a "realloc" (core func $realloc))

  (core func $instance-id (canon lower (func $rt "instance-id")))
  (core func $page-size (canon lower (func $kv "page-size")))
  (core func $allocate (canon lower (func $kv "allocate") (memory $mem) (realloc $realloc)))
  (core func $free (canon lower (func $kv "free") (memory $mem)))
  (core func $fork (canon lower (func $kv "fork") (memory $mem) (realloc $realloc)))
  (core func $copy-tokens (canon lower (func $kv "copy-tokens")))
  (core func $mask-page (canon lower (func $kv "mask-page") (memory $mem)))
  (core func $submit (canon lower (func $fwd "submit") (memory $mem)))
  (core func $wait (canon lower (func $fwd "wait") (memory $mem) (realloc $realloc)))
  (core func $ready (canon lower (func $fwd "ready")))

  (core module $main
    (import "env" "memory" (memory 1))
    (import "env" "realloc" (func $realloc (param i32 i32 i32 i32) (result i32)))
    (import "host" "instance-id" (func $instance-id (result i64)))
    (import "host" "page-size" (func $page-size (result i32)))
    (import "host" "allocate" (func $allocate (param i32 i32)))                 ;; count, retptr
    (import "host" "free" (func $free (param i32 i32)))                         ;; pages (ptr, len)
    (import "host" "fork" (func $fork (param i32 i32 i32)))                     ;; pages (ptr, len), retptr
    (import "host" "copy-tokens" (func $copy-tokens (param i32 i32 i32 i32 i32)))
    (import "host" "mask-page" (func $mask-page (param i32 i32 i32)))           ;; p, mask (ptr, len)
    (import "host" "submit" (func $submit (param i32) (result i64)))            ;; &(q, fwd)
    (import "host" "wait" (func $wait (param i64 i32)))                         ;; f, retptr
    (import "host" "ready" (func $ready (param i64) (result i32)))

    (global $n (mut i32) (i32.const 0))      ;; handles in the table
    (global $outs (mut i32) (i32.const 0))   ;; the last wait's list<output>: ptr
    (global $nouts (mut i32) (i32.const 0))  ;; ... and length
    ;; the sample sampler's parameters (set-sample)
    (global $temperature (mut f32) (f32.const 0.8))
    (global $top-k (mut i32) (i32.const 20))
    (global $top-p (mut f32) (f32.const 0.9))
    (global $min-p (mut f32) (f32.const 0.0))
    (global $seeded (mut i32) (i32.const 1))
    (global $repeat (mut i32) (i32.const 1))  ;; outputs per pass of submit (set-repeat)
    (func (export "set-repeat") (param i32) (global.set $repeat (local.get 0)))
    (func (export "set-sample") (param f32 i32 f32 f32 i32)
      (global.set $temperature (local.get 0))
      (global.set $top-k (local.get 1))
      (global.set $top-p (local.get 2))
      (global.set $min-p (local.get 3))
      (global.set $seeded (local.get 4)))

    (func $new (param $size i32) (param $align i32) (result i32)
      (call $realloc (i32.const 0) (i32.const 0) (local.get $align) (local.get $size)))
    (func $slot (param $i i32) (result i32)
      (i32.add (i32.const 1024) (i32.shl (local.get $i) (i32.const 2))))
    ;; appends the list<u32> at (ptr, len) to the handle table; returns the index of its first element
    (func $append (param $ptr i32) (param $len i32) (result i32)
      (local $first i32) (local $k i32)
      (local.set $first (global.get $n))
      (block $done
        (loop $l
          (br_if $done (i32.ge_u (local.get $k) (local.get $len)))
          (i32.store (call $slot (i32.add (local.get $first) (local.get $k)))
                     (i32.load (i32.add (local.get $ptr) (i32.shl (local.get $k) (i32.const 2)))))
          (local.set $k (i32.add (local.get $k) (i32.const 1)))
          (br $l)))
      (global.set $n (i32.add (global.get $n) (local.get $len)))
      (local.get $first))

    (func (export "instance-id") (result i64) (call $instance-id))
    (func (export "page-size") (result i32) (call $page-size))
    (func (export "count") (result i32) (global.get $n))
    (func (export "handle") (param $i i32) (result i32)
      (if (i32.ge_u (local.get $i) (global.get $n)) (then unreachable))
      (i32.load (call $slot (local.get $i))))

    (func (export "alloc") (param $count i32) (result i32)
      (call $allocate (local.get $count) (i32.const 16))
      (call $append (i32.load (i32.const 16)) (i32.load (i32.const 20))))
    (func (export "free-range") (param $i i32) (param $count i32)
      (call $free (call $slot (local.get $i)) (local.get $count)))
    (func (export "free-all")
      (call $free (i32.const 1024) (global.get $n))
      (global.set $n (i32.const 0)))
    (func (export "free-handles") (param $ptr i32) (param $len i32)
      (call $free (local.get $ptr) (local.get $len)))
    (func (export "fork") (param $i i32) (param $count i32) (result i32)
      (call $fork (call $slot (local.get $i)) (local.get $count) (i32.const 16))
      (call $append (i32.load (i32.const 16)) (i32.load (i32.const 20))))
    (func (export "copy") (param $src i32) (param $dst i32) (param $src-off i32) (param $dst-off i32)
                          (param $count i32)
      (call $copy-tokens (i32.load (call $slot (local.get $src))) (i32.load (call $slot (local.get $dst)))
                         (local.get $src-off) (local.get $dst-off) (local.get $count)))
    (func (export "mask") (param $page i32) (param $ptr i32) (param $len i32)
      (call $mask-page (i32.load (call $slot (local.get $page))) (local.get $ptr) (local.get $len)))

    ;; Writes a sampler (40 bytes, align 8) of the given case at $s; see the module docstring.
    (func $sampler (param $s i32) (param $kind i32) (param $arg i32)
      (local $ids i32)
      (i64.store (local.get $s) (i64.const 0))  ;; discriminant byte + padding
      (i32.store8 (local.get $s) (local.get $kind))
      (if (i32.eq (local.get $kind) (i32.const 1))
        (then  ;; sample(sample-params)
          (f32.store offset=8 (local.get $s) (global.get $temperature))
          (i32.store offset=12 (local.get $s) (global.get $top-k))
          (f32.store offset=16 (local.get $s) (global.get $top-p))
          (f32.store offset=20 (local.get $s) (global.get $min-p))
          (i64.store offset=24 (local.get $s) (i64.const 0))
          (i64.store offset=32 (local.get $s) (i64.const 0))
          (if (global.get $seeded)
            (then
              (i32.store8 offset=24 (local.get $s) (i32.const 1))  ;; seed: some(arg)
              (i64.store offset=32 (local.get $s) (i64.extend_i32_u (local.get $arg)))))))
      (if (i32.eq (local.get $kind) (i32.const 2))
        (then  ;; top-k-distribution((k, temperature))
          (i32.store offset=8 (local.get $s) (local.get $arg))
          (f32.store offset=12 (local.get $s) (f32.const 1.0))))
      (if (i32.eq (local.get $kind) (i32.const 3))
        (then  ;; logprobs([arg])
          (local.set $ids (call $new (i32.const 4) (i32.const 4)))
          (i32.store (local.get $ids) (local.get $arg))
          (i32.store offset=8 (local.get $s) (local.get $ids))
          (i32.store offset=12 (local.get $s) (i32.const 1)))))

    (func (export "submit")
      (param $tokens i32) (param $num-tokens i32) (param $first-pos i32) (param $num-pos i32)
      (param $first-page i32) (param $num-pages i32) (param $last-len i32) (param $kind i32) (param $arg i32)
      (result i64)
      (call $submit-pass (local.get $tokens) (local.get $num-tokens) (local.get $first-pos) (local.get $num-pos)
                         (local.get $first-page) (local.get $num-pages) (local.get $last-len) (local.get $kind)
                         (local.get $arg) (global.get $repeat)))
    (func $submit-pass
      (param $tokens i32) (param $num-tokens i32) (param $first-pos i32) (param $num-pos i32)
      (param $first-page i32) (param $num-pages i32) (param $last-len i32) (param $kind i32) (param $arg i32)
      (param $repeat i32) (result i64)
      (local $pos i32) (local $k i32) (local $idx i32) (local $samplers i32) (local $num-out i32)
      (local $args i32)
      ;; positions: first-pos, first-pos + 1, ...
      (local.set $pos (call $new (i32.shl (local.get $num-pos) (i32.const 2)) (i32.const 4)))
      (block $done
        (loop $l
          (br_if $done (i32.ge_u (local.get $k) (local.get $num-pos)))
          (i32.store (i32.add (local.get $pos) (i32.shl (local.get $k) (i32.const 2)))
                     (i32.add (local.get $first-pos) (local.get $k)))
          (local.set $k (i32.add (local.get $k) (i32.const 1)))
          (br $l)))
      ;; $repeat outputs at the last input, the i-th with arg + i (none for kind 5)
      (local.set $num-out (select (local.get $repeat) (i32.const 0) (i32.lt_u (local.get $kind) (i32.const 5))))
      (local.set $idx (call $new (i32.shl (local.get $num-out) (i32.const 2)) (i32.const 4)))
      (local.set $samplers (call $new (i32.mul (local.get $num-out) (i32.const 40)) (i32.const 8)))
      (local.set $k (i32.const 0))
      (block $done
        (loop $l
          (br_if $done (i32.ge_u (local.get $k) (local.get $num-out)))
          (i32.store (i32.add (local.get $idx) (i32.shl (local.get $k) (i32.const 2)))
                     (i32.sub (local.get $num-tokens) (i32.const 1)))
          (call $sampler (i32.add (local.get $samplers) (i32.mul (local.get $k) (i32.const 40)))
                         (local.get $kind) (i32.add (local.get $arg) (local.get $k)))
          (local.set $k (i32.add (local.get $k) (i32.const 1)))
          (br $l)))
      ;; the parameters tuple<u32, forward-pass>
      (local.set $args (call $new (i32.const 72) (i32.const 4)))
      (i32.store offset=0 (local.get $args) (i32.const 0))                   ;; q = 0
      (i32.store offset=4 (local.get $args) (local.get $tokens))             ;; tokens
      (i32.store offset=8 (local.get $args) (local.get $num-tokens))
      (i32.store offset=12 (local.get $args) (i32.const 1024))               ;; input-embeddings: []
      (i32.store offset=16 (local.get $args) (i32.const 0))
      (i32.store offset=20 (local.get $args) (local.get $pos))               ;; positions
      (i32.store offset=24 (local.get $args) (local.get $num-pos))
      (i32.store offset=28 (local.get $args) (call $slot (local.get $first-page)))  ;; pages
      (i32.store offset=32 (local.get $args) (local.get $num-pages))
      (i32.store offset=36 (local.get $args) (local.get $last-len))          ;; last-page-len
      (i32.store offset=40 (local.get $args) (i32.const 1024))               ;; mask: [] (causal)
      (i32.store offset=44 (local.get $args) (i32.const 0))
      (i32.store offset=48 (local.get $args) (local.get $idx))               ;; output-indices
      (i32.store offset=52 (local.get $args) (local.get $num-out))
      (i32.store offset=56 (local.get $args) (local.get $samplers))          ;; samplers
      (i32.store offset=60 (local.get $args) (local.get $num-out))
      (i32.store offset=64 (local.get $args) (i32.const 1024))               ;; output-masks: []
      (i32.store offset=68 (local.get $args) (i32.const 0))
      (call $submit (local.get $args)))

    (func $wait-pass (export "wait") (param $f i64) (result i32)
      (call $wait (local.get $f) (i32.const 16))
      (global.set $outs (i32.load (i32.const 16)))
      (global.set $nouts (i32.load (i32.const 20)))
      (global.get $nouts))
    ;; address of outputs[i] (an output record: ids at +0, values at +8)
    (func $output (param $i i32) (result i32)
      (if (i32.ge_u (local.get $i) (global.get $nouts)) (then unreachable))
      (i32.add (global.get $outs) (i32.shl (local.get $i) (i32.const 4))))
    ;; lifted as list results: the returned pointer addresses a (ptr, len) pair, here the record's field
    (func (export "out-ids") (param $i i32) (result i32) (call $output (local.get $i)))
    (func (export "out-values") (param $i i32) (result i32) (i32.add (call $output (local.get $i)) (i32.const 8)))
    (func (export "ready") (param $f i64) (result i32) (call $ready (local.get $f)))

    (func (export "forward-greedy")
      (param $tokens i32) (param $num-tokens i32) (param $first-pos i32) (param $first-page i32)
      (param $num-pages i32) (param $last-len i32) (result i32)
      (local $o i32)
      (if (i32.ne (call $wait-pass (call $submit-pass (local.get $tokens) (local.get $num-tokens)
                                                      (local.get $first-pos) (local.get $num-tokens)
                                                      (local.get $first-page) (local.get $num-pages)
                                                      (local.get $last-len) (i32.const 0) (i32.const 0)
                                                      (i32.const 1)))
                  (i32.const 1))
        (then unreachable))
      (local.set $o (call $output (i32.const 0)))
      (if (i32.ne (i32.load offset=4 (local.get $o)) (i32.const 1)) (then unreachable))  ;; one id
      (i32.load (i32.load (local.get $o))))                                              ;; ids[0]

    (func (export "forward-logprob")
      (param $tokens i32) (param $num-tokens i32) (param $first-pos i32) (param $first-page i32)
      (param $num-pages i32) (param $last-len i32) (param $token i32) (result f32)
      (local $o i32)
      (if (i32.ne (call $wait-pass (call $submit-pass (local.get $tokens) (local.get $num-tokens)
                                                      (local.get $first-pos) (local.get $num-tokens)
                                                      (local.get $first-page) (local.get $num-pages)
                                                      (local.get $last-len) (i32.const 3) (local.get $token)
                                                      (i32.const 1)))
                  (i32.const 1))
        (then unreachable))
      (local.set $o (call $output (i32.const 0)))
      (if (i32.ne (i32.load offset=12 (local.get $o)) (i32.const 1)) (then unreachable))  ;; one value
      (f32.load (i32.load offset=8 (local.get $o))))                                      ;; values[0]
  )
  (core instance $m (instantiate $main
    (with "env" (instance $a))
    (with "host" (instance
      (export "instance-id" (func $instance-id))
      (export "page-size" (func $page-size))
      (export "allocate" (func $allocate))
      (export "free" (func $free))
      (export "fork" (func $fork))
      (export "copy-tokens" (func $copy-tokens))
      (export "mask-page" (func $mask-page))
      (export "submit" (func $submit))
      (export "wait" (func $wait))
      (export "ready" (func $ready))))))

  (func (export "instance-id") (result u64) (canon lift (core func $m "instance-id")))
  (func (export "page-size") (result u32) (canon lift (core func $m "page-size")))
  (func (export "count") (result u32) (canon lift (core func $m "count")))
  (func (export "handle") (param "i" u32) (result u32) (canon lift (core func $m "handle")))
  (func (export "alloc") (param "n" u32) (result u32) (canon lift (core func $m "alloc")))
  (func (export "free-range") (param "i" u32) (param "n" u32) (canon lift (core func $m "free-range")))
  (func (export "free-all") (canon lift (core func $m "free-all")))
  (func (export "free-handles") (param "pages" (list u32))
    (canon lift (core func $m "free-handles") (memory $mem) (realloc $realloc)))
  (func (export "fork") (param "i" u32) (param "n" u32) (result u32) (canon lift (core func $m "fork")))
  (func (export "copy") (param "src" u32) (param "dst" u32) (param "src-offset" u32) (param "dst-offset" u32)
                        (param "count" u32)
    (canon lift (core func $m "copy")))
  (func (export "mask") (param "page" u32) (param "runs" (list u32))
    (canon lift (core func $m "mask") (memory $mem) (realloc $realloc)))
  (func (export "submit") (param "tokens" (list u32)) (param "first-position" u32) (param "num-positions" u32)
                          (param "first-page" u32) (param "num-pages" u32) (param "last-page-len" u32)
                          (param "sampler" u32) (param "arg" u32) (result u64)
    (canon lift (core func $m "submit") (memory $mem) (realloc $realloc)))
  (func (export "set-sample") (param "temperature" f32) (param "top-k" u32) (param "top-p" f32) (param "min-p" f32)
                              (param "seeded" bool)
    (canon lift (core func $m "set-sample")))
  (func (export "set-repeat") (param "n" u32) (canon lift (core func $m "set-repeat")))
  (func (export "wait") (param "f" u64) (result u32) (canon lift (core func $m "wait")))
  (func (export "out-ids") (param "i" u32) (result (list u32)) (canon lift (core func $m "out-ids") (memory $mem)))
  (func (export "out-values") (param "i" u32) (result (list f32))
    (canon lift (core func $m "out-values") (memory $mem)))
  (func (export "ready") (param "f" u64) (result bool) (canon lift (core func $m "ready")))
  (func (export "forward-greedy") (param "tokens" (list u32)) (param "first-position" u32) (param "first-page" u32)
                                  (param "num-pages" u32) (param "last-page-len" u32) (result u32)
    (canon lift (core func $m "forward-greedy") (memory $mem) (realloc $realloc)))
  (func (export "forward-logprob") (param "tokens" (list u32)) (param "first-position" u32)
                                   (param "first-page" u32) (param "num-pages" u32) (param "last-page-len" u32)
                                   (param "token" u32) (result f32)
    (canon lift (core func $m "forward-logprob") (memory $mem) (realloc $realloc)))
)
"""
