"""Text completion: one prompt in, the generated text out (nothing else is printed).

    pie run text_completion -- --prompt "What is the capital of France?" --max-tokens 32 --temperature 0

The host runs the decode loop (a generation stream); --per-token runs it here, one pass per token
(the same tokens: the programmability benchmark measures both).
"""

import argparse

import inferlet

parser = argparse.ArgumentParser(prog="text_completion")
parser.add_argument("--prompt", required=True)
parser.add_argument("--max-tokens", type=int, default=256)
parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
parser.add_argument("--top-p", type=float, default=1.0)
parser.add_argument("--top-k", type=int, default=0)
parser.add_argument("--min-p", type=float, default=0.0)
parser.add_argument("--seed", type=int, default=None)
parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
parser.add_argument("--system", default=None, help="system message")
parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
parser.add_argument("--ignore-eos", action="store_true", help="generate max-tokens tokens even past EOS")
parser.add_argument("--per-token", action="store_true",
                    help="run the decode loop in this program, one pass per token, instead of on the host")
args = parser.parse_args()

ctx = inferlet.Context()
if args.raw or not inferlet.model_facts().has_chat_template:
    ctx.fill_tokens(inferlet.encode(args.prompt if args.system is None else f"{args.system}\n\n{args.prompt}"))
else:
    messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
               [{"role": "user", "content": args.prompt}]
    ctx.fill(inferlet.chat_prompt(messages))
sampler = inferlet.sample(args.temperature, args.top_k, args.top_p, args.min_p, args.seed)
on_token = (lambda token: None) if args.per_token else None  # a callback asks for per-token control
print(ctx.generate(max_tokens=args.max_tokens, sampler=sampler, stop=args.stop, ignore_eos=args.ignore_eos,
                   on_token=on_token))
