"""Generation as expressions: `ctx += text`, `ctx.gen(...)` returning the text it appended and keeping it as
a named capture, `ctx.select(options)` choosing an option by its log-probability (`ctx.score`).

    ctx += "The capital of France is"
    city = ctx.select([" Paris", " Rome", " Berlin"], name="city")
    ctx.gen("why", max_tokens=24, stop=["\\n"]); print(ctx["city"], ctx["why"])
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import inferlet


class Expressions:
    """The expression methods of `inferlet.Context` (a mixin; the state lives on the Context).

    State: `captures`, name -> the text a named `gen` / `select` appended (forks copy it)."""

    captures: dict[str, str]

    def __iadd__(self, text: str) -> "Expressions":
        """`ctx += text` fills `text` (as `ctx.fill(text)`)."""
        self.fill(text)
        return self

    def __getitem__(self, name: str) -> str:
        """The capture `name` (what `gen(name)` or `select(..., name)` appended)."""
        return self.captures[name]

    def gen(self, name: Optional[str] = None, max_tokens: int = 256, *, stop: Sequence[str] = (),
            temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
            seed: Optional[int] = None, sampler: Optional["inferlet.Sampler"] = None, ignore_eos: bool = False,
            regex: Optional[str] = None, json_schema: Union[str, dict, None] = None,
            grammar: Optional["inferlet.Grammar"] = None, choices: Optional[Sequence[str]] = None) -> str:
        """Generates and appends text (greedy unless a temperature or a sampler is given); returns it and,
        with `name`, keeps it as `ctx[name]`. `regex` / `json_schema` / `grammar` constrain every token;
        `choices` picks one of them by log-probability instead of generating (as `select`).

        >>> ctx.gen("date", regex="[0-9]{4}-[0-9]{2}-[0-9]{2}")
        '1969-07-20'
        """
        if choices is not None:
            return self.select(choices, name)
        if regex is not None:
            grammar = inferlet.Grammar.regex(regex)
        elif json_schema is not None:
            grammar = inferlet.Grammar.json_schema(json_schema)
        sampler = sampler or inferlet.sample(temperature, top_k, top_p, min_p, seed)
        text = self.generate(max_tokens, sampler, stop, ignore_eos, grammar)
        if name is not None:
            self.captures[name] = text
        return text

    def select(self, options: Sequence[str], name: Optional[str] = None) -> str:
        """The option with the highest total log-probability after this context (`score`), appended and,
        with `name`, kept as `ctx[name]`; ties go to the first.

        >>> ctx.select([" yes", " no"], name="verdict")
        ' yes'
        """
        scores = self.score(options)
        best = options[max(range(len(options)), key=lambda i: scores[i])]
        self.fill(best)
        if name is not None:
            self.captures[name] = best
        return best

    def score(self, options: Sequence[str]) -> list[float]:
        """The total log-probability (temperature 1) of each option's tokens following this context, all
        options in one forward pass; the context is unchanged but for its pending tokens, now computed.

        >>> ctx.score([" Paris", " Rome"])
        [-0.21, -3.9]

        The pass runs the context's pending tokens (at least its last) and every option's tokens side by
        side: slots [0, L) hold the context (L = len(tokens)), option i's n_i tokens take slots [s_i, s_i + n_i) after it with
        positions L .. L + n_i - 1, and an attention mask lets each option token see the context and its
        own option's earlier tokens only. The options' slots are scratch: later passes overwrite them.
        """
        if not options:
            raise ValueError("score: no options")
        tokenized = [inferlet.encode(o, False) for o in options]
        if any(not t for t in tokenized):
            raise ValueError(f"score: an option has no tokens: {options!r}")
        pending = self._make_room(sum(map(len, tokenized)))
        L, first = len(self.tokens), len(self.tokens) - pending  # the context's slots; the first pending one
        starts, slot = [], L
        for t in tokenized:
            starts.append(slot)
            slot += len(t)
        S = slot  # slots of the pass's sequence
        mask = [inferlet.brle([s <= row for s in range(S)]) for row in range(first, L)]
        scratch, positions = [], []
        out_indices, samplers = [pending - 1], [inferlet.logprobs([t[0] for t in tokenized])]
        for t, start in zip(tokenized, starts):
            for j, token in enumerate(t):
                scratch.append(token)
                positions.append(L + j)
                mask.append(inferlet.brle([s < L or start <= s <= start + j for s in range(S)]))
                if j + 1 < len(t):  # this token's output predicts the option's next token
                    out_indices.append(pending + len(scratch) - 1)
                    samplers.append(inferlet.logprobs([t[j + 1]]))
        outs = self._run_scratch(scratch, positions, mask, out_indices, samplers)
        totals = [float(v) for v in outs[0].values]
        k = 1
        for i, t in enumerate(tokenized):
            for _ in t[1:]:
                totals[i] += outs[k].values[0]
                k += 1
        return [v if math.isfinite(v) else -math.inf for v in totals]
