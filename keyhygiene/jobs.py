"""The jobs: sync, enforce, run (sync then enforce), prune, undo and enable, as plain functions.

The command line calls them inline and the Celery tasks call the very same functions. Each one
records a run, binds ``run_id`` to every log line it writes, and returns a JobOutcome whose exit
code is the one the interface defines; none of them lets an exception escape without recording it.

A run's outcome (status, exit code, message) is decided here, once, and written to its ``runs``
row as it is; everything that reports a run (``trigger --wait``, ``status``, ``report runs``)
reads it back from there (:meth:`JobOutcome.of_run`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from db import audit, runs, snapshots
from db.leases import LeaseHolder
from db.models import Run
from keyhygiene.keysapi.errors import ApiError, AuthenticationFailed
from keyhygiene.keysapi.timing import longest_change
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
from .lease import EnforcementLease, RunHeartbeat
from .settings import Settings
from .timeutil import isoformat, utcnow

if TYPE_CHECKING:
    from keyhygiene.keysapi.client import KeysClient

    from .api import EarlyListing

log = khlog.get_logger(__name__)

Clock = Callable[[], datetime]
JOBS = ("sync", "enforce", "run", "prune", "undo", "enable")
# Jobs that read the rules file (undo and enable for its protect_* lists), and the ones that take
# --allow-actions.
RULES_JOBS = frozenset({"enforce", "run", "undo", "enable"})
CAPPED_JOBS = frozenset({"enforce", "run"})
CHANGING_JOBS = frozenset({"enforce", "run", "undo", "enable"})
"""The jobs that change keys: each holds the enforcement lease for its whole run, unless it is a
dry run (which changes nothing and must never make a live run skip)."""


@dataclass
class JobOutcome:
    """How a job ended, as every command reports it and its ``runs`` row records it."""

    kind: str
    status: str
    exit_code: int
    message: str
    run_id: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    sync: SyncResult | None = None
    enforcement: EnforceResult | None = None

    @classmethod
    def of_run(cls, run: Run) -> JobOutcome:
        """A recorded run as the outcome the job returned when it ended."""
        code = EXIT_FAILURE if run.exit_code is None else run.exit_code
        return cls(run.kind, run.status, code, run.message or run.status, run.id, dict(run.summary or {}))


def load_ruleset(settings: Settings) -> RuleSet:
    """The rules file named by KEYHYGIENE_RULES_FILE; a mistake is a UsageError naming file, line, field."""
    try:
        return load_rules(Path(settings.rules_file))
    except RulesError as exc:
        raise UsageError(str(exc)) from None


@contextmanager
def _run_context(run_id: int, allow_actions: int | None) -> Iterator[None]:
    # --allow-actions is bound too, so that every key_action event of the run carries it.
    context: dict[str, Any] = {"run_id": run_id}
    if allow_actions is not None:
        context["allow_actions"] = allow_actions
    khlog.bind(**context)
    try:
        yield
    finally:
        khlog.unbind(*context)


def _start(
    database: Database,
    *,
    kind: str,
    now: datetime,
    started_by: str,
    task_id: str | None,
    dry_run: bool | None,
    allow_actions: int | None,
    stale_after: timedelta,
    summary: dict[str, Any] | None,
) -> int:
    try:
        with session_scope(database) as session:
            # A run still 'running' long past any time limit belongs to a process that died.
            runs.abandon_stale_runs(session, now=now, older_than=now - stale_after, exit_code=EXIT_FAILURE)
            # ... and a snapshot it was taking is failed: its staging rows go with the next prune.
            snapshots.fail_orphaned(session, error=f"sync stopped: {runs.ABANDONED}")
            return runs.start_run(
                session,
                kind=kind,
                now=now,
                started_by=started_by,
                task_id=task_id,
                dry_run=dry_run,
                allow_actions=allow_actions,
                summary=summary,
            ).id
    except SQLAlchemyError as exc:
        raise DatabaseFailure(f"cannot record the run: {describe_db_error(exc)}") from None


def _finish(database: Database, outcome: JobOutcome, now: datetime, dry_run: bool | None = None) -> JobOutcome:
    assert outcome.run_id is not None
    # The message goes on to the runs table, the log, the command's output and the notices.
    outcome.message = khlog.redact_text(outcome.message)
    try:
        with session_scope(database) as session:
            runs.finish_run(
                session,
                outcome.run_id,
                status=outcome.status,
                now=now,
                exit_code=outcome.exit_code,
                message=outcome.message,
                summary=outcome.summary or None,
                dry_run=dry_run,
            )
    except SQLAlchemyError as exc:
        outcome.status = runs.FAILED
        outcome.exit_code = EXIT_FAILURE
        outcome.message = f"{outcome.message}; and the run could not be recorded: {describe_db_error(exc)}"
    _log_finished(outcome)
    return outcome


def _log_finished(outcome: JobOutcome) -> None:
    log.info(
        "run_finished",
        run_id=outcome.run_id,
        kind=outcome.kind,
        status=outcome.status,
        exit_code=outcome.exit_code,
        message=outcome.message,
    )


MAX_ALLOW_ACTIONS = 2**31 - 1
"""The largest ``--allow-actions``: the runs table stores it in an INTEGER column (32 bits on PostgreSQL)."""

ABORTED_NOTICE_SECONDS = 15.0
"""What the notices of a job stopped at its soft time limit may take, all together."""


def _notify_recorded(
    settings: Settings,
    database: Database,
    ruleset: RuleSet | None,
    outcome: JobOutcome,
    clock: Clock,
    abort_errors: tuple[type[BaseException], ...] = (),
) -> None:
    """Send the notices of a run already recorded; never fails the job.

    A stop (SIGTERM, Ctrl-C, the worker's soft time limit) while they are sent leaves the run's
    outcome and exit code as recorded; the notice cut short, and those of the run not reached yet,
    are sent by the next run. Jobs that do not otherwise read the rules file (sync, prune) read it
    here for its notify targets only; a rules file that cannot be read then means no notices, not
    a failed job.
    """
    from .notices import after_run

    stops: tuple[type[BaseException], ...] = (KeyboardInterrupt, *abort_errors)
    try:
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
            # Past the soft time limit the hard one is at least 30 s away (worker.limits): half of it.
            within=ABORTED_NOTICE_SECONDS if outcome.status == runs.ABORTED else None,
            stops=abort_errors,
        )
    except stops as stop:
        log.warning("notices_interrupted", kind=outcome.kind, error=str(stop) or type(stop).__name__)


def _failure(
    kind: str, run_id: int | None, exc: BaseException, abort_errors: tuple[type[BaseException], ...]
) -> JobOutcome:
    if abort_errors and isinstance(exc, abort_errors):
        return JobOutcome(kind, runs.ABORTED, EXIT_FAILURE, "aborted: the job reached its time limit", run_id)
    if isinstance(exc, EnforcementRefused):
        message = f"enforcement refused, nothing was changed: {exc}"
        result = exc.result if isinstance(exc.result, EnforceResult) else None
        # The plan's counts, as a run that went ahead records them: ``report runs`` and ``status``.
        summary = result.summary() if result is not None else {}
        return JobOutcome(kind, runs.REFUSED, EXIT_REFUSED, message, run_id, summary=summary, enforcement=result)
    if isinstance(exc, KeyhygieneError):
        return JobOutcome(kind, runs.FAILED, exc.exit_code, str(exc), run_id)
    if isinstance(exc, AuthenticationFailed):
        return JobOutcome(kind, runs.FAILED, EXIT_FAILURE, f"the API rejected the management key: {exc}", run_id)
    if isinstance(exc, ApiError):
        return JobOutcome(kind, runs.FAILED, EXIT_FAILURE, f"API error: {exc}", run_id)
    if isinstance(exc, SQLAlchemyError):
        return JobOutcome(kind, runs.FAILED, EXIT_FAILURE, f"database error: {describe_db_error(exc)}", run_id)
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C or SIGTERM (keyhygiene.shutdown.Terminated)
        return JobOutcome(kind, runs.ABORTED, EXIT_FAILURE, str(exc) or "interrupted", run_id)
    return JobOutcome(kind, runs.FAILED, EXIT_FAILURE, f"unexpected error: {type(exc).__name__}: {exc}", run_id)


def execute(
    kind: str,
    settings: Settings,
    *,
    dry_run: bool = False,
    started_by: str = runs.CLI,
    task_id: str | None = None,
    allow_actions: int | None = None,
    undo_run_id: int | None = None,
    key_hashes: Sequence[str] = (),
    clock: Clock = utcnow,
    on_page: ProgressCallback | None = None,
    abort_errors: tuple[type[BaseException], ...] = (),
    database: Database | None = None,
    client: KeysClient | None = None,
    early: EarlyListing | None = None,
) -> JobOutcome:
    """Run one job and record it: ``sync``, ``enforce``, ``run``, ``prune``, ``undo`` (of run
    ``undo_run_id``) or ``enable`` (of ``key_hashes``).

    ``dry_run`` can only narrow what the rules file allows: the effective dry-run of ``enforce``
    and ``run`` is the rules file's ``dry_run`` OR this flag (``undo`` and ``enable`` are an
    operator's own request, so only this flag makes them dry runs). ``allow_actions`` lifts both
    caps of ``enforce`` and ``run`` for this one run, up to that many changes. ``early``: the
    listing of a ``sync`` or ``run``, begun by the caller (who closes it); its client is the job's.
    """
    if kind not in JOBS:
        return JobOutcome(kind, runs.FAILED, EXIT_USAGE, f"unknown job {kind!r}")
    if allow_actions is not None and (kind not in CAPPED_JOBS or not 1 <= allow_actions <= MAX_ALLOW_ACTIONS):
        return JobOutcome(kind, runs.FAILED, EXIT_USAGE, "--allow-actions takes a positive count, for enforce and run")

    own_database = database is None
    run_id: int | None = None
    lease: EnforcementLease | None = None
    alive: RunHeartbeat | None = None
    noted: dict[str, Any] = {}
    try:
        ruleset = load_ruleset(settings) if kind in RULES_JOBS else None
        if kind != "prune" and client is None:
            # Bad usage, like a bad rules file, is refused before a run is recorded (or a notice sent).
            settings.require_management_key()
        effective_dry_run = _effective_dry_run(kind, ruleset, dry_run)
        # Dry because the rules file says so (every run then is, a cron job's too), not only by
        # --dry-run: `status` counts such a run as the schedule's. Kept from the start to the end,
        # whatever the end (refused, failed, or abandoned by a process that died).
        noted = {"dry_run_by_rules": True} if kind in CAPPED_JOBS and ruleset and ruleset.safety.dry_run else {}
        if database is None:
            database = Database.open(settings)
        if kind == "undo" and undo_run_id is not None:
            _require_run(database, undo_run_id)
        if kind in CHANGING_JOBS and not effective_dry_run:
            hold_for = longest_change(retry_seconds=settings.http_retry_seconds, timeout=settings.http_timeout)
            lease = EnforcementLease(database, job=kind, hold_for=hold_for)
            if not lease.acquire():
                held_by, lease = lease.held_by, None
                return _skipped(database, kind, clock(), started_by, task_id, held_by, allow_actions)
        dead_after = 2 * settings.job_time_limit  # a run still running this long: its process died
        run_id = _start(
            database,
            kind=kind,
            now=clock(),
            started_by=started_by,
            task_id=task_id,
            dry_run=effective_dry_run,
            allow_actions=allow_actions,
            stale_after=dead_after,
            summary=noted or None,
        )
        if started_by == runs.CLI:  # no time limit: its age alone cannot tell that its process died
            alive = RunHeartbeat.start(database, run_id, clock=clock, stale_after=dead_after)
        with _run_context(run_id, allow_actions):
            log.info("run_started", kind=kind, started_by=started_by, dry_run=effective_dry_run)
            outcome = _execute(
                kind,
                settings,
                database,
                client,
                ruleset,
                run_id=run_id,
                dry_run=bool(effective_dry_run),
                allow_actions=allow_actions,
                undo_run_id=undo_run_id,
                key_hashes=key_hashes,
                clock=clock,
                on_page=on_page,
                fence=lease.fence if lease is not None else None,
                early=early,
                started_by=started_by,
            )
            outcome.summary = {**outcome.summary, **noted}
            outcome = _finish(database, outcome, clock(), effective_dry_run)
            _notify_recorded(settings, database, ruleset, outcome, clock, abort_errors)
            return outcome
    except BaseException as exc:
        if database is None or run_id is None:
            return not_started(kind, exc, abort_errors)
        outcome = _failure(kind, run_id, exc, abort_errors)
        if kind in CHANGING_JOBS and not outcome.summary:
            _count_changes_so_far(database, outcome)
        outcome.summary = {**outcome.summary, **noted}
        with _run_context(run_id, allow_actions):
            _finish(database, outcome, clock())
            if isinstance(exc, Exception):
                _notify_recorded(settings, database, ruleset, outcome, clock, abort_errors)
        if not isinstance(exc, Exception | KeyboardInterrupt):
            raise  # SystemExit and the like: recorded above, and passed on
        return outcome
    finally:
        if alive is not None:
            alive.stop()
        if lease is not None:
            lease.release(in_doubt=lambda: _left_in_doubt(database, run_id))
        if own_database and database is not None:
            database.close()


def _count_changes_so_far(database: Database, outcome: JobOutcome) -> None:
    """Give a job that changes keys, stopped or failed on the way, the counts of the changes it
    made before (its run record and message would otherwise not show that it changed any)."""
    assert outcome.run_id is not None
    try:
        with database.sessions() as session:
            counts = audit.outcome_counts(session, outcome.run_id)
    except SQLAlchemyError:
        return  # the database is what failed, most likely: the audit log keeps what was done
    outcome.summary = counts
    if any(counts.values()):
        outcome.message += (
            f" ({counts['done']} change(s) done, {counts['skipped']} skipped, {counts['failed']} failed before it "
            "ended: `keyhygiene report actions --since 1d`)"
        )


def not_started(kind: str, exc: BaseException, abort_errors: tuple[type[BaseException], ...] = ()) -> JobOutcome:
    """The outcome of a job that failed before its run was recorded (the store could not be opened,
    say), logged as ``run_not_started``. Call it in an ``except`` block: what is neither an
    Exception nor an interrupt (SystemExit and the like) is logged, then raised again."""
    outcome = _failure(kind, None, exc, abort_errors)
    log.error("run_not_started", kind=kind, error=outcome.message)
    if not isinstance(exc, Exception | KeyboardInterrupt):
        raise exc
    return outcome


def _require_run(database: Database, run_id: int) -> None:
    """Refuse, before a run is recorded, an undo of a run that does not exist (a typo)."""
    with database.sessions() as session:
        if runs.get_run(session, run_id) is None:
            raise UsageError(f"there is no run {run_id} before this one: see `keyhygiene report runs`")


def _skipped(
    database: Database,
    kind: str,
    now: datetime,
    started_by: str,
    task_id: str | None,
    held_by: LeaseHolder | None,
    allow_actions: int | None,
) -> JobOutcome:
    """Record a job that did not start because another job that changes keys holds the lease (or
    keeps it for a change it left in doubt: ``EnforcementLease.release``)."""
    holder = held_by.describe() if held_by is not None else "a job that just ended"
    reason = f"another enforcement holds the enforcement lock: {holder}; nothing was changed"
    kept_by = _runs_keeping_the_lock(database, held_by) if held_by is not None else []
    if kept_by and held_by is not None and held_by.expires_at is not None:
        reason += (
            f" (run {', '.join(map(str, kept_by))} left a change in doubt whose request may still land: the lock is "
            f"kept until {isoformat(held_by.expires_at)}, and the next enforcement after that settles it)"
        )
    outcome = JobOutcome(kind, runs.SKIPPED, EXIT_FAILURE, reason)
    outcome = _ended(database, outcome, now, started_by, task_id, allow_actions)
    log.warning("job_skipped", run_id=outcome.run_id, kind=kind, reason=reason, started_by=started_by)
    _log_finished(outcome)  # as every recorded run ends: an alert on run_finished sees this one too
    return outcome


def _left_in_doubt(database: Database | None, run_id: int | None) -> bool:
    """Whether run ``run_id`` left a change in doubt."""
    if database is None or run_id is None:
        return False
    with database.sessions() as session:
        return audit.left_in_doubt(session, run_id)


def _runs_keeping_the_lock(database: Database, held_by: LeaseHolder) -> list[int]:
    """The finished runs, started under the lock ``held_by`` holds, that left a change in doubt:
    their lock is kept for it (none when that cannot be read)."""
    if held_by.acquired_at is None:
        return []
    try:
        with database.sessions() as session:
            return audit.finished_runs_in_doubt(session, started_since=held_by.acquired_at)
    except SQLAlchemyError:
        return []


def _ended(
    database: Database,
    outcome: JobOutcome,
    now: datetime,
    started_by: str,
    task_id: str | None,
    allow_actions: int | None = None,
) -> JobOutcome:
    """Record a job that ended before it began (``outcome`` says how), with its run id."""
    try:
        with session_scope(database) as session:
            outcome.run_id = runs.record_ended_run(
                session,
                kind=outcome.kind,
                now=now,
                status=outcome.status,
                exit_code=outcome.exit_code,
                message=outcome.message,
                started_by=started_by,
                task_id=task_id,
                allow_actions=allow_actions,
            ).id
    except SQLAlchemyError as exc:
        raise DatabaseFailure(f"cannot record the run: {describe_db_error(exc)}") from None
    return outcome


def _effective_dry_run(kind: str, ruleset: RuleSet | None, dry_run: bool) -> bool | None:
    """Whether this run changes no key (None for jobs that change no key anyway)."""
    if ruleset is None:
        return None
    return (ruleset.safety.dry_run or dry_run) if kind in CAPPED_JOBS else dry_run


def finished_run(settings: Settings, task_id: str) -> JobOutcome | None:
    """The outcome of a run already recorded as ended for the Celery task ``task_id``, if any: the
    same message delivered again (the broker restores a message whose worker lost its connection
    while the job ran). None when there is none, or the database cannot tell (the job then runs,
    and meets the same database)."""
    run = _run_of_task(settings, task_id)
    return JobOutcome.of_run(run) if run is not None and run.status in runs.FINAL_STATUSES else None


def task_recorded(settings: Settings, task_id: str) -> bool:
    """Whether a run is recorded for Celery task ``task_id``, ended or not (False when the store
    cannot tell)."""
    return _run_of_task(settings, task_id) is not None


def _run_of_task(settings: Settings, task_id: str) -> Run | None:
    """The run recorded for Celery task ``task_id`` (``runs.run_for_task``), read and let go of;
    None when there is none, or the database cannot tell."""
    try:
        database = Database.open(settings)
    except KeyhygieneError:
        return None
    try:
        with database.sessions() as session:
            return runs.run_for_task(session, task_id)
    except SQLAlchemyError:
        return None
    finally:
        database.close()


def record_unstarted(
    settings: Settings,
    outcome: JobOutcome,
    *,
    started_by: str,
    task_id: str | None,
    allow_actions: int | None = None,
    now: datetime | None = None,
) -> JobOutcome:
    """Record a job that ended before :func:`execute` could record it (another job held the lock,
    the rules file is invalid, ...), so that its outcome can be looked up like any other run.

    Sets ``outcome.run_id``; when the database cannot be reached the outcome is only logged.
    """
    outcome.message = khlog.redact_text(outcome.message)
    try:
        database = Database.open(settings)
    except KeyhygieneError as exc:
        log.error("run_not_recorded", kind=outcome.kind, status=outcome.status, reason=outcome.message, error=str(exc))
        return outcome
    try:
        _ended(database, outcome, now or utcnow(), started_by, task_id, allow_actions)
    except DatabaseFailure as exc:
        log.error("run_not_recorded", kind=outcome.kind, status=outcome.status, reason=outcome.message, error=str(exc))
    finally:
        database.close()
    _log_finished(outcome)
    return outcome


def _execute(
    kind: str,
    settings: Settings,
    database: Database,
    client: KeysClient | None,
    ruleset: RuleSet | None,
    *,
    run_id: int,
    dry_run: bool,
    allow_actions: int | None,
    undo_run_id: int | None,
    key_hashes: Sequence[str],
    clock: Clock,
    on_page: ProgressCallback | None,
    fence: Callable[[], None] | None = None,
    early: EarlyListing | None = None,
    started_by: str = runs.CLI,
) -> JobOutcome:
    if kind == "prune":
        from .retention import prune

        pruned = prune(
            database, now=clock(), retention_period=settings.retention, audit_retention=settings.audit_retention
        )
        return JobOutcome(kind, runs.OK, EXIT_OK, pruned.message(), run_id, summary=pruned.summary())
    opened = client is None and early is None
    api = client or (early.client() if early is not None else open_client(settings))
    try:
        if kind in ("undo", "enable"):
            assert ruleset is not None
            return _reenable(
                kind,
                database,
                api,
                ruleset,
                run_id=run_id,
                dry_run=dry_run,
                undo_run_id=undo_run_id,
                key_hashes=key_hashes,
                clock=clock,
                fence=fence,
            )
        sync_result: SyncResult | None = None
        if kind in ("sync", "run"):
            try:
                # A listing begun early is seen as of when it began, before the run was recorded.
                now = early.began_at if early is not None else clock()
                sync_result = take_snapshot(database, api, run_id=run_id, now=now, on_page=on_page, early=early)
            except SyncFailed as exc:
                return JobOutcome(kind, runs.FAILED, EXIT_FAILURE, str(exc), run_id)
            if kind == "sync":
                return JobOutcome(
                    kind,
                    runs.OK,
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
            fence=fence,
            allow_actions=allow_actions,
            triggered=started_by == runs.TRIGGER,
        )
        summary = enforcement.summary()
        if sync_result is not None:
            summary["sync"] = sync_result.summary()
        message = _enforce_message(enforcement)
        if sync_result is not None:
            message = f"{_sync_message(sync_result)}; {message}"
        # A change that failed fails the run (exit 1), after every other change was made.
        succeeded = enforcement.failed == 0
        return JobOutcome(
            kind,
            runs.OK if succeeded else runs.FAILED,
            EXIT_OK if succeeded else EXIT_FAILURE,
            message,
            run_id,
            summary=summary,
            sync=sync_result,
            enforcement=enforcement,
        )
    finally:
        if opened:
            api.close()


def _reenable(
    kind: str,
    database: Database,
    client: KeysClient,
    ruleset: RuleSet,
    *,
    run_id: int,
    dry_run: bool,
    undo_run_id: int | None,
    key_hashes: Sequence[str],
    clock: Clock,
    fence: Callable[[], None] | None = None,
) -> JobOutcome:
    from .enforcement import settle_in_doubt
    from .reenable import enable_keys, undo_run

    if not dry_run:
        # A change whose run died before it learned the API's answer is settled from the key's
        # fresh state first, as enforcement does: until then it cannot be given back.
        settle_in_doubt(database, client, now=clock())
    if kind == "undo":
        if undo_run_id is None:
            raise UsageError("undo needs the id of the run to undo")
        result = undo_run(
            database,
            client,
            run_id=run_id,
            undo_run_id=undo_run_id,
            safety=ruleset.safety,
            dry_run=dry_run,
            clock=clock,
            fence=fence,
        )
    else:
        if not key_hashes:
            raise UsageError("enable needs the hash of at least one key")
        result = enable_keys(
            database,
            client,
            run_id=run_id,
            key_hashes=key_hashes,
            safety=ruleset.safety,
            dry_run=dry_run,
            clock=clock,
            fence=fence,
        )
    succeeded = result.failed == 0
    return JobOutcome(
        kind,
        runs.OK if succeeded else runs.FAILED,
        EXIT_OK if succeeded else EXIT_FAILURE,
        result.message(),
        run_id,
        summary=result.summary(),
    )


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
