"""The enforcement lease: one job that changes keys at a time, across processes, workers and hosts.

A job takes the lease before it starts (``EnforcementLease.acquire``); a second one finds it taken
and is recorded as skipped. While the job runs, a heartbeat thread renews the lease every
``RENEW_EVERY``; a holder that dies stops renewing, and its lease is taken over once it is
``TTL`` old (or, after a fence, once the fence's longer hold has passed), or at once when the
holder ran on this machine (same boot and PID namespace), its process no longer exists and no
fence still holds the lease for a change it may have had in flight. Before
every destructive API call the job checks that the lease is still its own (``fence``): a holder
that was too slow to renew, and lost the lease to another process, stops before it changes
anything. The fence also holds the lease for as long as
that change may take (``hold_for``) on top of ``TTL``, however the renewals fare meanwhile: a holder
cut off from the database mid-change is not taken over, and its change settled by another job,
while its request may still land.

The lease times come from this process's clock; hosts sharing a database are expected to keep
their clocks in step (NTP), and a skew well under ``TTL - RENEW_EVERY`` is harmless.

``RunHeartbeat`` keeps a job run from the command line from being taken for dead while it runs.
"""

from __future__ import annotations

import contextvars
import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from db import leases, runs

from .context import Database, describe_db_error, session_scope
from .errors import DatabaseFailure, KeyhygieneError
from .logging import get_logger
from .timeutil import isoformat, utcnow

log = get_logger(__name__)

TTL = timedelta(seconds=90)
RENEW_EVERY = timedelta(seconds=20)


def process_space() -> str | None:
    """This process's kernel boot and PID namespace: two processes that share it see each other's
    pids, so one can tell for sure whether the other is still alive. None where it cannot be read."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot}/{namespace}"[:128]


def _is_dead(holder: leases.LeaseHolder, space: str | None) -> bool:
    """True only when ``holder`` is surely dead: same boot and PID namespace, and no such process."""
    if space is None or holder.process_space != space or holder.pid is None:
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists but is not ours to signal
        return False
    return _is_zombie(holder.pid)


def _is_zombie(pid: int) -> bool:
    """A killed process that nobody reaped yet (an orphaned pool child, say) is dead all the same."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name, which is in parentheses and may itself hold spaces.
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


class LeaseLost(KeyhygieneError):
    """The enforcement lease is no longer ours: stop before changing anything else (exit 1)."""


class EnforcementLease:
    """One attempt at the enforcement lease: ``acquire()``, then ``fence()`` before each change,
    then ``release()``."""

    def __init__(
        self,
        database: Database,
        *,
        job: str,
        ttl: timedelta = TTL,
        renew_every: timedelta = RENEW_EVERY,
        name: str = leases.ENFORCEMENT,
        hold_for: timedelta = timedelta(0),
    ) -> None:
        self._database = database
        self.job = job
        self.name = name
        self.ttl = ttl
        self.hold_for = hold_for
        """The longest one change may take: ``fence`` holds the lease this much longer than ``ttl``."""
        self.renew_every = renew_every
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.process_space = process_space()
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.held_by: leases.LeaseHolder | None = None
        """Who held the lease when ``acquire`` found it taken."""

    def acquire(self) -> bool:
        """Take the lease and start renewing it; False (and ``held_by`` set) when another job holds it.

        Never waits. Raises DatabaseFailure when the database cannot answer.
        """
        try:
            with session_scope(self._database) as session:
                previous = leases.holder(session, self.name)
                dead = (
                    previous is not None
                    and self._holds_nothing_in_flight(previous)
                    and _is_dead(previous, self.process_space)
                )
                taken = leases.try_acquire(
                    session,
                    self.name,
                    token=self.token,
                    host=self.host,
                    pid=self.pid,
                    process_space=self.process_space,
                    job=self.job,
                    now=utcnow(),
                    ttl=self.ttl,
                    dead_token=previous.token if dead and previous is not None else None,
                )
        except SQLAlchemyError as exc:
            raise DatabaseFailure(f"cannot take the enforcement lock: {describe_db_error(exc)}") from None
        if not taken:
            self.held_by = previous
            return False
        if previous is not None:
            log.warning(
                "enforcement_lock_taken_over",
                previous_holder=previous.describe(),
                expired_at=isoformat(previous.expires_at),
            )
        # The log context (run, task) goes with the renewals: a lost lease names the run it was.
        renew = contextvars.copy_context().run
        self._heartbeat = threading.Thread(
            target=renew, args=(self._renew_until_stopped,), name="enforcement-lease", daemon=True
        )
        self._heartbeat.start()
        return True

    def _holds_nothing_in_flight(self, holder: leases.LeaseHolder) -> bool:
        """Whether a holder's fence no longer holds the lease for a change: its lease ends within
        ``ttl``, as every renewal leaves it. A process killed mid-change leaves its request to land
        at the API after its death; until that change surely ended, even a dead holder keeps the
        lease, so that no job settles the change as not made and sends it again."""
        return holder.expires_at is None or utcnow() >= holder.expires_at - self.ttl

    def fence(self) -> None:
        """Make sure the lease is still ours, and hold it for the change about to be made (``hold_for``
        and ``ttl``); raises LeaseLost when it is not ours."""
        if self._lost.is_set() or not self._renew(self.ttl + self.hold_for):
            self._lost.set()
            raise LeaseLost(
                "the enforcement lock was taken over by another process (this one stopped renewing it in time); "
                "stopped before the next change"
            )

    def release(self, *, in_doubt: Callable[[], bool] | None = None) -> None:
        """Stop renewing and free the lease (if it is still ours).

        ``in_doubt``: whether the job left a change in doubt (its answer lost, the key not changed
        yet when read again): its request may still land, and a job that settled it now would
        record it as not made. The lease is then kept, no longer renewed, until the hold of the
        job's last fence has passed (``fence``), as it is for a holder that dies mid-change; and
        kept too when the database cannot tell. The renewals stop first, whatever happens after."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=self.renew_every.total_seconds() + 5)
        try:
            keep = in_doubt is not None and in_doubt()
        except SQLAlchemyError:  # cannot tell: kept, it expires by itself
            keep = True
        if keep and not self._lost.is_set():
            log.warning(
                "enforcement_lock_kept",
                reason="a change left in doubt may still land: no job settles it before the lock expires",
                until=isoformat(self._expiry()),
            )
            return
        try:
            with session_scope(self._database) as session:
                leases.release(session, self.name, token=self.token)
        except SQLAlchemyError as exc:
            # Not fatal: the lease expires on its own within TTL.
            log.warning(
                "enforcement_lock_not_released", error=describe_db_error(exc), expires_in=self.ttl.total_seconds()
            )

    def _expiry(self) -> datetime | None:
        """When the lease expires, as it stands (None when unknown)."""
        try:
            with self._database.sessions() as session:
                holder = leases.holder(session, self.name)
        except SQLAlchemyError:
            return None
        return holder.expires_at if holder is not None and holder.token == self.token else None

    def _renew(self, ttl: timedelta | None = None) -> bool:
        with session_scope(self._database) as session:
            return leases.renew(session, self.name, token=self.token, now=utcnow(), ttl=ttl or self.ttl)

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.renew_every.total_seconds()):
            try:
                if not self._renew():
                    self._lost.set()
                    log.error("enforcement_lock_lost")
                    return
            except SQLAlchemyError as exc:
                # Keep trying: a lease is only lost once another process takes it over, and the
                # fencing check before each change finds that out.
                log.warning("enforcement_lock_not_renewed", error=describe_db_error(exc))


class RunHeartbeat:
    """A thread that renews a running job's ``runs.heartbeat_at`` until ``stop``, a few times within
    the age after which the next job takes the run for one whose process died (``stale_after``).

    For jobs run from the command line: they have no time limit, so only a heartbeat can show that
    a long one is still at work (``db.runs.abandon_stale_runs``). A renewal that fails is logged
    and tried again at the next beat."""

    LONGEST_BEAT = 60.0
    """Seconds between two renewals at most."""

    def __init__(self, database: Database, run_id: int, *, clock: Callable[[], datetime], every: float) -> None:
        self._database, self._run_id, self._clock, self._every = database, run_id, clock, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_until_stopped, name="run-heartbeat", daemon=True)

    @classmethod
    def start(
        cls, database: Database, run_id: int, *, clock: Callable[[], datetime], stale_after: timedelta
    ) -> RunHeartbeat:
        beat = cls(database, run_id, clock=clock, every=min(cls.LONGEST_BEAT, stale_after.total_seconds() / 4))
        beat._thread.start()
        return beat

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._every + 5)

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(self._every):
            try:
                with session_scope(self._database) as session:
                    if not runs.heartbeat(session, self._run_id, now=self._clock()):
                        return  # ended (or taken for dead): nothing left to renew
            except SQLAlchemyError as exc:
                log.warning("run_heartbeat_failed", run_id=self._run_id, error=describe_db_error(exc))
