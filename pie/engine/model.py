"""A model ready to serve: its weights in a model runner, its tokenizer, its EOS ids and its name.

`pie generate`'s loop (pie.control.generate) and the inferlet runtime (pie.runtime) both run on one.

>>> model = Model()                                       # doctest: +SKIP
>>> model.prompt_ids("What is the capital of France?")[:3]   # doctest: +SKIP
[1, 9690, 198]
"""

from __future__ import annotations

from functools import cached_property

from pie.engine.config import EngineConfig
from pie.engine.model_store import DEFAULT_MODEL, ModelStore
from pie.engine.runner import ModelRunner
from pie.engine.tokenizer import Tokenizer


class Model:
    """A model runner, its tokenizer and EOS ids: everything a client of the engine needs."""

    def __init__(self, name: str = DEFAULT_MODEL, config: EngineConfig = EngineConfig(), seed: int | None = None,
                 progress: bool = True, tensor_parallel: int = 1):
        """tensor_parallel > 1: the model split over that many processes (pie.engine.tensor_parallel)."""
        entry = ModelStore().resolve(name, progress=progress)
        self.name = entry.name
        self.tokenizer = Tokenizer(entry.path)
        if tensor_parallel > 1:
            from pie.engine.tensor_parallel import TensorParallelRunner

            self.runner = TensorParallelRunner.from_path(entry.path, config, seed, world_size=tensor_parallel)
        else:
            self.runner = ModelRunner.from_path(entry.path, config, seed)
        eos = set(self.tokenizer.special.eos_ids) | set(self.runner.model_config.eos_token_ids)
        self.eos_ids = frozenset(eos)

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """(vocab_size,) each token's text as bytes (pie.engine.vocabulary.token_bytes): what generation
        streams search for stop strings."""
        from pie.engine.vocabulary import token_bytes

        return token_bytes(self.tokenizer, self.runner.vocab_size)

    def prompt_ids(self, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
        """Token ids of a prompt: through the chat template unless raw (or the model has none)."""
        if raw or self.tokenizer.chat_template is None:
            return self.tokenizer.encode(prompt if system is None else f"{system}\n\n{prompt}")
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
                   [{"role": "user", "content": prompt}]
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_bos=False)
