"""The grammar host (pie.runtime.grammar): llguidance matchers over the default model's vocabulary,
their masks in the output-mask BRLE format, per-instance handles, errors naming the argument, and
greedy generation on the model runner constrained by a JSON schema."""

import json
import re
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from pie.control import ControlPlane
from pie.engine.batch import ForwardRequest, Greedy
from pie.engine.config import EngineConfig
from pie.engine.sampling import expand_vocab_mask
from pie.runtime import grammar as g
from pie.engine.vocabulary import vocab_metadata
from pie.runtime.grammar import GRAMMAR_COLD, GrammarHost, brle_runs

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module")
def model(smollm2_entry):
    from pie.engine.model import Model

    return Model(smollm2_entry.name, EngineConfig(kv_cache_mb=64), progress=False)


@pytest.fixture(scope="module")
def host(model):
    return GrammarHost(model.tokenizer, model.runner.vocab_size, model.eos_ids)


@pytest.fixture(scope="module")
def texts(model):
    """(V,) each token's text, special tokens included."""
    return model.tokenizer.backend.decode_batch([[i] for i in range(model.runner.vocab_size)],
                                                 skip_special_tokens=False)


_next_instance = iter(range(1000, 10**6))


@pytest.fixture
def inst(host):
    """A fake instance of its own (fresh id) whose runtime has the grammar host."""
    fake = SimpleNamespace(id=next(_next_instance), services=SimpleNamespace(grammar=host))
    yield fake
    host.end_instance(fake.id)


def allowed_of(host, inst, m) -> np.ndarray:
    runs = g.grammar_token_mask(inst, m)
    assert sum(runs) == host.vocab_size and all(r >= 0 for r in runs)
    return expand_vocab_mask(runs, host.vocab_size)  # the engine's own decoder of output masks


def ids_of(allowed: np.ndarray) -> set[int]:
    return set(np.flatnonzero(allowed).tolist())


def accept_text(model, inst, m, text: str) -> list[int]:
    ids = model.tokenizer.encode(text, add_bos=False)
    for t in ids:
        assert g.grammar_accept(inst, m, t), model.tokenizer.id_to_token(t)
    return ids


def test_table_matches_the_wit():
    from pie.runtime import api

    assert set(GRAMMAR_COLD) == {("grammar", n) for n in api.wit_functions()["grammar"]}
    assert GRAMMAR_COLD[("grammar", "token-mask")][1] == ("list", "u32")
    assert GRAMMAR_COLD[("grammar", "accept")][1] == "bool"
    assert GRAMMAR_COLD[("grammar", "from-ebnf")][1] == "u32"
    assert GRAMMAR_COLD[("grammar", "free")][1] is None


def test_brle_runs_match_a_reference():
    rng = np.random.default_rng(0)
    for n in (1, 2, 33, 1000):
        for p in (0.01, 0.5, 0.99):
            row = rng.random(n) < p
            runs = brle_runs(row)
            assert runs[0] >= 0 and all(r > 0 for r in runs[1:])  # only the first run may be 0
            assert sum(runs) == n
            if row.any():  # the engine's decoder reads it back (it refuses all-forbidden masks)
                assert expand_vocab_mask(runs, n).tolist() == row.tolist()
            ref, value, k = [], True, 0  # plain-loop encoder
            for b in row.tolist():
                if b == value:
                    k += 1
                else:
                    ref.append(k)
                    value, k = b, 1
            ref.append(k)
            assert runs == ref


def test_engine_tokenizer_spells_the_vocabulary_as_the_tokenizer_decodes_it(model, host, texts):
    engine = host.engine_tokenizer
    assert engine.vocab_size == host.vocab_size
    assert engine.eos_tokens == sorted(model.eos_ids)
    special = {i for i, t in model.tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    assert special and all(engine.is_special_token(i) for i in special)
    checked = 0
    for i, text in enumerate(texts):
        if i in special or "\ufffd" in text:  # specials are blanked; partial UTF-8 does not decode alone
            continue
        assert not engine.is_special_token(i) and engine.decode_bytes([i]) == text.encode("utf-8"), i
        checked += 1
    assert checked > 0.99 * host.vocab_size


def test_vocab_type_detection_agrees_with_llguidance(model):
    """vocab_metadata decides how token_bytes spells each token (the table the grammar host and the stop
    strings use); llguidance's own reader of tokenizer.json is the reference for the spellings."""
    import llguidance
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    from pie.engine.vocabulary import token_bytes

    def agrees_with_llguidance(tokenizer: Tokenizer) -> bool:
        reference = llguidance.LLTokenizer(tokenizer.to_str())
        ours = token_bytes(SimpleNamespace(backend=tokenizer), tokenizer.get_vocab_size())
        special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        # byte 0xFF alone is llguidance's marker of special tokens: it reads a token spelling it as b""
        return all(ours[i] == reference.decode_bytes([i]) for i in range(len(ours))
                   if i not in special and ours[i] != b"\xff")

    smol = model.tokenizer.backend
    assert vocab_metadata(json.loads(smol.to_str())) == ("byte_level", False) and agrees_with_llguidance(smol)
    # Llama-2 style: byte-fallback BPE, '▁' for spaces, a prepended '▁'
    vocab = {f"<0x{b:02X}>": b for b in range(256)} | {"▁": 256, "▁a": 257, "a": 258}
    llama2 = Tokenizer(models.BPE(vocab, [], byte_fallback=True))
    llama2.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    llama2.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
    assert vocab_metadata(json.loads(llama2.to_str())) == ("byte_fallback", True) and agrees_with_llguidance(llama2)
    # a word-level tokenizer: tokens are their own text (llguidance reads no such tokenizer.json)
    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    assert vocab_metadata(json.loads(raw.to_str())) == ("raw", False)
    assert token_bytes(SimpleNamespace(backend=raw), 3) == [b"a", b"b", b"[UNK]"]


def test_json_schema_mask_allows_brace_and_forbids_words(model, host, inst):
    tok = model.tokenizer
    m = g.grammar_from_json_schema(inst, json.dumps(PERSON))
    assert m == 1  # handles are small integers from 1, private to the instance
    allowed = allowed_of(host, inst, m)
    assert allowed[tok.token_to_id("{")]
    for word in ("hello", "Ġ{", "[", "Ġ", "<|im_start|>", "<|im_end|>"):
        assert not allowed[tok.token_to_id(word)], word
    assert not g.grammar_accept(inst, m, tok.token_to_id("hello"))  # refused, state unchanged
    assert np.array_equal(allowed_of(host, inst, m), allowed)
    assert not g.grammar_is_terminated(inst, m)


def test_full_json_terminates_and_then_only_eos(model, host, inst):
    eos = sorted(model.eos_ids)
    m = g.grammar_from_json_schema(inst, json.dumps(PERSON))
    ids = model.tokenizer.encode('{"name": "Bob", "age": 42}', add_bos=False)
    for t in ids[:-1]:
        assert g.grammar_accept(inst, m, t)
        assert not g.grammar_is_terminated(inst, m)
        assert not set(eos) & ids_of(allowed_of(host, inst, m))  # EOS only once the object is closed
    assert g.grammar_accept(inst, m, ids[-1])
    assert g.grammar_is_terminated(inst, m)
    assert ids_of(allowed_of(host, inst, m)) == set(eos)
    assert not g.grammar_accept(inst, m, model.tokenizer.token_to_id("Ġ"))
    # accepting EOS keeps it terminated, with the same mask; nothing but EOS is accepted after it
    assert g.grammar_accept(inst, m, eos[0])
    assert g.grammar_is_terminated(inst, m)
    assert ids_of(allowed_of(host, inst, m)) == set(eos)
    assert g.grammar_accept(inst, m, eos[0])
    assert not g.grammar_accept(inst, m, ids[0])


def test_invalid_json_is_refused(model, host, inst):
    tok = model.tokenizer
    m = g.grammar_from_json_schema(inst, json.dumps(PERSON))
    accept_text(model, inst, m, '{"name": "Bob", ')
    assert not g.grammar_accept(inst, m, tok.token_to_id("}"))  # "age" is required
    assert not g.grammar_accept(inst, m, sorted(model.eos_ids)[0])  # cannot end mid-object
    accept_text(model, inst, m, '"')
    for key in ("city", "c", "name"):  # no extra or repeated keys
        assert not g.grammar_accept(inst, m, tok.token_to_id(key)), key
    accept_text(model, inst, m, 'age": ')
    assert not g.grammar_accept(inst, m, tok.token_to_id('"'))  # an integer, not a string
    assert not g.grammar_accept(inst, m, tok.token_to_id("."))


def passes(model, host, inst, m, text: str) -> bool:
    """Whether the matcher takes the text's tokens and may then end (EOS allowed)."""
    ok = all(g.grammar_accept(inst, m, t) for t in model.tokenizer.encode(text, add_bos=False))
    return ok and bool(set(model.eos_ids) & ids_of(allowed_of(host, inst, m)))


@pytest.mark.parametrize("schema, valid, invalid", [
    # allOf: closed over the properties its members name, each member's requirements kept
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
     ['{"a": 1, "b": true}'], ['{"a": 1}', '{"a": 1, "b": true, "c": 2}']),
    # a tuple takes its prefixItems only
    ({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]}, ['["x", 1]'], ['["x", 1, 2]']),
    # an object that says additionalProperties stays open to them
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "string"}},
     ['{"a": 1, "z": "s"}'], ['{"a": 1, "z": 2}']),
    # nested objects are closed too
    ({"type": "object", "properties": {"in": {"type": "object", "properties": {"k": {"type": "integer"}}}}},
     ['{"in": {"k": 1}}', '{"in": {}}'], ['{"in": {"j": 1}}']),
])
def test_schemas_are_closed_unless_they_say_otherwise(model, host, inst, schema, valid, invalid):
    for text in valid:
        assert passes(model, host, inst, g.grammar_from_json_schema(inst, json.dumps(schema)), text), text
    for text in invalid:
        assert not passes(model, host, inst, g.grammar_from_json_schema(inst, json.dumps(schema)), text), text


def test_any_tokenization_of_the_text_is_accepted(model, host, inst):
    """An inferlet may feed text it tokenized in pieces: the grammar takes the tokens of '{' and of
    '"name": ...' even though the tokenizer spells '{"' as one token."""
    tok = model.tokenizer
    assert len(tok.encode('{"', add_bos=False)) == 1  # the canonical spelling merges them
    m = g.grammar_from_json_schema(inst, json.dumps(PERSON))
    pieces = tok.encode("{", add_bos=False) + tok.encode('"name": "Al", "age": 3}', add_bos=False)
    assert all(g.grammar_accept(inst, m, t) for t in pieces)
    assert g.grammar_is_terminated(inst, m)


def test_regex_mask_is_exactly_the_prefix_tokens(model, host, inst, texts):
    words = ("yes", "no", "maybe")
    m = g.grammar_from_regex(inst, "(yes|no|maybe)")
    # reference from the vocabulary: a token may come first iff its text is a non-empty prefix of a word
    want = {i for i, t in enumerate(texts) if t and any(w.startswith(t) for w in words)}
    assert len(want) >= 3
    assert ids_of(allowed_of(host, inst, m)) == want
    accept_text(model, inst, m, "may")
    rest = {i for i, t in enumerate(texts) if t and "be".startswith(t)}
    assert ids_of(allowed_of(host, inst, m)) == rest
    accept_text(model, inst, m, "be")
    assert g.grammar_is_terminated(inst, m)
    assert ids_of(allowed_of(host, inst, m)) == set(model.eos_ids)


def test_regex_that_may_go_on_ends_only_at_eos(model, host, inst, texts):
    eos = sorted(model.eos_ids)
    m = g.grammar_from_regex(inst, "[0-9]+")
    digits = {i for i, t in enumerate(texts) if re.fullmatch("[0-9]+", t)}
    assert ids_of(allowed_of(host, inst, m)) == digits
    accept_text(model, inst, m, "7")
    assert not g.grammar_is_terminated(inst, m)  # complete, but more digits may follow
    assert ids_of(allowed_of(host, inst, m)) == digits | set(eos)
    assert g.grammar_accept(inst, m, eos[0])
    assert g.grammar_is_terminated(inst, m)
    assert ids_of(allowed_of(host, inst, m)) == set(eos)


def test_ebnf_with_a_named_root_and_reset(model, host, inst, texts):
    grammar = 'answer ::= word "!"\nword ::= "yes" | "no"'
    m = g.grammar_from_ebnf(inst, grammar, "answer")
    first = allowed_of(host, inst, m)
    assert ids_of(first) == {i for i, t in enumerate(texts) if t and ("yes!".startswith(t) or "no!".startswith(t))}
    accept_text(model, inst, m, "no")
    assert ids_of(allowed_of(host, inst, m)) == {i for i, t in enumerate(texts) if t and "!".startswith(t)}
    accept_text(model, inst, m, "!")
    assert g.grammar_is_terminated(inst, m)
    g.grammar_reset(inst, m)
    assert not g.grammar_is_terminated(inst, m)
    assert np.array_equal(allowed_of(host, inst, m), first)
    accept_text(model, inst, m, "yes!")
    assert g.grammar_is_terminated(inst, m)
    # a grammar that also has a rule named root starts at the one asked for
    m = g.grammar_from_ebnf(inst, 'root ::= "zzz"\n' + grammar, "answer")
    assert np.array_equal(allowed_of(host, inst, m), first)


def test_compiled_grammars_are_cached(host, inst):
    schema = json.dumps({"type": "object", "properties": {"cached": {"type": "boolean"}}})
    before = host.compile_count
    a = g.grammar_from_json_schema(inst, schema)
    b = g.grammar_from_json_schema(inst, schema)
    assert host.compile_count == before + 1 and a != b
    # two matchers of one grammar keep separate states
    assert g.grammar_accept(inst, a, host.tokenizer.token_to_id("{"))
    assert allowed_of(host, inst, b)[host.tokenizer.token_to_id("{")]
    assert not allowed_of(host, inst, a)[host.tokenizer.token_to_id("{")]


def test_free_then_use_is_an_error(host, inst):
    m = g.grammar_from_regex(inst, "a")
    g.grammar_free(inst, m)
    for call, args in [(g.grammar_token_mask, ()), (g.grammar_accept, (5,)), (g.grammar_is_terminated, ()),
                       (g.grammar_reset, ()), (g.grammar_free, ())]:
        with pytest.raises(ValueError, match=f"^m: {m} is not a matcher of this instance$"):
            call(inst, m, *args)
    assert g.grammar_from_regex(inst, "a") == m + 1  # handles are not reused
    with pytest.raises(ValueError, match="^m: 7 is not a matcher of this instance$"):
        g.grammar_token_mask(inst, 7)


@pytest.mark.parametrize("call, args, pattern", [
    (g.grammar_from_json_schema, ("{not json",), r"^schema: not JSON: "),
    (g.grammar_from_json_schema, ("[1, 2]",), r"^schema: a JSON schema is an object or a boolean"),
    (g.grammar_from_json_schema, ('{"type": "foo"}',), r"^schema: invalid JSON schema: Invalid type: foo"),
    (g.grammar_from_json_schema, ('{"properties": {"a": {"$ref": "#/defs/x"}}}',), r"^schema: invalid JSON schema: "),
    (g.grammar_from_regex, ("(abc",), r"^pattern: invalid regex: unclosed group"),
    (g.grammar_from_regex, ("a{3,",), r"^pattern: invalid regex: "),
    (g.grammar_from_ebnf, ('root ::= "a" |', "root"), r"^grammar: invalid EBNF grammar: .*line 1"),
    (g.grammar_from_ebnf, ("root ::= other", "root"), r'^grammar: invalid EBNF grammar: .*"other" is not defined'),
    (g.grammar_from_ebnf, ('a ::= "x"\nroot ::= a ("b" | )', "root"),
     r"^grammar: invalid EBNF grammar: the rule root \(line 2\) has an empty alternative"),
    (g.grammar_from_ebnf, ('root ::= "a"', "main"), r"^root: the grammar has no rule named 'main'"),
    (g.grammar_from_ebnf, ('root ::= "a"', ""), r"^root: "),
])
def test_bad_sources_name_the_argument(host, inst, call, args, pattern):
    with pytest.raises(ValueError, match=pattern) as e:
        call(inst, *args)
    assert "\n" not in str(e.value) and "start:" not in str(e.value)  # one line, no echo of the engine's grammar
    assert host.num_matchers(inst.id) == 0
    assert g.grammar_from_regex(inst, "ok") == 1  # nothing was allocated by the failures


def test_token_outside_the_vocabulary(host, inst):
    m = g.grammar_from_regex(inst, "a")
    with pytest.raises(ValueError, match=rf"^token: {host.vocab_size} is outside the vocabulary"):
        g.grammar_accept(inst, m, host.vocab_size)


def test_handles_are_private_to_each_instance(host):
    a = SimpleNamespace(id=next(_next_instance), services=SimpleNamespace(grammar=host))
    b = SimpleNamespace(id=next(_next_instance), services=SimpleNamespace(grammar=host))
    try:
        ma = g.grammar_from_regex(a, "x+")
        with pytest.raises(ValueError, match="is not a matcher of this instance"):
            g.grammar_accept(b, ma, 5)
        with pytest.raises(ValueError, match="is not a matcher of this instance"):
            g.grammar_free(b, ma)
        mb = g.grammar_from_regex(b, "y+")
        assert ma == mb == 1  # each instance numbers its own
        g.grammar_free(b, mb)
        assert g.grammar_token_mask(a, ma)  # a's matcher untouched by b's free
        host.end_instance(a.id)
        assert host.num_matchers(a.id) == 0
        with pytest.raises(ValueError, match="is not a matcher of this instance"):
            g.grammar_token_mask(a, ma)
    finally:
        host.end_instance(a.id)
        host.end_instance(b.id)


def test_matcher_cap_per_instance(host, inst, monkeypatch):
    monkeypatch.setattr(g, "MAX_MATCHERS_PER_INSTANCE", 5)
    handles = [g.grammar_from_regex(inst, "z") for _ in range(5)]
    with pytest.raises(ValueError, match=r"too many matchers: this instance holds 5 \(the limit is 5\)"):
        g.grammar_from_regex(inst, "z")
    other = SimpleNamespace(id=next(_next_instance), services=inst.services)
    assert g.grammar_from_regex(other, "z") == 1  # the cap is per instance
    host.end_instance(other.id)
    g.grammar_free(inst, handles[2])
    assert g.grammar_from_regex(inst, "z") == 6


def test_default_cap_is_1024(host, inst):
    assert g.MAX_MATCHERS_PER_INSTANCE == 1024
    for _ in range(1024):
        g.grammar_from_regex(inst, "q")
    with pytest.raises(ValueError, match="too many matchers"):
        g.grammar_from_regex(inst, "q")
    host.end_instance(inst.id)
    assert host.num_matchers(inst.id) == 0


def test_model_vocab_wider_than_the_tokenizer(model, texts):
    extra = 40
    wide = GrammarHost(model.tokenizer, model.runner.vocab_size + extra, model.eos_ids)
    fake = SimpleNamespace(id=1, services=SimpleNamespace(grammar=wide))
    m = g.grammar_from_regex(fake, "(?s).*")  # any text, newlines too: every ordinary token
    runs = g.grammar_token_mask(fake, m)
    assert sum(runs) == wide.vocab_size
    allowed = expand_vocab_mask(runs, wide.vocab_size)
    assert not allowed[model.runner.vocab_size:].any()  # ids the tokenizer lacks: never
    special = {i for i, t in model.tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    assert not allowed[sorted(special - set(model.eos_ids))].any()  # special tokens: never
    assert allowed[sorted(model.eos_ids)].all()  # ".*" may end at once
    # every token of whole characters is allowed (lone bytes that cannot start a character are not)
    whole = [i for i, t in enumerate(texts) if i not in special and "\ufffd" not in t]
    assert len(whole) > 0.99 * model.runner.vocab_size and allowed[whole].all()
    with pytest.raises(ValueError, match="^token: "):
        g.grammar_accept(fake, m, wide.vocab_size)
    assert not g.grammar_accept(fake, m, model.runner.vocab_size + 3)


def test_threads_share_one_compilation(model, host):
    schema = json.dumps({"type": "object", "properties": {"threaded": {"type": "integer"}}, "required": ["threaded"]})
    before = host.compile_count
    ids = model.tokenizer.encode('{"threaded": 12}', add_bos=False)
    results, errors = {}, []

    def work(k):
        fake = SimpleNamespace(id=500_000 + k, services=SimpleNamespace(grammar=host))
        try:
            m = g.grammar_from_json_schema(fake, schema)
            results[k] = [g.grammar_accept(fake, m, t) for t in ids] + [g.grammar_is_terminated(fake, m)]
        except Exception as e:  # reported below
            errors.append(e)
        finally:
            host.end_instance(fake.id)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r == [True] * (len(ids) + 1) for r in results.values()) and len(results) == 8
    assert host.compile_count == before + 1


def greedy(model, prompt: str, max_tokens: int, masks=None) -> list[int]:
    """Greedy generation on the runner, one forward per token; masks(step) -> BRLE runs or None,
    and each chosen token is passed to masks.accept."""
    runner, ps = model.runner, model.runner.page_size
    tokens = model.prompt_ids(prompt)
    prompt_len, cached, pages = len(tokens), 0, []
    plane = ControlPlane.serving(runner)  # pages from the runner's pool, accounted as any client's
    instance = plane.open_instance()
    try:
        for _ in range(max_tokens):
            end = len(tokens)
            used = -(-end // ps)
            pages += plane.kv_pages.resolve(instance, plane.kv_pages.allocate(instance, used - len(pages)))
            mask = masks.mask() if masks else None
            [res] = runner.execute([ForwardRequest(tokens[cached:end], list(range(cached, end)), pages[:used],
                                                   end - (used - 1) * ps, outputs=[(end - cached - 1, Greedy())],
                                                   output_masks=None if mask is None else [mask])])
            cached = end
            token = res.outputs[0]
            if masks:
                masks.accept(token)
            if token in model.eos_ids:
                break
            tokens.append(token)
    finally:
        plane.end_instance(instance)
    return tokens[prompt_len:]


def test_greedy_generation_follows_a_json_schema(model, host, inst):
    prompt = "Describe a person named Alice who is 30 years old as JSON with the fields name and age."
    m = g.grammar_from_json_schema(inst, json.dumps(PERSON))
    seen = []

    class Masks:
        def mask(self):
            runs = g.grammar_token_mask(inst, m)
            seen.append(len(runs))
            return runs

        def accept(self, token):
            assert g.grammar_accept(inst, m, token)  # the sampler only chose allowed tokens

    out = greedy(model, prompt, 40, Masks())
    text = model.tokenizer.decode(out)
    value = json.loads(text)
    assert set(value) == {"name", "age"} and isinstance(value["name"], str) and type(value["age"]) is int
    assert g.grammar_is_terminated(inst, m)
    assert len(out) < 40 and len(seen) == len(out) + 1  # stopped at EOS, chosen under the final EOS-only mask
    # without the grammar, the same greedy run does not give bare JSON
    free_text = model.tokenizer.decode(greedy(model, prompt, 40))
    with pytest.raises(ValueError):
        json.loads(free_text)
