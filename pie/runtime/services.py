"""What the cold host calls (pie/runtime/api.py, grammar.py) reach: the model's description and
tokenizer, the control plane's pools and queues, the runner's embedding table, and the state the
instances of one runtime share (key-value store, messaging, grammar matchers). One object per Runtime,
handed to every Instance; the calls never see the Runtime itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pie.control import ControlPlane
from pie.runtime.grammar import GrammarHost
from pie.runtime.shared import Broker, KeyValueStore


@dataclass(frozen=True)
class ModelInfo:
    """The model as the `models` interface describes it."""

    name: str
    architecture: str
    vocab_size: int
    num_layers: int
    page_size: int
    max_batch_tokens: int
    adapters: tuple[str, ...] = ()  # the LoRA adapters loaded on its runner: adapter i + 1 is adapters[i]


@dataclass(frozen=True)
class InstanceServices:
    model: ModelInfo
    tokenizer: Any  # pie.engine.tokenizer.Tokenizer
    eos_ids: frozenset[int]
    plane: ControlPlane  # KV page pool, embedding-slot pool, command queues
    embeddings: Any  # pie.engine.embedding_table.EmbeddingTable of the runner
    embed_tokens: Any  # token ids -> (T, hidden) input embeddings (ModelRunner.embed_tokens)
    grammar: GrammarHost
    token_bytes: Callable[[], Any]  # the model's pie.control.TokenBytes (made at first use): stop strings of streams
    kv_store: KeyValueStore
    broker: Broker

    @property
    def num_free_pages(self) -> int:
        return self.plane.kv_pages.stats()["num_free"]
