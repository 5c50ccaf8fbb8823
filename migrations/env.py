"""Alembic environment: runs on the connection keyhygiene hands it (see db/migrate.py)."""

from __future__ import annotations

from alembic import context

import db.rollups  # noqa: F401  (its tables are part of the schema)
from db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - keyhygiene always passes its own connection
    raise RuntimeError("run migrations through `keyhygiene db upgrade`")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
