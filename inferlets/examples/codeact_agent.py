"""CodeAct agent: the model acts by writing Python, which runs inside this sandboxed inferlet; the code's
printed output is the observation it reads before answering.

One context holds the transcript (a one-example few-shot prompt shows the format). The model writes a
```python block (a regex grammar keeps it from writing anything but code up to the closing fence); the
code is compiled and run with `exec` in a fresh namespace whose builtins are a restricted set (no `open`,
`input`, `exec`, `eval`, `compile`, `globals`, `breakpoint`...), whose `import` admits only pure-computation
modules (math, statistics, fractions, decimal, itertools, functools, collections, json, re, string,
random, datetime, heapq, bisect, operator), and under a line budget (`--max-lines`, enforced with
sys.settrace) so a runaway loop becomes an error instead of stalling the instance. What it prints (or the
error, as "ExceptionType: message") is filled in as "Output: ..."; after an error the model may write
fixed code (up to `--max-steps` blocks), then it writes "Final answer: ...".

The restricted namespace is a convenience, not the security boundary: the guest itself is the sandbox
(WebAssembly, no filesystem, no sockets, HTTP only to allow-listed hosts), so code that escapes the
namespace still cannot reach the host.

    pie run codeact_agent -- --task "What is the sum of the squares of 1 to 10?"
    pie run codeact_agent -- --task "Sum of squares to 10?" --script "print(sum(i * i for i in range(11)))"

Arguments: --task (required), --max-steps (2), --code-tokens (96), --answer-tokens (24), --max-lines
(100000), --max-output (characters of output kept, 500), --script CODE (repeatable: run exactly these
blocks instead of the model's), --json.

Output: the transcript ("Code:", the code, "Output: ...", then "Final answer: ...", also the instance's
return value). With --json, one JSON line instead: {"steps": [{"code", "output", "error"}], "answer"}.

API: Context (fill, generate with Grammar.regex, free), runtime.set-return; exec / compile in the guest.
"""

import argparse
import builtins
import contextlib
import io
import json
import sys

import inferlet
from inferlet import Context, Grammar

SAFE_BUILTINS = [
    "abs", "all", "any", "ascii", "bin", "bool", "bytearray", "bytes", "callable", "chr", "complex", "dict",
    "divmod", "enumerate", "filter", "float", "format", "frozenset", "hasattr", "hash", "hex", "int",
    "isinstance", "issubclass", "iter", "len", "list", "map", "max", "min", "next", "object", "oct", "ord",
    "pow", "print", "range", "repr", "reversed", "round", "set", "slice", "sorted", "str", "sum", "tuple",
    "type", "zip", "ArithmeticError", "AssertionError", "AttributeError", "Exception", "IndexError",
    "KeyError", "LookupError", "NameError", "OverflowError", "RuntimeError", "StopIteration", "TypeError",
    "ValueError", "ZeroDivisionError", "True", "False", "None",
]
ALLOWED_MODULES = {"math", "statistics", "fractions", "decimal", "itertools", "functools", "collections", "json",
                   "re", "string", "random", "datetime", "heapq", "bisect", "operator"}

EXAMPLE_TASK = "What is 2 to the power of 10?"
EXAMPLE_REPLY = "```python\nprint(2 ** 10)\n```\nOutput: 1024\nFinal answer: 1024"


class LineBudgetExceeded(Exception):
    pass


def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level != 0 or name.partition(".")[0] not in ALLOWED_MODULES:
        raise ImportError(f"import of {name!r} is not allowed here")
    return builtins.__import__(name, globals, locals, fromlist, level)


def run_code(code, max_lines, max_output):
    """(printed output, error or None) of `code`, run in a fresh restricted namespace."""
    env = {"__builtins__": {name: getattr(builtins, name) for name in SAFE_BUILTINS} | {"__import__": guarded_import},
           "__name__": "__agent__"}
    out = io.StringIO()
    lines = 0

    def tracer(frame, event, arg):
        nonlocal lines
        if event == "line":
            lines += 1
            if lines > max_lines:
                raise LineBudgetExceeded(f"the code ran more than {max_lines} lines")
        return tracer

    error = None
    try:
        program = compile(code, "<agent>", "exec")
        with contextlib.redirect_stdout(out):
            sys.settrace(tracer)
            try:
                exec(program, env)
            finally:
                sys.settrace(None)
    except BaseException as e:  # the code's own SystemExit etc. included: it must not end the inferlet
        error = f"{type(e).__name__}: {e}"
    return out.getvalue()[:max_output], error


def main():
    parser = argparse.ArgumentParser(prog="codeact_agent")
    parser.add_argument("--task", required=True)
    parser.add_argument("--max-steps", type=int, default=2, help="code blocks at most")
    parser.add_argument("--code-tokens", type=int, default=96)
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument("--max-lines", type=int, default=100_000, help="lines one block may run")
    parser.add_argument("--max-output", type=int, default=500, help="characters of output kept")
    parser.add_argument("--script", action="append", default=[], help="a code block to run (repeatable)")
    parser.add_argument("--guide", default="", help="more instructions for the system message")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    ctx = Context()
    ctx.fill(inferlet.chat_prompt([
        {"role": "system", "content": "You solve tasks by writing Python code. Reply with one ```python code "
                                      "block that prints the result; you will be shown its output. Then "
                                      "give the final answer." + ("\n\n" + args.guide if args.guide else "")},
        {"role": "user", "content": EXAMPLE_TASK},
        {"role": "assistant", "content": EXAMPLE_REPLY},
        {"role": "user", "content": args.task}]))
    code_grammar = Grammar.regex("[^`]+```")

    def emit(text):
        if not args.json:
            print(text)

    steps = []
    scripted = bool(args.script)
    blocks = len(args.script) if scripted else args.max_steps
    for step in range(blocks):
        ctx.fill("```python\n")
        if scripted:
            code = args.script[step].rstrip("\n") + "\n"
            ctx.fill(code + "```")
        else:
            code = ctx.generate(max_tokens=args.code_tokens, grammar=code_grammar)
            if code.endswith("```"):
                code = code[:-3]
            else:  # cut off by the token limit
                ctx.fill("\n```")
        output, error = run_code(code, args.max_lines, args.max_output)
        observation = output.strip() if error is None else (output + error).strip()
        steps.append({"code": code, "output": output, "error": error})
        emit(f"Code:\n{code.rstrip()}\nOutput: {observation}")
        ctx.fill(f"\nOutput: {observation}\n")
        if scripted:
            continue
        if error is None:
            break
        if step + 1 < blocks:
            ctx.fill("The code failed; here is a fixed version.\n")
    ctx.fill("Final answer:")
    answer = ctx.generate(max_tokens=args.answer_tokens, sampler=inferlet.greedy(), stop=["\n"]).strip()
    ctx.free()
    inferlet.set_return(answer)
    if args.json:
        print(json.dumps({"steps": steps, "answer": answer}))
    else:
        print(f"Final answer: {answer}")


main()
