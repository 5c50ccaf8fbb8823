"""Prometheus metrics, read from the database at scrape time.

Every figure comes from the database when it is asked for, not from counters kept in one process's
memory, so any worker process (and ``keyhygiene metrics``) gives the same answer, before and after
restarts. Served by the worker at ``/metrics`` when ``KEYHYGIENE_METRICS_ADDR`` is set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from db import metrics, snapshots

from .context import Database
from .logging import get_logger
from .timeutil import utcnow

log = get_logger(__name__)

IDLE_AFTER = timedelta(days=30)


class DatabaseCollector(Collector):
    """Collects every keyhygiene metric from the database on each scrape."""

    def __init__(self, database: Database, clock: Callable[[], datetime] = utcnow) -> None:
        self.database = database
        self.clock = clock

    def collect(self) -> Iterator[Any]:
        now = self.clock()
        up = GaugeMetricFamily("keyhygiene_database_up", "1 when the database answered this scrape.")
        try:
            families = list(self._families(now))
        except Exception as exc:  # a scrape must answer, and say that the database did not
            log.warning("metrics_database_error", error=type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self, now: datetime) -> Iterator[Any]:
        with self.database.sessions() as session:
            newest = snapshots.latest_snapshot(session)
            keys = GaugeMetricFamily(
                "keyhygiene_keys",
                "Keys at the newest complete snapshot, by workspace and state.",
                labels=["workspace", "state"],
            )
            last_snapshot = GaugeMetricFamily(
                "keyhygiene_last_snapshot_timestamp_seconds", "When the newest complete snapshot was taken (Unix time)."
            )
            idle = GaugeMetricFamily(
                "keyhygiene_idle_keys", f"Keys with no new use for {IDLE_AFTER.days} days or more."
            )
            spend = GaugeMetricFamily(
                "keyhygiene_spend_last_day_usd", "Spend of all keys over the last 24 hours (USD)."
            )
            if newest is not None and newest.taken_at is not None:
                for workspace, state, count in metrics.keys_by_workspace_and_state(
                    session, newest.id, at=newest.taken_at
                ):
                    keys.add_metric([workspace, state], count)
                last_snapshot.add_metric([], newest.taken_at.timestamp())
                # From the roll-ups each sync keeps: a scrape costs two small aggregates, not a
                # pass over every key.
                idle.add_metric([], metrics.idle_keys(session, newest.id))
                spend.add_metric([], float(metrics.spend_since(session, now - timedelta(days=1))))
            yield keys
            yield last_snapshot
            yield idle
            yield spend

            runs_total = CounterMetricFamily(
                "keyhygiene_runs", "Job runs recorded, by job and status.", labels=["job", "status"]
            )
            for job, status, count in metrics.runs_by_job_and_status(session):
                runs_total.add_metric([job, status], count)
            yield runs_total

            running = GaugeMetricFamily("keyhygiene_runs_running", "Job runs in progress, by job.", labels=["job"])
            for job, count in metrics.running_runs_by_job(session):
                running.add_metric([job], count)
            yield running

            actions = CounterMetricFamily(
                "keyhygiene_key_actions",
                "Planned and executed changes to keys in the audit log, by action and outcome.",
                labels=["action", "outcome", "dry_run"],
            )
            for action, outcome, dry_run, count in metrics.actions_by_action_and_outcome(session):
                actions.add_metric([action, outcome, "true" if dry_run else "false"], count)
            yield actions

            pending = GaugeMetricFamily(
                "keyhygiene_key_actions_pending",
                "Changes to keys whose outcome is not recorded yet (in flight, or in doubt until a run settles them).",
                labels=["action"],
            )
            for action, count in metrics.pending_changes_by_action(session):
                pending.add_metric([action], count)
            yield pending

            success = GaugeMetricFamily(
                "keyhygiene_last_success_timestamp_seconds",
                "When the newest successful run of each job ended.",
                labels=["job"],
            )
            for job, finished in metrics.last_success_by_job(session):
                success.add_metric([job], finished.timestamp())
            yield success


def registry(database: Database, clock: Callable[[], datetime] = utcnow) -> CollectorRegistry:
    """A registry holding only keyhygiene's database-backed metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(database, clock))
    return registry


def render(database: Database, clock: Callable[[], datetime] = utcnow) -> bytes:
    """The metrics once, in the Prometheus text format."""
    return bytes(generate_latest(registry(database, clock)))


class _DatabaseDown(Collector):
    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("keyhygiene_database_up", "1 when the database answered this scrape.")
        up.add_metric([], 0)
        yield up


def render_database_down() -> bytes:
    """What a scrape says when the database cannot even be opened: ``keyhygiene_database_up 0``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_DatabaseDown())
    return bytes(generate_latest(registry))


def serve(database: Database, host: str, port: int) -> Any:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread of this process; returns the server."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry(database))
    log.info("metrics_serving", address=f"{host}:{port}")
    return server
