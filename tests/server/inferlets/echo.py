"""Greets, then echoes every client message until the end of input; returns "bye"."""
import sys

import inferlet

inferlet.send("hello " + " ".join(sys.argv[1:]))
while True:
    message = inferlet.receive()
    if message == "":
        break
    inferlet.send("echo:" + message)
inferlet.log("input closed")
inferlet.set_return("bye")
