"""Fixtures of the control-layer tests."""

from __future__ import annotations

import pytest

from control_fakes import FakeRunner
from pie.control import Scheduler


@pytest.fixture
def fake_runner() -> FakeRunner:
    return FakeRunner()


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
