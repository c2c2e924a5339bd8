"""react_agent (tools over http.fetch to an allow-listed loopback server), codeact_agent (model-written
Python run inside the sandboxed guest) and agent_swarm (instances cooperating over messaging and the
key-value store)."""

import ast
import http.server
import json
import operator
import re
import threading
import uuid

import pytest

FACTS = {"paris": "Paris is the capital of France; about 2.1 million people live there."}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def arithmetic(node):
    """The value of an arithmetic expression's AST (numbers and + - * / ** only)."""
    if isinstance(node, ast.Expression):
        return arithmetic(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](arithmetic(node.left), arithmetic(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](arithmetic(node.operand))
    raise ValueError("not an arithmetic expression")


class _Tools(http.server.BaseHTTPRequestHandler):
    """POST /calculator (body: an expression) and POST /lookup (body: a term); every request is recorded."""

    def do_POST(self):
        arg = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        self.server.seen.append((self.path, arg))
        try:
            if self.path == "/calculator":
                status, reply = 200, str(arithmetic(ast.parse(arg, mode="eval")))
            elif self.path == "/lookup":
                status, reply = 200, FACTS.get(arg.strip().lower(), f"no entry for {arg.strip()}")
            else:
                status, reply = 404, "no such tool"
        except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as e:
            status, reply = 400, f"bad expression: {e}"
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def tools():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Tools)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# ---- react_agent ----------------------------------------------------------------------------------------

def test_react_script_calls_tools_over_http_and_reports_errors_as_observations(measure, tools):
    port = tools.server_address[1]
    base = f"http://127.0.0.1:{port}"
    r = measure("react_agent", "--question", "What is 17 * 23?", "--tools-url", base,
                "--tool", f"weather=http://localhost:{port}/weather",  # not on the allow-list
                "--tool", "dead=http://127.0.0.1:1/dead",  # allowed, but nothing listens there
                "--script", "calculator[17 * 23]", "--script", "weather[Paris]", "--script", "dead[ping]",
                "--script", "lookup[Paris]", "--script", "finish[391]",
                "--max-steps", 5, "--thought-tokens", 6, "--json",
                http_allow=[f"127.0.0.1:{port}", "127.0.0.1:1"])
    result = r.json()
    # The allowed tool server saw exactly the calls to it, with the scripted arguments.
    assert tools.seen == [("/calculator", "17 * 23"), ("/lookup", "Paris")]
    steps = result["steps"]
    assert [(s["action"], s["argument"]) for s in steps] == [
        ("calculator", "17 * 23"), ("weather", "Paris"), ("dead", "ping"), ("lookup", "Paris"), ("finish", "391")]
    assert steps[0]["observation"] == "391"
    assert steps[1]["observation"].startswith(f"error: req.url: host localhost:{port} is not on the allow-list")
    assert steps[2]["observation"].startswith("error: POST http://127.0.0.1:1/dead:")
    assert steps[3]["observation"] == FACTS["paris"]
    assert steps[4]["observation"] is None
    assert all(s["thought"] for s in steps)  # the model wrote every thought
    assert result["answer"] == "391" == r.return_value and result["tool_calls"] == 4


def test_react_grammar_mode_makes_the_model_call_tools(measure, tools):
    port = tools.server_address[1]
    r = measure("react_agent", "--question", "What is 17 * 23?", "--tools-url", f"http://127.0.0.1:{port}",
                "--max-steps", 3, "--min-tool-calls", 1, "--thought-tokens", 8, "--action-tokens", 12,
                http_allow=[f"127.0.0.1:{port}"])
    lines = r.output.splitlines()
    actions = [re.fullmatch(r"Action: (\w+)\[(.*)\]", l) for l in lines if l.startswith("Action:")]
    assert actions and all(actions), r.output  # every action is well formed: the grammar held it
    calls = [(f"/{m.group(1)}", m.group(2)) for m in actions if m.group(1) != "finish"]
    assert all(name in ("/calculator", "/lookup") for name, _ in calls)
    assert len(calls) >= 1  # --min-tool-calls: the model could not finish before calling a tool
    assert tools.seen == calls  # each call reached the server, in order
    observations = [l for l in lines if l.startswith("Observation: ")]
    assert len(observations) == len(calls)
    assert lines[-1].startswith("Answer: ") and r.return_value == lines[-1][len("Answer: "):]
    assert len(actions) <= 3


# ---- codeact_agent ----------------------------------------------------------------------------------------

ESCAPE = ("b = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'catch_warnings'][0]"
          ".__init__.__globals__['__builtins__']\n"
          "real_open = b['open'] if isinstance(b, dict) else b.open\n"
          "print(real_open('/etc/hostname').read())")


def test_codeact_runs_code_in_the_guest_within_the_sandbox(measure):
    blocks = ["import math\nprint(sum(i * i for i in range(11)), math.factorial(12))",
              "print(open('/etc/hostname').read())",
              "import os\nprint(os.listdir('/'))",
              "print('before')\nwhile True:\n    pass",
              ESCAPE]
    r = measure("codeact_agent", "--task", "Compute things.", *[a for b in blocks for a in ("--script", b)],
                "--max-lines", 20000, "--answer-tokens", 4, "--json")
    steps = r.json()["steps"]
    assert [s["code"] for s in steps] == [b + "\n" for b in blocks]
    assert steps[0] == {"code": blocks[0] + "\n", "output": "385 479001600\n", "error": None}
    assert steps[1]["error"] == "NameError: name 'open' is not defined"
    assert steps[2]["error"] == "ImportError: import of 'os' is not allowed here"
    assert steps[3]["output"] == "before\n"
    assert steps[3]["error"] == "LineBudgetExceeded: the code ran more than 20000 lines"
    # Code that escapes the restricted namespace still runs in the WebAssembly guest: no host files.
    assert steps[4]["error"].startswith("FileNotFoundError:") and "/etc/hostname" in steps[4]["error"]


def test_codeact_model_writes_code_that_is_executed(measure):
    r = measure("codeact_agent", "--task", "What is 1234 * 5678?", "--max-steps", 1, "--code-tokens", 32,
                "--answer-tokens", 8)
    m = re.fullmatch(r"Code:\n(.*)\nOutput: (.*)\nFinal answer: (.*)\n", r.output, re.S)
    assert m, r.output
    code, output, answer = m.groups()
    assert code.strip() and answer == r.return_value
    # A single print of arithmetic (what the model writes here): the output is the expression's value.
    p = re.fullmatch(r"print\((.*)\)", code.strip())
    assert p, code
    assert output == str(arithmetic(ast.parse(p.group(1), mode="eval")))


# ---- agent_swarm ------------------------------------------------------------------------------------------

def test_agent_swarm_aggregates_every_workers_answer(runtime, model, completion):
    swarm = f"swarm-{uuid.uuid4().hex[:8]}"
    subtasks = ["What is the capital of France?", "What is the capital of Italy?"]
    t0 = model.runner.num_forward_passes
    coordinator = runtime.launch("agent_swarm", ["--role", "coordinator", "--swarm", swarm, "--workers", "2",
                                                 "--question", "Which capitals are these?", "--max-tokens", "12",
                                                 "--summary-tokens", "16", "--json",
                                                 *[a for t in subtasks for a in ("--subtask", t)]])
    workers = [runtime.launch("agent_swarm", ["--role", "worker", "--swarm", swarm, "--worker-id", f"w{i}",
                                              "--max-tokens", "12"]) for i in range(2)]
    results = [w.wait(60) for w in workers]
    result = coordinator.wait(60)
    assert result.error is None and all(r.error is None for r in results), (result.error, [r.error for r in results])
    report = json.loads(result.output)
    contributions = report["contributions"]
    # every sub-question answered, by both workers (round robin), and each answer is what that worker printed
    assert [c["question"] for c in contributions] == subtasks
    assert sorted(c["worker"] for c in contributions) == ["w0", "w1"]
    for c in contributions:
        printed = results[int(c["worker"][1])].output
        assert f"task {c['task']}: {c['question']} -> {c['answer']}\n" == printed
    # the workers really ran the model on their question
    reference = completion(subtasks[0], 12, "--system", "Answer in one short sentence.", "--stop", "\n")
    assert contributions[0]["answer"] == reference.strip()
    assert report["summary"]
    assert runtime.kv_store.list_keys(swarm) == []  # the coordinator cleaned up
    assert runtime.num_free_pages == runtime.num_pages
    assert model.runner.num_forward_passes > t0


def test_agent_swarm_workers_first_and_model_written_subtasks(runtime):
    swarm = f"swarm-{uuid.uuid4().hex[:8]}"
    workers = [runtime.launch("agent_swarm", ["--role", "worker", "--swarm", swarm, "--max-tokens", "8"])
               for _ in range(3)]
    coordinator = runtime.launch("agent_swarm", ["--role", "coordinator", "--swarm", swarm, "--workers", "3",
                                                 "--question", "Plan a day in Paris.", "--max-tokens", "8",
                                                 "--summary-tokens", "8"])
    results = [w.wait(60) for w in workers]
    result = coordinator.wait(60)
    assert result.error is None and all(r.error is None for r in results), (result.error, [r.error for r in results])
    lines = result.output.splitlines()
    summary = next(i for i, l in enumerate(lines) if l.startswith("Summary:"))  # the summary may run on
    contributions = [re.fullmatch(r"\[worker (\d+)\] (.*) -> (.*)", l) for l in lines[:summary]]
    assert len(contributions) == 3 and all(contributions), result.output
    ids = {r.instance_id for r in results}
    assert {int(m.group(1)) for m in contributions} == ids  # one sub-question per worker
    for m in contributions:
        worker_output = next(r.output for r in results if r.instance_id == int(m.group(1)))
        assert f": {m.group(2)} -> {m.group(3)}\n" in worker_output
    assert runtime.kv_store.list_keys(swarm) == []
    assert runtime.num_free_pages == runtime.num_pages
