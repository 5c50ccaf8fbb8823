"""The job lock: at most one hygiene job touches the API and the database at a time, across every
worker on every host.

It is a Redis key set with ``SET NX PX``: taking it never blocks (a job that finds it taken is
skipped, not queued behind). It is a short lease: a heartbeat thread renews it every
``RENEW_EVERY`` while the job runs, so it expires within ``LEASE_TTL`` of its holder dying (a killed
worker blocks the schedule for at most that long, not for the job's whole time limit). Its value
says who holds it, and only the holder can renew or release it (compare-and-set in one Lua script),
so a job that outlived its lock can never extend or release the lock of the job after it.
"""

from __future__ import annotations

import contextvars
import json
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis

from keyhygiene import logging as khlog
from keyhygiene.timeutil import isoformat

log = khlog.get_logger(__name__)

LOCK_KEY = "keyhygiene:job-lock"
LEASE_TTL = 90.0
"""Seconds the lock outlives its last renewal: the longest a dead worker blocks the schedule."""
RENEW_EVERY = 20.0

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


def redis_client(url: str, *, timeout: float = 5.0) -> redis.Redis:
    """A Redis client for ``url`` that gives up on a dead server within ``timeout`` seconds."""
    return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)


@dataclass(frozen=True, slots=True)
class LockHolder:
    """Who holds the lock, as written in its value."""

    kind: str | None
    task_id: str | None
    since: str | None

    def describe(self) -> str:
        task = f" (task {self.task_id})" if self.task_id else ""
        since = f" since {self.since}" if self.since else ""
        return f"a {self.kind or 'job'}{task}{since}"


class JobLock:
    """One attempt at the job lock; use ``acquire()`` then ``release()``."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_seconds: float = LEASE_TTL,
        renew_every: float = RENEW_EVERY,
        key: str = LOCK_KEY,
    ) -> None:
        self._client = client
        self._ttl_ms = int(ttl_seconds * 1000)
        self._renew_every = renew_every
        self._key = key
        self._value: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self, *, kind: str, task_id: str | None, now: datetime) -> bool:
        """Take the lock if it is free; never waits. Raises redis.RedisError if Redis is unreachable."""
        value = json.dumps({"token": uuid.uuid4().hex, "kind": kind, "task_id": task_id, "since": isoformat(now)})
        if self._client.set(self._key, value, nx=True, px=self._ttl_ms):
            self._value = value
            # The log context (task, job) goes with the renewals: a lost lock names the job it was.
            renew = contextvars.copy_context().run
            self._heartbeat = threading.Thread(
                target=renew, args=(self._renew_until_released,), name="job-lock", daemon=True
            )
            self._heartbeat.start()
            return True
        return False

    def renew(self) -> bool:
        """Push the lock's expiry ``ttl_seconds`` out, if this attempt still holds it."""
        if self._value is None:
            return False
        return bool(self._client.eval(_RENEW, 1, self._key, self._value, self._ttl_ms))

    def _renew_until_released(self) -> None:
        while not self._stop.wait(self._renew_every):
            try:
                if not self.renew():
                    log.error("job_lock_lost", key=self._key)
                    return
            except redis.RedisError as exc:
                # Redis is away (restarting?): keep trying; the lock expires on its own meanwhile.
                log.warning("job_lock_not_renewed", error=str(exc))

    def holder(self) -> LockHolder | None:
        """Who holds the lock now (None if nobody, or if it cannot be read)."""
        try:
            raw: Any = self._client.get(self._key)
        except redis.RedisError:
            return None
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return LockHolder(None, None, None)
        return LockHolder(data.get("kind"), data.get("task_id"), data.get("since"))

    def release(self) -> bool:
        """Release the lock if this attempt still holds it; True if it did."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=self._renew_every + 10)
        if self._value is None:
            return False
        value, self._value = self._value, None
        return bool(self._client.eval(_RELEASE, 1, self._key, value))
