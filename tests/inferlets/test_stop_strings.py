"""Context.generate's stop strings are found without decoding the whole text at every token (the SDK's
incremental scan), with exactly the old behaviour: the text cut at the first stop string of the whole
decode, and the same tokens appended, as the full rescan at every token gives (computed in the guest
over the same greedy tokens)."""

import json

import pytest

GUEST = """
import json, sys
import inferlet
from inferlet import decode

prompt, n, stop_sets = json.loads(sys.argv[1])

def fresh():
    ctx = inferlet.Context()
    ctx.fill(inferlet.chat_prompt([{"role": "user", "content": prompt}]))
    return ctx

ref_ctx = fresh()
start = len(ref_ctx.tokens)
ref_ctx.generate(max_tokens=n, ignore_eos=True)
ref = ref_ctx.tokens[start:]
ref_ctx.free()

def rescan(stop):  # the old loop: decode everything at every token
    for k in range(1, len(ref) + 1):
        text = decode(ref[:k])
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut], k
    return decode(ref), len(ref)

out = []
for stop in stop_sets:
    ctx = fresh()
    text = ctx.generate(max_tokens=n, stop=stop, ignore_eos=True)
    out.append([[text, len(ctx.tokens) - start], list(rescan(stop))])
    ctx.free()
print(json.dumps({"text": decode(ref), "results": out}))
"""


@pytest.mark.parametrize("prompt", ["Count from one to twenty in words.",
                                    "Write 'good morning' in Japanese, Chinese and Russian."])
def test_stop_strings_match_the_full_rescan(runtime, prompt):
    n = 40
    probe = runtime.run_source(GUEST, [json.dumps([prompt, n, []])])
    assert probe.error is None, probe.error
    text = json.loads(probe.output)["text"]
    assert len(text) > 20
    # stop strings taken from the text at many places and lengths, one that never occurs, several at once
    stops = [[text[i:i + length]] for i in (1, 7, len(text) // 2, len(text) - 3) for length in (1, 5)
             if text[i:i + length].strip()]
    stops += [["never occurs here"], [text[-4:], text[10:13]], [text[20:22], "zz"], [""]]
    r = runtime.run_source(GUEST, [json.dumps([prompt, n, stops])])
    assert r.error is None, r.error
    results = json.loads(r.output)["results"]
    assert len(results) == len(stops)
    for stop, (got, expected) in zip(stops, results):
        assert got == expected, (stop, got, expected)
    assert any(got[1] < n for got, _ in results)  # some stopped early
