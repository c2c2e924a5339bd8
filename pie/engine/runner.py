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

import numpy as np
import torch

from pie.engine.attention import RequestLayout, build_plan
from pie.engine.batch import BatchError, ForwardRequest, ForwardResult, Sampler
from pie.engine.config import EngineConfig, ModelConfig
from pie.engine.embedding_table import EmbeddingTable
from pie.engine.kernels import MaskError, decode_attention_supported, expand_brle, linear_kernel_max_rows
from pie.engine.kv_cache import PagedKVCache, sequence_length, sequence_slots
from pie.engine.transformer import Transformer
from pie.engine.sampling import Sampling, apply_vocab_masks, check_sampler, check_vocab_mask, vocab_mask_bias


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
        self.max_batch_tokens = engine_config.max_batch_tokens
        self.max_batch_requests = engine_config.max_batch_requests
        self.sampling = Sampling(seed)
        self.use_decode_kernel = decode_attention_supported(engine_config.torch_dtype, engine_config.device)
        # CUDA devices run the kernel path (pie.engine.cuda_forward) when it supports the model;
        # otherwise, and everywhere else, Transformer.forward (PyTorch ops, the reference) runs.
        self.cuda_forward = None
        self.cuda_path_reason = None
        if torch.device(engine_config.device).type == "cuda":
            from pie.engine.cuda_forward import CudaForward, cuda_forward_unsupported
            from pie.engine.cuda_sampling import DeviceSampling

            if engine_config.cuda_kernels:
                self.cuda_path_reason = cuda_forward_unsupported(model_config, engine_config.torch_dtype,
                                                                 torch.device(engine_config.device))
            else:
                self.cuda_path_reason = "turned off (EngineConfig.cuda_kernels=False)"
            if self.cuda_path_reason is None:
                self.cuda_forward = CudaForward(self.model, self.cache, use_graphs=engine_config.cuda_graphs)
                self.device_sampling = DeviceSampling(self.sampling)
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

    @torch.inference_mode()
    def embed_tokens(self, token_ids: list[int]) -> torch.Tensor:
        """(T, hidden_size) input embeddings of the tokens (what a pass over them would embed)."""
        return self.model.embed[torch.tensor(token_ids, dtype=torch.int64)].clone()

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
        pages = list(request.kv_page_ids)
        if not pages:
            raise fail("kv_page_ids", "no KV pages: the sequence must hold at least the input tokens")
        for p in pages:
            if not 0 <= p < self.num_pages:
                raise fail("kv_page_ids", f"page id {p} is out of range [0, {self.num_pages})")
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
        `execute`, or as a pie.control ForwardCommand when it was submitted), and the batch is within
        the runner's limits (the scheduler forms batches within them)."""
        if not requests:
            return []
        on_cuda = self.cuda_forward is not None
        ps = self.page_size
        token_ids: list[int] = []
        positions: list[int] = []
        layouts: list[RequestLayout] = []
        write_slots: list = []  # per request: (T,) int64 tensor (PyTorch path) or T ints (CUDA path)
        output_rows: list[int] = []
        samplers: list[Sampler] = []
        embed_rows: list[torch.Tensor] = []  # rows of the flattened batch given as input embeddings
        embed_values: list[torch.Tensor] = []  # their (T_i, hidden_size) embeddings
        mask_rows: list[int] = []  # rows of `logits` (= sampler indices) that have an output mask
        mask_runs: list[np.ndarray] = []  # their run arrays
        start = 0
        for req in requests:
            t = len(req.token_ids)
            kv_len = sequence_length(len(req.kv_page_ids), req.kv_last_page_len, ps)
            token_ids.extend(req.token_ids)
            positions.extend(req.positions)
            slots = None if on_cuda else torch.from_numpy(sequence_slots(req.kv_page_ids, kv_len, ps))
            mask = None if req.mask is None else torch.from_numpy(expand_brle(req.mask, kv_len))
            layouts.append(RequestLayout(start=start, num_tokens=t, slots=slots, mask=mask))
            if req.input_embeddings is not None:
                embed_rows.append(torch.arange(start, start + t))
                embed_values.append(req.input_embeddings)
            if on_cuda:  # plain ints: one tensor for the whole batch later (a tensor each costs ~7 us)
                if req.write_slots is None:  # the sequence's last T slots, from its pages
                    pages = req.kv_page_ids
                    write_slots.append([pages[i // ps] * ps + i % ps for i in range(kv_len - t, kv_len)])
                else:
                    write_slots.append(req.write_slots)
            elif req.write_slots is None:
                write_slots.append(slots[-t:])
            else:
                write_slots.append(torch.tensor(list(req.write_slots), dtype=torch.int64))
            if req.output_masks is not None:
                for j, runs in enumerate(req.output_masks):
                    if runs is not None:
                        mask_rows.append(len(samplers) + j)
                        mask_runs.append(np.asarray(runs, dtype=np.int64))
            for pos, sampler in req.outputs:
                output_rows.append(start + pos)
                samplers.append(sampler)
            start += t
        if on_cuda:
            logits = self._forward_cuda(requests, layouts, token_ids, positions, write_slots, output_rows,
                                        embed_rows, embed_values)  # (M, V) float32 on the device
            sampling = self.device_sampling
        else:
            logits = self._forward_torch(layouts, token_ids, positions, write_slots, output_rows,
                                         embed_rows, embed_values)  # (M, V) float32
            sampling = self.sampling
        self.num_forward_passes += 1
        self.num_tokens_processed += start
        if mask_rows:  # unmasked batches skip this entirely
            apply_vocab_masks(logits, mask_rows, vocab_mask_bias(mask_runs, self.model_config.vocab_size))
        outputs = sampling(logits, samplers) if samplers else []
        results = []
        k = 0
        for req in requests:
            n = len(req.outputs)
            results.append(ForwardResult(outputs=outputs[k:k + n]))
            k += n
        return results

    def _forward_torch(self, layouts, token_ids, positions, write_slots, output_rows, embed_rows,
                       embed_values) -> torch.Tensor:
        """Transformer.forward (the PyTorch path) over the flattened batch."""
        plan = build_plan(layouts, self.model_config.sliding_window, self.use_decode_kernel)
        threads = torch.get_num_threads()
        single = (self.single_torch_thread and threads > 1
                  and len(token_ids) <= linear_kernel_max_rows(self.engine_config.torch_dtype))
        if single:
            torch.set_num_threads(1)
        try:
            return self.model.forward(
                torch.tensor(token_ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64),
                torch.cat(write_slots), torch.tensor(output_rows, dtype=torch.int64), plan, self.cache,
                input_embeds=(torch.cat(embed_rows), torch.cat(embed_values)) if embed_rows else None)
        finally:
            if single:
                torch.set_num_threads(threads)

    def _forward_cuda(self, requests, layouts, token_ids, positions, write_slots, output_rows, embed_rows,
                      embed_values) -> torch.Tensor:
        """pie.engine.cuda_forward over the batch, described as a BatchLayout."""
        from pie.engine.cuda_forward import BatchLayout

        return self.cuda_forward.forward(BatchLayout(
            token_ids=token_ids, positions=positions, output_rows=output_rows,
            write_slots=torch.tensor([slot for part in write_slots for slot in part], dtype=torch.int64),
            qo_lens=[lay.num_tokens for lay in layouts], pages=[list(r.kv_page_ids) for r in requests],
            last_page_len=[r.kv_last_page_len for r in requests],
            masks=[None if r.mask is None else [list(row) for row in r.mask] for r in requests],
            embed_rows=torch.cat(embed_rows) if embed_rows else None,
            embed_values=torch.cat(embed_values) if embed_values else None))
