"""Inferlets through the runner's CUDA path (pie.engine.attention.cuda + device_sampling), on any
machine: the session engine's runner is switched to the CUDA attention backend over the PyTorch
stand-in kernels (tests/cuda/reference_kernels.py, float32 like the engine here), and each inferlet
must print what it prints on the PyTorch path. What crosses the path: decode and prefill batches from
many instances, forked (copy-on-write) contexts, custom attention masks with pages dropped (windowed
attention), multi-token verification passes (speculative decoding), output masks from a grammar
(constrained decoding), top-k distributions and logprobs (beam search, handled on the host)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "cuda"))

import reference_kernels  # noqa: E402
from pie.engine.attention.cuda import CudaAttention  # noqa: E402
from pie.engine.device_sampling import DeviceSampling  # noqa: E402

RUNS = [
    ("text_completion", "--prompt", "Name three colours.", "--max-tokens", 12, "--temperature", 0),
    ("beam_search", "--prompt", "What is the capital of France?", "--beams", 3, "--max-tokens", 6,
     "--ignore-eos", "--json"),
    ("speculative_decoding", "--prompt", "Repeat exactly: red, green, blue, red, green, blue.", "--max-tokens", 16,
     "--temperature", 0),
    ("windowed_attention", "--prompt", "Tell me a story.", "--max-tokens", 40, "--window", 32, "--temperature", 0,
     "--ignore-eos"),
    ("constrained_decoding", "--prompt", "Give a number.", "--regex", "[0-9]{2,4}", "--max-tokens", 8),
]


@pytest.fixture
def kernel_path(model, monkeypatch):
    """Switches the session runner to the CUDA path over the stand-in kernels for one test."""
    runner = model.runner
    monkeypatch.setattr(runner, "attention",
                        CudaAttention(runner.model_config, runner.cache, kernels=reference_kernels))
    monkeypatch.setattr(runner, "device_sampling", DeviceSampling(runner.sampling, kernels=reference_kernels))
    return runner


@pytest.mark.parametrize("run", RUNS, ids=[r[0] for r in RUNS])
def test_inferlet_output_is_the_same_on_the_kernel_path(run_inferlet, model, run, request):
    name, *args = run
    want = run_inferlet(name, *args)
    runner = request.getfixturevalue("kernel_path")
    passes = runner.num_forward_passes
    got = run_inferlet(name, *args)
    assert runner.num_forward_passes > passes  # the runner ran, on the kernel path
    assert same(got.output, want.output), f"kernel path: {got.output!r}\nPyTorch path: {want.output!r}"


def same(a: str, b: str) -> bool:
    """Equal text; JSON outputs equal with floats (scores) within float32 summation-order noise."""
    if a == b:
        return True
    try:
        return _close(json.loads(a), json.loads(b))
    except json.JSONDecodeError:
        return False


def _close(x, y) -> bool:
    if isinstance(x, float) or isinstance(y, float):
        return x == pytest.approx(y, rel=1e-4, abs=1e-5)
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_close(u, v) for u, v in zip(x, y))
    return x == y
