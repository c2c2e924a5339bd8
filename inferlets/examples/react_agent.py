"""ReAct agent: a Thought / Action / Observation loop whose tools are HTTP endpoints, called from inside the
inferlet (`http.fetch`; the server's configuration must allow their hosts).

One context holds the whole transcript, so each turn computes only what it adds. Every step the model
writes "Thought: ..." (one line, held to that by a regex grammar) and then "Action: tool[argument]", where a
second grammar allows only the configured tools (and `finish` once `--min-tool-calls` calls were made; at
the last step only `finish`). The tool is called with `POST <its URL>` and the argument as the body; the
reply (or the error: a host not on the allow-list, a refused connection, an HTTP error status) is filled in
as "Observation: ..." and the loop goes on until `finish[answer]` or `--max-steps`. With `--script`, the
actions are taken from the script instead of the model (the thoughts are still generated), which makes a
run reproducible.

    pie run react_agent -- --question "What is 17 * 23?" --tools-url http://127.0.0.1:8000
    pie run react_agent -- --question "What is 17 * 23?" --tool calculator=http://127.0.0.1:8000/calculator \\
        --script "calculator[17 * 23]" --script "finish[391]"

Arguments: --question (required), --tools-url BASE (adds calculator=BASE/calculator and
lookup=BASE/lookup), --tool NAME=URL (repeatable), --max-steps (4), --min-tool-calls (1), --thought-tokens
(32), --action-tokens (24), --script ACTION (repeatable: "tool[argument]"), --json.

Output: the transcript, one line per Thought / Action / Observation, then "Answer: ..." (also the
instance's return value). With --json, one JSON line instead: {"steps": [{"thought", "action", "argument",
"observation"}], "answer", "tool_calls"}.

API: Context (fill, generate with Grammar.regex, free), http.fetch (Request record; Err on failure),
runtime.set-return.
"""

import argparse
import json
import re

import inferlet

DESCRIPTIONS = {
    "calculator": "evaluates an arithmetic expression, e.g. calculator[2 * (3 + 4)]",
    "lookup": "looks a term up in an encyclopedia, e.g. lookup[Paris]",
    "finish": "gives the final answer, e.g. finish[42]",
}
MAX_OBSERVATION = 300  # characters of a tool reply kept in the transcript


def main():
    parser = argparse.ArgumentParser(prog="react_agent")
    parser.add_argument("--question", required=True)
    parser.add_argument("--tools-url", default=None, help="base URL of a server with /calculator and /lookup")
    parser.add_argument("--tool", action="append", default=[], help="NAME=URL (repeatable)")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--min-tool-calls", type=int, default=1)
    parser.add_argument("--thought-tokens", type=int, default=32)
    parser.add_argument("--action-tokens", type=int, default=24)
    parser.add_argument("--script", action="append", default=[], help="an action to take: tool[argument]")
    parser.add_argument("--guide", default="", help="more instructions for the system message (e.g. a tools manual)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    base = args.tools_url.rstrip("/") if args.tools_url else None
    specs = ([f"calculator={base}/calculator", f"lookup={base}/lookup"] if base else []) + args.tool
    tools = {}
    for spec in specs:
        name, sep, url = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name == "finish":
            parser.error(f"--tool {spec!r}: expected NAME=URL (NAME a word other than finish)")
        tools[name] = inferlet.http_tool(name, url, DESCRIPTIONS.get(name, "a tool at " + url))
    if not tools and not args.script:
        parser.error("no tools: give --tools-url or --tool NAME=URL")
    script = [re.fullmatch(r"\s*(\w+)\[(.*)\]\s*", action, re.S) for action in args.script]
    if None in script:
        parser.error(f"--script {args.script[script.index(None)]!r}: expected tool[argument]")

    listing = "\n".join(f"- {name}[...]: {tool.description}" for name, tool in tools.items())
    ctx = inferlet.Context()
    ctx.system("Answer the question by thinking step by step and using tools. Available actions:\n"
               f"{listing}\n- finish[answer]: gives the final answer\nUse exactly this format:\nThought: one line of "
               "reasoning\nAction: tool[argument]\nObservation: the tool's reply\n... (repeat) ...\nThought: I know "
               "the answer\nAction: finish[answer]" + ("\n\n" + args.guide if args.guide else ""))
    ctx.user(args.question)
    ctx.assistant()
    steps, answer, calls = [], None, 0
    for step in range(args.max_steps):
        ctx += "Thought:"
        thought = ctx.gen(max_tokens=args.thought_tokens, regex="[^\\n]+\\n")
        if not thought.endswith("\n"):  # cut off by the token limit
            ctx += "\n"
        ctx += "Action: "
        if script:
            name, argument = script.pop(0).groups()
            ctx += f"{name}[{argument}]"
        else:  # the configured tools (finish once enough were called; only finish at the last step)
            allowed = ["finish"] if step == args.max_steps - 1 else \
                list(tools) + (["finish"] if calls >= args.min_tool_calls else [])
            text = ctx.gen(max_tokens=args.action_tokens, regex=f"({'|'.join(map(re.escape, allowed))})\\[[^\\]\\n]+\\]")
            m = re.fullmatch(r"(\w+)\[(.*)\]", text, re.S)
            name, argument = m.groups() if m else (allowed[0], text.partition("[")[2])
            if m is None:  # cut off by the token limit
                ctx += "]"
        steps.append({"thought": thought.strip(), "action": name, "argument": argument, "observation": None})
        if name == "finish":
            answer = argument.strip()
            break
        calls += name in tools
        observation = tools[name](input=argument) if name in tools else f"error: no tool named {name!r}"
        steps[-1]["observation"] = observation
        ctx += f"\nObservation: {observation}\n"
    if answer is None:  # out of steps
        ctx += "Answer:"
        answer = ctx.gen(max_tokens=args.action_tokens, stop=["\n"]).strip()
    ctx.free()
    inferlet.set_return(answer)
    if args.json:
        print(json.dumps({"steps": steps, "answer": answer, "tool_calls": calls}))
        return
    for s in steps:
        print(f"Thought: {s['thought']}\nAction: {s['action']}[{s['argument']}]" +
              ("" if s["observation"] is None else f"\nObservation: {s['observation']}"))
    print(f"Answer: {answer}")

main()
