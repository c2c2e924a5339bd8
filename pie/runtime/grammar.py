"""The `grammar` interface: constrained decoding through xgrammar matchers held on the host.

An inferlet compiles a grammar (JSON schema, regex or EBNF) into a matcher, asks the matcher for the
tokens allowed next (`token-mask`), passes that mask as the output mask of its forward pass, and feeds
the sampled token back (`accept`). One `GrammarHost` serves one Runtime (one model): it builds the
xgrammar tokenizer description from the model's tokenizer once, on first use, caches compiled
grammars by source, and keeps every instance's matchers under handles private to that instance.

Masks are BRLE run lists over the model's vocabulary [0, vocab_size): runs alternate allowed /
forbidden, starting with allowed (a first run of 0 forbids token 0), and add up to vocab_size: the
format of ForwardRequest.output_masks, so a guest passes a mask straight through.

Termination: a matcher is terminated once the grammar is complete and nothing but an end-of-sequence
token may follow (or once such a token has been accepted). A terminated matcher's mask allows exactly
the EOS token(s), and `accept` takes only those.

The model's vocabulary (logits width) may be wider than the tokenizer's: the extra ids are always
forbidden, as are special tokens (chat markers and the like) other than EOS.

>>> host = GrammarHost(tokenizer, vocab_size=49152, eos_ids=[2])              # doctest: +SKIP
>>> m = host.from_regex(instance_id=1, pattern="(yes|no)")                      # doctest: +SKIP
>>> runs = host.token_mask(1, m)   # -> ForwardRequest(..., output_masks=[runs])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from pie.engine.vocabulary import byte_level_alphabet, vocab_metadata

if TYPE_CHECKING:
    from pie.engine.tokenizer import Tokenizer
    from pie.runtime.instance import Instance

MAX_MATCHERS_PER_INSTANCE = 1024  # live matchers one instance may hold
MAX_SOURCE_CHARS = 1 << 20  # characters of one schema / pattern / grammar
COMPILED_CACHE_ENTRIES = 256  # compiled grammars kept (least recently used dropped first)
_MAX_HANDLE = (1 << 32) - 1  # handles are WIT u32


# ---- the tokenizer description xgrammar needs ----------------------------------------------------------

def encoded_vocabulary(tokenizer: "Tokenizer", vocab_size: int, vocab_type: str) -> list[str]:
    """(vocab_size,) token spellings for xgrammar, indexed by token id.

    Ordinary tokens are spelled as in the tokenizer's vocabulary (xgrammar decodes them by the vocab
    type). Special added tokens and ids the tokenizer lacks (holes, and ids past its vocabulary up to
    the model's vocab_size) are "", which xgrammar treats as special: never allowed by a grammar
    (an EOS id among them is still allowed where the grammar may end). Non-special added tokens are
    plain text; in a byte-level vocabulary they are re-spelled in the byte-level alphabet so that
    xgrammar decodes them back to that text."""
    backend = tokenizer.backend
    spelled = [""] * vocab_size
    for token, idx in backend.get_vocab(with_added_tokens=False).items():
        if 0 <= idx < vocab_size:
            spelled[idx] = token
    alphabet = byte_level_alphabet() if vocab_type == "byte_level" else None
    for idx, added in backend.get_added_tokens_decoder().items():
        if not 0 <= idx < vocab_size:
            continue
        if added.special:
            spelled[idx] = ""
        elif alphabet is not None:
            spelled[idx] = "".join(alphabet[b] for b in added.content.encode("utf-8"))
        else:
            spelled[idx] = added.content
    return spelled


_LOG_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s*\S+:\d+:\s*")  # "[06:22:39] /project/cpp/x.cc:83: "
_CHECK_FAILED = re.compile(r"Check failed: \(.*?\) is false:\s*")


def _xgrammar_message(e: BaseException) -> str:
    """The useful part of an xgrammar error (its C++ log prefix and check expression dropped)."""
    text = _CHECK_FAILED.sub("", _LOG_PREFIX.sub("", str(e).strip()))
    return " ".join(text.split()) or type(e).__name__


# ---- the host --------------------------------------------------------------------------------------------

class _Matcher:
    """One live matcher: the xgrammar GrammarMatcher and a lock serialising calls on it."""

    __slots__ = ("matcher", "lock")

    def __init__(self, matcher: Any):
        self.matcher = matcher
        self.lock = threading.Lock()


class GrammarHost:
    """Grammar matchers of one model's runtime. Thread-safe: many instance threads call at once.

    tokenizer: pie.engine.tokenizer.Tokenizer; vocab_size: the model's vocabulary (logits width);
    eos_ids: the tokens that end a sequence (a terminated matcher allows exactly these)."""

    def __init__(self, tokenizer: "Tokenizer", vocab_size: int, eos_ids: Iterable[int]):
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = tuple(sorted({int(e) for e in eos_ids if 0 <= int(e) < vocab_size}))
        self._init_lock = threading.Lock()
        self._compiler: Any = None  # xgrammar.GrammarCompiler, built on first use
        self._info: Any = None  # xgrammar.TokenizerInfo
        self._words = 0  # int32 words of one xgrammar bitmask: ceil(vocab_size / 32)
        self._eos_allowed: np.ndarray | None = None  # (vocab_size,) bool, True exactly at eos_ids
        self._eos_runs: list[int] = []  # BRLE of _eos_allowed
        self._lock = threading.Lock()  # guards the tables below
        self._compiled: OrderedDict[tuple, Any] = OrderedDict()  # (kind, *source) -> CompiledGrammar, LRU
        self._compiling: dict[tuple, Future] = {}  # keys being compiled now -> their result
        self._matchers: dict[int, dict[int, _Matcher]] = {}  # instance id -> handle -> matcher
        self._next_handle: dict[int, int] = {}  # instance id -> next handle to give out
        self.compile_count = 0  # grammars compiled (cache misses), for tests and stats

    # -- lazy setup --
    def _ensure(self) -> Any:
        """The GrammarCompiler, built on first use (imports xgrammar, reads the whole vocabulary)."""
        if self._compiler is not None:
            return self._compiler
        with self._init_lock:
            if self._compiler is None:
                if not self.eos_ids:
                    raise ValueError("the model has no end-of-sequence token in its vocabulary; "
                                     "a grammar needs one to end")
                import xgrammar

                vocab_type, add_prefix_space = vocab_metadata(json.loads(self.tokenizer.backend.to_str()))
                spelled = encoded_vocabulary(self.tokenizer, self.vocab_size, vocab_type)
                kinds = {"byte_level": xgrammar.VocabType.BYTE_LEVEL, "byte_fallback": xgrammar.VocabType.BYTE_FALLBACK,
                         "raw": xgrammar.VocabType.RAW}
                info = xgrammar.TokenizerInfo(spelled, kinds[vocab_type], vocab_size=self.vocab_size,
                                              stop_token_ids=list(self.eos_ids), add_prefix_space=add_prefix_space)
                eos_allowed = np.zeros(self.vocab_size, dtype=np.bool_)
                eos_allowed[list(self.eos_ids)] = True
                self._eos_allowed = eos_allowed
                self._eos_runs = brle_runs(eos_allowed)
                self._words = (self.vocab_size + 31) // 32
                self._info = info
                # our own cache keeps compiled grammars; xgrammar's would hold a second copy
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        return self._compiler

    @property
    def tokenizer_info(self) -> Any:
        """The xgrammar TokenizerInfo (built on first use)."""
        self._ensure()
        return self._info

    # -- compiled grammars --
    def compile(self, kind: str, *source: str) -> Any:
        """The CompiledGrammar of ("json", schema) | ("regex", pattern) | ("ebnf", grammar, root),
        from the cache or compiled now (once, however many threads ask at the same time). Raises
        ValueError naming the argument when the source does not compile."""
        compiler = self._ensure()
        key = (kind, *source)
        with self._lock:
            hit = self._compiled.get(key)
            if hit is not None:
                self._compiled.move_to_end(key)
                return hit
            pending = self._compiling.get(key)
            owner = pending is None
            if owner:
                pending = self._compiling[key] = Future()
        if not owner:
            return pending.result()  # raises the owner's error too
        try:
            compiled = self._compile_now(compiler, kind, source)
        except BaseException as e:
            with self._lock:
                del self._compiling[key]
            pending.set_exception(e)
            raise
        with self._lock:
            del self._compiling[key]
            self._compiled[key] = compiled
            self.compile_count += 1
            while len(self._compiled) > COMPILED_CACHE_ENTRIES:
                self._compiled.popitem(last=False)
        pending.set_result(compiled)
        return compiled

    @staticmethod
    def _compile_now(compiler: Any, kind: str, source: tuple[str, ...]) -> Any:
        if kind == "json":
            [schema] = source
            try:
                doc = json.loads(schema)
            except ValueError as e:
                raise ValueError(f"schema: not JSON: {e}") from None
            if not isinstance(doc, (dict, bool)):
                raise ValueError(f"schema: a JSON schema is an object or a boolean, got {type(doc).__name__}")
            try:
                # one line, json.dumps spacing (", " and ": "): a small model cannot wander off into
                # endless whitespace, and the text is canonical
                return compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)
            except Exception as e:  # xgrammar raises RuntimeError for unsupported / inconsistent schemas
                raise ValueError(f"schema: invalid JSON schema: {_xgrammar_message(e)}") from None
        if kind == "regex":
            [pattern] = source
            try:
                return compiler.compile_regex(pattern)
            except Exception as e:
                raise ValueError(f"pattern: invalid regex: {_xgrammar_message(e)}") from None
        if kind == "ebnf":
            grammar, root = source
            if not root.strip():
                raise ValueError("root: the root rule name is empty")
            try:
                return compiler.compile_grammar(grammar, root_rule_name=root)
            except Exception as e:
                message = _xgrammar_message(e)
                if "root rule" in message and "not found" in message:
                    raise ValueError(f"root: the grammar has no rule named {root!r}") from None
                raise ValueError(f"grammar: invalid EBNF grammar: {message}") from None
        raise ValueError(f"unknown grammar kind {kind!r}")

    # -- matchers --
    _ARG_NAMES = {"json": ("schema",), "regex": ("pattern",), "ebnf": ("grammar", "root")}

    def _new_matcher(self, instance_id: int, kind: str, *source: str) -> int:
        import xgrammar

        for name, text in zip(self._ARG_NAMES[kind], source):
            if len(text) > MAX_SOURCE_CHARS:
                raise ValueError(f"{name}: {len(text)} characters exceed the limit of {MAX_SOURCE_CHARS}")
        with self._lock:  # refuse early, before compiling, when the instance is at its cap
            self._check_room(instance_id)
        matcher = _Matcher(xgrammar.GrammarMatcher(self.compile(kind, *source)))
        with self._lock:
            self._check_room(instance_id)
            handle = self._next_handle.get(instance_id, 1)
            if handle > _MAX_HANDLE:
                raise ValueError("this instance has used up the matcher handles")
            self._next_handle[instance_id] = handle + 1
            self._matchers.setdefault(instance_id, {})[handle] = matcher
        return handle

    def _check_room(self, instance_id: int) -> None:
        """Caller holds self._lock."""
        live = len(self._matchers.get(instance_id, ()))
        if live >= MAX_MATCHERS_PER_INSTANCE:
            raise ValueError(f"too many matchers: this instance holds {live} (the limit is "
                             f"{MAX_MATCHERS_PER_INSTANCE}); free the ones it no longer uses")

    def _get(self, instance_id: int, m: int) -> _Matcher:
        with self._lock:
            found = self._matchers.get(instance_id, {}).get(m)
        if found is None:
            raise ValueError(f"m: {m} is not a matcher of this instance")
        return found

    def from_json_schema(self, instance_id: int, schema: str) -> int:
        return self._new_matcher(instance_id, "json", schema)

    def from_regex(self, instance_id: int, pattern: str) -> int:
        return self._new_matcher(instance_id, "regex", pattern)

    def from_ebnf(self, instance_id: int, grammar: str, root: str) -> int:
        return self._new_matcher(instance_id, "ebnf", grammar, root)

    def _allowed(self, matcher: Any) -> np.ndarray:
        """(vocab_size,) bool: the tokens the (not terminated) matcher allows next. Caller holds the
        matcher's lock."""
        words = np.empty(self._words, dtype=np.int32)  # bit j of word w = token 32 * w + j
        matcher.fill_next_token_bitmask(words)
        # little-endian bytes of the words, low bit first = tokens in increasing order
        bits = np.unpackbits(words.view(np.uint8), bitorder="little", count=self.vocab_size)
        return bits.view(np.bool_)

    def _terminated(self, matcher: Any) -> bool:
        """Caller holds the matcher's lock."""
        if matcher.is_terminated():  # an EOS token was accepted
            return True
        if not matcher.is_completed():
            return False
        return bool(np.array_equal(self._allowed(matcher), self._eos_allowed))  # only EOS may follow

    def token_mask(self, instance_id: int, m: int) -> list[int]:
        """BRLE runs over [0, vocab_size) of the tokens allowed next (allowed first); a terminated
        matcher allows exactly the EOS tokens."""
        entry = self._get(instance_id, m)
        with entry.lock:
            if entry.matcher.is_terminated():
                return list(self._eos_runs)
            return brle_runs(self._allowed(entry.matcher))

    def accept(self, instance_id: int, m: int, token: int) -> bool:
        """Advances the matcher by `token`; False (and no change) when the grammar forbids it."""
        entry = self._get(instance_id, m)
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token: {token} is outside the vocabulary [0, {self.vocab_size})")
        with entry.lock:
            if entry.matcher.is_terminated():  # only EOS is allowed after EOS; xgrammar would refuse it
                return token in self.eos_ids
            return bool(entry.matcher.accept_token(token))

    def is_terminated(self, instance_id: int, m: int) -> bool:
        entry = self._get(instance_id, m)
        with entry.lock:
            return self._terminated(entry.matcher)

    def reset(self, instance_id: int, m: int) -> None:
        """Back to the state before any token was accepted."""
        entry = self._get(instance_id, m)
        with entry.lock:
            entry.matcher.reset()

    def free(self, instance_id: int, m: int) -> None:
        with self._lock:
            table = self._matchers.get(instance_id, {})
            if table.pop(m, None) is None:
                raise ValueError(f"m: {m} is not a matcher of this instance")

    def num_matchers(self, instance_id: int) -> int:
        with self._lock:
            return len(self._matchers.get(instance_id, ()))

    def end_instance(self, instance_id: int) -> None:
        """Frees every matcher of the instance (it has ended)."""
        with self._lock:
            self._matchers.pop(instance_id, None)
            self._next_handle.pop(instance_id, None)


def brle_runs(allowed: np.ndarray) -> list[int]:
    """(V,) bool, V >= 1 -> BRLE runs alternating allowed / forbidden, starting with allowed.

    >>> brle_runs(np.array([False, True, True, False]))
    [0, 1, 2, 1]
    """
    change = np.flatnonzero(allowed[1:] != allowed[:-1]) + 1  # indices where a new run starts
    edges = np.concatenate(([0], change, [allowed.shape[0]]))
    runs = np.diff(edges)
    if not allowed[0]:
        runs = np.concatenate(([0], runs))
    return runs.tolist()


# ---- cold calls: f(instance, *args) -> value (the host is inst.services.grammar) -------------------------

def grammar_from_json_schema(inst: "Instance", schema: str) -> int:
    return inst.services.grammar.from_json_schema(inst.id, schema)


def grammar_from_regex(inst: "Instance", pattern: str) -> int:
    return inst.services.grammar.from_regex(inst.id, pattern)


def grammar_from_ebnf(inst: "Instance", grammar: str, root: str) -> int:
    return inst.services.grammar.from_ebnf(inst.id, grammar, root)


def grammar_token_mask(inst: "Instance", m: int) -> list[int]:
    return inst.services.grammar.token_mask(inst.id, m)


def grammar_accept(inst: "Instance", m: int, token: int) -> bool:
    return inst.services.grammar.accept(inst.id, m, token)


def grammar_is_terminated(inst: "Instance", m: int) -> bool:
    return inst.services.grammar.is_terminated(inst.id, m)


def grammar_reset(inst: "Instance", m: int) -> None:
    inst.services.grammar.reset(inst.id, m)


def grammar_free(inst: "Instance", m: int) -> None:
    inst.services.grammar.free(inst.id, m)


# (interface, function) -> (implementation, result type descriptor), as pie.runtime.api.COLD
GRAMMAR_COLD: dict[tuple[str, str], tuple[Any, Any]] = {
    ("grammar", "from-json-schema"): (grammar_from_json_schema, "u32"),
    ("grammar", "from-regex"): (grammar_from_regex, "u32"),
    ("grammar", "from-ebnf"): (grammar_from_ebnf, "u32"),
    ("grammar", "token-mask"): (grammar_token_mask, ("list", "u32")),
    ("grammar", "accept"): (grammar_accept, "bool"),
    ("grammar", "is-terminated"): (grammar_is_terminated, "bool"),
    ("grammar", "reset"): (grammar_reset, None),
    ("grammar", "free"): (grammar_free, None),
}
