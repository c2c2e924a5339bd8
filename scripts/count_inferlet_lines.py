"""Lines of code of the bundled inferlets against Pie 0.1's Rust examples of the same applications.

    python scripts/count_inferlet_lines.py            # the Markdown table (as in README.md)
    python scripts/count_inferlet_lines.py --all      # every bundled example, with the SDK code it owns

A line counts when it is not blank, not only a comment and not part of a docstring (module, class or
function). An example's count is its own file plus the SDK code (inferlets/sdk/python/inferlet/*.py) that
only it, or only it and its twin, uses: code written for one application is counted with it, code that
several applications share is the SDK's.

The SDK is attributed per definition, not per module: every top-level function, class (its body without
its methods), method and module-level assignment is a unit, and a module's remaining statements (its
imports) are one more. A static analysis finds the units an example uses, transitively through the SDK:
- a name or a dotted name (`inferlet.gen_all`, `branches.submit`, `Subscription`) is resolved through the
  imports of the file it appears in, module by module, to the unit it names;
- a method is used when its class is used (a class uses its bases) and its name is read as an attribute
  in the code used (`ctx.fork()`, `self._pass(...)`); dunder methods come with their class. A read on a
  parameter annotated with a class (`matcher: Optional["Matcher"]`) or inside a module defining a method
  of that name means that class's method only; reads on modules imported from outside the SDK
  (`grammar.accept`) are none;
- a used unit makes its module's remaining statements used.
Other reads are matched by name, so a method sharing its name with one another example calls counts as
shared (`Context.accept`, named like `Branch.accept`): the analysis errs towards the SDK, never towards an
example.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import tokenize
from dataclasses import dataclass, field
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


def code_line_numbers(source: str) -> set[int]:
    """Numbers of the non-blank lines that hold code: comment-only lines and docstrings excluded."""
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
    return code - docstring_lines


def code_lines(path: Path) -> int:
    return len(code_line_numbers(path.read_text()))


@dataclass
class Unit:
    """A piece of SDK code counted as a whole: `key` is "module.name", "module.Class.method" or
    "module:" (the module's other statements)."""

    key: str
    module: str
    lines: int = 0
    nodes: list = field(default_factory=list)  # the AST nodes whose references it makes
    owner: str | None = None  # a method: its class's key
    method: str | None = None  # ... and its name


def span(node: ast.AST) -> set[int]:
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return set(range(first, node.end_lineno + 1))


def chains(nodes: list, external: frozenset = frozenset()) -> tuple[list[list[str]], set[str], set[tuple[str, str]]]:
    """The dotted names (`a`, `a.b.c`) read in `nodes`; the attribute names read on receivers of unknown
    type; and (type, attribute) for those read on a parameter annotated with a type (`m: "Matcher"`).
    Attributes of `external` names (modules imported from outside the SDK) are no method reads."""
    found, attrs, typed = [], set(), set()

    def visit(node: ast.AST, annotated: dict[str, set[str]]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            annotated = dict(annotated)
            for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
                annotated.pop(a.arg, None)
                if getattr(a, "annotation", None) is not None:
                    annotated[a.arg] = set(re.findall(r"\w+", ast.unparse(a.annotation))) - {"Optional", "inferlet"}
        if isinstance(node, ast.Attribute):
            parts, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                parts.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name):
                found.append([inner.id] + parts[::-1])
            if isinstance(node.value, ast.Name) and node.value.id in external:
                pass
            elif isinstance(node.value, ast.Name) and node.value.id in annotated:
                typed.update((t, node.attr) for t in annotated[node.value.id])
            else:
                attrs.add(node.attr)
        elif isinstance(node, ast.Name):
            found.append([node.id])
        for child in ast.iter_child_nodes(node):
            visit(child, annotated)

    for root in nodes:
        visit(root, {})
    return found, attrs, typed


class Program:
    """The SDK's units and every file's names (local definitions and imports)."""

    def __init__(self) -> None:
        self.units: dict[str, Unit] = {}
        self.names: dict[str, dict[str, tuple]] = {}  # file -> name -> ("unit", key) | ("module", m) | ("alias", m, n)
        self.bases: dict[str, list[list[str]]] = {}  # class key -> the dotted names of its bases
        self.external: dict[str, set[str]] = {}  # file -> the names it imports (SDK ones are removed after)
        self.classes: dict[str, list[str]] = {}  # module -> the keys of its classes
        self.methods_of: dict[str, set[str]] = {}  # class key -> its methods' names
        self.methods: dict[str, set[str]] = {}  # module -> the names of its classes' methods
        for path in sorted(SDK.glob("*.py")):
            self._add_module(path.stem, path)

    def _imports(self, file: str, tree: ast.AST, package_file: bool) -> None:
        names = self.names.setdefault(file, {})
        external = self.external.setdefault(file, set())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                external.update((a.asname or a.name).split(".")[0] for a in node.names)
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "inferlet" or a.name.startswith("inferlet."):
                        parts = a.name.split(".")
                        names[a.asname or parts[0]] = ("module", parts[-1] if a.asname else "__init__")
            elif isinstance(node, ast.ImportFrom):
                if node.level and package_file:
                    module = node.module or "__init__"
                elif node.module == "inferlet":
                    module = "__init__"
                elif node.module and node.module.startswith("inferlet."):
                    module = node.module.split(".")[1]
                else:
                    continue
                for a in node.names:
                    if (SDK / f"{a.name}.py").exists() and module == "__init__":
                        names[a.asname or a.name] = ("module", a.name)
                    else:
                        names[a.asname or a.name] = ("alias", module, a.name)

    def _add_module(self, module: str, path: Path) -> None:
        source = path.read_text()
        tree = ast.parse(source)
        code = code_line_numbers(source)
        self._imports(module, tree, True)
        names = self.names[module]
        rest = Unit(f"{module}:", module)
        taken: set[int] = set()
        for stmt in tree.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                unit = Unit(f"{module}.{stmt.name}", module, nodes=[stmt])
                names[stmt.name] = ("unit", unit.key)
                lines = span(stmt)
                if isinstance(stmt, ast.ClassDef):
                    self.bases[unit.key] = chains(stmt.bases)[0]
                    self.classes.setdefault(module, []).append(unit.key)
                    self.methods_of[unit.key] = {m.name for m in stmt.body if isinstance(m, ast.FunctionDef)}
                    self.methods.setdefault(module, set()).update(self.methods_of[unit.key])
                    unit.nodes = [n for n in stmt.bases + stmt.decorator_list + stmt.body
                                  if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
                    for m in stmt.body:
                        if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            mlines = span(m)
                            lines -= mlines
                            self.units[f"{unit.key}.{m.name}"] = Unit(f"{unit.key}.{m.name}", module,
                                                                       len(mlines & code), [m], unit.key, m.name)
                unit.lines = len(lines & code)
                self.units[unit.key] = unit
                taken |= span(stmt)
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign)) and all(
                    isinstance(t, ast.Name) for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target])):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                unit = Unit(f"{module}.{targets[0].id}", module, len(span(stmt) & code), [stmt])
                for t in targets:
                    names[t.id] = ("unit", unit.key)
                self.units[unit.key] = unit
                taken |= span(stmt)
            elif not isinstance(stmt, (ast.Import, ast.ImportFrom)):
                rest.nodes.append(stmt)
        rest.lines = len(code - taken)
        self.units[rest.key] = rest

    def ancestors(self, name: str) -> set[str]:
        """The keys of the SDK classes named `name` and of their bases, transitively."""
        found, todo = set(), [k for k, u in self.units.items() if u.owner is None and k.endswith(f".{name}")]
        while todo:
            key = todo.pop()
            if key not in found and key in self.units:
                found.add(key)
                todo += [self.resolve(self.units[key].module, chain) for chain in self.bases.get(key, [])]
        return found

    def resolve(self, file: str, chain: list[str]) -> str | None:
        """The unit a dotted name read in `file` names (None: not the SDK's)."""
        entry = self.names.get(file, {}).get(chain[0])
        for _ in range(8):  # aliases of aliases, modules of modules
            if entry is None:
                return None
            if entry[0] == "unit":
                return entry[1]
            if entry[0] == "alias":
                entry = self.names.get(entry[1], {}).get(entry[2])
                continue
            module = entry[1]  # a module: the next part is a name in it
            chain = chain[1:]
            if not chain:
                return f"{module}:"
            entry = self.names.get(module, {}).get(chain[0])
        return None

    def used_by(self, path: Path) -> set[str]:
        """The SDK units the file at `path` uses, transitively."""
        file = f"example:{path.stem}"
        self.names.pop(file, None)
        tree = ast.parse(path.read_text())
        self._imports(file, tree, False)
        used: set[str] = set()
        attrs: set[str] = set()  # read on receivers of unknown type (a module's own class's method first)
        typed: set[tuple[str, str]] = set()
        todo = [(file, tree)]
        while todo:
            while todo:
                where, node = todo.pop()
                found, new_attrs, new_typed = chains([node], frozenset(self.external[where] - self.names[where].keys()))
                own = self.methods.get(where, set())
                attrs |= {a for a in new_attrs if a not in own}
                typed |= {(key, a) for a in new_attrs & own for key in self.classes.get(where, [])
                          if a in self.methods_of[key]}
                typed |= {(key, attr) for t, attr in new_typed for key in self.ancestors(t)}
                for chain in found:
                    key = self.resolve(where, chain)
                    if key is not None and key in self.units and key not in used:
                        used.add(key)
                        unit = self.units[key]
                        todo += [(unit.module, n) for n in unit.nodes]
                        rest = self.units[f"{unit.module}:"]
                        if rest.key not in used:
                            used.add(rest.key)
                            todo += [(unit.module, n) for n in rest.nodes]
            for unit in self.units.values():  # methods of used classes, read as attributes
                if unit.owner in used and unit.key not in used and (
                        unit.method in attrs or (unit.owner, unit.method) in typed
                        or (unit.method.startswith("__") and unit.method.endswith("__"))):
                    used.add(unit.key)
                    todo += [(unit.module, n) for n in unit.nodes]
        return used


class Attribution:
    """Which examples use each SDK unit, and the units each example owns (only it, or it and its twin,
    uses them)."""

    def __init__(self) -> None:
        self.program = Program()
        self.examples = {p.stem: p for p in sorted(EXAMPLES.glob("*.py"))}
        self.used = {name: self.program.used_by(p) for name, p in self.examples.items()}
        self.users: dict[str, set[str]] = {}
        for name, keys in self.used.items():
            for key in keys:
                self.users.setdefault(key, set()).add(name)

    def own(self, example: str, twin: str | None = None) -> list[Unit]:
        """The SDK units (with code) counted with `example`."""
        group = {example} | ({twin} if twin else set())
        return [self.program.units[k] for k in sorted(self.used[example])
                if self.users[k] <= group and self.program.units[k].lines]

    def lines(self, example: str, twin: str | None = None) -> int:
        return code_lines(self.examples[example]) + sum(u.lines for u in self.own(example, twin))

    def parts(self, example: str, twin: str | None = None) -> str:
        by_module: dict[str, list[str]] = {}
        for u in self.own(example, twin):
            by_module.setdefault(u.module, []).append(u.key.split(".", 1)[1] if "." in u.key else "imports")
        return f"`{example}.py`" + "".join(f" + `inferlet/{m}.py` ({', '.join(names)})"
                                           for m, names in by_module.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all", action="store_true", help="list every example and the SDK code only it uses")
    args = parser.parse_args()
    counts = Attribution()
    if args.all:
        for name in counts.examples:
            print(f"{name}: {counts.lines(name)} lines = {counts.parts(name)}")
        return
    print("| application | Pie (Python) | Pie 0.1 (Rust) | goal (half) | met |")
    print("| --- | --- | --- | --- | --- |")
    for app, (example, twin, rust) in RUST.items():
        lines, goal = counts.lines(example, twin), rust // 2
        print(f"| {app} | {lines} ({counts.parts(example, twin)}) | {rust} | <= {goal} | {'yes' if lines <= goal else 'no'} |")


if __name__ == "__main__":
    main()
