"""windowed_attention and attention_sink: the KV pages held stay bounded however long the generation
(pages that leave the window are freed), the text is what full attention with the same window mask
gives, and a generation that never leaves the window is exactly text_completion's."""

import json

import pytest

PROMPT = "Tell me a story about a dragon."
PS = 16

# The reference: every page kept, the window (and sinks) imposed by explicit attention-mask rows only.
REFERENCE = """
import json, sys
import inferlet
from inferlet import raw

d = json.loads(sys.argv[1])
window, sink, n_new = d["window"], d["sink"], d["max_tokens"]
P = raw.kv.page_size()
seq = inferlet.encode(inferlet.chat_prompt([{"role": "user", "content": d["prompt"]}]), add_bos=False)
pages = []

def brle(flags):
    runs, cur, count = [], True, 0
    for f in flags:
        if f != cur:
            runs.append(count)
            cur, count = f, 0
        count += 1
    runs.append(count)
    return runs

n = 0
pending = list(seq)
out = []
while len(out) < n_new:
    end = n + len(pending)
    if -(-end // P) > len(pages):
        pages += raw.kv.allocate(-(-end // P) - len(pages))
    rows = [[p < sink or p > q - window for p in range(q + 1)] + [False] * (end - q - 1) for q in range(n, end)]
    mask = [brle(r) for r in rows] if any(not all(r[:q + 1]) for r, q in zip(rows, range(n, end))) else []
    fwd = raw.forward.ForwardPass(tokens=pending, input_embeddings=[], positions=list(range(n, end)),
                                  pages=pages[:-(-end // P)], last_page_len=end - (-(-end // P) - 1) * P,
                                  mask=mask, output_indices=[len(pending) - 1], samplers=[inferlet.greedy()],
                                  output_masks=[])
    tok = raw.forward.wait(raw.forward.submit(0, fwd))[0].ids[0]
    n = end
    out.append(tok)
    pending = [tok]
raw.kv.free(pages)
print(json.dumps({"text": inferlet.decode(out), "prompt_tokens": len(seq)}))
"""


def reference(run_inferlet, window, sink, max_tokens):
    return json.loads(run_inferlet(None, json.dumps({"prompt": PROMPT, "window": window, "sink": sink,
                                                     "max_tokens": max_tokens}), source=REFERENCE).output)


def coherent(text):
    """Crude: mostly words and punctuation, not one short loop."""
    words = text.split()
    printable = sum(c.isalnum() or c.isspace() or c in ".,;:'\"!?-()" for c in text) / max(len(text), 1)
    return len(words) >= 40 and printable > 0.95 and len(set(words)) / len(words) > 0.3


@pytest.mark.parametrize("name, sink, window, bound", [
    ("attention_sink", 4, 32, 1 + 2 + 1),
    ("windowed_attention", 0, 32, 2 + 1),
])
def test_pages_stay_bounded_and_text_matches_masked_full_attention(run_inferlet, name, sink, window, bound):
    n = 80
    extra = ["--sink", sink] if name == "attention_sink" else []
    r = run_inferlet(name, "--prompt", PROMPT, "--max-tokens", n, "--window", window, *extra,
                     "--temperature", 0, "--ignore-eos", "--stats")
    stats = r.stats
    assert stats["generated"] == n and stats["bound"] == bound
    assert stats["max_pages_held"] <= bound
    assert stats["max_pages_in_use"] <= bound  # counted with kv.num-free-pages in the guest
    total = stats["prompt_tokens"] + n
    assert stats["pages_freed"] >= -(-total // PS) - bound  # without eviction the sequence takes 8 pages
    assert r.output.strip()
    ref = reference(run_inferlet, window, sink, n)
    assert ref["prompt_tokens"] == stats["prompt_tokens"] > PS
    assert r.output == ref["text"] + "\n"
    if name == "attention_sink":
        assert coherent(r.output), r.output


@pytest.mark.parametrize("name", ["attention_sink", "windowed_attention"])
def test_no_eviction_is_plain_greedy(run_inferlet, name):
    """Prompt (38 tokens) + 24 generated fit in the window: nothing is evicted, no mask is used, and
    the text is text_completion's greedy text."""
    plain = run_inferlet("text_completion", "--prompt", PROMPT, "--max-tokens", 24, "--temperature", 0)
    r = run_inferlet(name, "--prompt", PROMPT, "--max-tokens", 24, "--window", 64, "--temperature", 0, "--stats")
    assert r.output == plain.output
    assert r.stats["pages_freed"] == 0
    assert r.stats["max_pages_held"] == -(-(r.stats["prompt_tokens"] + 23) // PS)


def test_long_prompt_is_prefilled_within_the_bound(run_inferlet):
    """A prompt longer than the window: prefilled page by page, evicting as it goes."""
    prompt = " ".join(f"Item {i}: a red apple." for i in range(20)) + " Summarize the list."
    r = run_inferlet("attention_sink", "--prompt", prompt, "--max-tokens", 8, "--window", 24, "--sink", 4,
                     "--temperature", 0, "--stats")
    stats = r.stats
    assert stats["prompt_tokens"] > 100
    assert stats["max_pages_in_use"] <= stats["bound"] == 1 + 2 + 1
    assert stats["pages_freed"] > 3
    assert stats["passes"] >= (stats["prompt_tokens"] - 24) // PS + 8
    assert r.output.strip()
