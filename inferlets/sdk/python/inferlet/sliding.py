"""Generation in bounded KV memory: the program behind the `attention_sink` and `windowed_attention`
inferlets (their files only pick the name and whether the first tokens are kept); see those files for
what it does and its arguments.

    from inferlet.sliding import main
    main("attention_sink", with_sink=True)
"""

import json

import inferlet
from inferlet import raw


class Window:
    """The KV pages of a sequence that keeps its first `sink` tokens and its last `window` tokens."""

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
        mask = [inferlet.brle([p <= n + i and self.visible(n + i, p) for p in positions]) for i in range(T)] if hidden else []
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


def main(prog: str, with_sink: bool) -> None:
    """Parses sys.argv, generates, prints the text. with_sink: --sink S keeps the first S tokens too."""
    parser = inferlet.ArgParser(prog)
    parser.add_argument("--window", type=int, default=256, help="recent tokens every token attends to")
    if with_sink:
        parser.add_argument("--sink", type=int, default=4, help="first tokens every token attends to")
    parser.add_argument("--stats", action="store_true", help="log page and pass counts to stderr")
    args = parser.parse_args()
    sink = args.sink if with_sink else 0
    if args.window < 1 or sink < 0:
        parser.error("--window must be >= 1 and --sink >= 0")
    win = Window(sink, args.window)
    prompt = args.prompt_tokens()
    if not prompt:
        parser.error("the prompt has no tokens")
    stopper = inferlet.Stopper(args.max_tokens, args.stop, args.ignore_eos)
    # prefill: the first min(len, W) tokens at once, then page-aligned chunks of at most one page
    first = min(len(prompt), args.window)
    cuts = [0] + [c for c in range(first, len(prompt)) if c == first or c % win.P == 0] + [len(prompt)]
    chunks = [prompt[a:b] for a, b in zip(cuts, cuts[1:])]
    for chunk in chunks[:-1] if not stopper.done else ():
        win.run(chunk)
    pending = chunks[-1]
    while not stopper.done:
        token = win.run(pending, inferlet.step_sampler(args.sampler(), len(stopper.tokens))).ids[0]
        stopper.push(token)
        pending = [token]
    win.free()
    print(stopper.text)
    if args.stats:
        inferlet.log(json.dumps({"passes": win.passes, "generated": len(stopper.tokens), "max_pages_held": win.max_held,
                                 "max_pages_in_use": win.max_in_use, "pages_freed": win.freed, "bound": win.bound,
                                 "prompt_tokens": len(prompt)}))
