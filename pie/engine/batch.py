"""What one forward pass is asked to do: the request and sampler types shared by every layer.

A batch is a list of `ForwardRequest`s. All of them run in one ragged forward (prefill and decode
mixed); each request reads its own KV pages and asks for outputs at chosen input positions.

KV sequence of a request: the pages `kv_page_ids` in order, all full but the last, which holds
`kv_last_page_len` tokens, so `kv_len = (len(kv_page_ids) - 1) * page_size + kv_last_page_len`.
The pass first writes the K/V of its T input tokens to `write_slots` (flat slots
`page_id * page_size + offset`; by default the last T slots of the sequence), then every input token
attends over the whole sequence: by default input token i sees sequence indices
`j <= kv_len - T + i` (causal), or exactly what its `mask` row allows.

Mask rows are binary run-length encoded (BRLE): run lengths over the `kv_len` sequence entries that
alternate "may attend" / "hidden", starting with "may attend" (a run may be 0).
Example, kv_len 6: [2, 3, 1] -> attend 0, 1 and 5.

Output masks (`output_masks`, e.g. from a grammar matcher) restrict the vocabulary of an output:
one BRLE run list over the model's vocabulary [0, vocab_size) per output, runs alternating
"allowed" / "forbidden", starting with "allowed", adding up to exactly vocab_size and allowing at
least one token. Forbidden logits are set to -inf before the output's sampler runs.
Example, vocab 6: [0, 2, 3, 1] -> only tokens 2, 3 and 4 may be produced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch


@dataclass(frozen=True)
class Greedy:
    """The most likely token (argmax of the logits)."""


@dataclass(frozen=True)
class Sample:
    """A token drawn from softmax(logits / temperature), filtered by top-k, top-p and min-p.

    top_k 0 and top_p 1.0 and min_p 0.0 mean no filter. With `seed` set, the draw is a function of
    (seed, logits) alone, whatever else is in the batch.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None


@dataclass(frozen=True)
class TopKDistribution:
    """The k most likely tokens and their probabilities under softmax(logits / temperature)."""

    k: int
    temperature: float = 1.0


@dataclass(frozen=True)
class Logprobs:
    """Log-probabilities (log_softmax of the logits) of the given tokens."""

    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class RawLogits:
    """The full (vocab_size,) float32 logits row."""


Sampler = Union[Greedy, Sample, TopKDistribution, Logprobs, RawLogits]

# What a sampler yields, in order: Greedy / Sample -> int token id; TopKDistribution -> (ids, probs)
# as two lists; Logprobs -> list of floats; RawLogits -> (vocab_size,) float32 CPU tensor.
SamplerOutput = Union[int, tuple[list[int], list[float]], list[float], torch.Tensor]


@dataclass
class ForwardRequest:
    token_ids: Sequence[int]  # (T,) input token ids, T >= 1
    positions: Sequence[int]  # (T,) RoPE positions of the input tokens
    kv_page_ids: Sequence[int]  # (P,) pages of the KV sequence, in order, P >= 1
    kv_last_page_len: int  # 1..page_size tokens in the last page (after this pass's writes)
    write_slots: Sequence[int] | None = None  # (T,) flat slots; None = the last T slots of the sequence
    mask: Sequence[Sequence[int]] | None = None  # T BRLE rows over kv_len entries; None = causal
    outputs: Sequence[tuple[int, Sampler]] = field(default_factory=tuple)  # (input index, sampler)
    # None = no masks; else one entry per `outputs` entry, same order: None (unmasked) or BRLE runs
    # over the vocabulary (allowed / forbidden, starting with allowed, summing to vocab_size)
    output_masks: Sequence[Sequence[int] | None] | None = None
    # (T, hidden_size) input embeddings used instead of the embeddings of token_ids (whose values are then
    # ignored, but their count is T); None = embed token_ids
    input_embeddings: torch.Tensor | None = None
    adapter: int = 0  # the runner's LoRA adapter the pass runs with (pie.engine.lora.AdapterTable); 0 = none


@dataclass
class ForwardResult:
    outputs: list[SamplerOutput]  # one per ForwardRequest.outputs entry, same order


class BatchError(ValueError):
    """A request of the batch is malformed; names the request index and the field."""

    def __init__(self, request_index: int, field_name: str, message: str):
        super().__init__(f"request {request_index}: {field_name}: {message}")
        self.request_index = request_index
        self.field_name = field_name
