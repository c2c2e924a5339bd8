"""`pie build DIR`: main.py + local modules + requirements.txt into one standalone component (world
`inferlet`), run like any .wasm. One build (module-scoped) serves the run tests; the CLI test builds a DIR
with a requirement; the error cases fail before componentize-py runs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from cli_helpers import run_pie as pie

from pie.runtime.build import BuildError, build_inferlet

MAIN = textwrap.dedent('''\
    import argparse
    import sys

    import inferlet

    import helper
    from textpkg import shout
    from textpkg.fmt import banner

    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=6)
    parser.add_argument("--csv", action="store_true")
    parser.add_argument("--fail", action="store_true")
    args = parser.parse_args()

    if args.csv:
        print(helper.as_csv([args.prompt, "c"]))
        sys.exit(0)
    if args.fail:
        raise ValueError(f"refusing {args.prompt!r}")
    ctx = inferlet.Context()
    ctx.fill(inferlet.chat_prompt([{"role": "user", "content": args.prompt}]))
    text = ctx.generate(max_tokens=args.max_tokens, sampler=inferlet.greedy())
    print(banner(helper.tag(text)))
    print(shout(f"{len(sys.argv) - 1} args, prog {parser.prog}"))
''')

# Only the standard library of the shared runtime at module level: the flattened copy below runs there too.
# as_csv imports `csv` (not in the shared runtime's set) inside a function: bundled because pie build scans
# every module's imports, wherever they are.
HELPER = textwrap.dedent('''\
    import textwrap


    def tag(text):
        return "[" + textwrap.shorten(text, width=200) + "]"


    def as_csv(row):
        import csv
        import io

        buf = io.StringIO()
        csv.writer(buf, lineterminator="").writerow(row)
        return buf.getvalue()
''')

TEXTPKG_INIT = textwrap.dedent('''\
    from .fmt import banner  # noqa: F401  (a relative import inside a local package)


    def shout(s):
        return s.upper() + "!"
''')

TEXTPKG_FMT = 'def banner(s):\n    return "== " + s + " =="\n'

PROMPT = "Name a color."


def write_dir(root: Path) -> Path:
    (root / "textpkg").mkdir(parents=True)
    (root / "main.py").write_text(MAIN)
    (root / "helper.py").write_text(HELPER)
    (root / "textpkg" / "__init__.py").write_text(TEXTPKG_INIT)
    (root / "textpkg" / "fmt.py").write_text(TEXTPKG_FMT)
    (root / "notes.txt").write_text("not bundled\n")
    return root


def flattened() -> str:
    """The same program as one source for the shared runtime (which sees a single file): DIR's modules are
    installed into sys.modules from their sources, then main.py's source runs unchanged."""
    modules = [("textpkg.fmt", TEXTPKG_FMT, False), ("textpkg", TEXTPKG_INIT, True), ("helper", HELPER, False)]
    prelude = textwrap.dedent(f'''\
        import sys as _sys, types as _types
        for _name, _src, _is_pkg in {modules!r}:
            _m = _types.ModuleType(_name)
            if _is_pkg:
                _m.__path__ = []
            _m.__package__ = _name if _is_pkg else _name.rpartition(".")[0]
            _sys.modules[_name] = _m
            exec(compile(_src, _name, "exec"), _m.__dict__)
    ''')
    return prelude + MAIN


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = write_dir(tmp_path_factory.mktemp("inferlet"))
    out = build_inferlet(root, progress=False)
    assert out == root / f"{root.name}.wasm"  # the default OUT
    assert out.stat().st_size > 1 << 20
    assert not list(root.glob(".*.tmp")), "the temporary output was left behind"
    return out


def check_pages(runtime) -> None:
    assert runtime.num_free_pages == runtime.num_pages, "pages leaked by the instance"


def test_output_matches_shared_runtime(runtime, built):
    standalone = runtime.run(built, ["--prompt", PROMPT])
    check_pages(runtime)
    shared = runtime.run_source(flattened(), ["--prompt", PROMPT], filename="main.py")
    check_pages(runtime)
    assert standalone.error is None, standalone.error + "\n" + standalone.log
    assert shared.error is None, shared.error + "\n" + shared.log
    assert standalone.output == shared.output
    first, second = standalone.output.splitlines()
    assert first.startswith("== [") and first.endswith("] ==") and len(first) > len("== [] ==")
    assert second == "2 ARGS, PROG MAIN.PY!"  # sys.argv = ["main.py", "--prompt", PROMPT]


def test_function_level_import_is_bundled(runtime, built):
    r = runtime.run(built, ["--prompt", "a,b", "--csv"])
    assert r.error is None, r.error + "\n" + r.log
    assert r.output == '"a,b",c\n'  # sys.exit(0) is success


def test_errors_are_reported_like_the_shared_runtime(runtime, built):
    r = runtime.run(built, ["--prompt", "x", "--fail"])
    assert r.error == "ValueError: refusing 'x' (main.py:21)"
    assert "Traceback" in r.log and "refusing 'x'" in r.log
    r = runtime.run(built, [])  # argparse: usage on stderr (the log), exit status 2
    assert r.error == "exited with status 2"
    assert "main.py: error: the following arguments are required: --prompt" in r.log
    check_pages(runtime)


def test_build_errors(tmp_path):
    with pytest.raises(BuildError, match="is not a directory"):
        build_inferlet(tmp_path / "absent", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BuildError, match=r"has no main\.py"):
        build_inferlet(empty, progress=False)

    d = write_dir(tmp_path / "d")
    (d / "main.py").write_text("import helper\n\nprint('a'\n")
    with pytest.raises(BuildError, match=r"^SyntaxError: .* \(main\.py:3\)$"):
        build_inferlet(d, progress=False)
    (d / "main.py").write_text(MAIN)
    (d / "textpkg" / "fmt.py").write_text("def banner(s)\n    return s\n")
    with pytest.raises(BuildError, match=r"^SyntaxError: .* \(textpkg/fmt\.py:1\)$"):
        build_inferlet(d, progress=False)
    (d / "textpkg" / "fmt.py").write_text(TEXTPKG_FMT)

    (d / "main.py").write_text("import json\ntry:\n    import maybe_absent\nexcept ImportError:\n    pass\n"
                               "import not_a_module\n")
    with pytest.raises(BuildError, match=r"^main\.py:6: no module named 'not_a_module' \(not in DIR, "):
        build_inferlet(d, progress=False)
    (d / "main.py").write_text(MAIN)

    (d / "inferlet.py").write_text("x = 1\n")
    with pytest.raises(BuildError, match=r"inferlet\.py in DIR would shadow .* 'inferlet'"):
        build_inferlet(d, progress=False)
    (d / "inferlet.py").unlink()

    # markupsafe has only compiled (platform) wheels here: pip finds no pure-Python one
    (d / "requirements.txt").write_text("# compiled\nmarkupsafe\n")
    with pytest.raises(BuildError, match=r"^requirements\.txt: no pure-Python wheel of markupsafe "):
        build_inferlet(d, progress=False)
    assert not list(d.glob("*.wasm")) and not list(d.glob(".*.tmp"))


def test_cli_build_then_run_with_a_requirement(tmp_path):
    d = tmp_path / "punycode"
    d.mkdir()
    (d / "requirements.txt").write_text("idna\n")
    (d / "main.py").write_text(textwrap.dedent('''\
        import sys

        import idna
        import inferlet

        for name in sys.argv[1:]:
            print(idna.encode(name).decode("ascii"))
        print(inferlet.decode(inferlet.encode("Paris", add_bos=False)))
    '''))
    out = tmp_path / "dist" / "puny.wasm"
    b = pie("build", str(d), "-o", str(out))
    assert b.returncode == 0, b.stderr
    assert out.is_file() and not (d / "punycode.wasm").exists()
    size_mib = f"{out.stat().st_size / 2**20:.1f} MiB"
    assert b.stdout.startswith(f"{out} ({size_mib}) built in ") and b.stdout.endswith(" s\n")
    assert "installing requirements.txt" in b.stderr

    r = pie("run", str(out), "--", "bücher.example", "ドメイン.テスト")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "xn--bcher-kva.example\nxn--eckwd4c7c.xn--zckzah\nParis\n"

    bad = pie("build", str(tmp_path / "nowhere"))
    assert bad.returncode == 1
    assert bad.stderr == f"pie: error: {tmp_path / 'nowhere'} is not a directory (pie build DIR: DIR holds main.py)\n"
