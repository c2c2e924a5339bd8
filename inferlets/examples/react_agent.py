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
from inferlet import Context, Grammar
from componentize_py_types import Err

HTTP = inferlet.raw.http

DESCRIPTIONS = {
    "calculator": "evaluates an arithmetic expression, e.g. calculator[2 * (3 + 4)]",
    "lookup": "looks a term up in an encyclopedia, e.g. lookup[Paris]",
    "finish": "gives the final answer, e.g. finish[42]",
}
MAX_OBSERVATION = 300  # characters of a tool reply kept in the transcript


def call_tool(url, argument):
    """The observation of one tool call: the reply's text, or what went wrong (never an exception)."""
    try:
        reply = HTTP.fetch(HTTP.Request(method="POST", url=url, headers=[("Content-Type", "text/plain")],
                                        body=argument.encode()))
    except Err as e:
        return f"error: {e.value}"
    text = bytes(reply.body).decode("utf-8", "replace").strip()
    if reply.status >= 400:
        return f"error: HTTP {reply.status} {text}"[:MAX_OBSERVATION]
    return " ".join(text.split())[:MAX_OBSERVATION] or "(empty reply)"


def action_grammar(names):
    alternatives = "|".join(re.escape(n) for n in names)
    return Grammar.regex(f"({alternatives})\\[[^\\]\\n]+\\]")


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

    tools = {}
    if args.tools_url:
        base = args.tools_url.rstrip("/")
        tools.update({"calculator": f"{base}/calculator", "lookup": f"{base}/lookup"})
    for spec in args.tool:
        name, sep, url = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name == "finish":
            parser.error(f"--tool {spec!r}: expected NAME=URL (NAME a word other than finish)")
        tools[name] = url
    if not tools and not args.script:
        parser.error("no tools: give --tools-url or --tool NAME=URL")
    script = []
    for action in args.script:
        m = re.fullmatch(r"\s*(\w+)\[(.*)\]\s*", action, re.S)
        if m is None:
            parser.error(f"--script {action!r}: expected tool[argument]")
        script.append((m.group(1), m.group(2)))

    listing = "\n".join(f"- {name}[...]: {DESCRIPTIONS.get(name, 'a tool at ' + url)}" for name, url in tools.items())
    system = ("Answer the question by thinking step by step and using tools. Available actions:\n"
              f"{listing}\n- finish[answer]: {DESCRIPTIONS['finish'].split(', e.g.')[0]}\n"
              "Use exactly this format:\nThought: one line of reasoning\nAction: tool[argument]\n"
              "Observation: the tool's reply\n... (repeat) ...\nThought: I know the answer\nAction: finish[answer]")
    if args.guide:
        system += "\n\n" + args.guide
    ctx = Context()
    ctx.fill(inferlet.chat_prompt([{"role": "system", "content": system},
                                   {"role": "user", "content": args.question}]))
    thought_grammar = Grammar.regex("[^\\n]+\\n")

    def emit(line):
        if not args.json:
            print(line)

    steps, answer, calls = [], None, 0
    for step in range(args.max_steps):
        ctx.fill("Thought:")
        thought = ctx.generate(max_tokens=args.thought_tokens, grammar=thought_grammar)
        if not thought.endswith("\n"):  # cut off by the token limit
            ctx.fill("\n")
        thought = thought.strip()
        emit(f"Thought: {thought}")
        ctx.fill("Action: ")
        if script:
            name, argument = script.pop(0)
            ctx.fill(f"{name}[{argument}]")
        else:
            last = step == args.max_steps - 1
            allowed = ["finish"] if last else list(tools) + (["finish"] if calls >= args.min_tool_calls else [])
            text = ctx.generate(max_tokens=args.action_tokens, grammar=action_grammar(allowed))
            m = re.fullmatch(r"(\w+)\[(.*)\]", text, re.S)
            if m is None:  # cut off by the token limit
                name, argument = (allowed[0], text.partition("[")[2])
                ctx.fill("]")
            else:
                name, argument = m.group(1), m.group(2)
        emit(f"Action: {name}[{argument}]")
        record = {"thought": thought, "action": name, "argument": argument, "observation": None}
        steps.append(record)
        if name == "finish":
            answer = argument.strip()
            break
        if name in tools:
            observation = call_tool(tools[name], argument)
            calls += 1
        else:
            observation = f"error: no tool named {name!r}"
        record["observation"] = observation
        emit(f"Observation: {observation}")
        ctx.fill(f"\nObservation: {observation}\n")
    if answer is None:  # out of steps
        ctx.fill("Answer:")
        answer = ctx.generate(max_tokens=args.action_tokens, sampler=inferlet.greedy(), stop=["\n"]).strip()
    ctx.free()
    inferlet.set_return(answer)
    if args.json:
        print(json.dumps({"steps": steps, "answer": answer, "tool_calls": calls}))
    else:
        print(f"Answer: {answer}")


main()
