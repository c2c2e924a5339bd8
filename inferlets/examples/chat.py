"""Multi-turn chat over the client's messages (`pie run chat`: one line of stdin per user turn; the
reply to each is printed). The KV cache of earlier turns is reused.

    printf 'What is the capital of France?\\nAnd of Germany?\\n' | pie run chat -- --temperature 0
"""

import argparse

import inferlet

parser = argparse.ArgumentParser(prog="chat")
parser.add_argument("--max-tokens", type=int, default=256, help="per reply")
parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
parser.add_argument("--seed", type=int, default=None)
parser.add_argument("--system", default=None, help="system message")
args = parser.parse_args()

chat = inferlet.Chat(system=args.system)
while True:
    line = inferlet.receive()
    if line == "":  # the client closed its input
        break
    if not line.strip():
        continue
    print(chat.say(line.strip(), max_tokens=args.max_tokens, sampler=inferlet.sample(args.temperature, seed=args.seed)))
chat.free()
