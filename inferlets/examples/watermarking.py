"""Green-list watermarking (Kirchenbauer et al., 2023): generate watermarked text, or detect the mark.

    pie run watermarking -- --prompt "Tell me about the sea." --max-tokens 64 --key 42
    pie run watermarking -- --detect "TEXT" --key 42            # prints the z-score

Arguments: --prompt, --max-tokens (64), --key (the secret, an integer; 0), --gamma (0.25, the green
fraction of the vocabulary), --delta (2.0, the bias added to green logits; 0 = no watermark),
--temperature (1.0), --top-k (64, see below), --seed (the guest's sampling seed), --system, --raw (no
chat template), --ignore-eos; --detect TEXT scores TEXT instead of generating; --json prints a JSON
object ({"text", "tokens", "green", "scored", "z"}) instead of the bare text / z-score.

The green list: for each previous token `prev`, a keyed pseudo-random permutation pi of the vocabulary
[0, V) (a 4-round Feistel network on 16 bits, cycle-walked into [0, V), its round keys derived from
(key, prev) with splitmix64) puts token t in the green list iff pi(t) < floor(gamma * V): exactly
gamma * V green tokens per previous token, as with Kirchenbauer's `randperm(V)[:gamma * V]`, but without
building a permutation of V entries (membership costs a few integer operations per token).

Generation: each step runs one forward pass with a `top_k_distribution(k, temperature)` sampler (the
probabilities of the k most likely tokens, a softmax over the whole vocabulary); the guest multiplies the
green tokens' probabilities by e^delta (the same as adding delta to their logits), renormalises over the
k tokens and draws one with its own `random.Random(seed)`. The alternative, `raw_logits`, would move the
whole V-entry row (49152 floats) into the guest every step and soft-max it in interpreted Python; the
top-k re-weighting moves k numbers and is exact up to top-k truncation: the tokens beyond the k most likely
(a negligible mass at k = 64) can never be drawn, as with ordinary top-k sampling. The detector does not
depend on the choice.

Detection: TEXT is tokenized (no BOS); each token after the first is green or not given its predecessor
(the first token's predecessor, the prompt's last token, is unknown to the detector). With s scored
tokens, g of them green: z = (g - gamma s) / sqrt(s gamma (1 - gamma)); unwatermarked text gives z near 0
(|z| < 2 most of the time), watermarked text a large z (z > 4 is a confident detection).
"""

import argparse
import json
import math
import random

import inferlet

parser = argparse.ArgumentParser(prog="watermarking")
parser.add_argument("--prompt", default=None)
parser.add_argument("--max-tokens", type=int, default=64)
parser.add_argument("--key", type=int, default=0, help="the watermark's secret key")
parser.add_argument("--gamma", type=float, default=0.25, help="green fraction of the vocabulary")
parser.add_argument("--delta", type=float, default=2.0, help="bias added to green logits (0 = no watermark)")
parser.add_argument("--temperature", type=float, default=1.0)
parser.add_argument("--top-k", type=int, default=64, help="tokens re-weighted and drawn from per step")
parser.add_argument("--seed", type=int, default=None, help="the guest's sampling seed")
parser.add_argument("--system", default=None, help="system message")
parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
parser.add_argument("--ignore-eos", action="store_true", help="generate max-tokens tokens even past EOS")
parser.add_argument("--detect", default=None, metavar="TEXT", help="print the z-score of TEXT")
parser.add_argument("--json", action="store_true", help="print a JSON object with the counts")
args = parser.parse_args()
if not 0 < args.gamma < 1:
    parser.error("--gamma must be in (0, 1)")
if (args.prompt is None) == (args.detect is None):
    parser.error("give exactly one of --prompt (generate) and --detect TEXT (score)")
if args.temperature <= 0 or args.top_k < 1:
    parser.error("--temperature must be > 0 and --top-k >= 1")

V, M64 = inferlet.model_facts().vocab_size, (1 << 64) - 1
GREEN = int(args.gamma * V)  # tokens t with pi(t) < GREEN are green
BITS = max(2, (V - 1).bit_length() + ((V - 1).bit_length() & 1))  # even: two halves of BITS // 2 bits
HALF, HMASK = BITS // 2, (1 << BITS // 2) - 1


def splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def round_keys(prev):
    """The 4 Feistel round keys of the permutation for previous token `prev` (derived from key and prev)."""
    keys = [splitmix64((args.key & M64) ^ splitmix64(prev + 1))]
    for _ in range(4):
        keys.append(splitmix64(keys[-1]))
    return keys[1:]


def permute(t, keys):
    """pi(t): a keyed bijection of [0, V) (Feistel on BITS bits, cycle-walked back into [0, V))."""
    while True:
        left, right = t >> HALF, t & HMASK
        for k in keys:
            left, right = right, left ^ (splitmix64(k ^ right) & HMASK)
        t = (left << HALF) | right
        if t < V:
            return t


def report(text, tokens):
    """The text (or z-score), or with --json the counts: z = (g - gamma s) / sqrt(s gamma (1 - gamma))."""
    scored = max(len(tokens) - 1, 0)
    green = sum(permute(b, round_keys(a)) < GREEN for a, b in zip(tokens, tokens[1:]))
    z = (green - args.gamma * scored) / math.sqrt(scored * args.gamma * (1 - args.gamma)) if scored else 0.0
    if args.json:
        print(json.dumps({"text": text, "tokens": tokens, "green": green, "scored": scored, "z": z}))
    else:
        print(text if args.detect is None else f"{z:.4f}")


if args.detect is not None:
    report(args.detect, inferlet.encode(args.detect, add_bos=False))
    raise SystemExit(0)
ctx, rng, boost = inferlet.StandardArgs(**vars(args)).context(), random.Random(args.seed), math.exp(args.delta)
stopper = inferlet.Stopper(args.max_tokens, ignore_eos=args.ignore_eos)
while not stopper.done:
    out = ctx.step([inferlet.top_k_distribution(min(args.top_k, V), args.temperature)])[0]
    keys = round_keys(ctx.tokens[-1])
    token = rng.choices(out.ids, weights=[p * boost if permute(t, keys) < GREEN else p for t, p in zip(out.ids, out.values)])[0]
    stopper.push(token)  # EOS ends it (and is not part of the text) unless --ignore-eos
    ctx.fill_tokens([token])
ctx.free()
report(stopper.text, stopper.tokens)
