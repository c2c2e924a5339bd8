"""The command-line contract every generating inferlet shares: the prompt, the sampler, the stop
conditions and the chat rendering, parsed the same way and with the same help everywhere.

    args = inferlet.ArgParser("my_inferlet").parse_args()
    print(args.context().generate(**args.generation()))
"""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

import inferlet

# dest -> (flag, argparse keywords); the order of `--help`
STANDARD: dict[str, tuple[str, dict[str, Any]]] = {
    "prompt": ("--prompt", {"default": None, "help": "the user message (the whole text with --raw)"}),
    "max_tokens": ("--max-tokens", {"type": int, "default": 256, "help": "most tokens generated"}),
    "temperature": ("--temperature", {"type": float, "default": 1.0, "help": "0 = greedy"}),
    "top_p": ("--top-p", {"type": float, "default": 1.0, "help": "nucleus sampling: the smallest set of this mass"}),
    "top_k": ("--top-k", {"type": int, "default": 0, "help": "draw from the k most likely tokens (0 = all)"}),
    "min_p": ("--min-p", {"type": float, "default": 0.0, "help": "drop tokens below min-p times the top one's"}),
    "seed": ("--seed", {"type": int, "default": None, "help": "seed of the draws (none: unseeded)"}),
    "stop": ("--stop", {"action": "append", "default": [], "help": "stop string (repeatable)"}),
    "system": ("--system", {"default": None, "help": "system message"}),
    "raw": ("--raw", {"action": "store_true", "help": "do not apply the chat template"}),
    "ignore_eos": ("--ignore-eos", {"action": "store_true", "help": "generate max-tokens tokens even past EOS"}),
}


class StandardArgs(argparse.Namespace):
    """Parsed arguments (`ArgParser.parse_args`), with what the standard ones build. An option left out
    of the parser holds its default."""

    def sampler(self) -> "inferlet.Sampler":
        """The draw the sampling flags describe (greedy at temperature 0)."""
        return inferlet.sample(self.temperature, self.top_k, self.top_p, self.min_p, self.seed)

    def prompt_tokens(self) -> list[int]:
        """The prompt's token ids: the chat rendering of --system and --prompt up to the assistant's turn,
        or with --raw (or no chat template) their text joined by a blank line, tokenized as is."""
        if self.raw or not inferlet.model_facts().has_chat_template:
            return inferlet.encode(self.prompt if self.system is None else f"{self.system}\n\n{self.prompt}")
        return self.context().tokens

    def context(self) -> "inferlet.Context":
        """A Context holding the prompt (as `prompt_tokens`), in the assistant's open turn when chatting."""
        ctx = inferlet.Context()
        if self.raw or not inferlet.model_facts().has_chat_template:
            ctx.fill_tokens(self.prompt_tokens())
            return ctx
        if self.system is not None:
            ctx.system(self.system)
        ctx.user(self.prompt)
        ctx.assistant()
        return ctx

    def generation(self) -> dict[str, Any]:
        """Keywords of `Context.generate`: max_tokens, sampler, stop, ignore_eos."""
        return {"max_tokens": self.max_tokens, "sampler": self.sampler(), "stop": self.stop,
                "ignore_eos": self.ignore_eos}


class ArgParser(argparse.ArgumentParser):
    """An ArgumentParser holding the standard flags (`STANDARD`) but those in `omit`; `required` names the
    ones that must be given (--prompt by default); other keywords override defaults by dest.

    >>> parser = inferlet.ArgParser("beam_search", omit=("stop", "seed"), max_tokens=32)
    >>> args = parser.parse_args()            # a StandardArgs: args.context(), args.sampler(), ...
    """

    def __init__(self, prog: str, *, omit: Sequence[str] = (), required: Sequence[str] = ("prompt",),
                 helps: Optional[dict[str, str]] = None, **defaults: Any):
        super().__init__(prog=prog)
        unknown = (set(omit) | set(required) | set(defaults) | set(helps or {})) - set(STANDARD)
        if unknown:
            raise ValueError(f"ArgParser: not standard arguments: {sorted(unknown)}")
        for dest, (flag, kwargs) in STANDARD.items():
            if dest in omit:
                self.set_defaults(**{dest: defaults.get(dest, kwargs.get("default", False))})
            else:
                if dest in defaults:
                    kwargs = dict(kwargs, default=defaults[dest])
                if helps and dest in helps:
                    kwargs["help"] = helps[dest]
                if dest in required:
                    kwargs["required"] = True
                self.add_argument(flag, **kwargs)

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None) -> StandardArgs:
        return super().parse_args(args, namespace if namespace is not None else StandardArgs())
