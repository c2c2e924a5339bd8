"""The `grammar` interface: constrained decoding through llguidance matchers held on the host.

An inferlet compiles a grammar (JSON schema, regex or EBNF) into a matcher, asks the matcher for the
tokens allowed next (`token-mask`), passes that mask as the output mask of its forward pass, and feeds
the sampled token back (`accept`). One `GrammarHost` serves one Runtime (one model): it describes the
model's vocabulary to llguidance once, on first use, caches compiled grammars by source, and keeps
every instance's matchers under handles private to that instance.

Why llguidance (benchmarks/results/grammar_engines.md, against xgrammar): an 8 MB install with no
dependencies (xgrammar pulls triton and transformers, over a gigabyte), imported in milliseconds,
and bounded work per token (its lexer and parser run on fuel limits, so a hostile grammar cannot stall
the batch loop).

Masks are BRLE run lists over the model's vocabulary [0, vocab_size): runs alternate allowed /
forbidden, starting with allowed (a first run of 0 forbids token 0), and add up to vocab_size: the
format of ForwardRequest.output_masks, so a guest passes a mask straight through.

Termination: a matcher is terminated once the grammar is complete and nothing but an end-of-sequence
token may follow (or once such a token has been accepted). A terminated matcher's mask allows exactly
the EOS token(s), and `accept` takes only those.

The model's vocabulary (logits width) may be wider than the tokenizer's: the extra ids are always
forbidden, as are special tokens (chat markers and the like) other than EOS.

Dialects: JSON schemas (draft 2020-12, as far as llguidance goes: benchmarks/grammar_engines), compiled
closed (an object takes only the properties its schema names unless it says otherwise, a tuple only its
prefixItems) and printed on one line with json.dumps spacing; regexes in Rust's `regex` syntax, matched
whole; EBNF in the GBNF notation (`rule ::= "text" | [a-z]+ other*`), with any rule as the root.

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

from pie.engine.vocabulary import token_bytes

if TYPE_CHECKING:
    from pie.engine.tokenizer import Tokenizer
    from pie.runtime.instance import Instance

MAX_MATCHERS_PER_INSTANCE = 1024  # live matchers one instance may hold
MAX_SOURCE_CHARS = 1 << 20  # characters of one schema / pattern / grammar
COMPILED_CACHE_ENTRIES = 256  # compiled grammars kept (least recently used dropped first)
_MAX_HANDLE = (1 << 32) - 1  # handles are WIT u32
# JSON as json.dumps prints it, on one line: a small model cannot wander off into endless whitespace
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# every grammar's header. no_forcing: a mask allows every token whose text keeps the output in the
# grammar, however the text is split into tokens (with forcing, llguidance allows only the canonical
# tokenization of text the grammar forces, and refuses the tokens an inferlet tokenized itself)
ENGINE_OPTIONS = '%llguidance {"no_forcing": true}'


# ---- what llguidance is given ----------------------------------------------------------------------------

class _Vocabulary:
    """The model's vocabulary as llguidance's TokenizerWrapper reads it: each token's bytes (b"" for
    special tokens and ids the tokenizer lacks: never allowed by a grammar), the special ids, and the
    tokenizer itself for the text llguidance tokenizes (forced prefixes)."""

    def __init__(self, tokenizer: "Tokenizer", vocab_size: int, eos_ids: tuple[int, ...]):
        self.tokens = token_bytes(tokenizer, vocab_size)  # (vocab_size,) bytes
        specials = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
        self.special_token_ids = sorted(i for i in specials | set(eos_ids) if 0 <= i < vocab_size)
        self.eos_token_id = eos_ids[0]
        self.bos_token_id = None
        self._tokenizer = tokenizer

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_bos=False)


def closed_schema(schema: Any, in_all_of: bool = False) -> Any:
    """A copy of a JSON schema in which objects take only the properties their schema names and tuples
    only their prefixItems, unless the schema says otherwise (additionalProperties / items present).

    Members of an allOf are left open (closing each would refuse the other members' properties); the
    schema holding the allOf is closed instead, over the properties all of them name.

    >>> closed_schema({"type": "object", "properties": {"a": {"type": "integer"}}})["additionalProperties"]
    False
    """
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas"):
            out[key] = {k: closed_schema(v) for k, v in value.items()} if isinstance(value, dict) else value
        elif key == "allOf" and isinstance(value, list):
            out[key] = [closed_schema(s, in_all_of=True) for s in value]
        elif key in ("items", "additionalProperties", "not", "if", "then", "else", "contains",
                     "propertyNames", "unevaluatedProperties", "unevaluatedItems", "anyOf", "oneOf",
                     "prefixItems"):
            out[key] = closed_schema(value)
        else:
            out[key] = value
    open_keys = ("additionalProperties", "unevaluatedProperties", "patternProperties")
    is_object = out.get("type") == "object" or "properties" in out or (
        "allOf" in out and any(isinstance(s, dict) and ("properties" in s or s.get("type") == "object")
                               for s in out["allOf"]))
    if is_object and not in_all_of and not any(k in out for k in open_keys):
        members = [m for m in out.get("allOf", []) if isinstance(m, dict)]
        if members:  # closed over every member's properties: name them all here, where it is closed
            named = [n for m in members if isinstance(m.get("properties"), dict) for n in m["properties"]]
            out["properties"] = {**{n: {} for n in named}, **out.get("properties", {})}
        out["additionalProperties"] = False
    if "prefixItems" in out and "items" not in out and not in_all_of:
        out["items"] = False
    return out


_ENGINE_ECHO = re.compile(r"^\s*(\d+\s*\|.*|[\s^~]*)$")  # llguidance's quoted source lines and carets
_AT_POSITION = re.compile(r"^(?:at \d+\(\d+\): |failed to compile JSON schema: )+")  # where, in the generated grammar


def _engine_message(text: str) -> str:
    """llguidance's error on one line, without its echo of the generated grammar."""
    lines = [line.strip() for line in str(text).splitlines() if not _ENGINE_ECHO.match(line)]
    message = _AT_POSITION.sub("", " ".join(lines))
    if "regex parse error:" in message and "error: " in message:
        message = message.rsplit("error: ", 1)[1]  # the regex crate's reason: "unclosed group"
    return " ".join(message.split()) or "the engine refused it"


def _has_empty_alternative(node: Any) -> bool:
    """Whether a parsed GBNF body has an alternative with nothing in it (`a ::= "x" |`, `a ::=`)."""
    from llguidance.gbnf_to_lark import SequenceNode

    if isinstance(node, SequenceNode) and not node.nodes:
        return True
    return any(_has_empty_alternative(child) for child in node.children())


def ebnf_to_lark(grammar: str, root: str) -> str:
    """A GBNF-notation grammar as the Lark rules llguidance compiles, `root` its start rule.
    Raises ValueError naming the argument: the grammar's syntax error (with its line), a rule used but
    not defined, or a root the grammar lacks."""
    from llguidance.gbnf_to_lark import GrammarParser, resolve

    if not root.strip():
        raise ValueError("root: the root rule name is empty")
    try:
        rules = GrammarParser().parse(grammar)
    except Exception as e:  # GbnfToLarkError: "<what> at line N, <context>"
        raise ValueError(f"grammar: invalid EBNF grammar: {' '.join(str(e).split())}") from None
    for name, rule in rules.items():
        if _has_empty_alternative(rule.alternatives):
            found = re.search(rf"(?m)^\s*{re.escape(name)}\s*::=", grammar)
            line = grammar.count("\n", 0, found.start()) + 1 if found else "?"
            raise ValueError(f"grammar: invalid EBNF grammar: the rule {name} (line {line}) has an empty "
                             'alternative (write "" for the empty text)')
    if root not in rules:
        raise ValueError(f"root: the grammar has no rule named {root!r}")
    if root != "root":  # the converter starts at the rule named "root": name the chosen one so
        if "root" in rules:
            spare = next(f"root_{k}" for k in range(len(rules) + 1) if f"root_{k}" not in rules)
            rules["root"].name = spare
        rules[root].name = "root"
        rules = {rule.name: rule for rule in rules.values()}
    try:
        resolve(rules)
    except Exception as e:  # "Rule 'x' not found"
        missing = re.fullmatch(r"Rule '(.*)' not found", str(e))
        reason = f'the rule "{missing.group(1)}" is not defined' if missing else str(e)
        raise ValueError(f"grammar: invalid EBNF grammar: {reason}") from None
    ordered = sorted(rules.values(), key=lambda rule: rule.order)
    return "\n\n".join(str(rule) for rule in ordered) + "\n"


# ---- the host --------------------------------------------------------------------------------------------

class _Matcher:
    """One live matcher: the llguidance LLMatcher and a lock serialising calls on it."""

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
        self._engine_tokenizer: Any = None  # llguidance.LLTokenizer, built on first use
        self._words = (vocab_size + 31) // 32  # int32 words of one bitmask: bit j of word w = token 32 w + j
        self._eos_runs: list[int] = []  # BRLE of the EOS-only mask
        self._lock = threading.Lock()  # guards the tables below
        self._compiled: OrderedDict[tuple, Any] = OrderedDict()  # (kind, *source) -> LLMatcher template, LRU
        self._compiling: dict[tuple, Future] = {}  # keys being compiled now -> their result
        self._matchers: dict[int, dict[int, _Matcher]] = {}  # instance id -> handle -> matcher
        self._next_handle: dict[int, int] = {}  # instance id -> next handle to give out
        self.compile_count = 0  # grammars compiled (cache misses), for tests and stats

    # -- lazy setup --
    def _ensure(self) -> Any:
        """The llguidance tokenizer, built on first use (reads the whole vocabulary)."""
        if self._engine_tokenizer is not None:
            return self._engine_tokenizer
        with self._init_lock:
            if self._engine_tokenizer is None:
                if not self.eos_ids:
                    raise ValueError("the model has no end-of-sequence token in its vocabulary; "
                                     "a grammar needs one to end")
                import llguidance

                vocabulary = _Vocabulary(self.tokenizer, self.vocab_size, self.eos_ids)
                engine_tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocabulary),
                                                          n_vocab=self.vocab_size, eos_token=list(self.eos_ids))
                eos_allowed = np.zeros(self.vocab_size, dtype=np.bool_)
                eos_allowed[list(self.eos_ids)] = True
                self._eos_runs = brle_runs(eos_allowed)
                self._engine_tokenizer = engine_tokenizer
        return self._engine_tokenizer

    @property
    def engine_tokenizer(self) -> Any:
        """The llguidance LLTokenizer describing the vocabulary (built on first use)."""
        return self._ensure()

    # -- compiled grammars --
    def compile(self, kind: str, *source: str) -> Any:
        """The compiled grammar of ("json", schema) | ("regex", pattern) | ("ebnf", grammar, root): a
        matcher in its start state that new matchers copy, from the cache or compiled now (once, however
        many threads ask at the same time). Raises ValueError naming the argument when the source does
        not compile."""
        self._ensure()
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
            compiled = self._compile_now(kind, source)
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

    def _compile_now(self, kind: str, source: tuple[str, ...]) -> Any:
        """A new LLMatcher in its start state for the grammar; ValueError naming the argument."""
        import llguidance

        engine_tokenizer = self._ensure()
        if kind == "json":
            [schema] = source
            try:
                doc = json.loads(schema)
            except ValueError as e:
                raise ValueError(f"schema: not JSON: {e}") from None
            if not isinstance(doc, (dict, bool)):
                raise ValueError(f"schema: a JSON schema is an object or a boolean, got {type(doc).__name__}")
            doc = closed_schema({} if doc is True else {"not": {}} if doc is False else doc)
            lark, what = f"start: %json {json.dumps({**doc, 'x-guidance': JSON_FORMAT})}", "schema: invalid JSON schema"
        elif kind == "regex":
            [pattern] = source
            lark, what = f"start: /{llguidance.regex_to_lark(pattern)}/", "pattern: invalid regex"
        elif kind == "ebnf":
            grammar, root = source
            lark, what = ebnf_to_lark(grammar, root), "grammar: invalid EBNF grammar"
        else:
            raise ValueError(f"unknown grammar kind {kind!r}")
        spec = llguidance.LLMatcher.grammar_from_lark(f"{ENGINE_OPTIONS}\n{lark}")
        matcher = llguidance.LLMatcher(engine_tokenizer, spec, log_level=0)
        if matcher.is_error():
            raise ValueError(f"{what}: {_engine_message(matcher.get_error())}")
        return matcher

    # -- matchers --
    _ARG_NAMES = {"json": ("schema",), "regex": ("pattern",), "ebnf": ("grammar", "root")}

    def _new_matcher(self, instance_id: int, kind: str, *source: str) -> int:
        for name, text in zip(self._ARG_NAMES[kind], source):
            if len(text) > MAX_SOURCE_CHARS:
                raise ValueError(f"{name}: {len(text)} characters exceed the limit of {MAX_SOURCE_CHARS}")
        with self._lock:  # refuse early, before compiling, when the instance is at its cap
            self._check_room(instance_id)
        matcher = _Matcher(self.compile(kind, *source).deep_copy())
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
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        # little-endian bytes of the words, low bit first = tokens in increasing order
        bits = np.unpackbits(words.view(np.uint8), bitorder="little", count=self.vocab_size)
        return bits.view(np.bool_)

    def token_mask(self, instance_id: int, m: int) -> list[int]:
        """BRLE runs over [0, vocab_size) of the tokens allowed next (allowed first); a terminated
        matcher allows exactly the EOS tokens."""
        entry = self._get(instance_id, m)
        with entry.lock:
            if entry.matcher.is_stopped():
                return list(self._eos_runs)
            return brle_runs(self._allowed(entry.matcher))

    def accept(self, instance_id: int, m: int, token: int) -> bool:
        """Advances the matcher by `token`; False (and no change) when the grammar forbids it."""
        entry = self._get(instance_id, m)
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token: {token} is outside the vocabulary [0, {self.vocab_size})")
        with entry.lock:
            matcher = entry.matcher
            if matcher.is_stopped():  # complete, or EOS accepted: only EOS may follow
                return token in self.eos_ids
            # checked first: a refused token would leave the matcher in its error state
            return matcher.validate_tokens([token]) == 1 and matcher.consume_token(token)

    def is_terminated(self, instance_id: int, m: int) -> bool:
        """Whether the grammar is complete with nothing but EOS to follow (llguidance stops the
        matcher then), or EOS was accepted."""
        entry = self._get(instance_id, m)
        with entry.lock:
            return entry.matcher.is_stopped()

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
