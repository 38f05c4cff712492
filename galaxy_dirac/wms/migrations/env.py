"""Alembic's environment, run by :func:`galaxy_dirac.wms.migrations.upgrade` on a connection it hands over."""

from __future__ import annotations

from alembic import context

from galaxy_dirac.wms.migrations import compare_type, target_metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `galaxy-dirac-wms db upgrade`, which passes the database connection")

context.configure(
    connection=connection,
    target_metadata=target_metadata(),
    render_as_batch=True,  # ALTERs SQLite can run (copy and move), for `alembic revision --autogenerate` drafts
    transaction_per_migration=True,
    compare_type=compare_type,
)
with context.begin_transaction():
    context.run_migrations()
