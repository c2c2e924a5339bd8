"""beam_search: the beam it returns is at least as likely as greedy decoding's continuation of the same
length (scores recomputed independently, in one teacher-forced pass with logprobs samplers), its
reported score is that recomputed score, width 1 is greedy decoding, and forked beams share pages."""

import json
import math

import pytest

# A guest that scores continuations of a prompt: one pass over prompt + continuation with a logprobs
# sampler at every position that predicts a continuation token; and greedy's own continuation.
SCORER = """
import json, sys
import inferlet
from inferlet import raw

d = json.loads(sys.argv[1])
prompt, n = d["prompt"], d["n"]
P = raw.kv.page_size()

def score(gen):
    seq = prompt + gen
    pages = raw.kv.allocate(-(-len(seq) // P))
    fwd = raw.forward.ForwardPass(
        tokens=seq, input_embeddings=[], positions=list(range(len(seq))), pages=pages,
        last_page_len=len(seq) - (len(pages) - 1) * P, mask=[],
        output_indices=[len(prompt) - 1 + i for i in range(len(gen))],
        samplers=[inferlet.logprobs([t]) for t in gen], output_masks=[])
    outs = raw.forward.wait(raw.forward.submit(0, fwd))
    raw.kv.free(pages)
    return sum(o.values[0] for o in outs)

ctx = inferlet.Context()
ctx.fill_tokens(prompt)
ctx.generate(max_tokens=n, sampler=inferlet.greedy(), ignore_eos=True)
greedy = ctx.tokens[len(prompt):]
ctx.free()
print(json.dumps({"greedy": greedy, "greedy_text": inferlet.decode(greedy),
                  "greedy_logprob": score(greedy), "beam_logprob": score(d["beam"])}))
"""


@pytest.mark.parametrize("prompt, n", [
    ("What is the capital of France?", 12),
    ("Write a haiku about the sea.", 10),
])
def test_beam_is_at_least_as_likely_as_greedy(run_inferlet, prompt, n):
    beam = run_inferlet("beam_search", "--prompt", prompt, "--beams", 4, "--max-tokens", n, "--ignore-eos",
                        "--json", "--stats")
    result = json.loads(beam.output)
    assert len(result["tokens"]) == n
    scored = json.loads(run_inferlet(None, json.dumps({"prompt": result["prompt_tokens"], "n": n,
                                                       "beam": result["tokens"]}), source=SCORER).output)
    # the reported score is the sequence's log-probability (top-k-distribution vs logprobs samplers)
    assert result["logprob"] == pytest.approx(scored["beam_logprob"], abs=1e-3)
    assert scored["beam_logprob"] >= scored["greedy_logprob"] - 1e-4
    # greedy as the SDK does it is text_completion's greedy output
    tc = run_inferlet("text_completion", "--prompt", prompt, "--max-tokens", n, "--temperature", 0, "--ignore-eos")
    assert tc.output == scored["greedy_text"] + "\n"
    # the final beams are ranked and distinct
    scores = [b["logprob"] for b in result["beams"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 4
    assert len({tuple(b["tokens"]) for b in result["beams"]}) == 4
    assert result["beams"][0]["tokens"] == result["tokens"]
    # forked beams share their prefix pages: 4 unshared beams would hold 4 * ceil(len / page size) pages
    ps = 16
    total = len(result["prompt_tokens"]) + n
    assert beam.stats["peak_pages_in_use"] <= len(result["prompt_tokens"]) // ps + 4 * (-(-n // ps) + 1)
    assert beam.stats["peak_pages_in_use"] < 4 * -(-total // ps)


def test_width_one_is_greedy(run_inferlet):
    prompt = "What is the capital of France?"
    beam = run_inferlet("beam_search", "--prompt", prompt, "--beams", 1, "--max-tokens", 24)
    tc = run_inferlet("text_completion", "--prompt", prompt, "--max-tokens", 24, "--temperature", 0)
    assert beam.output == tc.output
    assert beam.output.strip()


def test_eos_finishes_beams(run_inferlet):
    """Without --ignore-eos, a short answer ends at EOS: the search stops before max-tokens, the best
    beam is a finished one (its text has no EOS), and its score is at least every live beam's."""
    beam = run_inferlet("beam_search", "--prompt", "What is the capital of France?", "--beams", 3,
                        "--max-tokens", 32, "--json", "--stats")
    result = json.loads(beam.output)
    assert beam.stats["finished"] >= 1 and beam.stats["steps"] < 32
    assert "Paris" in result["text"] and len(result["tokens"]) < 32
    assert result["logprob"] == max(b["logprob"] for b in result["beams"])
    assert math.isfinite(result["logprob"]) and result["logprob"] < 0


def test_length_penalty(run_inferlet):
    """Raw prompt whose most likely continuation is EOS: by total logprob the empty answer wins; ranked
    by logprob per token (--length-penalty 1) a longer beam does, and the beams are in that order."""
    args = ["--prompt", "Name three colors.", "--raw", "--beams", 2, "--max-tokens", 16, "--json"]
    plain = json.loads(run_inferlet("beam_search", *args).output)
    assert plain["tokens"] == [] and plain["text"] == ""
    per_token = json.loads(run_inferlet("beam_search", *args, "--length-penalty", 1).output)
    assert len(per_token["tokens"]) > 4 and per_token["text"].strip()
    # finished beams count their EOS in the length (it was scored)
    lengths = [len(b["tokens"]) + b["finished"] for b in per_token["beams"]]
    avg = [b["logprob"] / n for b, n in zip(per_token["beams"], lengths)]
    assert avg == sorted(avg, reverse=True)
    assert avg[0] > plain["logprob"]  # the empty answer's per-token score is its EOS logprob
    assert plain["beams"][0]["finished"]
