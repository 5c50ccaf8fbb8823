"""Scripted misbehaviour of the fake API: latency, 429s, 5xxs, broken bodies and dropped connections.

Faults are queued and consumed in the order they were scheduled: each request takes one count from
the first queued fault whose method and path match it, so ``rate_limit(2)`` then ``server_error(1)``
answers 429, 429, 503 and then normally. Every method is safe to call from any thread, including
while the server is handling requests.
"""

from __future__ import annotations

import fnmatch
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .state import FakeOpenRouter

ListPageCallback = Callable[["FakeOpenRouter", str, int], Any]

KINDS = ("rate_limit", "server_error", "malformed", "truncated", "drop_connection", "drop_mid_body", "slow_answer")


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault to apply to one request."""

    kind: str
    status: int = 0
    retry_after: float | str | None = None
    """Seconds, or the header's text as it is sent (a malformed one, for instance)."""
    after_processing: bool = False
    delay: float = 0.0


@dataclass(slots=True)
class _Scheduled:
    fault: Fault
    remaining: int
    method: str | None
    path: str | None

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        return self.path is None or fnmatch.fnmatchcase(path, self.path)


class Faults:
    """What the fake does wrong, and when.

    ``path`` is matched against the path below ``/api/v1`` (``/keys``, ``/keys/<hash>``, ``/key``,
    ``/workspaces``) with shell-style wildcards, so ``"/keys"`` targets only the list and create
    endpoint and ``"/keys*"`` every key endpoint. ``method`` narrows further (``"GET"``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[_Scheduled] = []
        self._on_list_page: ListPageCallback | None = None
        self._rng = random.Random(0)
        self.latency: float = 0.0
        self.latency_jitter: float = 0.0
        self.past_end_status: int | None = None
        """What ``GET /keys`` answers for an offset past the last key (but 0): ``[]`` when None, as
        the API facts infer; else this 4xx, which no document rules out."""

    def rate_limit(
        self, count: int, retry_after: float | str | None = 1, *, method: str | None = None, path: str | None = None
    ) -> None:
        """The next ``count`` matching requests get 429, with ``Retry-After`` unless it is None (a
        string is sent as it is)."""
        self._schedule(Fault("rate_limit", 429, retry_after), count, method, path)

    def server_error(
        self,
        count: int,
        status: int = 503,
        *,
        retry_after: float | None = None,
        method: str | None = None,
        path: str | None = None,
        after_processing: bool = False,
    ) -> None:
        """The next ``count`` matching requests get ``status`` (a 5xx) with the standard error body.

        With ``after_processing`` the request takes effect first, as behind a gateway that answers
        5xx once the API behind it has acted."""
        if not 500 <= status <= 599:
            raise ValueError(f"server_error status must be 5xx, got {status}")
        fault = Fault("server_error", status, retry_after, after_processing=after_processing)
        self._schedule(fault, count, method, path)

    def malformed(self, count: int, *, method: str | None = "GET", path: str | None = "/keys") -> None:
        """The next ``count`` matching responses are an HTML page with status 200 instead of JSON."""
        self._schedule(Fault("malformed", 200), count, method, path)

    def truncated(self, count: int, *, method: str | None = "GET", path: str | None = "/keys") -> None:
        """The next ``count`` matching responses carry only the first half of their JSON body.

        The request is processed normally (a truncated PATCH still changes the key) and
        Content-Length matches the bytes sent, so the client sees a parse error, not a hang.
        """
        self._schedule(Fault("truncated"), count, method, path)

    def drop_connection(
        self,
        count: int,
        *,
        after_processing: bool = False,
        method: str | None = None,
        path: str | None = None,
    ) -> None:
        """The next ``count`` matching requests get their socket closed with no response.

        With ``after_processing`` the request takes effect first, as when a response is lost.
        """
        self._schedule(Fault("drop_connection", after_processing=after_processing), count, method, path)

    def drop_mid_body(self, count: int, *, method: str | None = None, path: str | None = None) -> None:
        """The next ``count`` matching requests take effect, then their answer stops half-way.

        The headers announce the whole body; the socket closes after half of it, as when a
        connection breaks mid-body (the client sees a protocol error, not a parse error).
        """
        self._schedule(Fault("drop_mid_body", after_processing=True), count, method, path)

    def slow_answer(self, count: int, seconds: float, *, method: str | None = None, path: str | None = None) -> None:
        """The next ``count`` matching requests take effect at once, but their answer waits ``seconds``
        (long enough, and a client's read timeout fires after the change was made)."""
        self._schedule(Fault("slow_answer", after_processing=True, delay=seconds), count, method, path)

    def on_list_page(self, callback: ListPageCallback | None) -> None:
        """Run ``callback(fake, workspace_id, offset)`` before each ``GET /keys`` page is computed.

        It runs outside the fake's lock, so it may add, change or delete keys. None removes it.
        """
        with self._lock:
            self._on_list_page = callback

    def clear(self) -> None:
        """Forget every queued fault, the list-page callback and the latency."""
        with self._lock:
            self._queue.clear()
            self._on_list_page = None
            self.latency = 0.0
            self.latency_jitter = 0.0

    @property
    def pending(self) -> int:
        """How many faulted responses are still queued."""
        with self._lock:
            return sum(item.remaining for item in self._queue)

    def take(self, method: str, path: str) -> Fault | None:
        """Consume and return the fault for this request, if one is queued for it."""
        with self._lock:
            for index, item in enumerate(self._queue):
                if item.matches(method, path):
                    item.remaining -= 1
                    if item.remaining <= 0:
                        del self._queue[index]
                    return item.fault
        return None

    def list_page_callback(self) -> ListPageCallback | None:
        with self._lock:
            return self._on_list_page

    def delay(self) -> float:
        """Seconds to wait before answering this request."""
        with self._lock:
            jitter = self._rng.uniform(0.0, self.latency_jitter) if self.latency_jitter > 0 else 0.0
            return max(0.0, self.latency + jitter)

    def _schedule(self, fault: Fault, count: int, method: str | None, path: str | None) -> None:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if count == 0:
            return
        with self._lock:
            self._queue.append(_Scheduled(fault, count, method, path))
