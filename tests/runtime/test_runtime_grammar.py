"""The grammar interface from Python guests: raw matcher calls, and the SDK's constrained generation
(`Context.generate(grammar=...)`) whose every output must parse and validate."""

import json
import re

import pytest

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
          "required": ["city", "population"], "additionalProperties": False}


def test_raw_matcher_calls(run_py, model):
    r = run_py("""
        import json
        from wit_world.imports import grammar, tokenizer
        m = grammar.from_regex("(yes|no)")
        mask = list(grammar.token_mask(m))
        V = sum(mask)
        allowed = set()
        t = 0
        for i, run in enumerate(mask):
            if i % 2 == 0:
                allowed.update(range(t, t + run))
            t += run
        yes = list(tokenizer.encode("yes", False))
        ok = [grammar.accept(m, tok) for tok in yes]
        done = grammar.is_terminated(m)
        grammar.reset(m)
        after_reset = grammar.is_terminated(m)
        bad = grammar.accept(m, list(tokenizer.encode("maybe", False))[0])
        grammar.free(m)
        print(json.dumps([V, yes[0] in allowed, len(allowed), ok, done, after_reset, bad]))
    """)
    assert r.error is None, r.error
    vocab, yes_allowed, num_allowed, ok, done, after_reset, bad = json.loads(r.output)
    assert vocab == model.runner.vocab_size
    assert yes_allowed and 0 < num_allowed < 100
    assert all(ok) and done and not after_reset and not bad


@pytest.mark.parametrize("call, error", [
    ("grammar.from_json_schema('{not json')", r"grammar\.from-json-schema: schema: "),
    ("grammar.from_regex('(')", r"grammar\.from-regex: pattern: "),
    ("grammar.from_ebnf('root ::= ', 'root')", r"grammar\.from-ebnf: grammar: "),
    ("grammar.token_mask(77)", r"grammar\.token-mask: m: 77 is not a matcher of this instance"),
    ("m = grammar.from_regex('a'); grammar.free(m); grammar.accept(m, 1)",
     r"grammar\.accept: m: \d+ is not a matcher of this instance"),
])
def test_grammar_errors(run_py, call, error):
    r = run_py("from wit_world.imports import grammar\n" + call + "\nprint('not reached')\n")
    assert r.output == "" and re.match(error, r.error), r.error


def test_constrained_generation_json_regex_ebnf(run_py):
    r = run_py("""
        import json
        import inferlet
        from inferlet import Context, Grammar
        schema = json.loads(__import__("sys").argv[1])
        outs = []
        for g in (Grammar.json_schema(schema), Grammar.regex("[0-9]{3}-[0-9]{4}"),
                  Grammar.ebnf('root ::= "Answer: " ("yes" | "no")')):
            ctx = Context()
            ctx.fill_user("Give me the largest city of France and its population as JSON.")
            ctx.fill("<|im_start|>assistant\\n")
            outs.append(ctx.generate(max_tokens=48, grammar=g))
            ctx.free()
        print(json.dumps(outs))
    """, json.dumps(SCHEMA))
    assert r.error is None, r.error
    obj, phone, answer = json.loads(r.output)
    data = json.loads(obj)
    assert set(data) == {"city", "population"}
    assert isinstance(data["city"], str) and isinstance(data["population"], int)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", phone)
    assert answer in ("Answer: yes", "Answer: no")


def test_matchers_are_freed_with_their_instance(runtime, run_py):
    r = run_py("from wit_world.imports import grammar\nfor _ in range(5): grammar.from_regex('[a-z]+')\n"
               "print(1)\n")
    assert r.error is None
    assert runtime.grammar.num_matchers(r.instance_id) == 0
