"""Small builders for scheduler tests that work on the plain functions (no HTTP)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from galaxy_dirac.wms import jobs
from galaxy_dirac.wms.auth import Principal
from galaxy_dirac.wms.config import Settings, load_settings
from galaxy_dirac.wms.db import Jobs, create_schema, make_engine, read_transaction
from tests.jdl import jdl_text  # also imported from here by the scheduler tests

ALICE = Principal(role="runner", owner="alice", group="galaxy_user", vo="galaxy")
BOB = Principal(role="runner", owner="bob", group="galaxy_user", vo="galaxy")
ADMIN = Principal(role="admin", owner="admin", group="galaxy_admin", vo="galaxy")


def make_settings(tmp_path: Path, db_url: str, **overrides: Any) -> Settings:
    return load_settings(overrides={"home": str(tmp_path / "home"), "db": db_url, **overrides}, environ={})


def make_db(db_url: str) -> Engine:
    engine = make_engine(db_url)
    create_schema(engine)
    return engine


def submit(engine: Engine, settings: Settings, n: int = 1, principal: Principal = ALICE, **attrs: Any) -> list[int]:
    result = jobs.submit(engine, [jdl_text(**attrs) for _ in range(n)], principal, settings)
    return [r["JobID"] for r in result]


def job_token(job_id: int, run: int = 0, owner: str = "alice") -> Principal:
    return Principal(role="job", owner=owner, group="galaxy_user", vo="galaxy", job_id=job_id, run=run)


def row(engine: Engine, job_id: int) -> Any:
    with read_transaction(engine) as conn:
        return conn.execute(select(Jobs).where(Jobs.JobID == job_id)).one()


def at(seconds: float) -> dt.datetime:
    """A time ``seconds`` after a fixed point in the future, so test updates are never 'late' by accident."""
    return dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=seconds)
