"""`pie run`: the bundled text_completion prints exactly what `pie generate` prints."""

from cli_helpers import run_pie as pie

PROMPT = "What is the capital of France?"


def test_run_text_completion_matches_generate(runtime):  # runtime: the Python runtime is built already
    run = pie("run", "text_completion", "--", "--prompt", PROMPT, "--max-tokens", "32", "--temperature", "0")
    gen = pie("generate", "--prompt", PROMPT, "--max-tokens", "32", "--temperature", "0")
    assert run.returncode == 0, run.stderr
    assert gen.returncode == 0, gen.stderr
    assert run.stdout == gen.stdout == "The capital of France is Paris.\n"


def test_run_reports_errors_with_exit_status(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("print('partial')\nraise RuntimeError('it broke')\n")
    r = pie("run", str(bad))
    assert r.returncode == 1
    assert r.stdout == "partial\n"
    assert "pie: error: bad.py: RuntimeError: it broke (bad.py:2)" in r.stderr
    r = pie("run", "no_such_inferlet")
    assert r.returncode == 1 and "no inferlet named 'no_such_inferlet'" in r.stderr


def test_run_reads_at_file_arguments_on_the_client_side(tmp_path, runtime):
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    echo = tmp_path / "echo.py"
    echo.write_text("import sys\nprint(sys.argv[1:])\n")
    r = pie("run", str(echo), "--", "--json-schema", f"@{schema}", "@@literal", "plain")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "['--json-schema', '{\"type\": \"object\"}', '@literal', 'plain']\n"
    r = pie("run", str(echo), "--", f"@{tmp_path / 'missing.json'}")
    assert r.returncode == 1 and "inferlet argument @" in r.stderr and "missing.json" in r.stderr
    assert "Traceback" not in r.stderr


def test_generate_and_run_ignore_eos_agree(runtime):
    args = ["--prompt", PROMPT, "--max-tokens", "12", "--temperature", "0", "--ignore-eos"]
    run = pie("run", "text_completion", "--", *args)
    gen = pie("generate", *args)
    assert run.returncode == 0 and gen.returncode == 0, run.stderr + gen.stderr
    assert run.stdout == gen.stdout
    assert run.stdout.startswith("The capital of France is Paris.") and len(run.stdout) > len("The capital of France is Paris.\n")
