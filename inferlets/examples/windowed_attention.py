"""Windowed (sliding-window) attention: long generation in bounded KV memory.

    pie run windowed_attention -- --prompt "Tell me a long story." --max-tokens 2000 --window 256

Every token attends only to the last --window tokens (itself included). Only the pages holding those
tokens are kept; a page whose tokens have all left the window is freed at once, so at most
ceil(window / P) + 1 pages are held (P = kv.page-size), however long the generation. Without the first
tokens a model not trained with a sliding window tends to lose fluency once they leave the window (the
"attention sink" effect): `attention_sink` keeps them too.

Arguments: --prompt, --max-tokens (256), --window W (tokens, 256), and as in text_completion
--temperature (1.0; 0 = greedy), --top-k, --top-p, --min-p, --seed, --stop, --system, --raw,
--ignore-eos; --stats logs one JSON line to stderr ({"passes", "generated", "max_pages_held",
"max_pages_in_use", "pages_freed", "bound"}; max_pages_in_use is measured with kv.num-free-pages, so it
is exact only while no other instance allocates).

How it uses the raw API (inferlet.raw.kv / inferlet.raw.forward; no Context, whose pages only grow):
- Page j holds the tokens at positions [j*P, (j+1)*P). The pages held are kept in position order; a
  pass's `pages` list is that sequence (the evicted pages simply missing), all full but the last, and
  `last-page-len` makes the pass write its T inputs into the last T slots, which are the slots of
  positions [n, n+T) of the last page(s). Positions (`positions`, used by RoPE) keep increasing: they are
  independent of the slot index, and the cached keys keep the rotation of their original positions.
- Attention: exactly the last W tokens. As long as that is every held token, the pass is plain causal
  (`mask` empty), so a generation that never leaves the window is exactly text_completion's; otherwise
  each input row gets an explicit BRLE `mask` row over the sequence hiding the slots older than the
  window (the first held page is usually part-stale) and attending the window up to the row itself.
- Prefill: the first min(len(prompt), W) tokens in one pass, the rest page by page (page-aligned
  chunks of at most P tokens, each row with its own exact window), so the bound holds during prefill too.
- Sampling: one sampler per pass at the last input (greedy, or a seeded draw whose seed per step is
  derived as the SDK's Context.generate does, so seeded output also matches text_completion's until the
  window is left).
"""

import argparse
import json

import inferlet
from inferlet import raw

parser = argparse.ArgumentParser(prog="windowed_attention")
parser.add_argument("--prompt", required=True)
parser.add_argument("--max-tokens", type=int, default=256)
parser.add_argument("--window", type=int, default=256, help="recent tokens every token attends to")
parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
parser.add_argument("--top-p", type=float, default=1.0)
parser.add_argument("--top-k", type=int, default=0)
parser.add_argument("--min-p", type=float, default=0.0)
parser.add_argument("--seed", type=int, default=None)
parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
parser.add_argument("--system", default=None, help="system message")
parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
parser.add_argument("--ignore-eos", action="store_true", help="generate max-tokens tokens even past EOS")
parser.add_argument("--stats", action="store_true", help="log page and pass counts to stderr")
args = parser.parse_args()
if args.window < 1:
    parser.error("--window must be >= 1")


def prompt_tokens():
    if args.raw or not inferlet.model_facts().has_chat_template:
        return inferlet.encode(args.prompt if args.system is None else f"{args.system}\n\n{args.prompt}")
    messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
               [{"role": "user", "content": args.prompt}]
    return inferlet.encode(inferlet.chat_prompt(messages), add_bos=False)


def step_sampler(step):
    """The sampler of the step-th generated token (a seeded sampler derives one seed per step, as the
    SDK's Context.generate does)."""
    if args.temperature == 0:
        return inferlet.greedy()
    seed = None if args.seed is None else (args.seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF
    return inferlet.sample(args.temperature, args.top_k, args.top_p, args.min_p, seed)


class Window:
    """The KV pages of a sequence that keeps its last `window` tokens (and its first `sink` tokens: none here)."""

    def __init__(self, sink, window):
        self.P = raw.kv.page_size()
        self.sink, self.window = sink, window
        self.sink_pages = -(-sink // self.P)
        self.held = {}  # page index j -> handle (tokens at positions [j*P, (j+1)*P))
        self.n = 0  # tokens cached so far (positions 0 .. n-1)
        self.passes = self.freed = self.max_held = self.max_in_use = 0
        self.free0 = raw.kv.num_free_pages()

    @property
    def bound(self):
        return self.sink_pages + -(-self.window // self.P) + 1

    def visible(self, q, p):
        """Whether the token at position q attends to the one at position p (p <= q)."""
        return p < self.sink or p > q - self.window

    def run(self, tokens, sampler=None):
        """One pass writing `tokens` at positions [n, n + T); evicts what the first of them no longer
        sees. Returns the output of `sampler` at the last token (or waits and returns None)."""
        P, n, T = self.P, self.n, len(tokens)
        oldest = n - self.window + 1  # the first input's window starts here
        stale = [j for j in self.held if j >= self.sink_pages and (j + 1) * P <= oldest]
        if stale:  # freed before anything is allocated, so the pages in use never exceed the bound
            raw.kv.free([self.held.pop(j) for j in stale])
            self.freed += len(stale)
        for j in range(n // P, (n + T - 1) // P + 1):  # pages the pass writes into
            if j not in self.held:
                self.held[j] = raw.kv.allocate(1)[0]
        order = sorted(self.held)
        self.max_held = max(self.max_held, len(order))
        self.max_in_use = max(self.max_in_use, self.free0 - raw.kv.num_free_pages())
        # the position of every slot of the sequence (the last page is filled up to position n + T - 1)
        positions = [j * P + o for j in order for o in range(P) if j * P + o < n + T]
        hidden = any(p <= n + i and not self.visible(n + i, p) for i in range(T) for p in positions)
        mask = [brle([p <= n + i and self.visible(n + i, p) for p in positions]) for i in range(T)] if hidden else []
        fwd = raw.forward.ForwardPass(
            tokens=list(tokens), input_embeddings=[], positions=list(range(n, n + T)),
            pages=[self.held[j] for j in order], last_page_len=(n + T - 1) % P + 1, mask=mask,
            output_indices=[T - 1] if sampler else [], samplers=[sampler] if sampler else [], output_masks=[])
        out = raw.forward.wait(raw.forward.submit(0, fwd))
        self.passes += 1
        self.n += T
        return out[0] if sampler else None

    def free(self):
        if self.held:
            raw.kv.free(list(self.held.values()))
        self.held = {}


def brle(flags):
    """Run lengths of a boolean row, alternating attend / hidden, starting with attend."""
    runs, cur, count = [], True, 0
    for f in flags:
        if f != cur:
            runs.append(count)
            cur, count = f, 0
        count += 1
    runs.append(count)
    return runs


win = Window(0, args.window)
eos = inferlet.model_facts().eos_ids
prompt = prompt_tokens()
if not prompt:
    parser.error("the prompt has no tokens")
generated = []
text = None
if args.max_tokens <= 0:
    text = ""
else:
    # prefill: the first min(len, W) tokens at once, then page-aligned chunks of at most one page
    first = min(len(prompt), args.window)
    chunks = [prompt[:first]]
    i = first
    while i < len(prompt):
        end = min(len(prompt), (i // win.P + 1) * win.P)
        chunks.append(prompt[i:end])
        i = end
    for c in chunks[:-1]:
        win.run(c)
    pending = chunks[-1]
    step = 0
    while text is None:
        token = win.run(pending, step_sampler(step)).ids[0]
        step += 1
        if token in eos and not args.ignore_eos:
            text = inferlet.decode(generated)
            break
        generated.append(token)
        if args.stop:
            so_far = inferlet.decode(generated)
            cut = min((k for k in (so_far.find(s) for s in args.stop) if k >= 0), default=-1)
            if cut >= 0:
                text = so_far[:cut]
                break
        if len(generated) >= args.max_tokens:
            text = inferlet.decode(generated)
            break
        pending = [token]
win.free()
print(text)
if args.stats:
    inferlet.log(json.dumps({"passes": win.passes, "generated": len(generated), "max_pages_held": win.max_held,
                             "max_pages_in_use": win.max_in_use, "pages_freed": win.freed, "bound": win.bound,
                             "prompt_tokens": len(prompt)}))
