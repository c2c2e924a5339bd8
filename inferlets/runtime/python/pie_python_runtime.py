"""The shared Python runtime component (world `python-runtime`): runs a user's `.py` source as a script.

componentize-py bundles only the modules imported when the component is built, so every standard-library
module an inferlet may import is imported here, at the top.
"""

# Bundled standard library (an inferlet may import these).
import argparse  # noqa: F401
import base64  # noqa: F401
import collections  # noqa: F401
import dataclasses  # noqa: F401
import functools  # noqa: F401
import hashlib  # noqa: F401
import heapq  # noqa: F401
import io
import itertools  # noqa: F401
import json  # noqa: F401
import math  # noqa: F401
import random  # noqa: F401
import re  # noqa: F401
import statistics  # noqa: F401
import string  # noqa: F401
import sys
import textwrap  # noqa: F401
import time  # noqa: F401
import traceback
import typing  # noqa: F401
import enum  # noqa: F401
import copy  # noqa: F401
import bisect  # noqa: F401
import operator  # noqa: F401
import abc  # noqa: F401
import contextlib  # noqa: F401
import fractions  # noqa: F401
import decimal  # noqa: F401
import datetime  # noqa: F401
import gettext  # noqa: F401  (argparse imports it lazily)
import locale  # noqa: F401  (gettext imports it lazily)
import os  # noqa: F401
import pprint  # noqa: F401
import shutil  # noqa: F401  (argparse's help formatter)
import struct  # noqa: F401
import types  # noqa: F401
import uuid  # noqa: F401
import warnings  # noqa: F401
import weakref  # noqa: F401

import inferlet  # noqa: F401  (the SDK)
import inferlet.branches  # noqa: F401  (its helpers for fork-based inferlets)
import inferlet.sliding  # noqa: F401  (attention_sink, windowed_attention)
import inferlet.tool_calls  # noqa: F401  (openai_chat: tools in the prompt, calls under their grammar)
import wit_world
from componentize_py_types import Err
from wit_world.imports import runtime


class _HostWriter(io.TextIOBase):
    """sys.stdout / sys.stderr: every write goes to a host call (send to the client, or the log)."""

    def __init__(self, sink) -> None:
        self._sink = sink

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if s:
            self._sink(s)
        return len(s)

    def flush(self) -> None:
        pass


def _one_line(exc: BaseException, filename: str) -> str:
    """`Type: message (file:line)` of the innermost frame in the user's file."""
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == filename:
            where = f" ({filename}:{frame.lineno})"
    if isinstance(exc, SyntaxError) and exc.lineno:
        where = f" ({filename}:{exc.lineno})"
    return f"{type(exc).__name__}: {exc}{where}"


def run_script(source: str, filename: str) -> None:
    """Runs `source` as the script `filename` (`__name__ == "__main__"`): sys.argv = [filename] + the launch
    arguments, print() -> runtime.send, stderr -> runtime.log. SystemExit(0 / None) is success; any other
    exit or exception raises Err(one line), the traceback goes to the log. Standalone components built by
    `pie build` call this too, so both ways of running a script behave the same."""
    sys.argv = [filename] + list(runtime.arguments())
    sys.stdout = _HostWriter(runtime.send)
    sys.stderr = _HostWriter(runtime.log)
    namespace = {"__name__": "__main__", "__file__": filename, "__builtins__": __builtins__}
    try:
        exec(compile(source, filename, "exec"), namespace)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise Err(f"exited with status {e.code}")
    except Err:
        raise
    except BaseException as e:
        runtime.log("".join(traceback.format_exception(e)))
        raise Err(_one_line(e, filename))


class WitWorld(wit_world.WitWorld):
    def exec_source(self, source: str, filename: str) -> None:
        run_script(source, filename)
