"""The 200-client test's inferlet: sends its argument back; with --generate, one greedy token first."""
import sys

import inferlet

if "--generate" in sys.argv:
    ctx = inferlet.Context()
    ctx.fill(inferlet.chat_prompt([{"role": "user", "content": "Say hi."}]))
    ctx.generate(max_tokens=1, sampler=inferlet.greedy())
inferlet.send("got " + sys.argv[1])
