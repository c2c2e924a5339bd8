"""constrained_decoding: every output parses and validates against its JSON schema, fully matches its
regular expression, or is a sentence of its EBNF grammar; schemas and grammars are given inline
(an inferlet cannot read files), and `@FILE` that reaches the sandbox fails with a clear message."""

import json
import re

import pytest

PERSON = {"type": "object",
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "is_student": {"type": "boolean"}},
          "required": ["name", "age", "is_student"], "additionalProperties": False}
CITY = {"type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}, "population": {"type": "integer"},
                       "landmarks": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        "required": ["city", "country", "population"], "additionalProperties": False}
REVIEW = {"type": "object",
          "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                         "score": {"type": "number"},
                         "topics": {"type": "array", "items": {"enum": ["food", "service", "price"]}, "maxItems": 2}},
          "required": ["sentiment", "score"], "additionalProperties": False}

TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict}


def validate(value, schema, where="$"):
    """The subset of JSON Schema used here: type, enum, properties, required, additionalProperties,
    items, maxItems."""
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if "type" in schema:
        t = TYPES[schema["type"]]
        assert isinstance(value, t) and not (isinstance(value, bool) and schema["type"] in ("integer", "number")), \
            f"{where}: {value!r} is not {schema['type']}"
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for k in schema.get("required", []):
            assert k in value, f"{where}: {k} missing"
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), f"{where}: extra keys {set(value) - set(props)}"
        for k, v in value.items():
            if k in props:
                validate(v, props[k], f"{where}.{k}")
    if isinstance(value, list):
        assert len(value) <= schema.get("maxItems", len(value))
        for i, v in enumerate(value):
            validate(v, schema.get("items", {}), f"{where}[{i}]")


@pytest.mark.parametrize("prompt, schema", [
    ("Give me a JSON object for a person named Alice who is 30 years old and not a student.", PERSON),
    ("Describe Paris as a JSON object.", CITY),
    ("Classify this review as JSON: 'The food was cold and the waiter was rude.'", REVIEW),
], ids=["person", "city", "review"])
def test_json_schema(run_inferlet, prompt, schema):
    r = run_inferlet("constrained_decoding", "--prompt", prompt, "--json-schema", json.dumps(schema),
                     "--max-tokens", 64)
    assert r.output.endswith("\n")
    value = json.loads(r.output)
    validate(value, schema)


DATE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"


@pytest.mark.parametrize("prompt, pattern", [
    ("When did Apollo 11 land on the moon? Answer with the date.", DATE),
    ("When did World War II end? Answer with the date.", DATE),
    ("What is 12 times 12?", r"[0-9]+"),
], ids=["apollo", "ww2", "number"])
def test_regex(run_inferlet, prompt, pattern):
    r = run_inferlet("constrained_decoding", "--prompt", prompt, "--regex", pattern, "--max-tokens", 16)
    assert re.fullmatch(pattern, r.output[:-1]), r.output


COLOR = 'root ::= "The answer is " color "."\ncolor ::= "red" | "green" | "blue" | "yellow"'
LIST = ('root ::= item (", " item)? (", " item)? "."\n'
        'item ::= "apple" | "banana" | "cherry" | "grape"')
ANSWER = 'root ::= ("Yes" | "No") ", because " [a-z ]+ "."'


@pytest.mark.parametrize("prompt, grammar, pattern", [
    ("What is the color of the sky on a clear day?", COLOR, r"The answer is (red|green|blue|yellow)\."),
    ("List some fruits.", LIST, r"(apple|banana|cherry|grape)(, (apple|banana|cherry|grape)){0,2}\."),
    ("Is the sun a star? Answer yes or no and give a short reason.", ANSWER, r"(Yes|No), because [a-z ]+\."),
], ids=["color", "list", "answer"])
def test_ebnf(run_inferlet, prompt, grammar, pattern):
    r = run_inferlet("constrained_decoding", "--prompt", prompt, "--ebnf", grammar, "--max-tokens", 32)
    assert re.fullmatch(pattern, r.output[:-1]), r.output


def test_greedy_answer_is_the_unconstrained_one_when_allowed(run_inferlet):
    """A grammar that allows what the model says anyway does not change it."""
    plain = run_inferlet("text_completion", "--prompt", "What is the capital of France?", "--max-tokens", 16,
                         "--temperature", 0)
    assert plain.output == "The capital of France is Paris.\n"
    r = run_inferlet("constrained_decoding", "--prompt", "What is the capital of France?",
                     "--regex", r"The capital of France is [A-Z][a-z]+\.", "--max-tokens", 16)
    assert r.output == plain.output


@pytest.mark.parametrize("args, message", [
    (["--ebnf", "@grammar.ebnf"], "an inferlet cannot read files"),
    (["--json-schema", "@schema.json"], "an inferlet cannot read files"),
    (["--json-schema", "schema.json"], "--json-schema: not JSON"),
    (["--regex", "a", "--ebnf", 'root ::= "a"'], "not allowed with argument"),
    ([], "one of the arguments --json-schema --regex --ebnf is required"),
])
def test_argument_errors(run_inferlet, args, message):
    r = run_inferlet("constrained_decoding", "--prompt", "x", *args, expect_error=True)
    assert message in r.log, r.log


def test_file_arguments_expanded_by_pie_run(run_inferlet, tmp_path):
    """`pie run` replaces an @FILE argument by the file's text (the inferlet itself cannot read it)."""
    from pie.cli import expand_file_arguments

    (tmp_path / "person.json").write_text(json.dumps(PERSON, indent=2))
    (tmp_path / "color.ebnf").write_text(COLOR + "\n")
    prompt = "Give me a JSON object for a person named Alice who is 30 years old and not a student."
    args = expand_file_arguments(["--prompt", prompt, "--json-schema", f"@{tmp_path / 'person.json'}",
                                  "--max-tokens", "48"])
    validate(json.loads(run_inferlet("constrained_decoding", *args).output), PERSON)
    args = expand_file_arguments(["--prompt", "What is the color of the sky on a clear day?",
                                  "--ebnf", f"@{tmp_path / 'color.ebnf'}", "--max-tokens", "16"])
    assert re.fullmatch(r"The answer is (red|green|blue|yellow)\.\n", run_inferlet("constrained_decoding", *args).output)
