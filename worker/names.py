"""The names of the Celery tasks: the wire contract between ``trigger``, beat and the worker."""

from __future__ import annotations

from db.runs import WORKER_JOBS

JOB_KINDS = WORKER_JOBS
TASK_NAMES = {kind: f"keyhygiene.{kind}" for kind in JOB_KINDS}
QUEUE = "keyhygiene"
TRIGGERED_HEADER = "keyhygiene_started_by"
"""The header ``keyhygiene trigger`` sets on its messages (beat's have none): a triggered job that
expires unrun is recorded, a beat tick is not."""
