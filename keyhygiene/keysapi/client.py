"""A thin, typed client for OpenRouter's API-keys (management) endpoints.

The client knows the wire format and nothing about rules. It retries what is worth retrying (429,
5xx other than 501 and 505, and connection failures, honouring ``Retry-After``) within a bounded total time, and turns
every other failure into a typed error from :mod:`keyhygiene.keysapi.errors`. A change (PATCH,
DELETE, POST) is re-sent only when it surely was not applied (no connection, 429, 503), and only
after the caller's ``before_resend`` has looked at the key again; when its answer is lost it raises
OutcomeUnknown instead of repeating a destructive call, as it does for any failure of a change
that a try answered 503 (which a gateway may send after the API acted) came before. A ``Retry-After`` holds
back every thread of the client, not only the request that got it, and one longer than the retry
time left ends the request at once instead of trying again early. It is safe to share
between threads; listing keeps ``concurrency`` requests in flight, never more
(:mod:`keyhygiene.keysapi.paging`). Requests go straight to httpx's transport (its connection
pool, with the proxy the environment names), without ``httpx.Client``'s per-request machinery.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit
from urllib.request import getproxies, proxy_bypass

import httpx
import orjson
from tenacity import Retrying, retry_if_exception_type, wait_exponential_jitter
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from .errors import (
    ApiError,
    CertificateRefused,
    ConnectionFailed,
    MalformedResponse,
    NotFound,
    OutcomeUnknown,
    RateLimited,
    ServerError,
    TransientError,
    rejection_for,
)
from .models import CreatedKey, CurrentKey, Key, Workspace
from .paging import PAGE_SIZE, KeyStream, ProgressCallback
from .reads import ReadTransport
from .timing import LONGEST_BACKOFF

WORKSPACE_PAGE_SIZE = 100
_ALWAYS_GIVEN = ("disabled", "usage")
"""Fields of a key object the API has always given, never null: without them a key's state and its
use cannot be told (a rule would read a disabled key as enabled, a key in use as idle), so a key
object without them is a malformed answer, not one of an older API to tolerate."""
_NOT_RETRIED_5XX = {501, 505}
"""5xx answers that no retry can change (not implemented, HTTP version): every other 5xx (500-504,
and the 52x a CDN such as Cloudflare answers for an origin that failed or took too long) is worth
another try of a read."""
_CHANGES = frozenset({"PATCH", "DELETE", "POST"})
"""Methods that change something (a POST creates a key): retried only when the request surely was
not applied (see ``_send_once``)."""
_REFUSED_STATUSES = {503}
"""5xx answers that refuse a request without acting on it; any other 5xx to a change (a 524 is a
CDN that stopped waiting for an API still at work) is in doubt."""
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
"""Transport failures that happen before a request is on the wire."""
_USER_AGENT = "keyhygiene/0.1 (+https://github.com/keyhygiene/keyhygiene)"
_BASE_HEADERS = [
    (b"Accept", b"*/*"),
    (b"Accept-Encoding", b"gzip, deflate"),
    (b"Connection", b"keep-alive"),
    (b"User-Agent", _USER_AGENT.encode()),
]

BeforeResend = Callable[[bool], None]
"""Called by a change's request just before it is sent again after a refused try (429, 503, no
connection), once any wait is over, with whether a try answered 503 may have made the change. The
caller looks at the key again there, and raises to withdraw the change: anything but an
:class:`ApiError` (which the request would read as its own) ends the request unsent."""


def _proxy_for(base_url: str) -> str | None:
    """The proxy the environment names for ``base_url`` (``HTTPS_PROXY``, ``HTTP_PROXY``,
    ``ALL_PROXY``, ``NO_PROXY``), as httpx's own client would use it."""
    url = urlsplit(base_url)
    if url.hostname is None or proxy_bypass(url.hostname):
        return None
    proxies = getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and "://" not in proxy:
        return "http://" + proxy  # as curl and httpx's own client take proxy.example:3128
    return proxy


def _host_and_port(url: str) -> str:
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.hostname or '?'}{port}"


def environment_problem(base_url: str) -> str | None:
    """What in the environment would fail every request to ``base_url`` before it is sent, named
    without quoting it (a proxy URL may hold a password), or None: a proxy variable that holds no
    proxy URL httpx takes, or ``SSL_CERT_FILE``/``SSL_CERT_DIR`` naming nothing there to read."""
    url = urlsplit(base_url)
    proxy = _proxy_for(base_url)
    if proxy is not None:
        variable = f"{url.scheme.upper()}_PROXY" if getproxies().get(url.scheme) else "ALL_PROXY"
        try:
            scheme = httpx.Proxy(proxy).url.scheme
            host = urlsplit(proxy).hostname or ""
            host.encode("idna")  # as the transport encodes it: an empty label (a..b) fails every request
        except (ValueError, httpx.InvalidURL, UnicodeError):
            return f"{variable} does not hold a proxy URL httpx can use (expected e.g. http://proxy.example:3128)"
        if scheme.startswith("socks") and importlib.util.find_spec("socksio") is None:
            return f"{variable} names a SOCKS proxy, which needs the socksio package (pip install 'httpx[socks]')"
    if url.scheme != "https" and not (proxy or "").startswith("https"):
        return None  # no TLS: the certificate authorities are never read
    if cafile := os.environ.get("SSL_CERT_FILE"):
        if not os.path.isfile(cafile):
            return f"SSL_CERT_FILE names {cafile}, which is not a file"
        try:
            ssl.create_default_context(cafile=cafile)
        except (ssl.SSLError, OSError, ValueError):
            return f"SSL_CERT_FILE names {cafile}, which holds no certificate that can be read (PEM expected)"
    elif (capath := os.environ.get("SSL_CERT_DIR")) and not os.path.isdir(capath):
        return f"SSL_CERT_DIR names {capath}, which is not a folder"
    return None


@dataclass(frozen=True, slots=True)
class Listing:
    """Every key of every workspace listed, de-duplicated by hash."""

    keys: dict[str, Key]
    per_workspace: dict[str, int]
    pages: int
    duplicates: int


_LEAST_WAIT = 0.25
"""Seconds between two tries of one request, whatever ``Retry-After`` says: an API that answers
``Retry-After: 0`` gets at most four tries a second from each thread, not a flood."""


class _StopRetrying(stop_base):
    """No more tries once ``seconds`` have passed since the first (the last try may start up to one
    backoff later), nor when the API asked for a wait (``Retry-After``) that would end past them:
    the request is then never sent again before the time the API named."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, retry_state: Any) -> bool:
        elapsed = retry_state.seconds_since_start or 0.0
        if elapsed >= self.seconds:
            return True
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        asked = isinstance(error, TransientError) and error.retry_after is not None
        return asked and elapsed + retry_state.upcoming_sleep > self.seconds


class _WaitRetryAfter(wait_base):
    """Wait as long as the API asked (``Retry-After``, at least ``_LEAST_WAIT``), else back off
    exponentially with jitter. A wait the API asks for that would end past the retry time stops
    the retries instead (``_StopRetrying``)."""

    def __init__(self, fallback: wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: Any) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, TransientError) and error.retry_after is not None:
            return max(error.retry_after, _LEAST_WAIT)
        return float(self.fallback(retry_state))


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after-ms")
    if value is not None:
        try:
            seconds = float(value) / 1000
        except ValueError:
            pass
        else:
            if math.isfinite(seconds):
                return seconds
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date; fall back to our own backoff
    return seconds if math.isfinite(seconds) else None  # "nan", "inf": our own backoff


def _refused_certificate(exc: BaseException) -> str | None:
    """Why the server's certificate was refused, when that is what ended the connection (httpx's
    and ``ReadTransport``'s ``ConnectError`` both keep the ``ssl`` error in their chain)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_message or "certificate verify failed"
        seen = seen.__cause__ or seen.__context__
    return None


def _decoded(body: bytes, where: str) -> Any:
    """A response body's JSON. orjson reads a page of keys four times faster than the standard
    library, which matters at a thousand pages; what orjson refuses and the standard library reads
    (a lone surrogate escape such as ``"\\ud800"``, an integer beyond 64 bits, NaN) is read by the
    latter, so no answer is refused that was read before."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MalformedResponse(f"{where}: the response is not valid JSON") from None


def _the_key(key: Key, key_hash: str, where: str) -> Key:
    """``key``, when it is the key asked about."""
    if key.hash != key_hash:
        raise MalformedResponse(f"{where}: asked about key {key_hash[:12]}, answered about key {key.hash[:12]}")
    return key


def _require_state(item: Any, where: str) -> Any:
    """``item``, when it is a key object with every field of ``_ALWAYS_GIVEN``; else MalformedResponse."""
    if isinstance(item, Mapping):
        for name in _ALWAYS_GIVEN:
            if item.get(name) is None:
                raise MalformedResponse(f"{where}: a key object without {name!r}, which the API always gives")
    return item


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        message = body["error"]["message"]
        if isinstance(message, str) and message:
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return response.reason_phrase or f"HTTP {response.status_code}"


class KeysClient:
    """The OpenRouter API-keys endpoints, typed."""

    def __init__(
        self,
        base_url: str,
        management_key: str,
        *,
        concurrency: int = 4,
        timeout: float = 30.0,
        retry_seconds: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``sleep`` waits between tries and while the API asked to wait (tests record the waits)."""
        self.base_url = base_url.rstrip("/")
        self.concurrency = max(1, concurrency)
        self.retry_seconds = retry_seconds
        self._proxy = _proxy_for(self.base_url)
        # Named in errors by its host and port alone: its URL may hold a password.
        self._proxy_named = _host_and_port(self._proxy) if self._proxy else None
        # GETs (every page of a listing) go through the lean ``ReadTransport``; changes, and every
        # request through a proxy, through httpx's own transport, made when first needed.
        self._changes: httpx.BaseTransport | None = transport
        self._reads = transport or (None if self._proxy else ReadTransport(max_connections=self.concurrency))
        # What httpx.Client sends by default (compressed answers are decoded), and the credential.
        self._headers = [*_BASE_HEADERS, (b"Authorization", f"Bearer {management_key}".encode())]
        self._timeout = {"timeout": httpx.Timeout(timeout).as_dict()}
        self._lock = threading.Lock()
        self._management_key = management_key
        self.requests_sent = 0
        self._sleep = sleep
        self._not_before = 0.0
        """``time.monotonic()`` before which no request goes out: the API asked to wait (``Retry-After``)."""

    def __repr__(self) -> str:
        return f"KeysClient(base_url={self.base_url!r})"

    def __enter__(self) -> KeysClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._reads is not None:
            self._reads.close()
        if self._changes is not None and self._changes is not self._reads:
            self._changes.close()

    def _transport(self, method: str) -> httpx.BaseTransport:
        if method == "GET" and self._reads is not None:
            return self._reads
        with self._lock:
            if self._changes is None:
                limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
                self._changes = httpx.HTTPTransport(limits=limits, proxy=self._proxy)
            return self._changes

    # -- the endpoints -------------------------------------------------------------------------

    def current_key(self) -> CurrentKey:
        """``GET /key``: what the API says about our own credential."""
        return CurrentKey.from_api(self._data(self._request("GET", "/key")))

    def list_workspaces(self) -> list[Workspace]:
        """``GET /workspaces``, every page."""
        workspaces: list[Workspace] = []
        offset = 0
        while True:
            body = self._request("GET", "/workspaces", params={"offset": offset, "limit": WORKSPACE_PAGE_SIZE})
            page = self._data(body)
            if not isinstance(page, list):
                raise MalformedResponse("GET /workspaces: 'data' is not a list")
            workspaces.extend(Workspace.from_api(item) for item in page)
            total = body.get("total_count") if isinstance(body, Mapping) else None
            offset += len(page)
            if len(page) < WORKSPACE_PAGE_SIZE or (isinstance(total, int) and offset >= total):
                return workspaces

    def list_key_objects(
        self,
        *,
        workspace_id: str | None,
        offset: int,
        include_disabled: bool = True,
        include_expired: bool = True,
    ) -> list[dict[str, Any]]:
        """One page (at most 100 keys) of ``GET /keys`` as the API's raw key objects, each a JSON
        object with a string ``hash``; nothing else is checked or converted."""
        params: dict[str, Any] = {
            "include_disabled": "true" if include_disabled else "false",
            "include_expired": "true" if include_expired else "false",
            "offset": offset,
        }
        if workspace_id is not None:
            params["workspace_id"] = workspace_id
        page = self._data(self._request("GET", "/keys", params=params))
        if not isinstance(page, list):
            raise MalformedResponse("GET /keys: 'data' is not a list")
        if len(page) > PAGE_SIZE:
            raise MalformedResponse(f"GET /keys: a page of {len(page)} keys, more than {PAGE_SIZE}")
        for item in page:
            if not isinstance(item, dict) or not isinstance(item.get("hash"), str):
                raise MalformedResponse("GET /keys: an item is not a key object with a string 'hash'")
            _require_state(item, "GET /keys")
        return page

    def list_keys_page(
        self,
        *,
        workspace_id: str | None,
        offset: int,
        include_disabled: bool = True,
        include_expired: bool = True,
    ) -> list[Key]:
        """One page (at most 100 keys) of ``GET /keys``, typed."""
        page = self.list_key_objects(
            workspace_id=workspace_id,
            offset=offset,
            include_disabled=include_disabled,
            include_expired=include_expired,
        )
        return [Key.from_api(item) for item in page]

    def stream_keys(
        self, workspace_ids: Iterable[str | None], *, on_page: ProgressCallback | None = None, room: int | None = None
    ) -> KeyStream:
        """Every key of the given workspaces (None: the default one), disabled and expired ones
        included, as raw key objects handed over page by page while later pages are in flight
        (see :class:`~keyhygiene.keysapi.paging.KeyStream`); never more than ``concurrency``
        requests at once."""

        def fetch(workspace_id: str | None, offset: int) -> list[dict[str, Any]]:
            try:
                return self.list_key_objects(workspace_id=workspace_id, offset=offset)
            except NotFound:
                # "Workspace not found": deleted since the workspaces were listed, it has no keys
                # now (its keys the last snapshot held are checked one by one, and found gone).
                # Any other 404, or a workspace still listed, fails the listing.
                if workspace_id is None or any(space.id == workspace_id for space in self.list_workspaces()):
                    raise
                return []

        return KeyStream(fetch, workspace_ids, concurrency=self.concurrency, on_page=on_page, room=room)

    def stream_inventory(
        self, workspaces: Iterable[Workspace], *, on_page: ProgressCallback | None = None, room: int | None = None
    ) -> KeyStream:
        """Every key of every workspace (as :meth:`list_workspaces` gave them), disabled and expired
        ones included, page by page (:meth:`stream_keys`). None listed: the default one, which
        ``GET /keys`` without a workspace lists."""
        workspace_ids: list[str | None] = [workspace.id for workspace in workspaces]
        return self.stream_keys(workspace_ids or [None], on_page=on_page, room=room)

    def list_all_keys(self, workspace_ids: Iterable[str | None], *, on_page: ProgressCallback | None = None) -> Listing:
        """Every key of the given workspaces (None: the default one), typed and held at once.

        For a large organisation prefer :meth:`stream_keys`, which holds a few pages at a time.
        """
        stream = self.stream_keys(workspace_ids, on_page=on_page)
        keys = {raw["hash"]: Key.from_api(raw) for page in stream for raw in page}
        return Listing(keys=keys, per_workspace=stream.per_workspace, pages=stream.pages, duplicates=stream.duplicates)

    def get_key(self, key_hash: str) -> Key:
        """``GET /keys/{hash}``; raises NotFound for a key that does not exist, MalformedResponse for
        an answer about another key (a cache or proxy that mixed up its answers): the fresh check
        before a change must be of the key to be changed."""
        key = Key.from_api(_require_state(self._data(self._request("GET", f"/keys/{key_hash}")), "GET /keys/{hash}"))
        return _the_key(key, key_hash, "GET /keys/{hash}")

    def create_key(self, name: str, **fields: Any) -> CreatedKey:
        """``POST /keys``. The secret is returned this once and never logged."""
        body = self._request("POST", "/keys", body={"name": name, **fields})
        secret = body.get("key") if isinstance(body, Mapping) else None
        if not isinstance(secret, str):
            raise MalformedResponse("POST /keys: the response has no top-level 'key'")
        return CreatedKey(key=Key.from_api(self._data(body)), secret=secret)

    def update_key(self, key_hash: str, *, before_resend: BeforeResend | None = None, **fields: Any) -> Key:
        """``PATCH /keys/{hash}`` with the given fields (``disabled=True`` disables the key).
        ``before_resend``: see ``BeforeResend``."""
        answer = self._data(self._request("PATCH", f"/keys/{key_hash}", body=fields, before_resend=before_resend))
        return _the_key(Key.from_api(_require_state(answer, "PATCH /keys/{hash}")), key_hash, "PATCH /keys/{hash}")

    def delete_key(self, key_hash: str, *, before_resend: BeforeResend | None = None) -> None:
        """``DELETE /keys/{hash}``: permanent. ``before_resend``: see ``BeforeResend``."""
        body = self._request("DELETE", f"/keys/{key_hash}", before_resend=before_resend)
        if not isinstance(body, Mapping) or body.get("deleted") is not True:
            raise MalformedResponse('DELETE /keys: the response is not {"deleted": true}')

    # -- transport -------------------------------------------------------------------------------

    @staticmethod
    def _data(body: Any) -> Any:
        if not isinstance(body, Mapping) or "data" not in body:
            raise MalformedResponse("the response has no 'data' envelope")
        return body["data"]

    def _request(self, method: str, path: str, *, before_resend: BeforeResend | None = None, **kwargs: Any) -> Any:
        retrying = Retrying(
            retry=retry_if_exception_type(TransientError),
            stop=_StopRetrying(self.retry_seconds),
            wait=_WaitRetryAfter(wait_exponential_jitter(multiplier=0.25, max=LONGEST_BACKOFF)),
            sleep=self._sleep,
            reraise=True,
        )
        refused = False  # an attempt was answered 503 (see _REFUSED_STATUSES)
        deadline = time.monotonic() + self.retry_seconds
        try:
            for attempt in retrying:
                with attempt:
                    check = None
                    if before_resend is not None and attempt.retry_state.attempt_number > 1:
                        check = functools.partial(before_resend, refused)
                    try:
                        return self._send_once(method, path, deadline=deadline, before_send=check, **kwargs)
                    except ServerError:
                        refused = True
                        raise
                    except NotFound:
                        # A gateway may answer 503 after the API behind it deleted the key: then the
                        # 404 to the DELETE sent again may be our own doing.
                        if method == "DELETE" and refused:
                            raise OutcomeUnknown(
                                f"{method} {path}: 404 after an attempt answered 503, which may have deleted the key"
                            ) from None
                        raise
        except (RateLimited, ConnectionFailed, CertificateRefused, ServerError) as exc:
            # The last try made no change the API reported (refused with 429 or 503, or never
            # sent); a try answered 503 may have, behind a gateway that answered after the API
            # acted: the last one too, when the retry time ran out on 503s.
            if method in _CHANGES and refused:
                raise OutcomeUnknown(f"{exc}; a try was answered 503 and may have made the change") from None
            raise
        except OutcomeUnknown:
            raise
        except ApiError as exc:
            # Refused on a later try (the credential revoked meanwhile: 401; a conflict: 409; ...):
            # that try changed nothing, but the one answered 503 may have. A PATCH answered 404 is
            # about a key someone deleted: no PATCH deletes one.
            if method in _CHANGES and refused and not (isinstance(exc, NotFound) and method != "DELETE"):
                raise OutcomeUnknown(f"{exc}; a try was answered 503 and may have made the change") from None
            raise
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    def _hold_back(self, where: str, deadline: float | None = None) -> None:
        """Wait while the API has asked this client to (one thread's 429 holds back every thread,
        instead of each finding a 429 of its own); a wait that would end past the request's retry
        time (``deadline``, on ``time.monotonic``) is not waited: the request ends rate limited,
        unsent."""
        now = time.monotonic()
        with self._lock:
            wait = self._not_before - now
        if wait > (self.retry_seconds if deadline is None else deadline - now):
            asked = f"the API asked to wait {wait:.0f} s more, past the retry time"
            raise RateLimited(f"{where}: rate limited (not sent): {asked}", retry_after=wait)
        if wait > 0:
            self._sleep(wait)

    def _asked_to_wait(self, seconds: float | None) -> None:
        if seconds is not None and seconds > 0:
            with self._lock:
                self._not_before = max(self._not_before, time.monotonic() + seconds)

    def _send_once(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        deadline: float | None = None,
        before_send: Callable[[], None] | None = None,
    ) -> Any:
        where = f"{method} {path}"
        self._hold_back(where, deadline)
        if before_send is not None:  # after any wait: what it checks holds when the request leaves
            before_send()
        with self._lock:
            self.requests_sent += 1
        change = method in _CHANGES
        url = self.base_url + path if params is None else f"{self.base_url}{path}?{urlencode(params)}"
        # Straight to a transport: httpx.Client's cookies, redirects, auth flow and URL merging
        # cost more CPU per page than its HTTP does, and this client needs none of them.
        request = httpx.Request(method, url, headers=self._headers, json=body, extensions=self._timeout)
        try:
            response = self._transport(method).handle_request(request)
            try:
                response.read()
            finally:
                response.close()
        except _NEVER_SENT as exc:
            refused = _refused_certificate(exc)
            if refused is not None:
                raise CertificateRefused(
                    f"{where}: the TLS certificate of {self.base_url} is not trusted ({refused}); "
                    "trust its issuer through SSL_CERT_FILE or SSL_CERT_DIR"
                ) from None
            said = str(exc).strip()
            reason = f"{type(exc).__name__}: {said}" if said else type(exc).__name__
            through = f" through the proxy {self._proxy_named}" if self._proxy_named else ""
            raise ConnectionFailed(f"{where}: cannot reach the API at {self.base_url}{through} ({reason})") from None
        except (httpx.TransportError, httpx.DecodingError) as exc:
            # The request may have reached the API: a change is in doubt, a read is simply retried.
            if isinstance(exc, httpx.TimeoutException):
                lost = "the API did not answer in time"
            elif isinstance(exc, httpx.DecodingError):  # a proxy that garbled a compressed answer
                lost = "the answer could not be decoded (its Content-Encoding does not match its bytes)"
            else:
                lost = f"the connection broke before the answer ({type(exc).__name__})"
            if change:
                raise OutcomeUnknown(f"{where}: {lost}; the change may or may not have been made") from None
            raise ConnectionFailed(f"{where}: {lost}") from None
        status = response.status_code
        if 200 <= status < 300:
            return _decoded(response.content, where)
        # A proxy or a confused upstream may echo the request's credential in its error body.
        message = _error_message(response).replace(self._management_key, "[REDACTED]")
        if status == 429:
            retry_after = _retry_after(response)
            self._asked_to_wait(retry_after)
            raise RateLimited(f"{where}: rate limited (429): {message}", status=status, retry_after=retry_after)
        server_error = 500 <= status < 600 and status not in _NOT_RETRIED_5XX
        if change and server_error and status not in _REFUSED_STATUSES:
            failed = f"{where}: the API failed ({status}) while making the change: {message}"
            raise OutcomeUnknown(failed, status=status)
        if server_error:
            retry_after = _retry_after(response)
            self._asked_to_wait(retry_after)
            raise ServerError(f"{where}: the API failed ({status}): {message}", status=status, retry_after=retry_after)
        if 400 <= status < 500:
            raise rejection_for(status, f"{where}: {status} {message}")
        raise ApiError(f"{where}: unexpected HTTP {status}: {message}")
