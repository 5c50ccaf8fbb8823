"""The worker's heartbeat: a consumer bootstep that touches a file while the worker consumes.

It starts after the task consumer and is stopped with it, so when the broker connection is lost
(and the consumer restarts) the file goes stale until the worker is consuming again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import bootsteps

from keyhygiene import logging as khlog

from .health import HEARTBEAT_INTERVAL, mark_stopped, touch

log = khlog.get_logger(__name__)


def heartbeat_step(path: Path, interval: float = HEARTBEAT_INTERVAL) -> type[bootsteps.StartStopStep]:
    """A consumer bootstep class that keeps ``path`` fresh every ``interval`` seconds."""

    class Heartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, consumer: Any, **kwargs: Any) -> None:
            super().__init__(consumer, **kwargs)
            self.tref: Any = None

        def _beat(self) -> None:
            try:
                touch(path)
            except OSError as exc:
                log.warning("heartbeat_not_written", path=str(path), error=str(exc))

        def start(self, consumer: Any) -> None:
            self._beat()
            self.tref = consumer.timer.call_repeatedly(interval, self._beat)

        def stop(self, consumer: Any) -> None:
            if self.tref is not None:
                self.tref.cancel()
                self.tref = None

        def shutdown(self, consumer: Any) -> None:
            self.stop(consumer)
            try:
                mark_stopped(path)
            except OSError as exc:
                log.warning("heartbeat_not_written", path=str(path), error=str(exc))

    return Heartbeat
