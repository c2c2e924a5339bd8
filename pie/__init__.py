"""Pie in Python: a programmable LLM serving system.

Layers (data flows one way): pie.runtime (inferlets) -> pie.control (queues, scheduler, page pool)
-> pie.engine (model runner, paged KV cache, sampling).
"""

__version__ = "0.1.0"
