"""Sends COUNT messages of SIZE characters (a client that does not read them is a slow client)."""
import sys

import inferlet

count, size = int(sys.argv[1]), int(sys.argv[2])
block = "x" * size
for _ in range(count):
    inferlet.send(block)
