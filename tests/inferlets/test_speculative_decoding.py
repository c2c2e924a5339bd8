"""speculative_decoding: with greedy decoding its text is exactly text_completion's, in fewer forward
passes than generated tokens when the text repeats (prompt-lookup drafts get accepted)."""

import pytest

PROMPTS = [
    ["--prompt", "Repeat this list exactly: apple, banana, cherry, grape, lemon, mango, orange, peach.",
     "--max-tokens", 32],
    ["--prompt", "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. Monday, Tuesday, Wednesday, "
     "Thursday, Friday, Saturday, Sunday. Monday,", "--raw", "--max-tokens", 40],
    ["--prompt", "Copy this sentence three times: The quick brown fox jumps over the lazy dog.", "--max-tokens", 24],
]


@pytest.mark.parametrize("args", PROMPTS, ids=["list", "weekdays-raw", "sentence"])
def test_same_text_as_greedy_in_fewer_passes(run_inferlet, args):
    plain = run_inferlet("text_completion", *args, "--temperature", 0)
    spec = run_inferlet("speculative_decoding", *args, "--temperature", 0, "--stats")
    assert spec.output == plain.output
    stats = spec.stats
    generated = stats["generated"]
    assert generated >= 9
    assert stats["accepted"] > 0
    # every pass yields its accepted draft tokens plus one of the model's own
    assert generated <= stats["passes"] + stats["accepted"]
    assert stats["passes"] < generated
    # the engine agrees: fewer model passes than the plain loop (one per token) for the same text
    assert spec.passes == stats["passes"] < plain.passes


def test_rejected_drafts_do_not_change_the_text(run_inferlet):
    """Text whose n-grams recur but continue differently: drafts are proposed and mostly rejected;
    the stale K/V slots of rejected drafts must not leak into the output."""
    args = ["--prompt", "Count from 1 to 30, separated by commas.", "--max-tokens", 24, "--temperature", 0]
    plain = run_inferlet("text_completion", *args)
    spec = run_inferlet("speculative_decoding", *args, "--stats", "--min-ngram", 1)
    assert spec.output == plain.output
    assert spec.stats["drafted"] > spec.stats["accepted"]


def test_stop_strings_and_sampling_fallback(run_inferlet):
    args = ["--prompt", PROMPTS[1][1], "--raw", "--max-tokens", 40]
    plain = run_inferlet("text_completion", *args, "--temperature", 0, "--stop", "Friday")
    spec = run_inferlet("speculative_decoding", *args, "--temperature", 0, "--stop", "Friday")
    assert spec.output == plain.output == " Tuesday, Wednesday, Thursday, \n"
    # with a temperature there is nothing to verify greedily: the same seeded draws as text_completion
    args = ["--prompt", "Name three colors.", "--max-tokens", 12, "--temperature", 0.8, "--seed", 7]
    assert run_inferlet("speculative_decoding", *args).output == run_inferlet("text_completion", *args).output
