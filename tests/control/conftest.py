"""Fixtures of the control-layer tests."""

from __future__ import annotations

import pytest

from control_fakes import FakeRunner
from pie.control import PagePool, Scheduler


@pytest.fixture
def fake_runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def terminations() -> list:
    """(instance, message) of each termination the `pool` reports."""
    return []


@pytest.fixture
def pool(terminations):
    """A pool of 16 pages of 4 tokens; its invariants are checked at teardown."""
    pool = PagePool(num_pages=16, page_size=4, on_terminate=lambda i, m: terminations.append((i, m)))
    yield pool
    pool.check_invariants()


@pytest.fixture
def make_scheduler():
    """Builds schedulers and stops them at teardown (no thread is left blocked in take)."""
    made: list[Scheduler] = []

    def make(**kwargs) -> Scheduler:
        kwargs.setdefault("max_batch_requests", 64)
        kwargs.setdefault("max_batch_tokens", 4096)
        scheduler = Scheduler(**kwargs)
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.stop("test finished")
