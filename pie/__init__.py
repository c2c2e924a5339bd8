"""Pie in Python: a programmable LLM serving system.

Layers (data flows one way): pie.runtime (inferlets) -> pie.control (queues, scheduler, page pool)
-> pie.engine (model runner, paged KV cache, sampling).
"""

import os

# OpenMP workers that spin after each parallel region (libgomp's default) take a core from the engine's
# own kernel thread pool between torch ops: measured here, a batch-1 SmolLM2 decode step took 37-39 ms on
# the main thread vs 32 ms with passive waiting. Read once when torch loads OpenMP, so set before that
# (an explicit OMP_WAIT_POLICY in the environment wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
