"""The jobs: sync, enforce, run (sync then enforce) and prune, as plain functions.

The command line calls them inline and the Celery tasks call the very same functions. Each one
records a run, binds ``run_id`` to every log line it writes, and returns a JobOutcome whose exit
code is the one the interface defines; none of them lets an exception escape without recording it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from db import runs, snapshots
from keyhygiene.keysapi.client import KeysClient
from keyhygiene.keysapi.errors import ApiError, AuthenticationFailed
from keyhygiene.rules import RulesError, RuleSet, load_rules

from . import logging as khlog
from .context import Database, describe_db_error, open_client, session_scope
from .enforcement import EnforceResult, enforce_snapshot
from .errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    DatabaseFailure,
    EnforcementRefused,
    KeyhygieneError,
    UsageError,
)
from .inventory import ProgressCallback, SyncFailed, SyncResult, take_snapshot
from .settings import Settings
from .timeutil import utcnow

log = khlog.get_logger(__name__)

Clock = Callable[[], datetime]
JOBS = ("sync", "enforce", "run", "prune")


@dataclass
class JobOutcome:
    """How a job ended, as the command line and ``trigger --wait`` report it."""

    kind: str
    status: str
    exit_code: int
    message: str
    run_id: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    sync: SyncResult | None = None
    enforcement: EnforceResult | None = None


def load_ruleset(settings: Settings) -> RuleSet:
    """The rules file named by KEYHYGIENE_RULES_FILE; a mistake is a UsageError naming file, line, field."""
    try:
        return load_rules(Path(settings.rules_file))
    except RulesError as exc:
        raise UsageError(str(exc)) from None


@contextmanager
def _run_context(run_id: int) -> Iterator[None]:
    khlog.bind(run_id=run_id)
    try:
        yield
    finally:
        khlog.unbind("run_id")


def _start(
    database: Database,
    *,
    kind: str,
    now: datetime,
    trigger: str,
    task_id: str | None,
    dry_run: bool | None,
    stale_after: timedelta,
) -> int:
    try:
        with session_scope(database) as session:
            # A run still 'running' long past any time limit belongs to a process that died.
            runs.abandon_stale_runs(session, now=now, older_than=now - stale_after)
            return runs.start_run(session, kind=kind, now=now, trigger=trigger, task_id=task_id, dry_run=dry_run).id
    except SQLAlchemyError as exc:
        raise DatabaseFailure(f"cannot record the run: {describe_db_error(exc)}") from None


def _finish(database: Database, outcome: JobOutcome, now: datetime, dry_run: bool | None = None) -> JobOutcome:
    assert outcome.run_id is not None
    try:
        with session_scope(database) as session:
            runs.finish_run(
                session,
                outcome.run_id,
                status=outcome.status,
                now=now,
                error=None if outcome.status == runs.COMPLETE else khlog.redact_text(outcome.message),
                summary=outcome.summary or None,
                dry_run=dry_run,
            )
    except SQLAlchemyError as exc:
        outcome.status = runs.FAILED
        outcome.exit_code = EXIT_FAILURE
        outcome.message = f"{outcome.message}; and the run could not be recorded: {describe_db_error(exc)}"
    log.info(
        "run_finished",
        run_id=outcome.run_id,
        kind=outcome.kind,
        status=outcome.status,
        exit_code=outcome.exit_code,
        message=outcome.message,
    )
    return outcome


def _notify(settings: Settings, database: Database, ruleset: RuleSet | None, outcome: JobOutcome, clock: Clock) -> None:
    """Send the run's notices, after its record is committed; never fails the job.

    Jobs that do not otherwise read the rules file (sync, prune) read it here for its notify targets
    only; a rules file that cannot be read then means no notices, not a failed job.
    """
    from .notices import after_run

    if ruleset is None:
        if not Path(settings.rules_file).exists():
            return  # no rules file, no notify targets
        try:
            ruleset = load_ruleset(settings)
        except UsageError as exc:
            log.warning("notices_not_sent", reason=f"the rules file cannot be read: {exc}")
            return
    after_run(
        database,
        ruleset,
        outcome,
        now=clock(),
        timeout=settings.notify_timeout,
        retry_seconds=settings.notify_retry_seconds,
    )


def _failure(
    kind: str, run_id: int | None, exc: BaseException, abort_errors: tuple[type[BaseException], ...]
) -> JobOutcome:
    if abort_errors and isinstance(exc, abort_errors):
        return JobOutcome(kind, runs.ABORTED, EXIT_FAILURE, "aborted: the job reached its time limit", run_id)
    if isinstance(exc, EnforcementRefused):
        message = f"enforcement refused, nothing changed: {exc}"
        result = exc.result if isinstance(exc.result, EnforceResult) else None
        return JobOutcome(kind, runs.REFUSED, EXIT_REFUSED, message, run_id, enforcement=result)
    if isinstance(exc, KeyhygieneError):
        return JobOutcome(kind, runs.FAILED, exc.exit_code, str(exc), run_id)
    if isinstance(exc, AuthenticationFailed):
        return JobOutcome(kind, runs.FAILED, EXIT_FAILURE, f"the API rejected the management key: {exc}", run_id)
    if isinstance(exc, ApiError):
        return JobOutcome(kind, runs.FAILED, EXIT_FAILURE, f"API error: {exc}", run_id)
    if isinstance(exc, SQLAlchemyError):
        return JobOutcome(kind, runs.FAILED, EXIT_FAILURE, f"database error: {describe_db_error(exc)}", run_id)
    if isinstance(exc, KeyboardInterrupt):
        return JobOutcome(kind, runs.ABORTED, EXIT_FAILURE, "interrupted", run_id)
    return JobOutcome(kind, runs.FAILED, EXIT_FAILURE, f"unexpected error: {type(exc).__name__}: {exc}", run_id)


def execute(
    kind: str,
    settings: Settings,
    *,
    dry_run: bool = False,
    trigger: str = "cli",
    task_id: str | None = None,
    clock: Clock = utcnow,
    on_page: ProgressCallback | None = None,
    abort_errors: tuple[type[BaseException], ...] = (),
    database: Database | None = None,
    client: KeysClient | None = None,
) -> JobOutcome:
    """Run one job (``sync``, ``enforce``, ``run`` or ``prune``) and record it.

    ``dry_run`` can only narrow what the rules file allows: the effective dry-run is the rules
    file's ``dry_run`` OR this flag.
    """
    if kind not in JOBS:
        return JobOutcome(kind, runs.FAILED, EXIT_USAGE, f"unknown job {kind!r}")

    own_database = database is None
    run_id: int | None = None
    try:
        ruleset = load_ruleset(settings) if kind in ("enforce", "run") else None
        effective_dry_run = None if ruleset is None else (ruleset.safety.dry_run or dry_run)
        if database is None:
            database = Database.open(settings)
        run_id = _start(
            database,
            kind=kind,
            now=clock(),
            trigger=trigger,
            task_id=task_id,
            dry_run=effective_dry_run,
            stale_after=2 * settings.job_time_limit,
        )
        with _run_context(run_id):
            log.info("run_started", kind=kind, trigger=trigger, dry_run=effective_dry_run)
            outcome = _execute(
                kind,
                settings,
                database,
                client,
                ruleset,
                run_id=run_id,
                dry_run=bool(effective_dry_run),
                clock=clock,
                on_page=on_page,
            )
            outcome = _finish(database, outcome, clock(), effective_dry_run)
            _notify(settings, database, ruleset, outcome, clock)
            return outcome
    except BaseException as exc:
        outcome = _failure(kind, run_id, exc, abort_errors)
        if database is not None and run_id is not None:
            with _run_context(run_id):
                _finish(database, outcome, clock())
                if isinstance(exc, Exception):
                    _notify(settings, database, ruleset, outcome, clock)
        else:
            log.error("run_not_started", kind=kind, error=outcome.message)
        if not isinstance(exc, Exception | KeyboardInterrupt):
            raise  # SystemExit and the like: recorded above, and passed on
        return outcome
    finally:
        if own_database and database is not None:
            database.close()


def _execute(
    kind: str,
    settings: Settings,
    database: Database,
    client: KeysClient | None,
    ruleset: RuleSet | None,
    *,
    run_id: int,
    dry_run: bool,
    clock: Clock,
    on_page: ProgressCallback | None,
) -> JobOutcome:
    if kind == "prune":
        from .retention import prune

        pruned = prune(
            database, now=clock(), retention_period=settings.retention, audit_retention=settings.audit_retention
        )
        return JobOutcome(kind, runs.COMPLETE, EXIT_OK, pruned.message(), run_id, summary=pruned.summary())
    opened = client is None
    api = client or open_client(settings)
    try:
        sync_result: SyncResult | None = None
        if kind in ("sync", "run"):
            try:
                sync_result = take_snapshot(database, api, run_id=run_id, now=clock(), on_page=on_page)
            except SyncFailed as exc:
                return JobOutcome(kind, runs.FAILED, EXIT_FAILURE, str(exc), run_id)
            if kind == "sync":
                return JobOutcome(
                    kind,
                    runs.COMPLETE,
                    EXIT_OK,
                    _sync_message(sync_result),
                    run_id,
                    summary=sync_result.summary(),
                    sync=sync_result,
                )
        assert ruleset is not None
        snapshot_id = sync_result.snapshot_id if sync_result is not None else _newest_snapshot(database)
        enforcement = enforce_snapshot(
            database,
            api,
            ruleset,
            run_id=run_id,
            snapshot_id=snapshot_id,
            now=clock(),
            dry_run=dry_run,
            clock=clock,
        )
        summary = enforcement.summary()
        if sync_result is not None:
            summary["sync"] = sync_result.summary()
        message = _enforce_message(enforcement)
        if sync_result is not None:
            message = f"{_sync_message(sync_result)}; {message}"
        return JobOutcome(
            kind,
            runs.COMPLETE,
            EXIT_OK if enforcement.failed == 0 else EXIT_FAILURE,
            message,
            run_id,
            summary=summary,
            sync=sync_result,
            enforcement=enforcement,
        )
    finally:
        if opened:
            api.close()


def _newest_snapshot(database: Database) -> int:
    with database.sessions() as session:
        snapshot = snapshots.latest_snapshot(session)
    if snapshot is None:
        raise DatabaseFailure("there is no complete snapshot to enforce on: run `keyhygiene sync` first")
    return snapshot.id


def _sync_message(result: SyncResult) -> str:
    workspaces = len(result.per_workspace)
    return (
        f"snapshot {result.snapshot_id}: {result.key_count} keys in {workspaces} workspace"
        f"{'s' if workspaces != 1 else ''} ({result.added} new, {result.changed} changed, {result.gone} gone; "
        f"{result.new_versions} rows written)"
    )


def _enforce_message(result: EnforceResult) -> str:
    if result.dry_run:
        return (
            f"dry run: {result.planned} change(s) planned on {result.total_keys} keys, "
            f"{result.reported} reported; nothing was changed"
        )
    return (
        f"{result.done} changed, {result.skipped} skipped, {result.failed} failed, {result.reported} reported "
        f"({result.planned} planned on {result.total_keys} keys)"
    )
