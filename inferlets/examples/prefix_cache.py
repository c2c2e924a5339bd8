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

import hashlib
import json
import os

import inferlet
from inferlet import Context

parser = inferlet.ArgParser("prefix_cache", required=("system",))
parser.add_argument("--name", default=None, help="name of the saved prefix")
parser.add_argument("--shared", action="store_true", help="share the saved prefix with every client")
parser.add_argument("--drop", action="store_true", help="remove the saved prefix and exit")
parser.add_argument("--json", action="store_true")
args = parser.parse_args()
if args.prompt is None and not args.drop:
    parser.error("--prompt is required")
args.prompt = args.prompt or ""

# the prefix: the longest common token prefix of the system message alone and the whole prompt, leaving
# one token to compute (the pass that computes it draws the first output)
whole = args.prompt_tokens()
if args.raw or not inferlet.model_facts().has_chat_template:
    head = inferlet.encode(f"{args.system}\n\n")
else:
    head = inferlet.encode(inferlet.chat_prompt([{"role": "system", "content": args.system}], False), False)
prefix = whole[:min(len(os.path.commonprefix([head, whole])), len(whole) - 1)]
name = args.name or "prefix-cache/" + hashlib.sha256(",".join(map(str, prefix)).encode()).hexdigest()[:24]
if args.drop:
    saved = name in inferlet.saved_prefixes()
    if saved:
        Context.drop_saved(name)
    print(f"dropped {name}" if saved else f"no saved prefix {name}")
    raise SystemExit(0)

expected = prefix if args.shared else None  # a shared prefix's token ids are not in our kv-store
ctx = Context.open(name, expected) if prefix else None
imported, computed_prefix = ctx is not None, 0
if ctx is not None and ctx.tokens != prefix:  # a name given twice for different prefixes
    ctx.free()
    raise ValueError(f"the prefix saved as {name!r} is not this prompt's prefix")
if ctx is None:
    ctx = Context()
    if prefix:
        ctx.fill_tokens(prefix)
        ctx.flush()
        computed_prefix = len(prefix)
        if name in inferlet.saved_prefixes():  # another launch saved it meanwhile: use that one
            ctx.free()
            ctx, imported = Context.open(name, expected), True
        else:
            ctx.save(name, shared=args.shared)
ctx.fill_tokens(whole[len(prefix):])
text = ctx.generate(**args.generation())
if args.json:
    print(json.dumps({"text": text, "name": name, "imported": imported, "prefix_tokens": len(prefix),
                      "prompt_tokens": len(whole), "computed_prompt_tokens": computed_prefix + len(whole) - len(prefix)}))
else:
    print(text)
ctx.free()
