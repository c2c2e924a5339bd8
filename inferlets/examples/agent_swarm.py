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
from inferlet import Subscription, broadcast, store
from inferlet.branches import numbered_lines


def chat(system, user, guide):
    """A context holding `system` (plus --guide) and `user`, in the assistant's turn."""
    ctx = inferlet.Context()
    ctx.system(system + ("\n\n" + guide if guide else ""))
    ctx.user(user)
    ctx.assistant()
    return ctx


def worker(args, swarm):
    me = args.worker_id or str(inferlet.instance_id())
    with Subscription(f"{swarm}/tasks") as tasks:  # before registering: no task can be missed
        store.set(f"{swarm}/workers/{me}", "ready")
        broadcast(f"{swarm}/join", me)
        while not (message := json.loads(tasks.receive())).get("stop"):
            if message.get("to") != me:
                continue
            with chat("Answer in one short sentence.", message["question"], args.guide) as ctx:
                reply = ctx.gen(max_tokens=args.max_tokens, stop=["\n"]).strip()
            result = {"task": message["task"], "worker": me, "question": message["question"], "answer": reply}
            store.set(f"{swarm}/answers/{message['task']}", json.dumps(result))
            broadcast(f"{swarm}/results", json.dumps(result))
            print(f"task {message['task']}: {message['question']} -> {reply}")


def coordinator(args, swarm):
    results = Subscription(f"{swarm}/results")
    with Subscription(f"{swarm}/join") as joins:  # registered workers are in the store, later ones will join
        while len(workers := sorted(k.rsplit("/", 1)[1] for k in store.keys(f"{swarm}/workers/"))) < args.workers:
            joins.receive()
    questions = args.subtask
    if not questions:  # `--workers` sub-questions written by the model
        with chat(f"Split the question into {args.workers} simpler questions, one per line.", args.question,
                  args.guide) as ctx:
            questions = numbered_lines(ctx, args.workers, args.max_tokens, inferlet.greedy())
    for task, question in enumerate(questions):
        broadcast(f"{swarm}/tasks", json.dumps({"task": task, "to": workers[task % args.workers], "question": question}))
    contributions = {}
    while len(contributions) < len(questions):
        result = json.loads(results.receive())
        contributions[result["task"]] = result
    broadcast(f"{swarm}/tasks", json.dumps({"stop": True}))
    results.close()
    for key in store.keys(f"{swarm}/"):
        store.delete(key)
    contributions = [contributions[t] for t in range(len(questions))]
    notes = "\n".join(f"- {c['question']} {c['answer']}" for c in contributions)
    with chat("Combine the notes into one short answer.", f"Question: {args.question}\nNotes:\n{notes}", args.guide) as ctx:
        summary = ctx.gen(max_tokens=args.summary_tokens).strip()
    if args.json:
        print(json.dumps({"question": args.question, "contributions": contributions, "summary": summary}))
        return
    for c in contributions:
        print(f"[worker {c['worker']}] {c['question']} -> {c['answer']}")
    print(f"Summary: {summary}")


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
if args.role == "coordinator" and (args.question is None or args.workers < 1):
    parser.error("a coordinator needs --question and --workers >= 1")
(coordinator if args.role == "coordinator" else worker)(args, args.swarm)
