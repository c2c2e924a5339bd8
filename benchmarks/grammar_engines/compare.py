"""Two grammar engines side by side on the default model's vocabulary: llguidance and xgrammar.

    python benchmarks/grammar_engines/compare.py [--rounds 3] [--out benchmarks/results/grammar_engines]

xgrammar is no longer a dependency of pie; install it beside it to compare (`pip install xgrammar==0.2.8`,
which pulls triton and transformers). An engine that is not installed is left out of the table.

What it measures, per engine, in this one process (the machine is shared: both engines alternate):
  - install size: the engine's distribution and every distribution it pulls in that pie does not
    already need for something else (read from the installed packages' metadata and files);
  - import time: a fresh interpreter importing the engine (the best of --rounds);
  - setup: describing the 49k-token vocabulary to the engine (what the first grammar call pays);
  - compile time of each JSON schema, regex and EBNF grammar below (no cache);
  - per-token mask time: walking a valid text of each grammar token by token, the time to compute the
    next token's allowed set (the engine's bitmask, not pie's run-length encoding), median and p90;
  - JSON-schema coverage: each schema of SCHEMAS with texts that must be accepted and texts that must
    be refused (bounded strings, numbers with ranges, enums, nested arrays, anyOf, $ref, ...). A cell is
    "yes" when the schema compiles, every valid text is accepted and every invalid one refused; "loose"
    when an invalid text got through (the keyword is ignored), "refuses valid" or "error" otherwise.

Both engines are configured as pie uses them: JSON on one line with json.dumps spacing (", " and ": "),
objects closed to properties the schema does not name unless it says otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# (name, schema, texts that must be accepted, texts that must be refused); texts in json.dumps spacing
SCHEMAS: list[tuple[str, dict, list[str], list[str]]] = [
    ("string with min/max length", {"type": "string", "minLength": 2, "maxLength": 5},
     ['"abc"'], ['"a"', '"abcdefg"']),
    ("string with a pattern", {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
     ['"ABC-12"'], ['"AB-12"', '"abc-12"']),
    ("string format date", {"type": "string", "format": "date"}, ['"2026-12-08"'], ['"yesterday"']),
    ("integer in a range", {"type": "integer", "minimum": 10, "maximum": 99}, ["42", "10"], ["7", "100"]),
    ("number, exclusive bounds", {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
     ["0.5"], ["0", "1.5", "-0.25"]),
    ("integer multipleOf", {"type": "integer", "multipleOf": 5}, ["15"], ["7"]),
    ("enum of mixed values", {"enum": ["red", "green", 3]}, ['"green"', "3"], ['"blue"', "4"]),
    ("const", {"const": "x"}, ['"x"'], ['"y"']),
    ("nested arrays with item bounds",
     {"type": "array", "maxItems": 3,
      "items": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}},
     ["[[1], [2, 3]]", "[]"], ["[[]]", "[[1, 2, 3]]", "[[1], [1], [1], [1]]"]),
    ("tuple (prefixItems, no more items)",
     {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
     ['["a", 1]'], ['[1, "a"]', '["a", 1, 2]']),
    ("anyOf: integer or object",
     {"anyOf": [{"type": "integer"},
                {"type": "object", "properties": {"k": {"type": "string"}}, "required": ["k"]}]},
     ["5", '{"k": "v"}'], ['"s"', '{"j": 1}']),
    ("required and optional properties",
     {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a"]},
     ['{"a": 1}', '{"a": 1, "b": "x"}'], ['{"b": "x"}', '{"a": 1, "c": 2}']),
    ("additionalProperties schema", {"type": "object", "additionalProperties": {"type": "integer"}},
     ['{"x": 1}', "{}"], ['{"x": "s"}']),
    ("allOf of two objects",
     {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
     ['{"a": 1, "b": true}'], ['{"a": 1}']),
    ("recursive $ref",
     {"$defs": {"node": {"type": "object", "properties": {
         "v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
         "required": ["v", "next"]}}, "$ref": "#/$defs/node"},
     ['{"v": 1, "next": {"v": 2, "next": null}}'], ['{"v": 1}', '{"v": 1, "next": 2}']),
    ("a tool call (name const + arguments)",
     {"anyOf": [{"type": "object", "properties": {
         "name": {"const": "get_weather"},
         "arguments": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"enum": ["c", "f"]}},
                       "required": ["city"]}}, "required": ["name", "arguments"]}]},
     ['{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'],
     ['{"name": "get_time", "arguments": {"city": "Paris"}}', '{"name": "get_weather", "arguments": {}}']),
]

REGEXES: list[tuple[str, str, str]] = [  # (name, pattern, a text it matches)
    ("yes|no|maybe", "(yes|no|maybe)", "maybe"),
    ("decimal number", r"-?[0-9]{1,6}(\.[0-9]{1,4})?", "-1234.5"),
    ("e-mail address", r"[a-z0-9._%+-]{1,32}@[a-z0-9.-]{1,32}\.[a-z]{2,6}", "ada.lovelace@example.org"),
    ("ReAct step", r"Thought: [^\n]{1,200}\nAction: (search|lookup|finish)\[[^\]\n]{1,80}\]",
     "Thought: I should look up the capital.\nAction: search[capital of France]"),
    ("300-word alternation", "(" + "|".join(f"word{i}" for i in range(300)) + ")", "word257"),
]

EBNFS: list[tuple[str, str, str]] = [  # (name, grammar with a rule named root, a text it derives)
    ("arithmetic", 'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= factor (("*" | "/") factor)*\n'
                   'factor ::= [0-9]+ | "(" expr ")"', "(12+3)*4-5/6"),
    ("key=value lines", 'root ::= line+\nline ::= key "=" value "\\n"\nkey ::= [a-z_]+\nvalue ::= [a-zA-Z0-9 ]+',
     "name=Ada\nborn=1815\n"),
    ("yes/no with reason", 'root ::= ("yes" | "no") ", because " [a-z ]+ "."', "yes, because it rains."),
]


# ---- the engines, as pie drives them -----------------------------------------------------------------------

class LLGuidance:
    name = "llguidance"
    module = "llguidance"

    def setup(self, tokenizer, vocab_size: int, eos_ids: list[int]) -> None:
        from pie.runtime.grammar import GrammarHost

        self.host = GrammarHost(tokenizer, vocab_size, eos_ids)  # pie's own host: its tokenizer, its options
        self.host._ensure()
        self.words = (vocab_size + 31) // 32
        self.vocab_size = vocab_size

    def compile(self, kind: str, *source: str) -> Any:
        return self.host._compile_now(kind, source)

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill_mask(self, m: Any, words: np.ndarray) -> None:
        m.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)

    def accept(self, m: Any, token: int) -> bool:
        return m.validate_tokens([token]) == 1 and m.consume_token(token)

    def accepting(self, m: Any) -> bool:
        return m.is_accepting()


class XGrammar:
    name = "xgrammar"
    module = "xgrammar"

    def setup(self, tokenizer, vocab_size: int, eos_ids: list[int]) -> None:
        import xgrammar

        from pie.engine.vocabulary import byte_level_alphabet, vocab_metadata

        vocab_type, add_prefix_space = vocab_metadata(json.loads(tokenizer.backend.to_str()))
        spelled = [""] * vocab_size  # tokens in the tokenizer's own spelling; specials and holes ""
        for token, idx in tokenizer.backend.get_vocab(with_added_tokens=False).items():
            if 0 <= idx < vocab_size:
                spelled[idx] = token
        alphabet = byte_level_alphabet()
        for idx, added in tokenizer.backend.get_added_tokens_decoder().items():
            if 0 <= idx < vocab_size and not added.special:
                spelled[idx] = "".join(alphabet[b] for b in added.content.encode("utf-8"))
        kinds = {"byte_level": xgrammar.VocabType.BYTE_LEVEL, "byte_fallback": xgrammar.VocabType.BYTE_FALLBACK,
                 "raw": xgrammar.VocabType.RAW}
        info = xgrammar.TokenizerInfo(spelled, kinds[vocab_type], vocab_size=vocab_size,
                                      stop_token_ids=list(eos_ids), add_prefix_space=add_prefix_space)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.xgrammar = xgrammar

    def compile(self, kind: str, *source: str) -> Any:
        if kind == "json":
            return self.compiler.compile_json_schema(source[0], any_whitespace=False, strict_mode=True)
        if kind == "regex":
            return self.compiler.compile_regex(source[0])
        return self.compiler.compile_grammar(source[0], root_rule_name=source[1])

    def matcher(self, compiled: Any) -> Any:
        return self.xgrammar.GrammarMatcher(compiled)

    def fill_mask(self, m: Any, words: np.ndarray) -> None:
        m.fill_next_token_bitmask(words)

    def accept(self, m: Any, token: int) -> bool:
        return m.accept_token(token)

    def accepting(self, m: Any) -> bool:
        return m.is_completed() or m.is_terminated()


# ---- measurements ------------------------------------------------------------------------------------------

def _requirements(dist: str) -> list[str]:
    from packaging.requirements import Requirement

    try:
        reqs = metadata.distribution(dist).requires or []
    except metadata.PackageNotFoundError:
        return []
    names = []
    for text in reqs:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(req.name.lower().replace("_", "-"))
    return names


def _closure(roots: list[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_requirements(name))
    return seen


def _dist_bytes(name: str) -> int:
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return 0
    return sum(f.size or 0 for f in dist.files or [])


def install_cost(engine: str) -> tuple[int, list[str]]:
    """(bytes, distributions) the engine adds to an install of pie that has neither engine."""
    pie_needs = _closure([r for r in _requirements("pie-serve") if r not in ("xgrammar", "llguidance")])
    extra = sorted(_closure([engine]) - pie_needs)
    return sum(_dist_bytes(d) for d in extra), extra


def import_seconds(module: str, rounds: int) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return min(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout) for _ in range(rounds))


def walk_mask_times(engine, compiled, ids: list[int], words: np.ndarray) -> list[float]:
    """Per-token mask seconds while feeding ids; raises when a token of the valid text is refused."""
    m, times = engine.matcher(compiled), []
    for token in ids:
        t = time.perf_counter()
        engine.fill_mask(m, words)
        times.append(time.perf_counter() - t)
        if not engine.accept(m, token):
            raise ValueError(f"token {token} refused")
    return times


def verdict(engine, kind_source: tuple, tokenizer, valid: list[str], invalid: list[str]) -> str:
    try:
        compiled = engine.compile(*kind_source)
    except Exception as e:  # the engine refuses the schema
        return "error: " + " ".join(str(e).split())[:60]

    def passes(text: str) -> bool:
        m = engine.matcher(compiled)
        return all(engine.accept(m, t) for t in tokenizer.encode(text, add_bos=False)) and engine.accepting(m)

    if not all(passes(t) for t in valid):
        return "refuses valid"
    if any(passes(t) for t in invalid):
        return "loose"
    return "yes"


def main() -> int:
    from pie.engine.machine import cpu_name
    from pie.engine.model_store import DEFAULT_MODEL, ModelStore
    from pie.engine.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write PREFIX.md and PREFIX.json")
    args = ap.parse_args()

    entry = ModelStore().resolve(DEFAULT_MODEL)
    tokenizer = Tokenizer(entry.path)
    config = json.loads((entry.path / "config.json").read_text())
    vocab_size = int(config["vocab_size"])
    eos = [tokenizer.token_to_id("<|endoftext|>") if tokenizer.token_to_id("<|endoftext|>") is not None else 0]
    engines = []
    for engine in (LLGuidance(), XGrammar()):
        try:
            __import__(engine.module)
        except ImportError:
            print(f"{engine.name} is not installed: left out", file=sys.stderr)
            continue
        engines.append(engine)
    results: dict[str, dict[str, Any]] = {e.name: {} for e in engines}
    for engine in engines:
        r = results[engine.name]
        r["install_bytes"], r["install_dists"] = install_cost(engine.module)
        r["import_s"] = import_seconds(engine.module, args.rounds)
        t = time.perf_counter()
        engine.setup(tokenizer, vocab_size, eos)
        r["setup_s"] = time.perf_counter() - t
        r["version"] = metadata.version(engine.module)

    sources = ([("json", name, (json.dumps(schema),), valid[0]) for name, schema, valid, _ in SCHEMAS]
               + [("regex", name, (pattern,), text) for name, pattern, text in REGEXES]
               + [("ebnf", name, (grammar, "root"), text) for name, grammar, text in EBNFS])
    words = np.empty((vocab_size + 31) // 32, dtype=np.int32)
    for engine in engines:
        results[engine.name]["compile_ms"] = {}
        results[engine.name]["mask_us"] = {}
    for rnd in range(args.rounds):
        order = engines if rnd % 2 == 0 else list(reversed(engines))
        for kind, name, source, text in sources:
            ids = tokenizer.encode(text, add_bos=False)
            for engine in order:
                r = results[engine.name]
                try:
                    t = time.perf_counter()
                    compiled = engine.compile(kind, *source)
                    r["compile_ms"].setdefault(f"{kind}: {name}", []).append((time.perf_counter() - t) * 1e3)
                    times = walk_mask_times(engine, compiled, ids, words)
                    r["mask_us"].setdefault(f"{kind}: {name}", []).extend(x * 1e6 for x in times)
                except Exception as e:  # unsupported by this engine: no timing
                    r["compile_ms"].setdefault(f"{kind}: {name}", []).append(float("nan"))
                    r.setdefault("failed", {})[f"{kind}: {name}"] = " ".join(str(e).split())[:80]
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for engine in engines:
        results[engine.name]["coverage"] = {
            name: verdict(engine, ("json", json.dumps(schema)), tokenizer, valid, invalid)
            for name, schema, valid, invalid in SCHEMAS}

    names = [e.name for e in engines]
    head = "| | " + " | ".join(f"{n} {results[n]['version']}" for n in names) + " |"
    rule = "| --- |" + " --- |" * len(names)
    lines = [f"CPU: {cpu_name()}, {os.cpu_count()} cores; SmolLM2-135M's vocabulary ({vocab_size} tokens); "
             f"{args.rounds} rounds, engines alternating", "", head, rule]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    row("install size beyond pie's other dependencies (MB)",
        [f"{results[n]['install_bytes'] / 1e6:.0f} ({', '.join(results[n]['install_dists'])})" for n in names])
    row("import, fresh interpreter (s, best)", [f"{results[n]['import_s']:.2f}" for n in names])
    row("vocabulary setup, first grammar call (s)", [f"{results[n]['setup_s']:.2f}" for n in names])
    all_masks = {n: [x for xs in results[n]["mask_us"].values() for x in xs] for n in names}
    row("per-token mask, all grammars: median / p90 (us)",
        [f"{statistics.median(all_masks[n]):.0f} / {np.percentile(all_masks[n], 90):.0f}" if all_masks[n] else "-"
         for n in names])
    covered = {n: sum(v == "yes" for v in results[n]["coverage"].values()) for n in names}
    row("JSON-schema coverage (schemas fully enforced)", [f"{covered[n]} / {len(SCHEMAS)}" for n in names])
    lines += ["", "Compile time (ms, best of the rounds) and per-token mask time (us, median over the text's tokens "
              "and the rounds):", "", head, rule]
    for kind, name, _, _ in sources:
        key = f"{kind}: {name}"
        cells = []
        for n in names:
            c = [x for x in results[n]["compile_ms"].get(key, []) if x == x]
            m = results[n]["mask_us"].get(key, [])
            cells.append(f"{min(c):.1f} ms / {statistics.median(m):.0f} us" if c and m else "fails")
        row(key, cells)
    lines += ["", "JSON-schema coverage (yes: compiles, accepts every valid text, refuses every invalid one):", "",
              head, rule]
    for name, *_ in SCHEMAS:
        row(name, [results[n]["coverage"][name] for n in names])
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(str(args.out) + ".json").write_text(json.dumps({"cpu": cpu_name(), "results": results}, indent=1) + "\n")
        header = (f"# Grammar engines side by side ({time.strftime('%Y-%m-%d')})\n\n"
                  f"`python benchmarks/grammar_engines/compare.py --rounds {args.rounds}`; the machine was shared "
                  "while it ran, so compare within a row.\n\n")
        Path(str(args.out) + ".md").write_text(header + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
