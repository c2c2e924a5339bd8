"""Fixtures of the application-layer tests (the session's `engine` and `runtime` are in tests/conftest.py)."""

import textwrap

import pytest


@pytest.fixture
def run_py(runtime):
    """run_py(source, *args, **launch_kwargs) -> InstanceResult; checks the page pool is whole afterwards."""

    def run(source: str, *args: str, **kwargs):
        result = runtime.run_source(textwrap.dedent(source), list(args), filename="guest.py", **kwargs)
        assert runtime.num_free_pages == runtime.num_pages, "pages leaked by the instance"
        return result

    return run
