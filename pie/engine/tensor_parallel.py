"""Tensor parallelism: one model's attention heads, MLP and LM head split over W processes
(torch.distributed process groups: gloo on the CPU).

Rank r of W holds (Megatron's layout; Hq, Hkv query/KV heads, D head_dim, I intermediate, V vocabulary):
- q/k/v, column-parallel by heads: query heads [r Hq/W, (r+1) Hq/W) and KV heads [r Hkv/W, (r+1) Hkv/W),
  with their biases; q/k norms per head are whole (they are (D,)). Its attention and its KV cache see
  only those heads: the cache has the same pages on every rank (page p of rank r holds page p's tokens
  for r's KV heads), so the page table, the page pool and every page id are one, kept on rank 0.
- o_proj, row-parallel: the (H, Hq D / W) columns of its heads; each rank's (N, H) partial product is
  all-reduced (summed) before the residual add.
- gate/up, column-parallel: intermediate rows [r I/W, (r+1) I/W); down, row-parallel (those columns),
  all-reduced like o_proj.
- LM head, by vocabulary rows: the vocabulary padded with zero rows to Vp (a multiple of W); rank r's
  (M, Vp/W) logits are all-gathered into (M, Vp) and cut to (M, V).
- embeddings and the layer norms: whole on every rank.

The control plane and the runtime stay in one process, rank 0, whose runner is a `TensorParallelRunner`
(the ModelRunner interface; it runs shard 0 itself). Per forward pass it sends the batch's description
(the RaggedBatch, pickled once, samplers left out) to the W - 1 worker processes, which run the same
plan on their shards and join the collectives; sampling runs on rank 0 only, on the gathered logits.
Page copies go to every rank the same way, in the same order. A worker that dies (or fails) makes the
pass raise `TensorParallelError` naming it, within `collective_timeout_s` at worst (a killed process's
sockets close at once, which gloo reports at once), and every later call raise it too.

>>> runner = TensorParallelRunner.from_path(model_dir, EngineConfig(), world_size=2)   # doctest: +SKIP
>>> runner.execute([request])[0].outputs                                                 # doctest: +SKIP
[1234]
>>> runner.close()                                                                       # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import pickle
import traceback
import weakref
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from pie.engine.config import EngineConfig, ModelConfig, UnsupportedModelError
from pie.engine.ragged_batch import RaggedBatch
from pie.engine.runner import ModelRunner


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker died or failed: the model cannot run without its shard."""


# ---- the split -------------------------------------------------------------------------------------
def check_tensor_parallel(config: ModelConfig, world_size: int) -> None:
    """Raises UnsupportedModelError, one line naming the numbers, when `config` cannot be split over
    `world_size` ranks (heads, KV heads or the MLP's intermediate size do not divide, or a feature has
    no split here). The vocabulary need not divide: it is padded."""
    if world_size < 1:
        raise UnsupportedModelError(f"tensor parallel size must be >= 1, got {world_size}")
    for what, n in (("attention heads", config.num_heads), ("KV heads", config.num_kv_heads),
                    ("MLP intermediate size", config.intermediate_size)):
        if n % world_size:
            raise UnsupportedModelError(f"tensor parallel {world_size}: {what} {n} is not divisible by "
                                        f"{world_size}; choose a tensor parallel size that divides {n}")
    if config.is_moe:
        raise UnsupportedModelError(f"tensor parallel {world_size}: mixture-of-experts models ({config.family}, "
                                    f"{config.num_experts} experts) are not split yet; use tensor parallel 1")
    if config.qk_norm == "whole":
        raise UnsupportedModelError(f"tensor parallel {world_size}: q/k norms over the whole projection "
                                    f"({config.family}) are not split yet; use tensor parallel 1")


def shard_config(config: ModelConfig, world_size: int) -> ModelConfig:
    """The model as one rank sees it: Hq/W query heads, Hkv/W KV heads, I/W intermediate (the
    vocabulary and hidden size whole: the LM head is split by `vocab_shard`)."""
    check_tensor_parallel(config, world_size)
    return dataclasses.replace(config, num_heads=config.num_heads // world_size,
                               num_kv_heads=config.num_kv_heads // world_size,
                               intermediate_size=config.intermediate_size // world_size)


def _rows(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank's block of t's rows (dim 0), which divides by world_size."""
    n = t.shape[0] // world_size
    return t[rank * n:(rank + 1) * n]


def _cols(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank's block of t's columns (dim 1), which divides by world_size."""
    n = t.shape[1] // world_size
    return t[:, rank * n:(rank + 1) * n]


def shard_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor], rank: int,
                     world_size: int) -> dict[str, torch.Tensor]:
    """Rank's shard of an HF state dict, under the same names, with the shapes `shard_config` expects
    (see the module doc). Tensors that are not split (embeddings, norms, the LM head: see `vocab_shard`)
    are the same objects. Raises UnsupportedModelError as `check_tensor_parallel` does, and for
    quantized (packed) weights."""
    check_tensor_parallel(config, world_size)
    q, kv = config.q_size, config.kv_size
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if not name.startswith("model.layers.") or "norm" in name:
            out[name] = t
            continue
        if not isinstance(t, torch.Tensor):
            raise UnsupportedModelError(f"tensor parallel {world_size}: {name} is a quantized weight; "
                                        "quantized models are not split yet")
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight",
                          "q_proj.bias", "k_proj.bias", "v_proj.bias")):
            # (heads * D, ...) or (I, H): heads / intermediate rows are contiguous blocks of rows
            out[name] = _rows(t, rank, world_size)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):  # (H, Hq D) / (H, I): the input columns
            out[name] = _cols(t, rank, world_size)
        elif name.endswith("qkv_proj.weight"):  # (Hq D + 2 Hkv D, H): q, k and v each by heads
            out[name] = torch.cat([_rows(p, rank, world_size) for p in t.split([q, kv, kv])])
        elif name.endswith("gate_up_proj.weight"):  # (2I, H): gate rows then up rows, each by intermediate
            out[name] = torch.cat([_rows(p, rank, world_size) for p in t.chunk(2)])
        else:
            raise UnsupportedModelError(f"tensor parallel {world_size}: no split known for weight {name!r}")
    return out


def padded_vocab(vocab_size: int, world_size: int) -> int:
    """The vocabulary rounded up to a multiple of world_size (the LM head's padded rows)."""
    return -(-vocab_size // world_size) * world_size


def vocab_shard(lm_head: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank's (Vp/W, H) rows of the LM head (V, H), padded with zero rows to Vp (`padded_vocab`)."""
    v, h = lm_head.shape
    per_rank = padded_vocab(v, world_size) // world_size
    start, stop = rank * per_rank, min(v, (rank + 1) * per_rank)
    shard = lm_head.new_zeros((per_rank, h))
    if stop > start:
        shard[:stop - start] = lm_head[start:stop]
    return shard


class TensorParallelOps:
    """The backend's layer ops with an all-reduce (sum over the group) after each row-parallel linear
    layer, recognised by its weight (o_proj, down): the layer loop calls them as it calls any linear."""

    def __init__(self, ops: Any, row_parallel: list[torch.Tensor], group: Any):
        self.ops = ops
        self.row_parallel_ids = {id(w) for w in row_parallel}
        self.row_parallel = row_parallel  # keeps the ids valid
        self.group = group

    def linear(self, x: torch.Tensor, w: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ops.linear(x, w, bias)  # (N, out)
        if id(w) in self.row_parallel_ids:  # y is this rank's partial sum of the (N, H) output
            y = y.contiguous()
            self.group.allreduce([y]).wait()
        return y

    def __getattr__(self, name: str) -> Any:  # rms_norm, add_rms_norm: unchanged
        return getattr(self.ops, name)


def gather_logits(local: torch.Tensor, group: Any, world_size: int) -> torch.Tensor:
    """This rank's (M, Vp/W) logits -> every rank's, (M, Vp) in rank order (each rank calls it)."""
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size)]
    group.allgather([parts], [local]).wait()
    return torch.cat(parts, dim=1)


def _row_parallel_weights(runner: ModelRunner) -> list[torch.Tensor]:
    return [w for lw in runner.model.layers for w in (lw.o, lw.mlp.down)]


def _setup_shard(runner: ModelRunner, rank: int, world_size: int, group: Any) -> None:
    """Turns a runner built from a shard (`shard_config`, `shard_state_dict`) into rank's part of the
    model: the LM head's vocabulary rows, all-reduces after the row-parallel layers."""
    runner.model.lm_head = vocab_shard(runner.model.lm_head, rank, world_size)
    runner.attention.ops = TensorParallelOps(runner.attention.ops, _row_parallel_weights(runner), group)


# ---- processes -------------------------------------------------------------------------------------
def _gloo_group(store: Any, rank: int, world_size: int, timeout_s: float) -> Any:
    """A gloo process group of its own over `store` (no default group: several runners may live in one
    process), on the loopback interface."""
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    options._timeout = timedelta(seconds=timeout_s)
    return dist.ProcessGroupGloo(dist.PrefixStore("pie-tp", store), rank, world_size, options)


class _Span(NamedTuple):
    """A page copy (the fields of pie.control.CopySpan), picklable."""

    src_page: int
    src_offset: int
    dst_page: int
    dst_offset: int
    count: int


def _worker_main(rank: int, world_size: int, port: int, source: Any, engine_config: EngineConfig,
                 timeout_s: float, conn: Connection) -> None:
    """A worker process: builds shard `rank`, reports ("ready",) or ("error", text) on conn, then runs
    what rank 0 sends until ("stop",) or until rank 0 is gone (conn closed). A failure is reported on
    conn before the process exits, so rank 0 can name it."""
    try:
        if engine_config.threads is None:
            torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
        if isinstance(source, tuple):
            config, state_dict = source
        else:
            from pie.engine.weights import load_model_dir

            config, state_dict = load_model_dir(source)
        runner = ModelRunner(shard_config(config, world_size), shard_state_dict(config, state_dict, rank, world_size),
                             engine_config)
        del state_dict, source
        store = dist.TCPStore("127.0.0.1", port, world_size, False, timedelta(seconds=timeout_s))
        conn.send(("ready",))
        group = _gloo_group(store, rank, world_size, timeout_s)
        _setup_shard(runner, rank, world_size, group)
        while True:
            try:
                message = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):  # rank 0 is gone
                return
            if message[0] == "forward":
                gather_logits(runner.forward(message[1]), group, world_size)  # rank 0 samples
            elif message[0] == "copy":
                runner.cache.copy_spans(message[1])
            elif message[0] == "stop":
                return
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1)


def _stop_workers(processes: list[Any], conns: list[Connection]) -> None:
    """Asks the workers to stop, then ends those that do not within a few seconds."""
    for conn in conns:
        try:
            conn.send_bytes(pickle.dumps(("stop",)))
        except OSError:
            pass
    for p in processes:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    for conn in conns:
        conn.close()


class _BroadcastingCache:
    """The runner's KV cache as the control layer sees it: page copies run on every rank (the workers'
    first, sent in order with the passes); everything else is the local cache's."""

    def __init__(self, cache: Any, runner: "TensorParallelRunner"):
        self._cache = cache
        self._runner = runner

    def copy_spans(self, spans) -> None:
        spans = [_Span(s.src_page, s.src_offset, s.dst_page, s.dst_offset, s.count) for s in spans]
        self._runner._send(("copy", spans))
        self._cache.copy_spans(spans)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


class TensorParallelRunner(ModelRunner):
    """A ModelRunner whose model is split over `world_size` processes (see the module doc): this process
    runs rank 0's shard and the control of the others, started here (torch.multiprocessing, spawn) and
    reached over a TCP rendezvous on 127.0.0.1.

    source: a model folder (each worker loads it) or None (the workers get `state_dict` itself).
    engine_config applies to every rank: kv_cache_mb sizes each rank's cache of Hkv/W heads, so the same
    budget holds W times the pages of one process. collective_timeout_s bounds a wait on a collective
    (a hung worker); a dead one is seen at once.
    """

    def __init__(self, model_config: ModelConfig, state_dict: dict[str, torch.Tensor],
                 engine_config: EngineConfig = EngineConfig(), seed: int | None = None, world_size: int = 2,
                 source: str | None = None, collective_timeout_s: float = 60.0):
        if torch.device(engine_config.device).type != "cpu":
            raise UnsupportedModelError(f"tensor parallel {world_size}: only the CPU (gloo) is supported yet, "
                                        f"not device {engine_config.device!r}")
        config = shard_config(model_config, world_size)  # checks that the model divides
        self.world_size = world_size
        self.rank = 0
        self._failure: str | None = None
        self.processes: list[Any] = []
        self.conns: list[Connection] = []
        store = dist.TCPStore("127.0.0.1", 0, world_size, True, timedelta(seconds=collective_timeout_s),
                              wait_for_workers=False)
        ctx = torch.multiprocessing.get_context("spawn")
        worker_source = source if source is not None else (model_config, state_dict)
        try:
            for rank in range(1, world_size):
                ours, theirs = ctx.Pipe()
                p = ctx.Process(target=_worker_main, daemon=True, name=f"pie-tp-worker-{rank}",
                                args=(rank, world_size, store.port, worker_source, engine_config,
                                      collective_timeout_s, theirs))
                p.start()
                theirs.close()
                self.processes.append(p)
                self.conns.append(ours)
            self._finalizer = weakref.finalize(self, _stop_workers, self.processes, self.conns)
            super().__init__(config, shard_state_dict(model_config, state_dict, 0, world_size), engine_config, seed)
            self.shard_model_config = config
            self.model_config = model_config  # what requests are checked against: the whole model
            self._wait_ready()
            group = _gloo_group(store, 0, world_size, collective_timeout_s)
        except BaseException:
            _stop_workers(self.processes, self.conns)
            raise
        self.group = group
        self._store = store
        _setup_shard(self, 0, world_size, group)
        self.cache = _BroadcastingCache(self.cache, self)

    @classmethod
    def from_path(cls, path, engine_config: EngineConfig = EngineConfig(), seed: int | None = None,
                  world_size: int = 2, collective_timeout_s: float = 60.0) -> "TensorParallelRunner":
        from pie.engine.weights import check_model_dir, load_model_dir

        check_tensor_parallel(check_model_dir(path), world_size)  # before loading weights or starting processes
        config, state_dict = load_model_dir(path)
        return cls(config, state_dict, engine_config, seed, world_size, source=str(path),
                   collective_timeout_s=collective_timeout_s)

    def _worker_failure(self) -> str | None:
        """What went wrong with the workers: the error a worker reported, or which one died and how."""
        for rank, (p, conn) in enumerate(zip(self.processes, self.conns), start=1):
            try:
                while conn.poll():
                    message = conn.recv()
                    if message[0] == "error":
                        return f"tensor-parallel worker {rank} (pid {p.pid}) failed:\n{message[1]}"
            except (EOFError, OSError):
                pass
            p.join(timeout=0.5)
            if not p.is_alive():
                return f"tensor-parallel worker {rank} (pid {p.pid}) died (exit code {p.exitcode})"
        return None

    def _wait_ready(self) -> None:
        """Waits for every worker's ("ready",): raises TensorParallelError when one fails or dies first."""
        pending = dict(zip(self.conns, self.processes))
        while pending:
            ready = wait(list(pending) + [p.sentinel for p in pending.values()])
            for conn in [c for c in pending if c in ready or pending[c].sentinel in ready]:
                try:
                    message = conn.recv() if conn.poll() else ("died",)
                except (EOFError, OSError):
                    message = ("died",)
                if message[0] == "error":
                    rank = self.conns.index(conn) + 1
                    raise TensorParallelError(f"tensor-parallel worker {rank} (pid {pending[conn].pid}) failed "
                                              f"to load its shard:\n{message[1]}")
                if message[0] != "ready":
                    what = self._worker_failure() or "a tensor-parallel worker died"
                    raise TensorParallelError(f"{what} while loading its shard")
                del pending[conn]

    def _fail(self, cause: BaseException | None = None) -> TensorParallelError:
        """Marks the runner failed (every later call raises), ends the workers; the error to raise."""
        if self._failure is None:
            what = self._worker_failure()
            if what is None:
                what = f"a tensor-parallel collective failed ({cause})"
            self._failure = f"{what}; the tensor-parallel model cannot run without it"
            _stop_workers(self.processes, self.conns)
        return TensorParallelError(self._failure)

    def _send(self, message: tuple) -> None:
        """One message to every worker (pickled once), in order with the others."""
        if self._failure is not None:
            raise TensorParallelError(self._failure)
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for p, conn in zip(self.processes, self.conns):
                if not p.is_alive():
                    raise OSError
                conn.send_bytes(payload)
        except OSError:
            raise self._fail() from None

    @torch.inference_mode()
    def forward(self, batch: RaggedBatch) -> torch.Tensor:
        """(M, vocab) float32 logits of the batch's output rows, gathered from every rank's vocabulary
        rows; every rank writes its KV heads of the batch into its cache."""
        # the workers need what the forward pass reads, not the samplers and vocabulary masks
        self._send(("forward", dataclasses.replace(batch, samplers=(), output_mask_rows=(), output_mask_runs=())))
        try:
            logits = gather_logits(super().forward(batch), self.group, self.world_size)  # (M, Vp)
        except RuntimeError as e:  # a collective failed: a worker died or hung
            raise self._fail(e) from e
        return logits[:, :self.model_config.vocab_size]  # (M, V)

    def load_adapter(self, name: str, path) -> int:
        raise UnsupportedModelError(f"adapter {name!r}: LoRA adapters are not supported with tensor parallelism yet")

    def close(self) -> None:
        """Stops the workers (also done when the runner is collected, or at exit)."""
        self._finalizer()
