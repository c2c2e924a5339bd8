"""Text completion: one prompt in, the generated text out (nothing else is printed).

    pie run text_completion -- --prompt "What is the capital of France?" --max-tokens 32 --temperature 0

The host runs the decode loop (a generation stream); --per-token runs it here, one pass per token
(the same tokens: the programmability benchmark measures both).
"""

import inferlet

parser = inferlet.ArgParser("text_completion")
parser.add_argument("--per-token", action="store_true",
                    help="run the decode loop in this program, one pass per token, instead of on the host")
args = parser.parse_args()
on_token = (lambda token: None) if args.per_token else None  # a callback asks for per-token control
print(args.context().generate(**args.generation(), on_token=on_token))
