"""Lines of code of the bundled inferlets against Pie 0.1's Rust examples of the same applications.

    python scripts/count_inferlet_lines.py            # the Markdown table (as in README.md)
    python scripts/count_inferlet_lines.py --all      # every bundled example, with the SDK modules it pulls in

A line counts when it is not blank, not only a comment and not part of a docstring (module, class or
function). An example's count is its own file plus every SDK module (inferlets/sdk/python/inferlet/*.py,
`__init__` excepted) that only it, or only it and its twin, imports (directly or through other SDK
modules): code written for one application is counted with it, code that several applications share is
the SDK's.
"""

import argparse
import ast
import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "inferlets" / "examples"
SDK = ROOT / "inferlets" / "sdk" / "python" / "inferlet"

# application -> (bundled example, its twin or None, lines of Pie 0.1's Rust example, as measured in issue #21)
RUST = {
    "text completion": ("text_completion", None, 75),
    "constrained decoding": ("constrained_decoding", None, 408),
    "tree of thought": ("tree_of_thought", None, 112),
    "speculative decoding": ("speculative_decoding", None, 226),
    "prefix cache": ("prefix_cache", None, 109),
    "agent swarm": ("agent_swarm", None, 132),
    "watermarking": ("watermarking", None, 124),
    "attention sink": ("attention_sink", "windowed_attention", 124),
    "ReAct": ("react_agent", None, 69),
    "beam search": ("beam_search", None, 73),
}


def code_lines(path: Path) -> int:
    """Non-blank lines that hold code: comment-only lines and docstrings excluded."""
    source = path.read_text()
    docstring_lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                docstring_lines.update(range(first.lineno, first.end_lineno + 1))
    code: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                        tokenize.ENDMARKER):
            continue
        code.update(range(tok.start[0], tok.end[0] + 1))
    return len(code - docstring_lines)


def sdk_imports(path: Path) -> set[str]:
    """The SDK modules (`inferlet.X`, X a file of the SDK) that `path` imports directly."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level and path.parent == SDK:  # relative import inside the SDK
                names = [f"inferlet.{node.module}"] if node.module else [f"inferlet.{a.name}" for a in node.names]
            elif node.module == "inferlet":
                names = [f"inferlet.{a.name}" for a in node.names]
            elif node.module:
                names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "inferlet" and len(parts) > 1 and (SDK / f"{parts[1]}.py").exists():
                found.add(parts[1])
    return found


def modules_used(path: Path) -> set[str]:
    """The SDK modules `path` imports, directly or through other SDK modules (always with `__init__`)."""
    seen, todo = set(), list(sdk_imports(path) | sdk_imports(SDK / "__init__.py"))
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += sdk_imports(SDK / f"{name}.py")
    return seen


def own_modules(example: str, twin: str | None, users: dict[str, set[str]]) -> list[str]:
    """SDK modules that only `example` (and its twin) use."""
    group = {example} | ({twin} if twin else set())
    return sorted(m for m, who in users.items() if who and who <= group and example in who)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all", action="store_true", help="list every example and the SDK modules it uses")
    args = parser.parse_args()
    examples = {p.stem: p for p in sorted(EXAMPLES.glob("*.py"))}
    used = {name: modules_used(p) for name, p in examples.items()}
    users: dict[str, set[str]] = {}
    for name, modules in used.items():
        for m in modules:
            users.setdefault(m, set()).add(name)
    if args.all:
        for name in examples:
            print(f"{name}: {code_lines(examples[name])} lines; SDK modules {sorted(used[name]) or '-'}")
        for m in sorted(users):
            print(f"inferlet/{m}.py: {code_lines(SDK / f'{m}.py')} lines, used by {sorted(users[m])}")
        return
    print("| application | Pie (Python) | Pie 0.1 (Rust) | goal (half) | met |")
    print("| --- | --- | --- | --- | --- |")
    for app, (example, twin, rust) in RUST.items():
        own = own_modules(example, twin, users)
        lines = code_lines(examples[example]) + sum(code_lines(SDK / f"{m}.py") for m in own)
        parts = f"`{example}.py`" + "".join(f" + `inferlet/{m}.py`" for m in own)
        goal = rust // 2
        print(f"| {app} | {lines} ({parts}) | {rust} | <= {goal} | {'yes' if lines <= goal else 'no'} |")


if __name__ == "__main__":
    main()
