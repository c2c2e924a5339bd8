"""Holds KV pages and generates (greedy) token by token, sending each, until it is terminated."""
import inferlet

ctx = inferlet.Context()
ctx.fill(inferlet.chat_prompt([{"role": "user", "content": "Count from one to one thousand."}]))
inferlet.send("started")
for _ in range(100000):
    token = ctx.next_token(inferlet.greedy())
    ctx.fill_tokens([token])
    inferlet.send(inferlet.decode([token]))
