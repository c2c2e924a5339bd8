"""vLLM's side of the scheduler comparison: its V1 `Scheduler` over a fake model, N decoding requests.

Runs under the vLLM peer venv (scripts/install_vllm_peer.sh), never under the project's:

    /work/.vllm_venv/bin/python benchmarks/vllm_compare/vllm_side.py --n 1 32 128 512

The scheduler is built the way `vllm/v1/engine/core.py` (EngineCore.__init__ and
_initialize_kv_caches) builds it in vLLM 0.34.0, without an executor or a model: a VllmConfig over a
tiny Llama config written to a temporary folder (no weights, no tokenizer), the KV cache spec of
every layer as the model runner would report it (FullAttentionSpec), `get_kv_cache_configs` /
`generate_scheduler_kv_cache_config` with enough blocks that nothing is ever preempted, the block
hasher of prefix caching (on, as by default), and `scheduler_config.get_scheduler_cls()`.

One decode step is what `EngineCore.step` does around the model: `scheduler.schedule()`,
`scheduler.get_grammar_bitmask(...)`, a `ModelRunnerOutput` fabricated with one sampled token per
scheduled request (in place of execute_model + sample_tokens), and
`scheduler.update_from_output(...)`. Before the timed steps the N requests are added and stepped
through their prefill, so every timed step is N decoding requests. Each run has prompts of its own
(a run counter in every token), so no run hits the prefix cache of another.

With --serve it answers one measurement per stdin line ({"n": N, "steps": S}) with one JSON line,
so that run.py can alternate it with the pie side; otherwise it prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from worker_protocol import default_steps, protocol_stdout  # this file's folder

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BLOCK_SIZE = 16
NUM_LAYERS = 4
VOCAB = 32000

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": NUM_LAYERS,
    "vocab_size": VOCAB,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


class VllmScheduler:
    """A vLLM V1 scheduler as EngineCore builds it, and the fake model step around it."""

    def __init__(self, max_num_seqs: int, prompt_len: int, max_decode: int, kv_tokens: int,
                 async_scheduling: bool = False):
        import torch

        import vllm.triton_utils

        vllm.triton_utils.HAS_TRITON = True  # the CPU platform refuses x86 without triton-cpu otherwise
        from vllm import SamplingParams
        from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
        from vllm.v1.core.kv_cache_planning import get_global_kv_cache_groups, get_kv_cache_configs
        from vllm.v1.core.kv_cache_utils import (
            generate_scheduler_kv_cache_config,
            get_request_block_hasher,
            init_none_hash,
            resolve_kv_cache_block_sizes,
        )
        from vllm.v1.kv_cache_interface import FullAttentionSpec
        from vllm.v1.outputs import ModelRunnerOutput
        from vllm.v1.request import Request
        from vllm.v1.structured_output import StructuredOutputManager

        self._SamplingParams, self._Request, self._ModelRunnerOutput = SamplingParams, Request, ModelRunnerOutput
        self.prompt_len = prompt_len
        self.max_decode = max_decode
        self._model_dir = tempfile.TemporaryDirectory(prefix="vllm-peer-model-")
        with open(os.path.join(self._model_dir.name, "config.json"), "w") as f:
            json.dump(TINY_LLAMA, f)

        max_len = prompt_len + max_decode + 16
        # enough that nobody is ever preempted (every request of a measurement holds its blocks at once)
        num_blocks = -(-kv_tokens // BLOCK_SIZE) + 2 * max_num_seqs + 64
        model_config = ModelConfig(model=self._model_dir.name, skip_tokenizer_init=True, dtype="float32",
                                   max_model_len=max_len, seed=0)
        cache_config = CacheConfig(block_size=BLOCK_SIZE, num_gpu_blocks_override=num_blocks,
                                   enable_prefix_caching=True)
        scheduler_config = SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max(8192, max_num_seqs * prompt_len),
            max_model_len=max_len, is_encoder_decoder=False, enable_chunked_prefill=True,
            async_scheduling=async_scheduling)
        vllm_config = VllmConfig(model_config=model_config, cache_config=cache_config,
                                 scheduler_config=scheduler_config)
        self.vllm_config = vllm_config

        # what the model runner reports (one full-attention spec per layer), then _initialize_kv_caches
        hf = model_config.hf_config
        head_size = hf.hidden_size // hf.num_attention_heads
        specs = {f"model.layers.{i}.self_attn.attn": FullAttentionSpec(
            block_size=BLOCK_SIZE, num_kv_heads=hf.num_key_value_heads, head_size=head_size, dtype=torch.float32)
            for i in range(hf.num_hidden_layers)}
        resolve_kv_cache_layout(vllm_config, [["NHD"]], specs.values())  # the layout a CPU worker reports
        page_bytes = next(iter(specs.values())).page_size_bytes
        available = [page_bytes * len(specs) * (num_blocks + 16)]
        global_groups = get_global_kv_cache_groups(vllm_config, [specs])
        kv_cache_configs = get_kv_cache_configs(vllm_config, [specs], available, global_groups)
        kv_cache_config = generate_scheduler_kv_cache_config(kv_cache_configs)
        vllm_config.cache_config.num_gpu_blocks = kv_cache_config.num_blocks
        vllm_config.cache_config.block_size = min(g.kv_cache_spec.block_size for g in kv_cache_config.kv_cache_groups)
        block_size, hash_block_size = resolve_kv_cache_block_sizes(kv_cache_config, vllm_config)
        kv_cache_config.hash_block_size = hash_block_size

        # EngineCore.__init__: the structured-output manager, the scheduler, the prefix-cache hasher
        self.structured_output_manager = StructuredOutputManager(vllm_config)
        self.scheduler_cls = vllm_config.scheduler_config.get_scheduler_cls()
        self.scheduler = self.scheduler_cls(
            vllm_config=vllm_config, kv_cache_config=kv_cache_config,
            structured_output_manager=self.structured_output_manager, include_finished_set=False,
            log_stats=False, block_size=block_size, hash_block_size=hash_block_size)
        hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self.block_hasher = get_request_block_hasher(hash_block_size, hash_fn, vllm_config.num_hash_lookahead_tokens)
        self.num_blocks = kv_cache_config.num_blocks
        self._run = 0
        # as EngineCore.__init__ ends: the startup heap frozen out of the GC's way, the envs cache on
        from vllm.envs import enable_envs_cache
        from vllm.utils.gc_utils import freeze_gc_heap

        freeze_gc_heap()
        enable_envs_cache()

    # ---- one engine step over a fake model ---------------------------------------------------------
    def step(self) -> int:
        """EngineCore.step with the model replaced by one sampled token per scheduled request; returns the
        number of tokens scheduled."""
        scheduler = self.scheduler
        out = scheduler.schedule()
        scheduler.get_grammar_bitmask(out)
        req_ids = list(out.num_scheduled_tokens)
        sampled = [[7] for _ in req_ids]  # one token each (not EOS: the requests run on)
        model_output = self._ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled)
        scheduler.update_from_output(out, model_output)
        return out.total_num_scheduled_tokens

    def measure(self, n: int, steps: int, blocks: int = 5) -> dict:
        """N requests (fresh prompts), prefilled, then `blocks` blocks of `steps` decode steps each;
        the CPU and wall time of each block. The requests are aborted afterwards."""
        from vllm.v1.request import RequestStatus

        self._run += 1
        run = self._run
        assert blocks * steps + 4 <= self.max_decode, "more decode steps than the requests' max_tokens"
        params = self._SamplingParams(max_tokens=self.max_decode, temperature=0.0, ignore_eos=True)
        ids = []
        for i in range(n):
            # distinct in their first block: no prefix-cache hit, within this run or across runs
            prompt = [(run * 7919 + i * 104729 + j) % (VOCAB - 10) + 10 for j in range(self.prompt_len)]
            rid = f"r{run}-{i}"
            ids.append(rid)
            req = self._Request(rid, prompt, params, None, block_hasher=self.block_hasher)
            self.scheduler.add_request(req)
        # prefill (one step here: the token budget holds every prompt), then a warm-up decode step
        prefill_steps = 0
        while any(self.scheduler.requests[r].num_computed_tokens < self.prompt_len for r in ids):
            self.step()
            prefill_steps += 1
        assert self.step() == n
        cpu, wall = [], []
        for _ in range(blocks):
            scheduled = 0
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(steps):
                scheduled += self.step()
            c1, w1 = time.process_time(), time.perf_counter()
            assert scheduled == n * steps, f"{scheduled} tokens scheduled in {steps} steps of {n} decoding requests"
            cpu.append((c1 - c0) / steps)
            wall.append((w1 - w0) / steps)
        usage = self.scheduler.kv_cache_manager.usage
        assert len(self.scheduler.running) == n, f"{len(self.scheduler.running)} running, expected {n}"
        assert not self.scheduler.waiting, "a request was preempted"
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        while self.scheduler.has_requests():  # flush the finished ids out of the scheduler
            self.step()
        return {"n": n, "steps": steps, "blocks": blocks, "prefill_steps": prefill_steps,
                "cpu_s_per_step": cpu, "wall_s_per_step": wall, "kv_usage": usage}


def versions() -> dict:
    import torch
    import vllm

    return {"vllm": vllm.__version__, "torch": torch.__version__, "python": sys.version.split()[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1, 32, 128, 512])
    ap.add_argument("--steps", type=int, default=0, help="steps per block (default: by N)")
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-seqs", type=int, default=512)
    ap.add_argument("--max-decode", type=int, default=0, help="max_tokens of every request (default: by the plan)")
    ap.add_argument("--kv-tokens", type=int, default=0, help="KV capacity in tokens (default: by the plan)")
    ap.add_argument("--async-scheduling", action="store_true", help="vLLM's AsyncScheduler instead of Scheduler")
    ap.add_argument("--serve", action="store_true", help="answer {\"n\", \"steps\", \"blocks\"} lines on stdin")
    args = ap.parse_args()
    out = protocol_stdout()
    t = time.perf_counter()
    plan = {n: args.steps or default_steps(n) for n in args.n}
    max_decode = args.max_decode or max(s * args.blocks for s in plan.values()) + 8
    kv_tokens = args.kv_tokens or max(n * (args.prompt_len + s * args.blocks + 8) for n, s in plan.items())
    bench = VllmScheduler(max(args.max_seqs, *args.n), args.prompt_len, max_decode, kv_tokens,
                          async_scheduling=args.async_scheduling)
    header = {"side": "vllm", "versions": versions(), "scheduler_cls": bench.scheduler_cls.__module__ + "."
              + bench.scheduler_cls.__name__, "block_size": BLOCK_SIZE, "num_blocks": bench.num_blocks,
              "prompt_len": args.prompt_len, "setup_s": time.perf_counter() - t}
    if args.serve:
        print(json.dumps({"ready": True, **header}), file=out, flush=True)
        for line in sys.stdin:
            req = json.loads(line)
            print(json.dumps(bench.measure(req["n"], req["steps"], req.get("blocks", 1))), file=out, flush=True)
        return 0
    results = []
    for n in args.n:
        r = bench.measure(n, plan[n], args.blocks)
        r["cpu_us_per_step_median"] = statistics.median(r["cpu_s_per_step"]) * 1e6
        r["cpu_us_per_request_step_median"] = r["cpu_us_per_step_median"] / n
        results.append(r)
        print(f"N={n}: {r['cpu_us_per_step_median']:.1f} us/step CPU, "
              f"{r['cpu_us_per_request_step_median']:.2f} us/request-step", file=sys.stderr, flush=True)
    print(json.dumps({**header, "results": results}, indent=1), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
