"""Notices: tell people before and after, through the ``[[notify]]`` targets of the rules file.

After each job, a target whose ``on`` holds the job's outcome (``done`` when keys were changed,
``failed``, ``refused``) gets one message with the run id, the outcome, the counts and the keys
changed, failed or planned (at most ``MAX_KEYS`` listed, then a count), each with its owner. A run
that changed keys but failed (another change failed, or it stopped midway) is also a ``done``
occasion: a target that asks for ``done`` and not ``failed`` gets ``done`` with the keys changed.
Targets with ``upcoming`` also get, once per key, rule, action and due date, the keys a rule will
act on within ``upcoming_within``, after every job whose enforcement went through its snapshot
(whatever became of single changes), in messages of at most ``MAX_KEYS`` keys: every key is named.

Notices go out only after the run's changes and its record are committed, and never make a job fail:
each delivery is retried with backoff on 429, 5xx and connection errors within a bounded time; a
notice that still fails is recorded (``notices`` table) and logged, and the next run retries it once
before giving up for good. Whatever goes wrong with one target (a URL httpx rejects, ...) fails that
target's notice only. A target's URL (and signing secret) is read from the environment variable
the target names: it is a secret, registered for redaction, and never stored, logged or reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from db import audit, notices, runs, snapshots
from keyhygiene.rules import AuditFacts, KeyHistory, NotifyTarget, RuleSet, next_action, resolve_workspaces

from . import logging as khlog
from .context import Database, describe_db_error, session_scope
from .settings import SettingsError, read_env_file
from .timeutil import isoformat

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .jobs import JobOutcome

log = khlog.get_logger(__name__)

MAX_KEYS = 50
UNREACHED = "not sent: the job was stopped before it"
"""The error of a run's notice that a stop (SIGTERM, the soft time limit) came before: the next run sends it."""
SIGNATURE_HEADER = "X-Keyhygiene-Signature"
_RETRIED = {429, 500, 502, 503, 504}
_USER_AGENT = "keyhygiene-notices/0.1"


@dataclass(frozen=True, slots=True)
class NoticeKey:
    """One key in a notice."""

    key_hash: str
    key_name: str
    workspace: str | None
    owner: str | None
    rule: str
    action: str
    due: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "key_hash": self.key_hash,
            "key_name": self.key_name,
            "workspace": self.workspace,
            "owner": self.owner,
            "rule": self.rule,
            "action": self.action,
            "due": isoformat(self.due) if self.due is not None else None,
        }


@dataclass(frozen=True, slots=True)
class Delivered:
    """How one delivery ended."""

    ok: bool
    attempts: int
    error: str | None = None


# -- what to say ---------------------------------------------------------------------------------


def run_outcome(outcome: JobOutcome) -> str | None:
    """The notice outcome of a finished job: ``done`` (keys changed, by enforcement or given back by
    ``undo`` and ``enable``), ``failed``, ``refused``, or None."""
    if outcome.status == runs.REFUSED:
        return "refused"
    if outcome.status in (runs.FAILED, runs.ABORTED):
        return "failed"
    if outcome.enforcement is not None and (outcome.enforcement.done or outcome.enforcement.failed):
        return "done" if outcome.enforcement.done else "failed"
    summary = outcome.summary or {}
    if outcome.kind in ("undo", "enable") and summary.get("dry_run") is False and summary.get("done"):
        return "done"  # keys given back: a change like any other (a failed one fails the job)
    return None


def payload(
    *,
    event: str,
    run_id: int | None,
    outcome: str | None,
    counts: dict[str, Any],
    keys: Sequence[NoticeKey],
    message: str,
    dry_run: bool | None,
) -> dict[str, Any]:
    """The ``json`` format's body (the interface's fields, plus ``more``, ``message`` and ``dry_run``)."""
    listed = list(keys[:MAX_KEYS])
    return {
        "event": event,
        "run_id": run_id,
        "outcome": outcome,
        "counts": counts,
        "keys": [key.as_json() for key in listed],
        "more": max(len(keys) - len(listed), 0),
        "message": message,
        "dry_run": dry_run,
    }


def slack_body(body: dict[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook message: one summary line, then the keys as a list."""
    dry = " (dry run: nothing is changed)" if body.get("dry_run") else ""
    if body["event"] == "upcoming":
        summary = f"keyhygiene: {len(body['keys']) + body['more']} key(s) coming up for action{dry}"
    else:
        summary = f"keyhygiene run {body['run_id']}: {body['outcome']}{dry}. {body['message']}"
    lines = [summary]
    for key in body["keys"]:
        when = f" on {key['due'][:10]}" if key.get("due") else ""
        who = f", owner {key['owner']}" if key.get("owner") else ""
        where = f", workspace {key['workspace']}" if key.get("workspace") else ""
        lines.append(
            f"• `{key['key_name']}` ({key['key_hash'][:12]}): {key['action']}{when} by rule {key['rule']}{where}{who}"
        )
    if body["more"]:
        lines.append(f"… and {body['more']} more")
    return {"text": "\n".join(lines)}


def sign(body: bytes, secret: str) -> str:
    """``sha256=`` and the hex HMAC-SHA256 of the body: what ``X-Keyhygiene-Signature`` carries."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


# -- delivering ----------------------------------------------------------------------------------


def secret_setting(name: str) -> tuple[str, str | None]:
    """The value of the variable ``name``, else the contents of the file that ``NAME_FILE`` names
    (a Docker secret: never in ``docker inspect``), without surrounding white space; and why it
    could not be read, when the file cannot be.

    Read from the environment, then from the ``.env`` file the settings are read from: as for the
    settings, the environment wins (its ``NAME_FILE`` over the ``.env`` file's ``NAME``).
    """
    value, unread = _secret_in(os.environ, name)
    if value or unread:
        return value, unread
    try:
        file_values = read_env_file()
    except SettingsError as exc:
        return "", f"{name} cannot be read from the settings file: {exc}"
    return _secret_in(file_values, name)


def _secret_in(variables: Mapping[str, str | None], name: str) -> tuple[str, str | None]:
    value = (variables.get(name) or "").strip()
    path = (variables.get(f"{name}_FILE") or "").strip()
    if value or not path:
        return value, None
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().strip(), None
    except (OSError, UnicodeDecodeError) as exc:
        return "", f"{name}_FILE names {path}, which cannot be read ({type(exc).__name__})"


class NoticeSetupError(Exception):
    """The environment leaves no way to send a notice (said without quoting what may be secret)."""


class Sender:
    """Delivers bodies to targets over HTTP, retrying within a bounded time; raises only ``stops``."""

    def __init__(
        self,
        *,
        timeout: float,
        retry_seconds: float,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        deadline: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        stops: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.timeout = timeout
        # What stops the job wherever it stands (the worker's soft time limit, an Exception): it
        # ends the notices, never counts as one delivery's failure.
        self.stops = stops
        self.retry_seconds = retry_seconds
        self.deadline = deadline  # time.monotonic() past which nothing more is sent, whatever the budget
        self.sleep = sleep
        self.monotonic = monotonic
        self.started = monotonic()
        try:
            self.client = self._client(timeout, transport)
        except (ValueError, httpx.InvalidURL):
            # httpx quotes the proxy URL it could not take, which may hold a password.
            raise NoticeSetupError(
                "a proxy variable (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY) holds no proxy URL httpx can use"
            ) from None

    @staticmethod
    def _client(timeout: float, transport: httpx.BaseTransport | None) -> httpx.Client:
        return httpx.Client(
            timeout=httpx.Timeout(timeout),
            transport=transport,
            headers={"User-Agent": _USER_AGENT},
            follow_redirects=False,
            # A connection of its own for each attempt, which its ``_Cutoff`` can end.
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=0),
        )

    def close(self) -> None:
        self.client.close()

    def is_stop(self, exc: BaseException) -> bool:
        """Whether ``exc`` stops the job: SIGTERM or Ctrl-C (KeyboardInterrupt), or one of ``stops``."""
        return isinstance(exc, (KeyboardInterrupt, *self.stops))

    def at(self, now: datetime) -> datetime:
        """``now`` (when the notices' pass began) plus the time the pass has taken so far: when a
        notice is recorded or claimed. A record must not look older than it is to another run,
        which takes one sent longer ago than any send may take for one cut short."""
        return now + timedelta(seconds=self.monotonic() - self.started)

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def deliver(self, target: NotifyTarget, body: dict[str, Any], *, once: bool = False) -> Delivered:
        """POST ``body`` to the target in its format; ``once``: a single attempt (the retry of a failed one).

        Never raises: whatever goes wrong is this delivery's failure, told without the URL, and
        never another target's."""
        try:
            return self._deliver(target, body, once=once)
        except Exception as exc:  # one target's trouble must not stop the notices of the others
            if self.is_stop(exc):
                raise
            return Delivered(False, 0, f"{type(exc).__name__} (not sent)")

    def _deliver(self, target: NotifyTarget, body: dict[str, Any], *, once: bool) -> Delivered:
        resolved = _resolve(target)
        if isinstance(resolved, str):
            return Delivered(False, 0, resolved)
        url, secret = resolved
        content = json.dumps(slack_body(body) if target.format == "slack" else body, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers[SIGNATURE_HEADER] = sign(content, secret)
        deadline = time.monotonic() + self.retry_seconds
        if self.deadline is not None:
            deadline = min(deadline, self.deadline)
        attempts = 0
        delay = 0.5
        error = "no time was left to send it (the job was past its time limit)"
        while (left := (self.deadline or math.inf) - time.monotonic()) > 0:
            attempts += 1
            failed, retry_after = self._post(url, content, headers, timeout=min(self.timeout, left))
            if failed is None:
                return Delivered(True, attempts)
            error = failed
            wait = min(max(retry_after or delay, 0.0), 30.0) * (1 + random.random() / 4)
            final = retry_after is None  # a 4xx other than 429: sending it again changes nothing
            if once or final or time.monotonic() + wait > deadline:
                break
            self.sleep(wait)
            delay = min(delay * 2, 10.0)
        return Delivered(False, attempts, error)

    def _post(
        self, url: str, content: bytes, headers: dict[str, str], *, timeout: float
    ) -> tuple[str | None, float | None]:
        """(None, None) when delivered; else (an error without the URL, a Retry-After or 0 when retried).

        Only the status and the headers of the answer are read, never its body: a receiver that
        sends its body slowly cannot hold the job, and a receiver that sends its status and headers
        slowly is cut off after ``timeout`` seconds in all (``_Cutoff``)."""
        cutoff = _Cutoff(timeout)
        extensions = {"trace": cutoff.trace}
        try:
            with (
                cutoff,
                self.client.stream(
                    "POST", url, content=content, headers=headers, timeout=timeout, extensions=extensions
                ) as response,
            ):
                status, retry_after = response.status_code, response.headers.get("Retry-After", "")
        except httpx.TransportError as exc:
            # Say what kind of failure, never the message: some carry the URL.
            failure = cutoff.failure() or type(exc).__name__
            return f"{failure} (no answer)", 0.0
        except Exception as exc:  # a host name the socket layer cannot encode, ...: the same every time
            if self.is_stop(exc):
                raise
            return f"{type(exc).__name__} (not sent)", None
        if 200 <= status < 300:
            return None, None
        if status in _RETRIED:
            return f"HTTP {status}", float(retry_after) if retry_after.isdigit() else 0.0
        return f"HTTP {status}", None


class _Cutoff:
    """Ends one webhook request ``seconds`` after it began, however the receiver answers.

    httpx's timeouts bound each step (connecting, each write, each read), not the whole request: a
    receiver that sends its status line and headers a byte at a time, each within the timeout,
    would hold the job until its hard time limit. ``trace`` (httpx's ``trace`` request extension)
    keeps the request's socket as its connection is made (each attempt has a connection of its
    own; through a proxy, the connection to the proxy) and notes which step the request is in;
    when the time is up, a timer shuts the socket down, which wakes the thread blocked on it, and
    httpx raises a transport error. ``failure`` then names the step the time ran out in
    (``ReadTimeout`` while waiting for the answer), as httpx names its own timeouts: a receiver
    that says nothing and one that drips fail alike. A TLS handshake under way when the time runs
    out is bounded by its own timeout (the socket is in the TLS layer's hands until it is done), so
    such a request may take up to twice ``seconds``.

    The socket is forgotten, under the lock the timer shuts it with, as the response is closed,
    before its connection closes it: the timer never shuts a socket number that another connection
    of the process may have been given since."""

    _STEPS = {
        ".connect_tcp.started": "ConnectTimeout",
        ".send_request_headers.started": "WriteTimeout",
        ".receive_response_headers.started": "ReadTimeout",
    }
    _CONNECTED = (".connect_tcp.complete", ".connect_unix_socket.complete", ".start_tls.complete")
    _CLOSING = ".response_closed.started"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._step: str | None = None
        self._failure: str | None = None
        self._fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def trace(self, event: str, info: Mapping[str, Any]) -> None:
        """httpcore's events are named after the part that sends them (``connection.``, ``http11.``,
        ``proxy.``, ``socks.``): they are told apart by their ends."""
        _, dot, what = event.partition(".")
        what = dot + what
        step = self._STEPS.get(what)
        if step is not None:
            self._step = step
        elif what in self._CONNECTED:
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                with self._lock:
                    self._socket = sock
                    if self._fired:  # connected just as the time ran out
                        self._shut(sock)
        elif what == self._CLOSING:
            with self._lock:
                self._socket = None

    def failure(self) -> str | None:
        """The timeout the request ended with, when the time ran out; else None."""
        with self._lock:
            return self._failure

    def __enter__(self) -> _Cutoff:
        self._timer.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._timer.cancel()

    def _fire(self) -> None:
        with self._lock:
            self._fired = True
            self._failure = self._step
            if self._socket is not None:
                self._shut(self._socket)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        # socket.socket's own shutdown, also for a TLS socket: it ends the connection under the TLS
        # layer without touching the TLS state that the blocked thread is using. OSError: the
        # socket was handed to the TLS layer, or closed as the request failed.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _resolve(target: NotifyTarget) -> tuple[str, str | None] | str:
    """The target's URL and signing secret (None when it signs nothing), both registered for
    redaction; or why its notices cannot be sent as the environment stands, never quoting either."""
    url, unread = secret_setting(target.url_env)
    if unread or not url:
        return unread or f"{target.url_env} is not set"
    khlog.register_secret(url)
    if not _usable_url(url):
        return f"{target.url_env} does not hold a valid http(s) URL"
    if not target.secret_env:
        return url, None
    secret, unread = secret_setting(target.secret_env)
    if unread or not secret:
        return unread or f"{target.secret_env} is not set"
    khlog.register_secret(secret)
    return url, secret


def target_problem(target: NotifyTarget) -> str | None:
    """Why ``target``'s notices would fail as the environment (and ``.env``) stands now, or None
    (``rules check``): the variable unset, its file unreadable, or no usable http(s) URL."""
    resolved = _resolve(target)
    return resolved if isinstance(resolved, str) else None


def _usable_url(url: str) -> bool:
    """Whether ``url`` is an http(s) URL with a host that httpx takes, and a port, if it has one, of
    1-65535: checked once, before any attempt, as such a URL would fail them all the same way."""
    try:
        parsed = httpx.URL(url)
    except Exception:  # httpx.InvalidURL, and the idna package's errors for a bad host name
        return False
    # httpx takes any port number; the socket layer then fails each attempt on one outside 1-65535.
    return parsed.scheme in ("http", "https") and bool(parsed.host) and (parsed.port is None or 0 < parsed.port < 65536)


# -- after a run ---------------------------------------------------------------------------------


def after_run(
    database: Database,
    ruleset: RuleSet,
    outcome: JobOutcome,
    *,
    now: datetime,
    timeout: float,
    retry_seconds: float,
    transport: httpx.BaseTransport | None = None,
    within: float | None = None,
    stops: tuple[type[BaseException], ...] = (),
) -> None:
    """Send this run's notices and retry the ones earlier runs could not deliver. Raises only a stop:
    KeyboardInterrupt (SIGTERM, Ctrl-C) or one of ``stops`` (the worker's soft time limit).

    ``within``: the seconds all of it may take (a job past its soft time limit has little left);
    what is not sent by then is recorded as failed, and retried by the next run."""
    if not ruleset.notify:
        return
    deadline = time.monotonic() + within if within is not None else None
    # A send takes at most its retry budget and a last attempt's timeouts (connect, write, read):
    # a notice still being sent after longer than that was cut short (``notices.undelivered``).
    sending_before = now - timedelta(seconds=retry_seconds + 3 * timeout + 60)
    try:
        with Sender(
            timeout=timeout, retry_seconds=retry_seconds, transport=transport, deadline=deadline, stops=stops
        ) as sender:
            try:
                due = _run_notices(database, ruleset, outcome)
            except SQLAlchemyError as exc:  # this run's notices only: earlier runs' are still retried
                log.error("notices_not_sent", run_id=outcome.run_id, error=f"database error: {describe_db_error(exc)}")
                due = []
            try:
                _retry_undelivered(database, ruleset, sender, now=now, sending_before=sending_before)
            except BaseException as exc:
                if sender.is_stop(exc):  # before any of this run's notices: the next run sends them all
                    _record_unreached(database, due, sender, now=now)
                raise
            _send_run_notices(database, due, sender, now=now)
            if _planned(outcome):
                _send_upcoming(database, ruleset, outcome, sender, now=now)
    except SQLAlchemyError as exc:
        log.error("notices_not_sent", run_id=outcome.run_id, error=f"database error: {describe_db_error(exc)}")
    except Exception as exc:  # a notice must never fail the job it reports on
        if isinstance(exc, stops):
            raise
        log.error("notices_not_sent", run_id=outcome.run_id, error=khlog.redact_text(f"{type(exc).__name__}: {exc}"))


def _send(
    database: Database,
    target: NotifyTarget,
    body: dict[str, Any],
    sender: Sender,
    *,
    now: datetime,
    announcing: Sequence[tuple[str, str, str, datetime]] = (),
    on_record: Callable[[], None] | None = None,
) -> None:
    """Record the notice as being sent, send it, record how that ended, log it.

    Recorded first, so that a notice is never sent without its record: a process that dies while
    sending leaves it SENDING, and a later run retries it. ``announcing``: the upcoming actions it
    announces, recorded with it in one transaction (each is announced once: another run announcing
    the same one at the same moment makes this raise IntegrityError, and nothing is sent).
    ``on_record``: called once that record is committed."""
    with session_scope(database) as session:
        notice_id = _record(session, target, body, sender.at(now), notices.SENDING)
        if announcing:
            notices.record_announcements(session, target=target.name, notice_id=notice_id, items=announcing)
    if on_record is not None:
        on_record()
    delivered = sender.deliver(target, body)
    with session_scope(database) as session:
        notices.finish_send(
            session,
            notice_id,
            now=sender.at(now),
            sent=delivered.ok,
            attempts=delivered.attempts,
            error=delivered.error,
        )
    _log(target, body, delivered, notice_id)


def _log(target: NotifyTarget, body: dict[str, Any], delivered: Delivered, notice_id: int) -> None:
    fields = {
        "target": target.name,
        "notice_id": notice_id,
        "notice_event": body["event"],
        "run_id": body["run_id"],
        "keys": len(body["keys"]) + body["more"],
        "attempts": delivered.attempts,
    }
    if delivered.ok:
        log.info("notice_sent", **fields)
    else:
        log.warning("notice_failed", error=delivered.error, **fields)


def _planned(outcome: JobOutcome) -> bool:
    """Whether the job's enforcement went through its snapshot to the end (it planned, or a safety
    limit refused it), whatever became of single changes; not when the sync failed or the job
    stopped before that: then there is no fresh plan to warn of."""
    return outcome.kind in ("enforce", "run") and (outcome.enforcement is not None or outcome.status == runs.REFUSED)


_Due = list[tuple[NotifyTarget, dict[str, Any]]]
"""Notices to send: each target with its body."""


def _run_notices(database: Database, ruleset: RuleSet, outcome: JobOutcome) -> _Due:
    """The run's notices, one per target: the run's outcome to the targets whose ``on`` holds it;
    else, when the run changed keys though it failed (other changes failed, or it stopped midway),
    ``done`` with the keys changed to the targets whose ``on`` holds that."""
    said = run_outcome(outcome)
    changed = said != "done" and _may_have_changed(outcome)
    bodies: dict[str, dict[str, Any] | None] = {}
    due: _Due = []
    for target in ruleset.notify:
        occasion = said if said in target.on else "done" if changed and "done" in target.on else None
        if occasion is None:
            continue
        if occasion not in bodies:
            bodies[occasion] = _run_body(database, outcome, occasion)
        if (body := bodies[occasion]) is not None:
            due.append((target, body))
    return due


def _send_run_notices(database: Database, due: _Due, sender: Sender, *, now: datetime) -> None:
    """Send each in turn. A stop records those it came before: each one whose record as being sent
    was not written yet, the one being recorded included (a stop just after its commit, before it
    is counted, leaves it on record twice: sent twice, rather than not at all)."""
    on_record = 0

    def recorded() -> None:
        nonlocal on_record
        on_record += 1

    try:
        for target, body in due:
            _send(database, target, body, sender, now=now, on_record=recorded)
    except BaseException as exc:
        if sender.is_stop(exc):
            _record_unreached(database, due[on_record:], sender, now=now)
        raise


def _record_unreached(database: Database, due: _Due, sender: Sender, *, now: datetime) -> None:
    """The run's notices a stop came before: recorded failed, so that the next run sends each once
    (as it retries one that failed), as the one cut short mid-send is."""
    if not due:
        return
    try:
        with session_scope(database) as session:
            recorded = [
                _record(session, target, body, sender.at(now), notices.FAILED, UNREACHED) for target, body in due
            ]
    except SQLAlchemyError as exc:  # logged; the stop that came goes on, whatever became of these
        log.error("notices_not_sent", run_id=due[0][1]["run_id"], error=f"database error: {describe_db_error(exc)}")
        return
    for (target, body), notice_id in zip(due, recorded, strict=True):
        _log(target, body, Delivered(False, 0, UNREACHED), notice_id)


def _record(
    session: Session, target: NotifyTarget, body: dict[str, Any], now: datetime, status: str, error: str | None = None
) -> int:
    """One notice to ``target``, not attempted yet: before it is sent, or when it never will be by this run."""
    return notices.record_notice(
        session,
        now=now,
        target=target.name,
        event=body["event"],
        run_id=body["run_id"],
        status=status,
        attempts=0,
        payload=body,
        error=error,
    )


def _run_body(database: Database, outcome: JobOutcome, said: str) -> dict[str, Any] | None:
    """The run notice saying ``said``; None for ``done`` when the audit names no key changed."""
    keys = _run_keys(database, outcome, said)
    if said == "done" and not keys:
        return None
    return payload(
        event="run",
        run_id=outcome.run_id,
        outcome=said,
        counts=_counts(outcome),
        keys=keys,
        message=khlog.redact_text(outcome.message),
        dry_run=_dry_run(outcome),
    )


def _may_have_changed(outcome: JobOutcome) -> bool:
    """Whether a job whose outcome is not ``done`` may still have changed keys: one whose other
    changes failed, or that stopped midway (its audit records tell)."""
    return (
        outcome.kind in ("enforce", "run", "undo", "enable")
        and outcome.run_id is not None
        and outcome.status != runs.REFUSED  # a refused enforcement changes nothing
        and _dry_run(outcome) is not True
        and _done(outcome) != 0
    )


def _done(outcome: JobOutcome) -> int | None:
    """How many keys the job changed, as its result counts them; None when it stopped before counting."""
    if outcome.enforcement is not None:
        return outcome.enforcement.done
    done = (outcome.summary or {}).get("done")
    return done if isinstance(done, int) else None


def _dry_run(outcome: JobOutcome) -> bool | None:
    if outcome.enforcement is not None:
        return outcome.enforcement.dry_run
    said = (outcome.summary or {}).get("dry_run")  # undo and enable
    return said if isinstance(said, bool) else None


def _counts(outcome: JobOutcome) -> dict[str, Any]:
    summary = outcome.summary or {}
    names = ("keys", "planned_changes", "done", "skipped", "failed", "reported")
    counts = {name: summary[name] for name in names if isinstance(summary.get(name), int)}
    if outcome.enforcement is not None:
        counts.setdefault("planned_changes", outcome.enforcement.planned)
        counts.setdefault("keys", outcome.enforcement.total_keys)
    return counts


def _run_keys(database: Database, outcome: JobOutcome, said: str) -> list[NoticeKey]:
    """The keys changed (done), whose change failed or is in doubt (failed), or planned (refused), with their
    owners as the snapshot planned on (else the newest one) saw them: one query for the keys listed."""
    with database.sessions() as session:
        if outcome.enforcement is not None:
            snapshot_id: int | None = outcome.enforcement.snapshot_id
        else:
            newest = snapshots.latest_snapshot(session)
            snapshot_id = newest.id if newest is not None else None
        names = snapshots.workspace_names(session, snapshot_id)
        if said == "refused":
            decisions = outcome.enforcement.decisions if outcome.enforcement is not None else []
            rows: list[tuple[str, str, str | None, str, str]] = [
                (d.key_hash, d.key_name, d.workspace_id, d.rule, d.action)
                for d in sorted(decisions, key=lambda d: (d.key_name, d.key_hash))
                if d.changes_key
            ]
        elif outcome.run_id is not None:
            # A change left in doubt (its answer lost) is counted failed by its run: listed with them.
            wanted = [audit.DONE] if said == "done" else [audit.FAILED, audit.PENDING]
            rows = [
                (row.key_hash, row.key_name, row.workspace_id, row.rule, row.action)
                for row in notices.actions_of_run(session, outcome.run_id, wanted)
            ]
        else:
            rows = []
        listed = [key_hash for key_hash, *_ in rows[:MAX_KEYS]]
        owners = notices.owners(session, snapshot_id, listed) if snapshot_id is not None and listed else {}
    return [
        NoticeKey(key_hash, name, names.get(workspace or "", workspace), owners.get(key_hash), rule, action)
        for key_hash, name, workspace, rule, action in rows
    ]


def _send_upcoming(database: Database, ruleset: RuleSet, outcome: JobOutcome, sender: Sender, *, now: datetime) -> None:
    """Announce to each ``upcoming`` target the actions not yet announced to it, in messages of at
    most ``MAX_KEYS`` keys each: every one is named once, none cut off behind a count."""
    targets = [t for t in ruleset.notify if "upcoming" in t.on and t.upcoming_within is not None]
    if not targets:
        return
    horizon = max(target.upcoming_within or timedelta(0) for target in targets)
    coming = upcoming_keys(database, ruleset, now=now, within=horizon)
    for target in targets:
        assert target.upcoming_within is not None
        waiting = [key for key in coming if key.due is not None and key.due <= now + target.upcoming_within]
        for _ in range(2):  # a second look when another run announced some of them at the same moment
            waiting = _not_yet_announced(database, target, waiting)
            parts = math.ceil(len(waiting) / MAX_KEYS)
            raced = False
            for part, start in enumerate(range(0, len(waiting), MAX_KEYS), 1):
                batch = waiting[start : start + MAX_KEYS]
                body = payload(
                    event="upcoming",
                    run_id=outcome.run_id,
                    outcome=None,
                    counts={"upcoming": len(batch)},
                    keys=batch,
                    message=f"{len(batch)} key(s) will be acted on within {target.upcoming_within}"
                    + (f" (part {part} of {parts}: {len(waiting)} in all)" if parts > 1 else ""),
                    dry_run=ruleset.safety.dry_run,
                )
                # Said once: a notice that failed is retried by the next run, not announced afresh beside it.
                try:
                    _send(database, target, body, sender, now=now, announcing=[_announced(key) for key in batch])
                except IntegrityError:
                    waiting, raced = waiting[start:], True
                    break
            if not raced:
                break


def _announced(key: NoticeKey) -> tuple[str, str, str, datetime]:
    assert key.due is not None
    return (key.key_hash, key.rule, key.action, key.due)


def _not_yet_announced(database: Database, target: NotifyTarget, keys: list[NoticeKey]) -> list[NoticeKey]:
    if not keys:
        return []
    with database.sessions() as session:
        fresh = set(notices.not_yet_announced(session, target=target.name, items=[_announced(key) for key in keys]))
    return [key for key in keys if _announced(key) in fresh]


def upcoming_keys(database: Database, ruleset: RuleSet, *, now: datetime, within: timedelta) -> list[NoticeKey]:
    """Keys of the newest snapshot whose next rule action falls after now and within ``within``, soonest first.

    The same "when will a rule act" answer as the plan, ``report idle`` and the HTML report's
    upcoming actions (``keyhygiene.rules.next_action``); a key's action due now is this run's
    business, not a warning, so only actions still ahead are announced.
    """
    from .enforcement import load_plan_inputs

    with database.sessions() as session:
        newest = snapshots.latest_snapshot(session)
        if newest is None:
            return []
        inputs = load_plan_inputs(session, newest.id)
        ruleset = resolve_workspaces(ruleset, inputs.workspace_names)
        coming = []
        for key in inputs.keys:
            history = inputs.histories.get(key.hash, KeyHistory())
            step = next_action(key, history, inputs.audits.get(key.hash, AuditFacts()), ruleset, now)
            if step is not None and now < step.due <= now + within:
                coming.append((key, step))
        owners = notices.owners(session, newest.id, [key.hash for key, _ in coming])
    names = inputs.workspace_names
    found = [
        NoticeKey(
            key.hash,
            key.name,
            names.get(key.workspace_id or "", key.workspace_id),
            owners.get(key.hash),
            step.decision.rule,
            step.decision.action,
            step.due,
        )
        for key, step in coming
    ]
    found.sort(key=lambda key: (key.due or now, key.key_name, key.key_hash))
    return found


def _retry_undelivered(
    database: Database, ruleset: RuleSet, sender: Sender, *, now: datetime, sending_before: datetime
) -> None:
    """Give every notice an earlier run failed to deliver its one retry; then it is sent or given up.
    Each retry is claimed first: of two runs at once, one sends it. A retry that a run claimed
    longer ago than any send may take was cut short (that run died while sending it): it is given
    up, and logged here."""
    with session_scope(database) as session:
        backlog = notices.undelivered(session, sending_before=sending_before)
    for notice in backlog.given_up:
        log.warning(
            "notice_given_up",
            target=notice.target,
            notice_id=notice.id,
            run_id=notice.run_id,
            error=notices.RETRY_CUT_SHORT,
        )
    targets = {target.name: target for target in ruleset.notify}
    for notice in backlog.waiting:
        with session_scope(database) as session:
            if not notices.claim_retry(session, notice.id, now=sender.at(now)):
                continue
        target = targets.get(notice.target)
        # A notice a stopped run never reached gets its first send here, with the whole retry time,
        # and its one retry after that, as any notice does.
        first = notice.attempts == 0 and notice.last_error == UNREACHED
        if target is None:
            delivered = Delivered(False, 0, "the notify target is no longer in the rules file")
        else:
            delivered = sender.deliver(target, notice.payload, once=not first)
        with session_scope(database) as session:
            notices.finish_send(
                session,
                notice.id,
                now=sender.at(now),
                sent=delivered.ok,
                attempts=delivered.attempts,
                error=delivered.error,
                retry=not first,
            )
        if first and target is not None:
            _log(target, notice.payload, delivered, notice.id)
            continue
        event = "notice_retry_sent" if delivered.ok else "notice_given_up"
        (log.info if delivered.ok else log.warning)(
            event, target=notice.target, notice_id=notice.id, run_id=notice.run_id, error=delivered.error
        )
