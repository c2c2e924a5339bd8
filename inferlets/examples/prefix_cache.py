"""Prefix caching across instances: a system prompt's KV pages are computed and exported once, and every
later launch with the same system prompt imports them and prefills only the rest of its prompt.

The prompt is the chat rendering of `--system` + `--prompt` (as `text_completion` renders it); its prefix
is the rendering of the system message alone (the longest common token prefix of the two). The prefix is
saved under a name derived from its token ids (`--name` to choose one): the first launch finds nothing
(`Context.open` returns None), computes the prefix, and publishes it (`Context.save`: `kv.export-pages`,
the token ids in the kv-store); a later launch gets a context that shares those pages (copy-on-write: the
partly filled last page is copied when the suffix is written into it) and computes only the suffix. The
generation itself is `text_completion`'s, so with the same arguments (e.g. greedy) the text is the same.
The export outlives the instance until `--drop` removes it (or its client ends, or the server evicts it
under pool pressure). It is private to the launching client (a server connection, an HTTP request) unless
`--shared`: then every client's launches import it, passing the prefix tokens they computed the name from
(another client's kv-store is not theirs to read). Importing a shared prefix trusts whoever published it.
Two first launches racing each other both compute the prefix; the later one finds the other's export just
before publishing and uses it (only if both publish at the very same moment does the later
`kv.export-pages` trap on the taken name).

    pie run prefix_cache -- --system "You are a terse assistant." --prompt "Name a planet." --max-tokens 16
    pie run prefix_cache -- --system "You are a terse assistant." --drop

Arguments: --system (required), --prompt (required unless --drop), --max-tokens (256), --temperature
(1.0; 0 = greedy), --top-p, --top-k, --min-p, --seed, --stop (repeatable), --ignore-eos, --raw (no chat
template: system and prompt joined by a blank line), --name (the export's name), --shared (publish and
look up the prefix for every client), --drop (remove the saved prefix and exit), --json.

Output: the generated text (as `text_completion`); with --json one JSON line {"text", "name", "imported",
"prefix_tokens", "prompt_tokens", "computed_prompt_tokens"} (the prompt tokens this launch computed).

API: Context.open / save / drop_saved (kv.import-pages / export-pages / unexport-pages, kv-store),
Context (fill_tokens, flush, generate, free), tokenizer.
"""

import argparse
import hashlib
import json

import inferlet
from inferlet import Context

KV = inferlet.raw.kv


def render(system, prompt, raw):
    """(prefix token ids, whole prompt token ids)."""
    if raw or not inferlet.model_facts().has_chat_template:
        whole = inferlet.encode(f"{system}\n\n{prompt}")
        head = inferlet.encode(f"{system}\n\n")
    else:
        sys_msg = [{"role": "system", "content": system}]
        whole = inferlet.encode(inferlet.chat_prompt(sys_msg + [{"role": "user", "content": prompt}]))
        head = inferlet.encode(inferlet.chat_prompt(sys_msg, add_generation_prompt=False))
    n = 0
    while n < min(len(head), len(whole)) and head[n] == whole[n]:
        n += 1
    if n == len(whole):  # keep one token to compute: the pass that computes it draws the first output
        n -= 1
    return whole[:n], whole


def main():
    parser = argparse.ArgumentParser(prog="prefix_cache")
    parser.add_argument("--system", required=True)
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[])
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument("--name", default=None, help="name of the saved prefix")
    parser.add_argument("--shared", action="store_true", help="share the saved prefix with every client")
    parser.add_argument("--drop", action="store_true", help="remove the saved prefix and exit")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.prompt is None and not args.drop:
        parser.error("--prompt is required")

    prefix, whole = render(args.system, args.prompt or "", args.raw)
    name = args.name or "prefix-cache/" + hashlib.sha256(",".join(map(str, prefix)).encode()).hexdigest()[:24]
    if args.drop:
        if name in KV.list_exports():
            Context.drop_saved(name)
            print(f"dropped {name}")
        else:
            print(f"no saved prefix {name}")
        return

    expected = prefix if args.shared else None  # a shared prefix's token ids are not in our kv-store
    ctx = Context.open(name, expected) if prefix else None
    imported = ctx is not None
    if ctx is not None and ctx.tokens != prefix:  # a name given twice for different prefixes
        ctx.free()
        raise ValueError(f"the prefix saved as {name!r} is not this prompt's prefix")
    computed_prefix = 0
    if ctx is None:
        ctx = Context()
        if prefix:
            ctx.fill_tokens(prefix)
            ctx.flush()
            computed_prefix = len(prefix)
            if name in KV.list_exports():  # another launch saved it meanwhile: use that one
                ctx.free()
                ctx = Context.open(name, expected)
                imported = True
            else:
                ctx.save(name, shared=args.shared)
    ctx.fill_tokens(whole[len(prefix):])
    sampler = inferlet.sample(args.temperature, args.top_k, args.top_p, args.min_p, args.seed)
    text = ctx.generate(max_tokens=args.max_tokens, sampler=sampler, stop=args.stop, ignore_eos=args.ignore_eos)
    if args.json:
        print(json.dumps({"text": text, "name": name, "imported": imported, "prefix_tokens": len(prefix),
                          "prompt_tokens": len(whole),
                          "computed_prompt_tokens": computed_prefix + len(whole) - len(prefix)}))
    else:
        print(text)
    ctx.free()


main()
