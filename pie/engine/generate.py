"""The built-in generate loop: prompt -> text on the model runner, greedy or sampled, stopping on
EOS, stop strings or max tokens. It is the baseline the inferlet path is measured against.

>>> engine = Engine()                                                     # doctest: +SKIP
>>> engine.generate("What is the capital of France?", GenerationParams(temperature=0)).text  # doctest: +SKIP
'The capital of France is Paris.'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from pie.engine.batch import ForwardRequest, Greedy, Sample, Sampler
from pie.engine.config import EngineConfig
from pie.engine.kv_cache import PageAllocator
from pie.engine.model_store import DEFAULT_MODEL, ModelStore
from pie.engine.runner import ModelRunner
from pie.engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    def sampler(self, step: int) -> Sampler:
        """The sampler of the step-th generated token. A seeded generation derives one seed per step."""
        if self.temperature == 0:
            return Greedy()
        seed = None if self.seed is None else (self.seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF
        return Sample(self.temperature, self.top_k, self.top_p, self.min_p, seed)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int


@dataclass
class SequenceState:
    prompt_len: int
    tokens: list[int]  # prompt + generated
    pages: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None
    text: str | None = None


class Engine:
    """A model runner, its tokenizer and a page allocator: everything `pie generate` needs."""

    def __init__(self, model: str = DEFAULT_MODEL, config: EngineConfig = EngineConfig(), seed: int | None = None,
                 progress: bool = True):
        entry = ModelStore().resolve(model, progress=progress)
        self.model_name = entry.name
        self.tokenizer = Tokenizer(entry.path)
        self.runner = ModelRunner.from_path(entry.path, config, seed)
        self.pages = PageAllocator(self.runner.num_pages)
        eos = set(self.tokenizer.special.eos_ids) | set(self.runner.model_config.eos_token_ids)
        self.eos_ids = frozenset(eos)

    def prompt_ids(self, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
        """Token ids of a prompt: through the chat template unless raw (or the model has none)."""
        if raw or self.tokenizer.chat_template is None:
            return self.tokenizer.encode(prompt if system is None else f"{system}\n\n{prompt}")
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
                   [{"role": "user", "content": prompt}]
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_bos=False)

    def generate(self, prompt: str, params: GenerationParams = GenerationParams(), system: str | None = None,
                 raw: bool = False) -> Generation:
        return self.generate_batch([self.prompt_ids(prompt, system, raw)], params)[0]

    def generate_batch(self, prompts: Sequence[list[int]], params: GenerationParams = GenerationParams()) -> list[Generation]:
        """Generates for all prompts at once: one forward pass per step over every live sequence
        (prefill chunked to the runner's token budget)."""
        seqs = [SequenceState(prompt_len=len(p), tokens=list(p)) for p in prompts]
        for i, s in enumerate(seqs):
            if s.prompt_len == 0:
                raise ValueError(f"prompt {i} is empty")
            if params.max_tokens == 0:
                s.finish_reason, s.text = "length", ""
        try:
            while True:
                live = [s for s in seqs if s.finish_reason is None]
                if not live:
                    break
                self._step(live, params)
        finally:
            for s in seqs:
                self.pages.free(s.pages)
                s.pages = []
        return [Generation(text=s.text or "", token_ids=s.tokens[s.prompt_len:], finish_reason=s.finish_reason or "length",
                           prompt_tokens=s.prompt_len) for s in seqs]

    def _step(self, live: list[SequenceState], params: GenerationParams) -> None:
        page_size = self.runner.page_size
        budget = self.runner.max_batch_tokens
        requests, owners = [], []
        for s in live:
            todo = len(s.tokens) - s.num_cached
            take = min(todo, budget)
            if take <= 0:
                break
            budget -= take
            end = s.num_cached + take
            need_pages = -(-end // page_size) - len(s.pages)
            if need_pages > 0:
                s.pages += self.pages.allocate(need_pages)
            finishes_prompt = end == len(s.tokens)
            step = len(s.tokens) - s.prompt_len
            requests.append(ForwardRequest(
                token_ids=s.tokens[s.num_cached:end], positions=list(range(s.num_cached, end)),
                kv_page_ids=s.pages[:-(-end // page_size)], kv_last_page_len=end - (-(-end // page_size) - 1) * page_size,
                outputs=[(take - 1, params.sampler(step))] if finishes_prompt else []))
            owners.append((s, end))
        results = self.runner.execute(requests)
        for (s, end), res in zip(owners, results):
            s.num_cached = end
            if res.outputs:
                self.accept_token(s, int(res.outputs[0]), params)

    def accept_token(self, s: SequenceState, token: int, params: GenerationParams) -> None:
        """Appends a sampled token to a sequence, or finishes it (EOS, a stop string, max tokens)."""
        generated = len(s.tokens) - s.prompt_len
        if token in self.eos_ids and not params.ignore_eos:
            s.finish_reason = "stop"
        else:
            s.tokens.append(token)
            generated += 1
        text = None
        if s.finish_reason is None and params.stop:
            text = self.tokenizer.decode(s.tokens[s.prompt_len:])
            cut = min((i for i in (text.find(stop) for stop in params.stop) if i >= 0), default=-1)
            if cut >= 0:
                s.finish_reason, text = "stop", text[:cut]
        if s.finish_reason is None and generated >= params.max_tokens:
            s.finish_reason = "length"
        if s.finish_reason is not None:
            s.text = text if text is not None else self.tokenizer.decode(s.tokens[s.prompt_len:])
