"""Data parallelism: engine replicas behind one Runtime.

A Runtime serves one model on M replicas (`Runtime([model_0, ..., model_{M-1}])`, `pie serve
--data-parallel M`): each replica is a model runner of its own (its weights, its KV page pool, its prefix
cache) with its own control plane and batch loop. The runtime, the sandbox and what instances share
(key-value store, messaging, grammar matchers, the tokenizer) stay one.

An instance runs on one replica for its life: its pages live in that replica's pool. A launch goes to the
replica with the most free KV pages per instance it would then hold (`least_loaded`). Exports and the prefix cache are per
replica: an import of a name exported on another replica finds nothing (`kv.import-pages` gives none,
and the SDK recomputes the prefix), and a prefix cached on one replica is not seen by the others.

Instance ids stay unique across replicas: replica r numbers its instances r + 1, r + 1 + M, r + 1 + 2M, ...

>>> runtime = Runtime([Model(), Model()])                   # doctest: +SKIP
>>> [r.index for r in runtime.replicas]                      # doctest: +SKIP
[0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from pie.control import ControlPlane
from pie.runtime.services import InstanceServices


@dataclass(frozen=True)
class Replica:
    """One engine replica: its model (runner, weights, KV pool), its control plane and the services its
    instances reach (the shared parts are the same objects in every replica's services)."""

    index: int
    model: Any  # pie.engine.model.Model
    plane: ControlPlane
    services: InstanceServices

    @property
    def runner(self) -> Any:
        return self.model.runner

    @property
    def num_free_pages(self) -> int:
        return self.services.num_free_pages

    @property
    def num_pages(self) -> int:
        return self.plane.kv_pages.num_pages


def check_replicas(models: Sequence[Any]) -> None:
    """Replicas must serve the same model the same way: one tokenizer and vocabulary, one page size.
    Raises ValueError naming what differs."""
    if not models:
        raise ValueError("a runtime needs at least one model replica")
    first = models[0]
    for i, other in enumerate(models[1:], start=1):
        for what, a, b in (("model", first.name, other.name),
                           ("vocabulary size", first.runner.vocab_size, other.runner.vocab_size),
                           ("page size", first.runner.page_size, other.runner.page_size)):
            if a != b:
                raise ValueError(f"replica {i} differs from replica 0 in its {what}: {b} vs {a}")
        if other.runner is first.runner:
            raise ValueError(f"replica {i} is the same model runner as replica 0: each replica needs its own")


def least_loaded(replicas: Sequence[Replica], live: Sequence[int]) -> Replica:
    """The replica a new instance goes to: the most free KV pages per instance it would then hold,
    free / (live + 1), where live[i] counts the instances on replica i (launched ones included: a burst
    of launches that hold no pages yet still spreads). Ties: the lowest index."""
    return max(replicas, key=lambda r: (r.num_free_pages / (live[r.index] + 1), -r.index))
