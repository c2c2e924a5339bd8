"""Holds KV pages and generates on a generation stream (the host runs the loop), sending each chunk of
tokens as it comes, until it is terminated."""
import inferlet

ctx = inferlet.Context()
ctx.fill(inferlet.chat_prompt([{"role": "user", "content": "Count from one to one thousand."}]))
inferlet.send("started")
for chunk in ctx.stream(max_tokens=6000, ignore_eos=True):
    inferlet.send(inferlet.decode(chunk.tokens) or " ")
