"""The names of the Celery tasks: the wire contract between ``trigger``, beat and the worker."""

from __future__ import annotations

JOB_KINDS = ("run", "sync", "enforce", "prune")
TASK_NAMES = {kind: f"keyhygiene.{kind}" for kind in JOB_KINDS}
QUEUE = "keyhygiene"
