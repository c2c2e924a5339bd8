"""Fixtures of the application-layer tests: one engine and one runtime per session (the Python runtime
component is built once and cached under $PIE_HOME/python-runtime, compiled under $PIE_HOME/components)."""

import textwrap

import pytest


@pytest.fixture(scope="session")
def engine():
    from pie.engine.generate import Engine

    return Engine(progress=False)


@pytest.fixture(scope="session")
def runtime(engine):
    from pie.runtime import Runtime, RuntimeConfig

    rt = Runtime(engine, RuntimeConfig(deadline_s=120))
    rt.python_runtime()  # build / load once
    yield rt
    rt.close()


@pytest.fixture
def run_py(runtime):
    """run_py(source, *args, **launch_kwargs) -> InstanceResult; checks the page pool is whole afterwards."""

    def run(source: str, *args: str, **kwargs):
        result = runtime.run_source(textwrap.dedent(source), list(args), filename="guest.py", **kwargs)
        assert runtime.num_free_pages == runtime.num_pages, "pages leaked by the instance"
        return result

    return run
