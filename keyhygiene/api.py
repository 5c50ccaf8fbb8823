"""The API as the jobs open it: a client built from the settings with its credential checked, and a
sync's listing begun before the rest of the job is ready for it.

It loads the API client and nothing of the database, so that a command can start asking for pages
before it loads the job's modules.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from keyhygiene.keysapi.errors import ApiError, AuthenticationFailed
from keyhygiene.keysapi.paging import KeyStream, ProgressCallback

from .errors import NotAManagementKey, UsageError
from .logging import register_secret
from .settings import Settings
from .timeutil import utcnow

if TYPE_CHECKING:
    from keyhygiene.keysapi.client import KeysClient
    from keyhygiene.keysapi.models import Workspace


def open_client(settings: Settings, *, verify: bool = True) -> KeysClient:
    """A client for the configured API; with ``verify``, ``GET /key`` must say it is a management key."""
    from keyhygiene.keysapi.client import KeysClient, environment_problem  # httpx: only commands that call the API

    key = settings.require_management_key()
    register_secret(key)
    if (problem := environment_problem(settings.base_url)) is not None:
        raise UsageError(problem)
    client = KeysClient(
        settings.base_url,
        key,
        concurrency=settings.http_concurrency,
        timeout=settings.http_timeout,
        retry_seconds=settings.http_retry_seconds,
    )
    if verify:
        try:
            verify_management_key(client)
        except BaseException:
            client.close()
            raise
    return client


def verify_management_key(client: KeysClient) -> None:
    """Refuse to go on unless the credential is a management key (exit 2 otherwise)."""
    try:
        current = client.current_key()
    except AuthenticationFailed as exc:
        raise NotAManagementKey(
            f"OPENROUTER_MANAGEMENT_KEY was rejected by the API ({exc.status}): check that it is a valid management key"
        ) from None
    except ApiError:
        raise
    if not current.is_management_key:
        raise NotAManagementKey(
            "OPENROUTER_MANAGEMENT_KEY is not a management key: GET /key reports is_management_key=false; "
            "create a management key at https://openrouter.ai/settings/management-keys"
        )


class EarlyListing:
    """A sync's listing, begun by a command once it has opened the store, before it loads the job's
    other modules and records the run: the API's latency is waited out meanwhile.

    A thread opens the client (``GET /key`` checks the credential), lists the workspaces and starts
    the key stream, which fetches up to ``HEAD_START_PAGES`` pages ahead of the sync. It only reads:
    a command that stops before the sync takes the listing (a locked database, a signal)
    ``close``\\ s it, and loses a few page requests. What failed is raised where the sync would
    have met it: :meth:`client` raises what opening the client raised, :meth:`take` what listing
    the workspaces raised (the sync fails, recorded as any failed listing), and the stream raises
    what a page request raised.
    """

    HEAD_START_PAGES = 100
    """Most pages fetched before the sync takes them (10,000 keys, about 20 MB of parsed JSON):
    about what the API answers at a concurrency of 8 and 20 ms while the command starts."""

    def __init__(self, settings: Settings, on_page: ProgressCallback | None) -> None:
        import keyhygiene.keysapi.client  # noqa: F401  here, not in the thread: imports in two threads at once can deadlock

        # Before the thread starts: meanwhile the command's log lines are redacted by reading the
        # registered secrets, which must not grow while they are read.
        register_secret(settings.require_management_key())
        self._settings, self._on_page = settings, on_page
        self._lock = threading.Lock()
        self._closed = False
        self._client: KeysClient | None = None
        self._workspaces: list[Workspace] = []
        self._stream: KeyStream | None = None
        self._error: BaseException | None = None
        self.requests_before = 0
        """Requests the client had sent when the listing began (the credential check)."""
        self.started = 0.0
        """``time.monotonic()`` when the listing began."""
        self.began_at = utcnow()
        """When the listing began, once the credential was checked: the snapshot's time, which
        comes before anything the listing saw."""
        self._thread = threading.Thread(target=self._begin, name="keysapi-early", daemon=True)

    @classmethod
    def begin(cls, settings: Settings, *, on_page: ProgressCallback | None = None) -> EarlyListing:
        early = cls(settings, on_page)
        early._thread.start()
        return early

    def _begin(self) -> None:
        try:
            client = open_client(self._settings)
        except BaseException as exc:
            self._error = exc
            return
        with self._lock:
            closed, self._client = self._closed, client
        if closed:
            client.close()
            return
        try:
            self.requests_before, self.started, self.began_at = client.requests_sent, time.monotonic(), utcnow()
            workspaces = client.list_workspaces()
            stream = client.stream_inventory(workspaces, on_page=self._on_page, room=self.HEAD_START_PAGES)
            with self._lock:
                if self._closed:
                    return
                stream.start()
                self._workspaces, self._stream = workspaces, stream
        except BaseException as exc:
            self._error = exc

    def client(self) -> KeysClient:
        """The client, once its credential was checked; raises what opening it raised."""
        self._thread.join()
        if self._client is None:
            assert self._error is not None
            raise self._error
        return self._client

    def take(self) -> tuple[list[Workspace], KeyStream]:
        """The workspaces and the started stream of their keys; raises what listing the workspaces
        raised. Iterate the stream once, to its end or to a failure."""
        self.client()
        if self._stream is None:
            assert self._error is not None
            raise self._error
        return self._workspaces, self._stream

    def close(self) -> None:
        """Stop the listing if nothing took it to its end, and close the client. It does not wait
        for the requests in flight (a command stopping at once must not wait out their retries):
        the threads end by themselves after them, asking for nothing more."""
        with self._lock:
            self._closed = True
            stream, client = self._stream, self._client
        if stream is not None:
            stream.close(wait=False)
        if client is not None:
            client.close()

    def __enter__(self) -> EarlyListing:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
