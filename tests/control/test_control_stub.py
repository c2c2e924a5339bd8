"""The .pyi stub of the compiled module declares exactly what the module exports."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pie._ext._control as compiled

STUB = Path(__file__).parents[2] / "pie" / "control" / "_control.pyi"


def stub_names() -> dict[str, set[str]]:
    """Top-level names of the stub, each with the member names it declares (classes)."""
    names: dict[str, set[str]] = {}
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, ast.ClassDef):
            members = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AnnAssign)):
                    members.add(item.name if isinstance(item, ast.FunctionDef) else item.target.id)
            names[node.name] = members
        elif isinstance(node, ast.FunctionDef):
            names[node.name] = set()
        elif isinstance(node, ast.AnnAssign) and not node.target.id.startswith("_"):
            names[node.target.id] = set()
    return names


def public_members(cls: type) -> set[str]:
    own = set()
    for name, _value in inspect.getmembers(cls):
        if name.startswith("_") and name not in ("__init__", "__len__", "__int__"):
            continue
        if any(name in vars(base) for base in cls.__mro__[1:] if base.__module__ == "builtins"):
            continue
        own.add(name)
    return own


def test_stub_lists_every_export_and_nothing_else():
    exported = {name for name in dir(compiled) if not name.startswith("_")}
    assert set(stub_names()) == exported


def test_stub_classes_declare_every_public_member():
    declared = stub_names()
    for name in ("Future", "CommandQueue", "Batch", "Scheduler", "PagePool", "Sampler", "ForwardOutput",
                 "OutputValue", "ForwardLimits", "ForwardCommand", "CopySpan", "PageCopyCommand"):
        actual = public_members(getattr(compiled, name)) - {"__init__"}
        assert actual <= declared[name] | {"__init__"}, (name, actual - declared[name])
        assert declared[name] - {"__init__"} <= actual, (name, declared[name] - actual)
