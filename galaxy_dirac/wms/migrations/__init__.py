"""Schema migrations of the scheduler's database (Alembic, driven from code: no ``alembic.ini`` at run time).

Every start (``galaxy-dirac-wms serve``, each API worker, ``galaxy-dirac-wms db upgrade``) calls :func:`upgrade`:

- an empty database gets the models' tables (``create_all``) and is stamped at head;
- a database made before migrations existed (no ``alembic_version``) is recognised by the tables and indexes it
  has, stamped at the revision it matches, then upgraded: nothing is recreated;
- a stamped database is upgraded to head; one already there costs one query.

Concurrent starts take a lock around all of this (PostgreSQL advisory lock, MariaDB ``GET_LOCK``, ``flock`` on a
file beside a SQLite database), so ``serve --workers N`` upgrades once and the others find it done.

Adding a schema change: change the models in ``db.py``, then add ``versions/NNNN_<what>.py`` by hand (copy the
last one: ``revision``/``down_revision``, ``upgrade()``), with ``op.batch_alter_table`` for any ALTER so SQLite
can run it, and types that work on the three backends. ``tests/wms/test_migrations.py`` fails until the head
revision matches the models on SQLite, PostgreSQL and MariaDB.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import threading
import time
import zlib
from typing import Any, Iterator, NamedTuple, Sequence

from sqlalchemy import Connection, Engine, MetaData, inspect, text
from sqlalchemy.exc import OperationalError

log = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
#: The revision a database made before migrations existed is stamped at, by what it already has.
BASELINE = "0001_dirac_tables"
#: Tables of the baseline (DIRAC's JobDB, JobLoggingDB, TaskQueueDB, SandboxMetadataDB and PilotAgentsDB).
BASELINE_TABLES = frozenset(
    {
        "Jobs",
        "JobJDLs",
        "JobParameters",
        "HeartBeatLoggingInfo",
        "JobCommands",
        "LoggingInfo",
        "tq_TaskQueues",
        "tq_Jobs",
        "tq_TQToSites",
        "tq_TQToGridCEs",
        "tq_TQToBannedSites",
        "tq_TQToPlatforms",
        "tq_TQToJobTypes",
        "tq_TQToTags",
        "sb_Owners",
        "sb_SandBoxes",
        "sb_EntityMapping",
        "PilotAgents",
        "JobToPilotMapping",
    }
)
#: What the revisions after the baseline add, in order: (revision, tables, {table: indexes}), to stamp a database
#: made before migrations existed. Only those shapes can be unversioned: revisions added later need no entry.
ADDED_BY = (
    (
        "0002_monitoring",
        {"gd_SiteDirectorDecisions"},
        {
            "Jobs": {"gd_Jobs_EndExecTime", "gd_Jobs_StartExecTime"},
            "PilotAgents": {"gd_PilotAgents_SubmissionTime"},
            "HeartBeatLoggingInfo": {"gd_HeartBeat_JobID_Name"},
        },
    ),
    ("0003_sandbox_job_uploads", {"sb_JobUploads"}, {"sb_JobUploads": {"sb_JobUploads_JobID"}}),
)
#: How long a start waits for another one's upgrade before giving up (seconds).
LOCK_TIMEOUT = 600
#: Names the lock on PostgreSQL (advisory key: its CRC-32) and MariaDB (with the database name).
LOCK_NAME = "galaxy_dirac.wms.schema"
_THREAD_LOCK = threading.Lock()


class SchemaError(RuntimeError):
    """The database cannot be brought to this code's schema (partial tables, a revision newer than the code)."""


def target_metadata() -> Sequence[MetaData]:
    """Everything the head revision must match: the models (``db.py`` holds every table and index)."""
    from ..db import Base

    return [Base.metadata]


def compare_type(
    context: Any, inspected_column: Any, metadata_column: Any, inspected_type: Any, metadata_type: Any
) -> bool | None:
    """Alembic's type comparison, but seeing through ``with_variant`` (it compares MariaDB's LONGTEXT with the
    plain Text a variant wraps): a type with a variant for this dialect differs when its DDL differs."""
    dialect = context.dialect
    variants = getattr(metadata_type, "_variant_mapping", {})
    names = [dialect.name] + (["mariadb"] if getattr(dialect, "is_mariadb", False) else [])
    variant = next((variants[n] for n in names if n in variants), None)
    if variant is None:
        return None  # Alembic's default comparison
    return _ddl_name(inspected_type, dialect) != _ddl_name(variant, dialect)


def _ddl_name(type_: Any, dialect: Any) -> str:
    """The type the server stores: MySQL/MariaDB turn ``TEXT(n)`` into the smallest TEXT type that holds n."""
    length = getattr(type_, "length", None)
    if dialect.name in ("mysql", "mariadb") and type(type_).__name__.upper() == "TEXT" and length:
        return next(name for limit, name in _MYSQL_TEXTS if length <= limit)
    return str(type_.compile(dialect=dialect)).upper()


_MYSQL_TEXTS = ((2**8 - 1, "TINYTEXT"), (2**16 - 1, "TEXT"), (2**24 - 1, "MEDIUMTEXT"), (2**32 - 1, "LONGTEXT"))


def _config(connection: Connection) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", HERE)
    config.attributes["connection"] = connection
    return config


@functools.lru_cache(maxsize=1)
def _scripts() -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(HERE)


def head() -> str:
    """The newest revision this code knows."""
    return str(_scripts().get_current_head())


def _known(revision: str) -> bool:
    from alembic.util import CommandError

    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:
        return False


def _current(connection: Connection) -> str | None:
    from alembic.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def current(engine: Engine) -> str | None:
    """The revision the database is stamped at (None: unversioned or empty)."""
    with engine.connect() as conn:
        return _current(conn)


def detect(connection: Connection) -> str | None:
    """The revision an unversioned database matches by what it has; None when it has none of our tables."""
    inspector = inspect(connection)
    tables = set(inspector.get_table_names())
    present = BASELINE_TABLES & tables
    if not present:
        return None
    if present != BASELINE_TABLES:
        raise SchemaError(
            f"database has some of the scheduler's tables but not {', '.join(sorted(BASELINE_TABLES - present))}: "
            "restore it from a backup or point the scheduler at an empty database"
        )
    revision = BASELINE
    for rev, new_tables, new_indexes in ADDED_BY:
        if not new_tables <= tables:
            break
        if any(not names <= {i["name"] for i in inspector.get_indexes(t)} for t, names in new_indexes.items()):
            break
        revision = rev
    return revision


@contextlib.contextmanager
def _locked(connection: Connection) -> Iterator[None]:
    """One upgrade at a time per database, across threads, processes and hosts."""
    dialect = connection.dialect.name
    with _THREAD_LOCK:
        if dialect == "postgresql":
            key = zlib.crc32(LOCK_NAME.encode())  # advisory locks are per database already
            connection.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}s'"))
            try:
                connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            except OperationalError as exc:
                raise SchemaError(_timed_out()) from exc
            connection.commit()
            try:
                yield
            finally:
                connection.rollback()
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                connection.commit()
        elif dialect in ("mysql", "mariadb"):
            # GET_LOCK names are server-wide: name the database in it (at most 64 characters).
            name = f"{LOCK_NAME}.{connection.engine.url.database}"[:64]
            got = connection.execute(text("SELECT GET_LOCK(:n, :t)"), {"n": name, "t": LOCK_TIMEOUT}).scalar()
            connection.commit()
            if got != 1:
                raise SchemaError(_timed_out())
            try:
                yield
            finally:
                connection.rollback()
                connection.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": name})
                connection.commit()
        else:
            database = connection.engine.url.database
            if not database or database == ":memory:":
                yield
                return
            fd = os.open(lock_path(database), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                deadline = time.monotonic() + LOCK_TIMEOUT
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise SchemaError(_timed_out()) from None
                        time.sleep(0.05)
                yield
            finally:
                os.close(fd)  # releases the flock


def lock_path(database: str) -> str:
    """The file beside a SQLite database that upgrades lock."""
    return f"{database}.schemalock"


def _timed_out() -> str:
    return f"timed out after {LOCK_TIMEOUT} s waiting for another schema upgrade"


@contextlib.contextmanager
def _sqlite_foreign_keys_off(connection: Connection) -> Iterator[None]:
    """Batch ALTERs on SQLite copy a table and drop the old one: with foreign keys on, that drop would cascade
    into the child tables (ON DELETE CASCADE). Off for the upgrade, checked afterwards."""
    if connection.dialect.name != "sqlite":
        yield
        return
    connection.commit()
    # On the DBAPI connection: SQLAlchemy would open a transaction first, where SQLite ignores this pragma.
    raw = connection.connection.driver_connection
    raw.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        connection.rollback()
        broken = raw.execute("PRAGMA foreign_key_check").fetchall()
        raw.execute("PRAGMA foreign_keys=ON")
        if broken:
            raise SchemaError(f"upgrade left rows with dangling foreign keys: {broken[:5]}")


def _create_fresh(connection: Connection) -> None:
    for metadata in target_metadata():
        metadata.create_all(connection)
    connection.commit()


class Upgrade(NamedTuple):
    """What :func:`upgrade` did: the revision stamped before (None: unversioned or empty), the revision an
    unversioned database was recognised as (None: it was stamped, or empty), and the revision after (head)."""

    before: str | None
    detected: str | None
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def describe(self) -> str:
        if not self.changed:
            return f"already at {self.after}"
        if self.detected is not None:
            return f"database made before migrations recognised as {self.detected}, now at {self.after}"
        if self.before is None:
            return f"empty database: schema created at {self.after}"
        return f"upgraded from {self.before} to {self.after}"


def upgrade(engine: Engine) -> Upgrade:
    """Bring the database to head. Idempotent, and safe to run from every process at once."""
    target = head()
    with engine.connect() as conn:
        before = _current(conn)
        conn.rollback()
        if before == target:
            return Upgrade(before, None, target)
        with _locked(conn):
            from alembic import command

            before = _current(conn)
            conn.rollback()
            if before == target:  # another process did it while we waited
                return Upgrade(before, None, target)
            if before is not None and not _known(before):
                raise SchemaError(f"database is at revision {before!r}, unknown to this galaxy-dirac (head {target})")
            config = _config(conn)
            detected = None
            if before is None:
                detected = detect(conn)
                conn.rollback()
                if detected is None:
                    log.info("empty database: creating the schema at %s", target)
                    _create_fresh(conn)
                    command.stamp(config, target)
                    conn.commit()
                    return Upgrade(None, None, target)
                log.info("database made before migrations: stamping it at %s", detected)
                command.stamp(config, detected)
                conn.commit()
            with _sqlite_foreign_keys_off(conn):
                log.info("upgrading the database schema from %s to %s", before or detected, target)
                command.upgrade(config, target)
                conn.commit()
            return Upgrade(before, detected, target)
