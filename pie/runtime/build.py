"""`pie build DIR`: a standalone inferlet component (world `inferlet`) for a Python inferlet with its own
modules and pure-Python dependencies.

DIR/main.py is the entry script; the other `.py` modules and packages in DIR are importable, and the
packages named in DIR/requirements.txt are installed (pure-Python wheels only, `--no-deps`). A generated app
module exports `run`; componentize-py imports it at build time, and bundles exactly what is imported then
(a module first imported at run time is not in the component). So the app module imports:
- the shared Python runtime's module (`pie_python_runtime`): the same standard-library set, the SDK, and
  `run_script`, which runs a script the way `pie run FILE.py` does;
- every module that main.py imports (found with `ast`; an unconditional top-level import that fails is a
  build error), then, where they import, those imported by the other modules in DIR and by the requirements.
main.py's source is a string constant of the component, `exec`ed by `run`: its code runs at run time only,
while the modules it imports ran their top-level code at build time (no host calls may happen there).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pie.runtime import python_runtime
from pie.runtime.paths import inferlets_dir

MAIN = "main.py"
REQUIREMENTS = "requirements.txt"
WORLD = "inferlet"
APP_MODULE = "pie_inferlet_app"
# The CPython that componentize-py 0.25.1 embeds: requirements must have wheels installable on it.
GUEST_PYTHON = "3.14"
# Top-level names the component already uses: a user module or requirement with one of them would shadow it.
RESERVED = frozenset({APP_MODULE, "pie_python_runtime", "inferlet", "wit_world", "componentize_py_types",
                      "componentize_py_runtime", "componentize_py_async_support"})
# The generated module's build-time errors carry this prefix, so that they can be picked out of
# componentize-py's output.
ERROR_MARK = "pie-build-error: "
# Standard-library modules of the guest's Python that are newer than the oldest host Python pie supports.
GUEST_ONLY_STDLIB = frozenset({"annotationlib", "compression"})
# Standard-library packages bundled whole: their submodules are imported by names computed at run time.
WHOLE_PACKAGES = ("encodings",)
NATIVE_SUFFIXES = (".so", ".pyd", ".dylib", ".dll")


class BuildError(ValueError):
    """`pie build` cannot build the component; the message's first line says why."""


@dataclass
class _Import:
    name: str  # absolute module name
    where: str  # "file:line" of its first import statement
    required: bool  # an unconditional top-level import of main.py: failing to import it fails the build
    attrs: set[str] = field(default_factory=set)  # names of `from name import a, b` (may be submodules)


def build_inferlet(src_dir: Path, out: Path | None = None, progress: bool = True) -> Path:
    """Builds DIR into a component (default DIR/<DIR name>.wasm) and returns its path. The file is written
    in place by a rename, so a failed build leaves an older OUT as it was. Raises BuildError."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise BuildError(f"{src_dir} is not a directory (pie build DIR: DIR holds main.py)")
    main = src_dir / MAIN
    if not main.is_file():
        raise BuildError(f"{src_dir} has no {MAIN} (the inferlet's entry script)")
    out = Path(out) if out is not None else src_dir / f"{src_dir.resolve().name}.wasm"
    python_runtime.check_componentize_py()
    main_source = _read(main, MAIN)
    imports = _scan(_parse(main_source, MAIN), MAIN, package=None, top_level_required=True)

    def say(message: str) -> None:
        if progress:
            print(f"pie build: {message}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="pie-build-") as tmp:
        src, deps, app = Path(tmp) / "src", Path(tmp) / "deps", Path(tmp) / "app"
        for d in (src, deps, app):
            d.mkdir()
        modules = _stage_sources(src_dir, src)
        for rel in modules:
            pkg = _package_of(rel)
            imports += _scan(_parse(_read(src / rel, rel), rel), rel, package=pkg, top_level_required=False)
        requirements = src_dir / REQUIREMENTS
        if requirements.is_file() and _requirement_lines(requirements):
            say(f"installing {REQUIREMENTS} (pure-Python wheels for Python {GUEST_PYTHON})")
            for top, where in _install_requirements(requirements, src_dir, deps):
                imports.append(_Import(top, where, False))
            for f in sorted(deps.rglob("*.py")):  # best effort: a file this host cannot parse is skipped
                rel = f.relative_to(deps).as_posix()
                try:
                    tree = ast.parse(f.read_text(encoding="utf-8"), rel)
                except (SyntaxError, UnicodeDecodeError, ValueError):
                    continue
                imports += _scan(tree, rel, package=_package_of(rel), top_level_required=False)
        _check_shadowing(src, deps)
        _check_required(imports, src, deps)
        (app / f"{APP_MODULE}.py").write_text(_app_module(src_dir, main_source, _merge(imports)), encoding="utf-8")

        say(f"building {out.name} with componentize-py (world {WORLD}; 10-30 s)")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.parent / f".{out.name}.{os.getpid()}.tmp"
        try:
            sdk = inferlets_dir() / "sdk" / "python"
            runtime_py = inferlets_dir() / "runtime" / "python"
            proc = python_runtime.componentize(WORLD, APP_MODULE, [app, src, deps, runtime_py, sdk], tmp_out)
            if proc.returncode != 0 or not tmp_out.is_file():
                raise BuildError(_componentize_error(proc.stdout + "\n" + proc.stderr))
            os.replace(tmp_out, out)
        finally:
            tmp_out.unlink(missing_ok=True)
    return out


# ---- sources --------------------------------------------------------------------------------------------

def _read(path: Path, rel: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BuildError(f"{rel} is not UTF-8 text: {e.reason} at byte {e.start}") from None


def _parse(source: str, rel: str) -> ast.Module:
    try:
        return ast.parse(source, rel)
    except SyntaxError as e:
        raise BuildError(f"SyntaxError: {e.msg} ({rel}:{e.lineno})") from None


def _importable(rel: Path) -> bool:
    return all(p.isidentifier() for p in rel.with_suffix("").parts)


def _stage_sources(src_dir: Path, dest: Path) -> list[str]:
    """Copies DIR's importable `.py` files (not main.py, hidden folders or __pycache__) to `dest`: only
    they go into the component, whatever else DIR holds (an earlier OUT.wasm, a virtualenv...)."""
    staged = []
    for root, dirs, files in os.walk(src_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            rel = (Path(root) / name).relative_to(src_dir)
            if name.endswith(".py") and rel != Path(MAIN) and _importable(rel):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(root) / name, dest / rel)
                staged.append(rel.as_posix())
    return staged


def _package_of(rel: str) -> list[str]:
    """The package a module file belongs to, as name parts (`a/b/c.py` and `a/b/__init__.py` -> a.b)."""
    parts = list(Path(rel).with_suffix("").parts)
    return parts[:-1]


def _scan(tree: ast.Module, rel: str, package: list[str] | None, top_level_required: bool) -> list[_Import]:
    """Every import statement in `tree` as absolute module names. Relative imports are resolved within
    `package` (None: a script, where they cannot work and are skipped). Only statements directly in the
    module body of a `top_level_required` file are required; imports in functions, `try` or `if` are not."""
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        required = top_level_required and id(node) in top
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [_Import(a.name, where, required) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if package is None or node.level - 1 > len(package):
                    continue
                base = package[:len(package) - (node.level - 1)]
                name = ".".join(base + (node.module.split(".") if node.module else []))
            else:
                name = node.module or ""
            if name:
                found.append(_Import(name, where, required, {a.name for a in node.names if a.name != "*"}))
    return found


def _merge(imports: list[_Import]) -> list[_Import]:
    """One entry per module, in first-seen order; required if any statement importing it is."""
    merged: dict[str, _Import] = {}
    for i in imports:
        m = merged.setdefault(i.name, _Import(i.name, i.where, False))
        m.attrs |= i.attrs
        if i.required and not m.required:
            m.required, m.where = True, i.where
    # required ones first: their failure is reported, before any optional import could mask it
    return sorted(merged.values(), key=lambda m: not m.required)


def _check_shadowing(src: Path, deps: Path) -> None:
    for folder, what in ((src, "DIR"), (deps, REQUIREMENTS)):
        for entry in folder.iterdir():
            name = entry.name[:-3] if entry.name.endswith(".py") else entry.name
            if name in RESERVED:
                raise BuildError(f"{entry.name} in {what} would shadow the component's own module {name!r}: rename it")


def _check_required(imports: list[_Import], src: Path, deps: Path) -> None:
    """Fails fast (before the 10-30 s componentize-py run) on an unconditional top-level import of main.py
    that nothing provides. The generated module checks the same in the guest, which also catches a
    standard-library module that this host Python has and the guest's lacks."""
    for i in imports:
        top = i.name.split(".")[0]
        if not i.required or top in RESERVED or top in sys.stdlib_module_names or top in GUEST_ONLY_STDLIB:
            continue
        if not any((d / f"{top}.py").is_file() or (d / top).is_dir() for d in (src, deps)):
            raise BuildError(f"{i.where}: no module named {top!r} "
                             f"(not in DIR, {REQUIREMENTS}, or the standard library)")


# ---- requirements -------------------------------------------------------------------------------------------

def _requirement_lines(path: Path) -> list[str]:
    lines = [l.split("#", 1)[0].strip() for l in path.read_text(encoding="utf-8").splitlines()]
    return [l for l in lines if l]


def _install_requirements(requirements: Path, src_dir: Path, target: Path) -> list[tuple[str, str]]:
    """pip-installs requirements.txt into `target`: wheels tagged for any platform and no ABI only (what a
    component can run), no dependencies (list them too). Returns the installed top-level module names,
    each with the distribution that brought it."""
    cmd = [sys.executable, "-m", "pip", "install", "--target", str(target), "--no-deps", "--only-binary", ":all:",
           "--platform", "any", "--implementation", "py", "--abi", "none", "--python-version", GUEST_PYTHON,
           "--no-compile", "--no-input", "--disable-pip-version-check", "--quiet",
           "-r", str(requirements.resolve())]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=src_dir)
    if proc.returncode != 0:
        text = proc.stdout + "\n" + proc.stderr
        missing = re.search(r"No matching distribution found for (\S+)", text)
        if missing:
            raise BuildError(f"{REQUIREMENTS}: no pure-Python wheel of {missing.group(1)} for Python {GUEST_PYTHON} "
                             "(a package with compiled extensions cannot go into a component)")
        errors = [l.strip() for l in text.splitlines() if l.strip().startswith("ERROR:")]
        last = errors[-1] if errors else (text.strip().splitlines() or ["(no output)"])[-1]
        raise BuildError(f"{REQUIREMENTS}: pip install failed: {last}")
    tops = []
    for info in sorted(target.glob("*.dist-info")):
        dist = info.name[:-len(".dist-info")].rsplit("-", 1)[0]
        record = info / "RECORD"
        lines = record.read_text(encoding="utf-8").splitlines() if record.is_file() else []
        files = [l.split(",", 1)[0] for l in lines]
        native = [f for f in files if f.endswith(NATIVE_SUFFIXES) or ".so." in Path(f).name]
        if native:
            raise BuildError(f"{REQUIREMENTS}: {dist} has compiled extensions ({native[0]}): "
                             "only pure-Python packages can go into a component")
        for f in files:  # top-level modules: `name.py`, or `name/....py` (not dist-info, .data, bin)
            parts = f.split("/")
            if not f.endswith(".py"):
                continue
            name = parts[0][:-3] if len(parts) == 1 else parts[0]
            if name.isidentifier() and name not in {t for t, _ in tops}:
                tops.append((name, f"{REQUIREMENTS} ({dist})"))
    return tops


# ---- the generated app module ----------------------------------------------------------------------------------

_APP_TEMPLATE = '''\
"""Generated by `pie build` from {src_dir}: the app module of a standalone inferlet (world `inferlet`).

componentize-py imports this module at build time and bundles what is imported then; main.py runs only
when `run` is called, exactly as the shared Python runtime runs a .py (pie_python_runtime.run_script).
"""

import importlib
import pkgutil
import re
import traceback

import pie_python_runtime  # the shared runtime's standard-library set, the SDK and run_script
import wit_world

MAIN_FILENAME = {main_filename!r}
MAIN_SOURCE = {main_source!r}

# (module, "file:line" of its import, required, names imported from it): required ones are main.py's
# unconditional top-level imports; the others are bundled where they import, skipped where they do not.
BUNDLE = {bundle!r}


class PieBuildError(Exception):
    pass


def _path(filename):
    # componentize-py mounts its i-th -p folder at /i/: DIR's files read as DIR-relative paths
    return re.sub(r"^/\d+/", "", filename or "?")


def _one_line(e):
    where = ""
    for frame in traceback.extract_tb(e.__traceback__):
        if not frame.filename.startswith("<"):
            where = f" ({{_path(frame.filename)}}:{{frame.lineno}})"
    if isinstance(e, SyntaxError) and e.lineno:
        where = f" ({{_path(e.filename)}}:{{e.lineno}})"
    return f"{{type(e).__name__}}: {{e}}{{where}}"


def _bundle(name, where, required, attrs):
    try:
        module = importlib.import_module(name)
    except Exception as e:
        if not required:
            return
        if isinstance(e, ModuleNotFoundError) and e.name and (name + ".").startswith(e.name + "."):
            raise PieBuildError(f"{error_mark}{{where}}: no module named {{e.name!r}} (not in DIR, "
                                f"{requirements}, or the standard library)") from None
        raise PieBuildError(f"{error_mark}{{where}}: importing {{name!r}} at build time failed: "
                            f"{{_one_line(e)}}") from None
    for attr in attrs:  # `from package import sub`: sub may be a submodule
        if not hasattr(module, attr):
            try:
                importlib.import_module(f"{{name}}.{{attr}}")
            except Exception:
                pass


def _bundle_package(package):
    # every submodule, for what is imported by a name computed at run time: codecs.lookup("punycode")
    # imports encodings.punycode
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__, package + "."):
        try:
            importlib.import_module(info.name)
        except Exception:  # a platform's own codec (encodings.mbcs on Windows)
            pass


for _entry in BUNDLE:
    _bundle(*_entry)
for _package in {whole_packages!r}:
    _bundle_package(_package)


class WitWorld(wit_world.WitWorld):
    def run(self) -> None:
        pie_python_runtime.run_script(MAIN_SOURCE, MAIN_FILENAME)
'''


def _app_module(src_dir: Path, main_source: str, imports: list[_Import]) -> str:
    bundle = [(i.name, i.where, i.required, sorted(i.attrs)) for i in imports]
    return _APP_TEMPLATE.format(src_dir=src_dir.resolve(), main_filename=MAIN, main_source=main_source,
                                bundle=bundle, error_mark=ERROR_MARK, requirements=REQUIREMENTS,
                                whole_packages=WHOLE_PACKAGES)


def _componentize_error(output: str) -> str:
    """The generated module's own error if it raised one; else componentize-py's last lines (before the
    Rust backtrace that RUST_BACKTRACE=1 adds)."""
    ours = re.findall(r"PieBuildError: " + re.escape(ERROR_MARK) + r"(.*)", output)
    if ours:
        return ours[-1].strip()
    output = output.split("Stack backtrace:", 1)[0]
    tail = [l for l in output.strip().splitlines() if l.strip()][-15:]
    return "componentize-py failed: " + (tail[-1].strip() if tail else "(no output)") + \
        "".join("\n    " + l for l in tail[:-1])
