"""Stopping on SIGTERM or Ctrl-C without leaving a change unrecorded.

A command stops at once when told to, except while a change to a key is in flight: between the
intent written to the audit log and its outcome. A stop asked for then is held until the outcome is
recorded (its request with its retries and the look at the key before a retry, and the read after
a lost answer: ``keysapi.timing.longest_change``) and
raised right after, so the audit log says what became of that change. A second signal while one is
held (or a SIGKILL) stops at once: the intent stays pending, and the next enforcement settles it
from the key's fresh state.

In a worker's pool process, Celery's soft time limit arrives the same way (SIGUSR1, whose handler
raises SoftTimeLimitExceeded): it is held as well, and raised once the outcome is recorded. The
hard limit comes later by at least the longest one change may take, plus 30 s (``worker.limits``).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, Kubernetes, ``timeout``) or Ctrl-C: a job records its run (and
    snapshot) as aborted on the way out, and the command exits 1."""


_holding = 0
_held: str | None = None


def _stop(signum: int, _: Any) -> None:
    global _held
    why = "interrupted" if signum == signal.SIGINT else f"terminated by {signal.Signals(signum).name}"
    if _holding and _held is None:
        _held = why
        return
    raise Terminated(why)


_SOFT_LIMIT = signal.SIGUSR1
"""billiard's SIG_SOFT_TIMEOUT: how a Celery pool tells a job that its soft time limit has come."""


@contextmanager
def change_in_flight() -> Iterator[None]:
    """Hold a stop (or a soft time limit) asked for inside the block until the block ends, then raise it."""
    global _holding, _held
    release = None
    try:
        # First in the try: a signal's handler runs at a call, not between these bytecodes, so a
        # soft limit arriving while the hold is set up (inside the call below) still finds the
        # count taken back in ``finally``: left at 1, it would hold every later SIGTERM forever.
        _holding += 1
        if _holding == 1:
            release = _hold_soft_limit()
        yield
    finally:
        _holding -= 1
        came = release() if release is not None else None
        if not _holding and _held is not None:
            why, _held = _held, None
            raise Terminated(why)
        if came is not None:
            came()


def _hold_soft_limit() -> Callable[[], Callable[[], None] | None] | None:
    """Hold SIGUSR1 when a handler of its own is installed (a pool process's soft time limit); the
    release restores that handler and returns what raises the held signal, if it came."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(_SOFT_LIMIT)
    if not callable(previous):
        return None  # no pool here: SIGUSR1 keeps its default
    came: list[int] = []
    signal.signal(_SOFT_LIMIT, lambda signum, _: came.append(signum))

    def release() -> Callable[[], None] | None:
        signal.signal(_SOFT_LIMIT, previous)
        if not came:
            return None
        return lambda: previous(_SOFT_LIMIT, None)

    return release


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into Terminated while a command runs, held during a change in
    flight. Only the main thread can handle signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def stop_pool_process_on_sigterm() -> Iterator[None]:
    """In a worker's pool process, take SIGTERM as a command does while a job runs: Terminated,
    held during a change in flight, so the job records its run aborted and what became of every
    change, and returns. The pool's own handler is back once the job has ended.

    The pool process gets SIGTERM when a service manager stops the worker's whole process group
    (systemd's default ``KillMode=control-group``) or from ``celery control revoke --terminate``.
    billiard's handler would raise SystemExit wherever the job is, between a change's intent and its
    outcome too. The job ends early instead, recorded, and the process lives on: the worker it
    belongs to is stopping (a warm shutdown ends its pool once the job has returned) or, after a
    revoke, takes the next message. (A SIGTERM before the job has started its run, or after it has
    ended, still ends the process at once: there is no change in flight then.) Only for a pool's
    process: in the worker's own (``--pool solo``), SIGTERM is Celery's warm shutdown, which lets
    the job finish. Only the main thread can handle signals: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
