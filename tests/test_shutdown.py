"""Signals around a change in flight, in this process (the drills send them to real processes)."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from keyhygiene import shutdown


class SoftTimeLimit(Exception):
    """What billiard's SIGUSR1 handler raises in a pool process."""


@pytest.fixture
def soft_limit_handler() -> Iterator[None]:
    def handler(*_: Any) -> None:
        raise SoftTimeLimit

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_soft_limit_arriving_while_a_change_begins_leaves_sigterm_working(
    soft_limit_handler: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The soft limit lands while the hold of a change is being set up: the job ends there, and
    # the pool process lives on to run the next job, where SIGTERM must still stop it.
    hold: Callable[[], Any] = shutdown._hold_soft_limit

    def landing_now() -> Any:
        signal.raise_signal(signal.SIGUSR1)  # its handler runs here, before the hold is in place
        return hold()

    monkeypatch.setattr(shutdown, "_hold_soft_limit", landing_now)
    with pytest.raises(SoftTimeLimit), shutdown.change_in_flight():
        pytest.fail("the change began after its time limit")
    monkeypatch.setattr(shutdown, "_hold_soft_limit", hold)

    with pytest.raises(shutdown.Terminated), shutdown.stop_on_signals():
        signal.raise_signal(signal.SIGTERM)
        pytest.fail("SIGTERM outside a change was held")


def test_sigterm_during_a_change_is_raised_once_the_change_ends(soft_limit_handler: None) -> None:
    ended = []
    with pytest.raises(shutdown.Terminated), shutdown.stop_on_signals():
        with shutdown.change_in_flight():
            signal.raise_signal(signal.SIGTERM)
            ended.append("the change")  # held: the change goes on to its end
        pytest.fail("the held SIGTERM was not raised after the change")
    assert ended == ["the change"]
