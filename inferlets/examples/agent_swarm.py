"""Agent swarm: instances that cooperate through publish / subscribe messaging and the shared key-value
store. One coordinator splits a question into sub-questions and hands them to workers (separate instances,
launched alongside it); each worker answers its share with the model; the coordinator collects every answer
and writes a summary over all of them.

Protocol (every topic and key starts with the swarm's name, `--swarm`):
- a worker subscribes to "<swarm>/tasks", then registers: kv-store "<swarm>/workers/<id>" and a broadcast
  on "<swarm>/join" (its id). The coordinator subscribes to "<swarm>/join" and "<swarm>/results" before
  it looks at the registrations, so it misses no worker whichever of them starts first;
- the coordinator waits for `--workers` registrations, then broadcasts one task message per sub-question
  on "<swarm>/tasks" ({"task", "to", "question"}, round robin over the workers);
- a worker answers the tasks addressed to it and broadcasts {"task", "worker", "question", "answer"} on
  "<swarm>/results" (and stores it under "<swarm>/answers/<task>"), until {"stop": true};
- with every answer in, the coordinator broadcasts stop, removes the swarm's keys, fills the question and
  all answers into one context and generates the summary.
The sub-questions are `--subtask` (repeatable) or, without them, written by the coordinator's model
(`--workers` numbered one-line questions, held to that format by a regex grammar).

    pie run agent_swarm -- --role coordinator --swarm trip --workers 2 --question "Plan a day in Paris." &
    pie run agent_swarm -- --role worker --swarm trip & pie run agent_swarm -- --role worker --swarm trip

Arguments: --role coordinator|worker (required), --swarm (topic and key prefix, "swarm"), --workers
(coordinator: how many to wait for, 2), --question (coordinator, required), --subtask (coordinator,
repeatable), --worker-id (worker; default: its instance id), --max-tokens (per answer, 32),
--summary-tokens (48), --json.

Output: the coordinator prints "[worker W] sub-question -> answer" for every sub-question, then "Summary:
..." (with --json one JSON line: {"question", "contributions": [{"task", "worker", "question", "answer"}],
"summary"}); a worker prints each task it answered ("task N: question -> answer").

API: messaging.subscribe / broadcast / receive / unsubscribe, kv-store get / set / delete / list-keys,
Context (fill, generate with Grammar.regex, free), runtime.instance-id.
"""

import argparse
import json

import inferlet
from inferlet import Context
from inferlet.branches import numbered_lines

MSG = inferlet.raw.messaging
STORE = inferlet.raw.kv_store
GUIDE = ""  # --guide: more instructions for every system message (e.g. a manual the agents share)


def system(text):
    return {"role": "system", "content": text + ("\n\n" + GUIDE if GUIDE else "")}


def answer(question, max_tokens):
    ctx = Context()
    ctx.fill(inferlet.chat_prompt([system("Answer in one short sentence."), {"role": "user", "content": question}]))
    text = ctx.generate(max_tokens=max_tokens, sampler=inferlet.greedy(), stop=["\n"]).strip()
    ctx.free()
    return text


def worker(args):
    swarm = args.swarm
    me = args.worker_id or str(inferlet.instance_id())
    tasks = MSG.subscribe(f"{swarm}/tasks")  # before registering: no task can be missed
    STORE.set(f"{swarm}/workers/{me}", "ready")
    MSG.broadcast(f"{swarm}/join", me)
    while True:
        message = json.loads(MSG.receive(tasks))
        if message.get("stop"):
            break
        if message.get("to") != me:
            continue
        reply = answer(message["question"], args.max_tokens)
        result = {"task": message["task"], "worker": me, "question": message["question"], "answer": reply}
        STORE.set(f"{swarm}/answers/{message['task']}", json.dumps(result))
        MSG.broadcast(f"{swarm}/results", json.dumps(result))
        print(f"task {message['task']}: {message['question']} -> {reply}")
    MSG.unsubscribe(tasks)




def split(question, count, max_tokens):
    """`count` sub-questions written by the model."""
    ctx = Context()
    ctx.fill(inferlet.chat_prompt([
        system(f"Split the question into {count} simpler questions, one per line."),
        {"role": "user", "content": question}]))
    questions = numbered_lines(ctx, count, max_tokens, inferlet.greedy())
    ctx.free()
    return questions


def coordinator(args):
    swarm = args.swarm
    joins = MSG.subscribe(f"{swarm}/join")
    results = MSG.subscribe(f"{swarm}/results")
    # Wait for the workers: those registered already are in the store, later ones will broadcast on join.
    while True:
        workers = sorted(k.rsplit("/", 1)[1] for k in STORE.list_keys(f"{swarm}/workers/"))
        if len(workers) >= args.workers:
            break
        MSG.receive(joins)
    workers = workers[:args.workers]
    MSG.unsubscribe(joins)

    questions = args.subtask or split(args.question, args.workers, args.max_tokens)
    for task, question in enumerate(questions):
        MSG.broadcast(f"{swarm}/tasks", json.dumps({"task": task, "to": workers[task % len(workers)],
                                                     "question": question}))
    contributions = {}
    while len(contributions) < len(questions):
        result = json.loads(MSG.receive(results))
        contributions[result["task"]] = result
    MSG.broadcast(f"{swarm}/tasks", json.dumps({"stop": True}))
    MSG.unsubscribe(results)
    for key in STORE.list_keys(f"{swarm}/"):
        STORE.delete(key)
    contributions = [contributions[t] for t in range(len(questions))]

    ctx = Context()
    notes = "\n".join(f"- {c['question']} {c['answer']}" for c in contributions)
    ctx.fill(inferlet.chat_prompt([
        system("Combine the notes into one short answer."),
        {"role": "user", "content": f"Question: {args.question}\nNotes:\n{notes}"}]))
    summary = ctx.generate(max_tokens=args.summary_tokens, sampler=inferlet.greedy()).strip()
    ctx.free()
    if args.json:
        print(json.dumps({"question": args.question, "contributions": contributions, "summary": summary}))
    else:
        for c in contributions:
            print(f"[worker {c['worker']}] {c['question']} -> {c['answer']}")
        print(f"Summary: {summary}")


def main():
    parser = argparse.ArgumentParser(prog="agent_swarm")
    parser.add_argument("--role", choices=["coordinator", "worker"], required=True)
    parser.add_argument("--swarm", default="swarm")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--question", default=None)
    parser.add_argument("--subtask", action="append", default=[])
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--summary-tokens", type=int, default=48)
    parser.add_argument("--guide", default="", help="more instructions for every system message")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    global GUIDE
    GUIDE = args.guide
    if args.role == "coordinator":
        if args.question is None or args.workers < 1:
            parser.error("a coordinator needs --question and --workers >= 1")
        coordinator(args)
    else:
        worker(args)


main()
