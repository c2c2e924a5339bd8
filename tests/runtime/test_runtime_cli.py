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
