"""The model runner: owns the weights and the paged KV cache and executes one batch of forward
requests as one ragged forward pass (see pie.engine.batch for the request semantics).

>>> runner = ModelRunner.from_path(model_dir)                                  # doctest: +SKIP
>>> [res] = runner.execute([ForwardRequest(token_ids=[1, 2, 3], positions=[0, 1, 2],
...                                        kv_page_ids=[0], kv_last_page_len=3,
...                                        outputs=[(2, Greedy())])])          # doctest: +SKIP
>>> res.outputs                                                                # doctest: +SKIP
[1234]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pie.engine.attention import create_attention_backend, select_attention_backend
from pie.engine.attention.pytorch import PyTorchAttention
from pie.engine.batch import BatchError, ForwardRequest, ForwardResult, Sampler, SamplerOutput
from pie.engine.config import EngineConfig, ModelConfig
from pie.engine.embedding_table import EmbeddingTable
from pie.engine.kernels import MaskError, expand_brle, linear_kernel_max_rows
from pie.engine.kv_cache import PagedKVCache, sequence_length
from pie.engine.lora import AdapterTable
from pie.engine.ragged_batch import RaggedBatch, last_slots
from pie.engine.sampling import Sampling, apply_vocab_masks, check_sampler, check_vocab_mask, vocab_mask_bias
from pie.engine.transformer import Transformer


class ModelRunner:
    def __init__(self, model_config: ModelConfig, state_dict: dict[str, torch.Tensor],
                 engine_config: EngineConfig = EngineConfig(), seed: int | None = None):
        if engine_config.threads:
            torch.set_num_threads(engine_config.threads)
        # Batches whose linear layers run in our kernels' own thread pool give torch one thread, so its
        # idle OpenMP workers do not spin on the cores the pool needs; larger batches give torch all
        # its threads back.
        self.single_torch_thread = torch.device(engine_config.device).type == "cpu"
        self.model_config = model_config
        self.engine_config = engine_config
        self.model = Transformer(model_config, state_dict, engine_config.torch_dtype, engine_config.device)
        self.page_size = engine_config.page_size
        self.num_pages = engine_config.pages_for(model_config)
        self.cache = PagedKVCache(model_config.num_layers, self.num_pages, self.page_size,
                                  model_config.num_kv_heads, model_config.head_dim,
                                  engine_config.torch_dtype, engine_config.device)
        self.embeddings = EmbeddingTable(engine_config.embedding_slots, model_config.hidden_size,
                                         engine_config.torch_dtype, engine_config.device)
        self.adapters = AdapterTable(model_config, engine_config.torch_dtype, engine_config.device)
        self.max_batch_tokens = engine_config.max_batch_tokens
        # Positions a pass may use: the model's context or the KV cache's capacity, whichever is larger
        # (a hostile position must not make an attention backend size its RoPE tables to it).
        self.max_position = max(model_config.max_position_embeddings, self.num_pages * self.page_size)
        self.max_batch_requests = engine_config.max_batch_requests
        self.sampling = Sampling(seed)
        # The attention backend: pie's CUDA kernels (pie.engine.attention.cuda) on CUDA devices when
        # they cover the model, else PyTorch ops (the reference); cuda_path_reason says why not CUDA.
        backend, self.cuda_path_reason = select_attention_backend(model_config, engine_config)
        self.attention = create_attention_backend(backend, model_config, self.cache)
        self.device_sampling = None  # samplers on the device, for logits that stay there
        self.cuda_graphs = None  # decode steps replayed as CUDA graphs
        if backend == "cuda":
            from pie.engine.device_sampling import DeviceSampling

            self.device_sampling = DeviceSampling(self.sampling)
            if engine_config.cuda_graphs and not model_config.is_moe:  # routing reads expert counts on the host
                from pie.engine.cuda_graphs import DecodeGraphs

                self.cuda_graphs = DecodeGraphs(self.model, self.attention)
        self.num_forward_passes = 0
        self.num_tokens_processed = 0

    @classmethod
    def from_path(cls, path, engine_config: EngineConfig = EngineConfig(), seed: int | None = None) -> "ModelRunner":
        from pie.engine.weights import load_model_dir

        config, state_dict = load_model_dir(path)
        return cls(config, state_dict, engine_config, seed)

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    def load_adapter(self, name: str, path) -> int:
        """Loads a PEFT LoRA adapter (checked against the model: pie.engine.lora.AdapterError) under `name`;
        returns its index, what a ForwardRequest's `adapter` names. Load adapters before a control plane
        is made over the runner: the plane checks commands against the adapters there were then."""
        return self.adapters.load(name, path)

    @property
    def use_decode_kernel(self) -> bool:
        """Whether one-token requests run the CPU decode kernel (the PyTorch backend's choice; settable,
        for comparisons)."""
        return isinstance(self.attention, PyTorchAttention) and self.attention.use_decode_kernel

    @use_decode_kernel.setter
    def use_decode_kernel(self, enabled: bool) -> None:
        if isinstance(self.attention, PyTorchAttention):
            self.attention.use_decode_kernel = enabled

    @torch.inference_mode()
    def embed_tokens(self, token_ids: list[int]) -> torch.Tensor:
        """(T, hidden_size) input embeddings of the tokens (what a pass over them would embed)."""
        return self.model.embed_tokens(torch.tensor(token_ids, dtype=torch.int64, device=self.model.device)).clone()

    # ---- checking ---------------------------------------------------------------------------
    def validate(self, request: ForwardRequest, index: int = 0) -> None:
        """The engine's check of one request (what `execute` runs before a batch). Raises BatchError
        naming the request and the field."""
        def fail(field_name: str, message: str) -> BatchError:
            return BatchError(index, field_name, message)

        t = len(request.token_ids)
        if t == 0:
            raise fail("token_ids", "empty request: at least one input token is needed")
        if len(request.positions) != t:
            raise fail("positions", f"{len(request.positions)} positions for {t} tokens")
        vocab = self.model_config.vocab_size
        for tok in request.token_ids:
            if not 0 <= tok < vocab:
                raise fail("token_ids", f"token id {tok} is outside the vocabulary [0, {vocab})")
        for pos in request.positions:
            if pos < 0:
                raise fail("positions", f"position {pos} is negative")
            if pos >= self.max_position:
                raise fail("positions", f"position {pos} is past the model's {self.max_position} positions")
        pages = list(request.kv_page_ids)
        if not pages:
            raise fail("kv_page_ids", "no KV pages: the sequence must hold at least the input tokens")
        for p in pages:
            if not 0 <= p < self.num_pages:
                raise fail("kv_page_ids", f"page id {p} is out of range [0, {self.num_pages})")
        if not 0 <= request.adapter < len(self.adapters):
            raise fail("adapter", f"{request.adapter} is not a loaded adapter (0 = none, 1..{len(self.adapters) - 1})")
        if not 1 <= request.kv_last_page_len <= self.page_size:
            raise fail("kv_last_page_len", f"{request.kv_last_page_len} is not in [1, {self.page_size}]")
        kv_len = sequence_length(len(pages), request.kv_last_page_len, self.page_size)
        if kv_len < t:
            raise fail("kv_page_ids", f"the sequence holds {kv_len} tokens, fewer than the {t} input tokens")
        if request.write_slots is not None:
            if len(request.write_slots) != t:
                raise fail("write_slots", f"{len(request.write_slots)} slots for {t} tokens")
            for s in request.write_slots:
                if not 0 <= s < self.cache.num_slots:
                    raise fail("write_slots", f"slot {s} is out of range [0, {self.cache.num_slots})")
        if request.mask is not None:
            if len(request.mask) != t:
                raise fail("mask", f"{len(request.mask)} rows for {t} tokens (one BRLE row per input token)")
            try:
                expand_brle(request.mask, kv_len)
            except MaskError as e:
                raise fail("mask", f"row {e.row}: runs must add up to the sequence length {kv_len}") from None
        for out_index, (pos, sampler) in enumerate(request.outputs):
            if not 0 <= pos < t:
                raise fail("outputs", f"output {out_index}: input index {pos} is not in [0, {t})")
            problem = check_sampler(sampler, vocab)
            if problem:
                raise fail("outputs", f"output {out_index}: {problem}")
        emb = request.input_embeddings
        if emb is not None and tuple(emb.shape) != (t, self.model_config.hidden_size):
            raise fail("input_embeddings", f"shape {tuple(emb.shape)}, expected ({t}, {self.model_config.hidden_size})")
        if request.output_masks is not None:
            if len(request.output_masks) != len(request.outputs):
                raise fail("output_masks", f"{len(request.output_masks)} masks for {len(request.outputs)} outputs "
                                           "(one entry, a run list or None, per output)")
            for j, runs in enumerate(request.output_masks):
                if runs is not None:
                    try:
                        check_vocab_mask(runs, vocab)
                    except ValueError as e:
                        raise fail(f"output_masks[{j}]", str(e)) from None

    # ---- execution --------------------------------------------------------------------------
    def execute(self, requests: list[ForwardRequest]) -> list[ForwardResult]:
        """Checks every request, then runs them all in one forward pass. Raises BatchError (and changes
        nothing) when a request is malformed or the batch exceeds the runner's limits."""
        if len(requests) > self.max_batch_requests:
            raise BatchError(self.max_batch_requests, "batch",
                             f"{len(requests)} requests exceed max_batch_requests {self.max_batch_requests}")
        for i, request in enumerate(requests):
            self.validate(request, i)
        num_tokens = sum(len(r.token_ids) for r in requests)
        if num_tokens > self.max_batch_tokens:
            raise BatchError(len(requests) - 1, "batch",
                             f"{num_tokens} tokens exceed max_batch_tokens {self.max_batch_tokens}")
        return self.run(requests)

    def run(self, requests: list[ForwardRequest]) -> list[ForwardResult]:
        """Runs checked requests in one forward pass: each was checked once before it got here (by
        `execute`), and the batch is within the runner's limits."""
        if not requests:
            return []
        outputs = self.run_batch(self.flatten(requests))
        results, k = [], 0
        for req in requests:
            n = len(req.outputs)
            results.append(ForwardResult(outputs=outputs[k:k + n]))
            k += n
        return results

    def flatten(self, requests: list[ForwardRequest]) -> RaggedBatch:
        """The requests as one ragged batch, request after request (what the control layer's handler
        builds from its commands in C++)."""
        ps = self.page_size
        token_ids: list[int] = []
        positions: list[int] = []
        write_slots: list[int] = []  # plain ints: one tensor for the batch (a tensor per request costs ~7 us)
        qo_lens: list[int] = []
        output_rows: list[int] = []
        samplers: list[Sampler] = []
        embed_rows: list[torch.Tensor] = []  # rows of the flattened batch given as input embeddings
        embed_values: list[torch.Tensor] = []  # their (T_i, hidden_size) embeddings
        mask_rows: list[int] = []  # indices into samplers that have an output mask
        mask_runs: list[Sequence[int]] = []  # their run lists
        start = 0
        for req in requests:
            t = len(req.token_ids)
            token_ids.extend(req.token_ids)
            positions.extend(req.positions)
            qo_lens.append(t)
            if req.write_slots is None:  # the sequence's last T slots, from its pages
                write_slots.extend(last_slots(req.kv_page_ids, req.kv_last_page_len, t, ps))
            else:
                write_slots.extend(req.write_slots)
            if req.input_embeddings is not None:
                embed_rows.append(torch.arange(start, start + t))
                embed_values.append(req.input_embeddings)
            if req.output_masks is not None:
                for j, runs in enumerate(req.output_masks):
                    if runs is not None:
                        mask_rows.append(len(samplers) + j)
                        mask_runs.append(runs)
            for pos, sampler in req.outputs:
                output_rows.append(start + pos)
                samplers.append(sampler)
            start += t
        return RaggedBatch(
            page_size=ps, token_ids=token_ids, positions=positions,
            write_slots=torch.tensor(write_slots, dtype=torch.int64), output_rows=output_rows, qo_lens=qo_lens,
            page_ids=np.concatenate([np.asarray(r.kv_page_ids, dtype=np.int64) for r in requests]),
            page_indptr=np.cumsum([0] + [len(r.kv_page_ids) for r in requests], dtype=np.int64),
            last_page_len=[r.kv_last_page_len for r in requests],
            masks=[r.mask for r in requests], embed_rows=torch.cat(embed_rows) if embed_rows else None,
            embed_values=torch.cat(embed_values) if embed_values else None, samplers=samplers,
            output_mask_rows=mask_rows, output_mask_runs=mask_runs,
            adapters=[r.adapter for r in requests] if any(r.adapter for r in requests) else None)

    def run_batch(self, batch: RaggedBatch) -> list[SamplerOutput]:
        """Runs one checked ragged batch (within the runner's limits): the forward pass, the output masks,
        the samplers. Returns (M,) outputs, one per sampler in order."""
        if batch.num_requests == 0:
            return []
        logits = self.forward(batch)  # (M, V) float32 on the model's device
        self.num_forward_passes += 1
        self.num_tokens_processed += batch.num_tokens
        if batch.output_mask_rows:  # unmasked batches skip this entirely
            runs = [np.asarray(r, dtype=np.int64) for r in batch.output_mask_runs]
            apply_vocab_masks(logits, batch.output_mask_rows, vocab_mask_bias(runs, self.model_config.vocab_size))
        sampling = self.sampling if self.device_sampling is None else self.device_sampling
        return sampling(logits, list(batch.samplers)) if batch.samplers else []

    @torch.inference_mode()
    def forward(self, batch: RaggedBatch) -> torch.Tensor:
        """Logits (M, vocab) float32 of the batch's output rows, on the model's device: a CUDA graph's
        replay for decode batches that have one, else the attention backend's plan and one
        Transformer.forward. Writes the batch's K/V into the cache."""
        if self.cuda_graphs is not None and batch.is_decode:  # (a batch with adapters is not)
            logits = self.cuda_graphs.forward(batch)
            if logits is not None:
                return logits
        plan = self.attention.plan(batch)
        dev = self.model.device
        token_ids = torch.tensor(batch.token_ids, dtype=torch.int64).to(dev, non_blocking=True)
        output_rows = torch.tensor(batch.output_rows, dtype=torch.int64).to(dev, non_blocking=True)
        embeds = None
        if batch.embed_rows is not None:
            embeds = (batch.embed_rows.to(dev, non_blocking=True), batch.embed_values.to(dev, non_blocking=True))
        lora = None if batch.adapters is None else self.adapters.batch(list(batch.adapters), batch.qo_lens)
        threads = torch.get_num_threads()
        single = (self.single_torch_thread and threads > 1
                  and batch.num_tokens <= linear_kernel_max_rows(self.engine_config.torch_dtype))
        if single:
            torch.set_num_threads(1)
        try:
            return self.model.forward(token_ids, self.attention, plan, output_rows, embeds, lora)
        finally:
            if single:
                torch.set_num_threads(threads)
