"""watermarking: text generated with the green-list watermark is detected (z > 4) from its text alone;
text generated without it (the same inferlet with --delta 0, or text_completion's plain sampling), or
checked with another key, is not (|z| < 2)."""

import contextlib
import io
import json
import sys
import types
from pathlib import Path

import pytest

PROMPT = "Tell me a story about a dragon."


def detect(run_inferlet, text, key=42):
    return json.loads(run_inferlet("watermarking", "--detect", text, "--key", key, "--json").output)


@pytest.fixture(scope="module")
def marked(runtime, model):
    """Watermarked text, 48 tokens with delta 3 (with the default delta 2, this small model's fairly
    low-entropy text gave z 3.6 to 6.8 over 64 tokens: not reliably > 4 at this length)."""
    r = runtime.run("watermarking", ["--prompt", PROMPT, "--max-tokens", "48", "--key", "42", "--delta", "3",
                                     "--seed", "1", "--ignore-eos", "--json"])
    assert r.error is None, r.error
    assert runtime.num_free_pages == runtime.num_pages
    return json.loads(r.output)


def test_watermarked_text_is_detected(run_inferlet, marked):
    assert len(marked["tokens"]) == 48 and marked["text"].strip()
    assert marked["z"] > 4  # the generator's own count, over its token ids
    found = detect(run_inferlet, marked["text"])  # the detector sees only the text (re-tokenized)
    assert found["scored"] >= 40
    assert found["z"] > 4
    assert found["green"] / found["scored"] > 0.5  # vs gamma = 0.25 by chance
    # the plain output format: the z-score alone
    z = float(run_inferlet("watermarking", "--detect", marked["text"], "--key", 42).output)
    assert z == pytest.approx(found["z"], abs=1e-3)


def test_another_key_does_not_detect_it(run_inferlet, marked):
    assert abs(detect(run_inferlet, marked["text"], key=43)["z"]) < 2


def test_unwatermarked_text_is_not_detected(run_inferlet):
    plain = json.loads(run_inferlet("watermarking", "--prompt", PROMPT, "--max-tokens", 48, "--key", 42,
                                    "--delta", 0, "--seed", 1, "--ignore-eos", "--json").output)
    assert len(plain["tokens"]) == 48
    assert abs(plain["z"]) < 2
    assert abs(detect(run_inferlet, plain["text"])["z"]) < 2
    sampled = run_inferlet("text_completion", "--prompt", PROMPT, "--max-tokens", 48, "--temperature", 1,
                           "--seed", 3).output
    assert len(sampled) > 100
    assert abs(detect(run_inferlet, sampled)["z"]) < 2


def test_same_seed_same_text(run_inferlet):
    args = ["--prompt", "Name a fruit.", "--max-tokens", 8, "--key", 5, "--seed", 11, "--ignore-eos"]
    assert run_inferlet("watermarking", *args).output == run_inferlet("watermarking", *args).output


def test_arguments_are_checked(run_inferlet):
    r = run_inferlet("watermarking", "--prompt", "x", "--detect", "y", expect_error=True)
    assert "exactly one of --prompt" in r.log
    r = run_inferlet("watermarking", "--detect", "y", "--gamma", 1.5, expect_error=True)
    assert "--gamma" in r.log


def test_green_list_is_an_exact_keyed_partition():
    """The detector's green list, run on the host with a stub SDK: for a given key and previous token the
    Feistel permutation is a bijection of the vocabulary, exactly floor(gamma * V) tokens are green, and
    the list changes with the previous token and with the key."""
    V = 49152
    src = (Path(__file__).parents[2] / "inferlets" / "examples" / "watermarking.py").read_text()
    stub = types.ModuleType("inferlet")
    stub.model_facts = lambda: types.SimpleNamespace(vocab_size=V)
    stub.encode = lambda text, add_bos=False: [ord(c) for c in text]

    def load(key):
        ns = {"__name__": "__main__"}
        argv, saved = sys.argv, sys.modules.get("inferlet")
        sys.argv, sys.modules["inferlet"] = ["watermarking", "--detect", "ab", "--key", str(key)], stub
        try:
            with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
                exec(compile(src, "watermarking.py", "exec"), ns)
        finally:
            sys.argv = argv
            if saved is None:
                sys.modules.pop("inferlet", None)
            else:
                sys.modules["inferlet"] = saved
        return ns

    a, b = load(42), load(43)
    greens = []
    for ns, prev in ((a, 17), (a, 18), (b, 17)):
        keys = ns["round_keys"](prev)
        image = [ns["permute"](t, keys) for t in range(V)]
        assert sorted(image) == list(range(V))
        greens.append({t for t, x in enumerate(image) if x < ns["GREEN"]})
    assert all(len(g) == int(0.25 * V) for g in greens)
    # different previous tokens / keys give (nearly) independent lists: overlap about gamma^2 * V
    for other in greens[1:]:
        assert abs(len(greens[0] & other) - 0.25 * 0.25 * V) < 0.1 * 0.25 * V
