"""Fault drills: inject a fault, then check what must hold whatever went wrong, and count it.

Every drill ends with ``Drill.check``, which asserts the invariants of issue 8 and records the
figures that docs/reliability.md shows:

- no partial snapshot acted upon: every change was made from a complete snapshot, and no key
  state belongs to a snapshot that did not complete;
- no destructive call repeated: no key received the same PATCH or DELETE twice, except requests
  the API refused outright (429, 503), which are the only ones the client may re-send;
- no destructive call unaudited: every change the API applied has exactly one ``done`` audit row,
  and no intent is left pending once the next run has settled it;
- no secret in any output: the management key is in no stdout, stderr, log or database row;
- the next run succeeds.

With KEYHYGIENE_DRILLS_JSON set, the figures of every drill that ran are written there as JSON
when the session ends (``python -m tests.drills_report`` runs the drills and renders them).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from db.models import Action, Base, Run, Snapshot, key_records, key_usage
from keyhygiene.context import Database
from keyhygiene.fakeapi import FakeOpenRouter

from .celery_support import wait_until
from .conftest import MANAGEMENT_KEY

DRILLS_JSON_ENV = "KEYHYGIENE_DRILLS_JSON"
_REFUSED = {429, 503}
CHANGES = ("disable", "delete", "enable")


@dataclass
class Drill:
    """One drill: what was injected, what was expected, what was seen, and its figures."""

    name: str
    fault: str = ""
    expectation: str = ""
    observation: list[str] = field(default_factory=list)
    faults_injected: int = 0
    runs_completed: int = 0
    changes_made: int = 0
    changes_audited: int = 0
    repeated_destructive_calls: int = 0
    secrets_found: int = 0
    checked: bool = False

    def inject(self, description: str, count: int = 1) -> None:
        self.fault = f"{self.fault}; {description}" if self.fault else description
        self.faults_injected += count

    def saw(self, what: str) -> None:
        self.observation.append(what)

    def repeated_calls(self, fake: FakeOpenRouter) -> int:
        """PATCH/DELETE requests sent more than once to the same key that the API did not refuse."""
        counts = Counter(
            (call.method, call.path)
            for call in fake.calls
            if call.method in ("PATCH", "DELETE") and call.path.startswith("/keys/") and call.status not in _REFUSED
        )
        return sum(count - 1 for count in counts.values() if count > 1)

    def check(
        self,
        *,
        database: Database,
        fake: FakeOpenRouter,
        outputs: list[str],
        repeated: int | None = None,
    ) -> None:
        """Assert every invariant and record the figures. ``repeated``: repeats counted earlier
        (before a recovery run that may legitimately decide again on a key)."""
        self.repeated_destructive_calls = self.repeated_calls(fake) if repeated is None else repeated
        self.changes_made = sum(
            1
            for call in fake.calls
            if call.method in ("PATCH", "DELETE") and call.path.startswith("/keys/") and call.succeeded
        )
        with database.sessions() as session:
            actions = list(session.scalars(select(Action)))
            runs = {run.id: run for run in session.scalars(select(Run))}
            every_snapshot = list(session.scalars(select(Snapshot).order_by(Snapshot.id)))
            complete = {s.id for s in every_snapshot if s.status == "complete"}
            strays = [
                session.scalar(
                    select(table.c.id).where(
                        table.c.valid_from.not_in(complete) if complete else table.c.id.is_not(None)
                    )
                )
                for table in (key_usage, key_records)
            ]
            stray_versions = next((found for found in strays if found is not None), None)
            database_text = "\n".join(
                repr(tuple(row)) for table in Base.metadata.sorted_tables for row in session.execute(select(table))
            )
        done = [a for a in actions if not a.dry_run and a.action in CHANGES and a.outcome == "done"]
        self.changes_audited = len(done)
        self.runs_completed = sum(1 for run in runs.values() if run.status == "ok")
        self.secrets_found = sum(text.count(MANAGEMENT_KEY) for text in [*outputs, database_text])
        acted_on = {
            _snapshot_acted_on(runs[a.run_id], every_snapshot)
            for a in actions
            if not a.dry_run and a.action in CHANGES and a.outcome in ("done", "pending")
        }
        partial_acted_on = {snapshot for snapshot in acted_on if snapshot is not None and snapshot not in complete}
        newest_run = runs[max(runs)] if runs else None
        pending = [a.id for a in actions if a.outcome == "pending"]
        self.checked = True

        assert self.secrets_found == 0, "the management key leaked into an output or the database"
        assert self.repeated_destructive_calls == 0, f"a destructive call was repeated: {fake.change_counts()}"
        assert self.changes_made == self.changes_audited, (
            f"{self.changes_made} changes made at the API, {self.changes_audited} audited as done"
        )
        assert not partial_acted_on, f"changes were made from snapshots that never completed: {partial_acted_on}"
        assert stray_versions is None, "a key state belongs to a snapshot that did not complete"
        assert not pending, f"intents left pending after the next run: {pending}"
        assert newest_run is not None and newest_run.status == "ok", "the run after the fault did not succeed"


def _snapshot_acted_on(run: Run, snapshots: list[Snapshot]) -> int | str | None:
    """The snapshot whose keys ``run`` changed: as its summary says, or, for a run stopped before
    it could say (a signal, a kill), the one it took (``run``) or the newest complete one when it
    began (``enforce``); "none" when there is no such snapshot. None for undo and enable, which
    act on the audit log, not on a snapshot."""
    said = (run.summary or {}).get("snapshot_id")
    if said is not None:
        return int(said)
    if run.kind == "run":
        taken = [snapshot.id for snapshot in snapshots if snapshot.run_id == run.id]
        return taken[-1] if taken else "none"
    if run.kind == "enforce":
        before = [
            snapshot.id
            for snapshot in snapshots
            if snapshot.status == "complete" and snapshot.taken_at is not None and snapshot.taken_at <= run.started_at
        ]
        return before[-1] if before else "none"
    return None


_DRILLS: list[Drill] = []


@pytest.fixture(scope="session", name="drill_log")
def drill_log_fixture() -> Iterator[list[Drill]]:
    """Every drill of the session; written to $KEYHYGIENE_DRILLS_JSON at the end, when set."""
    yield _DRILLS
    target = os.environ.get(DRILLS_JSON_ENV)
    if target:
        Path(target).write_text(json.dumps([asdict(drill) for drill in _DRILLS if drill.checked], indent=2))


@pytest.fixture(name="drill")
def drill_fixture(drill_log: list[Drill], request: pytest.FixtureRequest) -> Drill:
    """A drill named after the test; a drill that does not reach ``check`` is not reported."""
    record = Drill(name=request.node.name)
    drill_log.append(record)
    return record


def expired_keys(fake: FakeOpenRouter, now: Any, *, doomed: int = 8, healthy: int = 150) -> list[str]:
    """``doomed`` expired keys (the rules delete them at once) among ``healthy`` ones: two pages."""
    from datetime import timedelta

    hashes = [
        str(
            fake.add_key(
                f"dev-old-{n}", created_at=now - timedelta(days=90), expires_at=now - timedelta(days=1), usage=1.0
            )["hash"]
        )
        for n in range(doomed)
    ]
    for n in range(healthy):
        fake.add_key(f"svc-{n}", created_at=now - timedelta(days=90), last_used_at=now, usage=5.0)
    return hashes


def wait_for_change_in_flight(database: Database, *, what: str, timeout: float = 60) -> None:
    """Wait until an intent is written and not yet completed: a change is in flight right now."""

    def pending() -> Any:
        with database.sessions() as session:
            return session.scalars(select(Action).where(Action.outcome == "pending").limit(1)).first()

    wait_until(pending, timeout=timeout, interval=0.05, what=what)


def outputs_of(*results: Any) -> list[str]:
    """stdout and stderr of CLI results (in-process) or processes (files)."""
    texts: list[str] = []
    for result in results:
        if hasattr(result, "stdout_path"):
            texts += [result.stdout_path.read_text(errors="replace"), result.stderr_path.read_text(errors="replace")]
        else:
            texts += [result.stdout, result.stderr]
    return texts
