"""How long the client may take: the ceiling of its own backoff, and the longest one change may take.

Pure arithmetic, without httpx: the lease and the worker's time limits read it too.
"""

from __future__ import annotations

from datetime import timedelta

LONGEST_BACKOFF = 10.0
"""Seconds between two tries of a request at most, when the API names no wait: the last try may
start this long after the retry time (``client._StopRetrying``)."""


def longest_change(*, retry_seconds: float, timeout: float) -> timedelta:
    """The longest one change to a key may take: its request (with, before its last try, the GET
    that looks at the key again before sending it again) and, when the answer is lost, the fresh
    GET after it: three requests, each retried for ``retry_seconds``
    (``KEYHYGIENE_HTTP_RETRY_SECONDS``), with a last try that may start one backoff later and take
    up to ``timeout``."""
    one_request = timedelta(seconds=retry_seconds + timeout + LONGEST_BACKOFF)
    return 3 * one_request
