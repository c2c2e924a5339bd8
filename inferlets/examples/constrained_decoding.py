"""Constrained decoding: output that follows a JSON schema, a regular expression or an EBNF grammar.

    pie run constrained_decoding -- --prompt "Describe a cat as JSON." --json-schema '{"type": "object", ...}'
    pie run constrained_decoding -- --prompt "When did Apollo 11 land?" --regex '[0-9]{4}-[0-9]{2}-[0-9]{2}'
    pie run constrained_decoding -- --prompt "Is water wet?" --ebnf 'root ::= "yes" | "no"'

Prints only the generated text (the CLI contract of text_completion).

Arguments: --prompt, exactly one of --json-schema SCHEMA, --regex PATTERN, --ebnf GRAMMAR (with
--root, the EBNF start rule, "root"), --max-tokens (256), and as in text_completion --temperature (0 =
greedy, the default here: a constrained answer is usually wanted deterministic), --top-k, --top-p,
--min-p, --seed, --system, --raw.

SCHEMA and GRAMMAR are the text itself (inline JSON / EBNF). An inferlet cannot read files (the sandbox
has no filesystem), so a file is passed as `@FILE`, which `pie run` replaces by the file's text before
the instance starts (a whole argument only: `--json-schema @schema.json`, not `--json-schema=@...`;
`@@x` passes a literal `@x`). Should an `@FILE` reach the inferlet unexpanded (a launcher that does not
expand it), it tries to open it and, failing, stops with an error saying so. A JSON-schema argument is
parsed here, so a malformed schema (or a bare file name) is reported as such, not as a grammar error.

How it uses the API: `Context.generate(grammar=Grammar.json_schema / regex / ebnf)`: every step the
host-side matcher (llguidance) gives the allowed next tokens as a BRLE vocabulary mask, the forward pass
applies it as the output's `output-masks` row before sampling, and the matcher accepts the drawn token;
generation ends when the grammar is complete (or at EOS once the grammar allows it, or --max-tokens:
then the output may be an incomplete prefix of a valid one).
"""

import json

import inferlet
from inferlet import Grammar

parser = inferlet.ArgParser("constrained_decoding", omit=("stop", "ignore_eos"), temperature=0.0)
which = parser.add_mutually_exclusive_group(required=True)
which.add_argument("--json-schema", metavar="SCHEMA", help="JSON schema text, or @FILE (expanded by pie run)")
which.add_argument("--regex", metavar="PATTERN", help="regular expression the whole output must match")
which.add_argument("--ebnf", metavar="GRAMMAR", help="EBNF grammar text, or @FILE (expanded by pie run)")
parser.add_argument("--root", default="root", help="the EBNF start rule")
args = parser.parse_args()


def content(value, flag):
    """The text of a SCHEMA / GRAMMAR argument: inline text, or @FILE (which `pie run` replaces by the
    file's text; the sandbox has no filesystem, so reading it here normally fails)."""
    if not value.startswith("@"):
        return value
    path = value[1:]
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        parser.error(f"{flag} {value}: an inferlet cannot read files (no filesystem in the sandbox); pass the "
                     f"{'schema' if flag == '--json-schema' else 'grammar'} inline, or launch with pie run, "
                     f"which replaces @FILE by the file's text")


if args.json_schema is not None:
    text = content(args.json_schema, "--json-schema")
    try:
        json.loads(text)
    except ValueError as e:
        parser.error(f"--json-schema: not JSON ({e}); give the schema text itself, or @FILE (for pie run "
                     f"to expand)")
    grammar = Grammar.json_schema(text)
elif args.regex is not None:
    grammar = Grammar.regex(args.regex)
else:
    grammar = Grammar.ebnf(content(args.ebnf, "--ebnf"), args.root)

ctx = args.context()
print(ctx.generate(max_tokens=args.max_tokens, sampler=args.sampler(), grammar=grammar))
ctx.free()
