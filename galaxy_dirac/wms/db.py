"""SQLAlchemy models of the embedded scheduler, with DIRAC's table and column names.

Keeping DIRAC's names (JobDB, JobLoggingDB, TaskQueueDB, SandboxMetadataDB, PilotAgentsDB) means operators can read
the tables with what they know of DIRAC, and search parameters of the DiracX API map one to one onto columns.
The modules above use SQLAlchemy Core statements on these models: the hot paths (submit, match, bulk status) stay
free of ORM overhead.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import os
import random
import threading
import time
from typing import Any, Callable, Iterator, TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    Connection,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import NullPool

from .. import states

LONGTEXT = Text().with_variant(Text(length=2**32 - 1), "mysql", "mariadb")


def utcnow() -> dt.datetime:
    """Naive UTC now: every DB backend stores DIRAC times as naive UTC."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


# --- JobDB -------------------------------------------------------------------------------------------------------
class Jobs(Base):
    __tablename__ = "Jobs"
    JobID: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    JobType: Mapped[str] = mapped_column(String(32), default="User")
    JobGroup: Mapped[str] = mapped_column(String(128), default="")
    Site: Mapped[str] = mapped_column(String(100), default="ANY")
    JobName: Mapped[str] = mapped_column(String(128), default="Unknown")
    Owner: Mapped[str] = mapped_column(String(64))
    OwnerGroup: Mapped[str] = mapped_column(String(128))
    VO: Mapped[str] = mapped_column(String(32))
    SubmissionTime: Mapped[dt.datetime | None] = mapped_column(DateTime)
    RescheduleTime: Mapped[dt.datetime | None] = mapped_column(DateTime)
    LastUpdateTime: Mapped[dt.datetime | None] = mapped_column(DateTime)
    StartExecTime: Mapped[dt.datetime | None] = mapped_column(DateTime)
    HeartBeatTime: Mapped[dt.datetime | None] = mapped_column(DateTime)
    EndExecTime: Mapped[dt.datetime | None] = mapped_column(DateTime)
    Status: Mapped[str] = mapped_column(String(32), default=states.RECEIVED)
    MinorStatus: Mapped[str] = mapped_column(String(128), default="Unknown")
    ApplicationStatus: Mapped[str] = mapped_column(String(255), default="Unknown")
    UserPriority: Mapped[int] = mapped_column(Integer, default=0)
    RescheduleCounter: Mapped[int] = mapped_column(Integer, default=0)
    VerifiedFlag: Mapped[bool] = mapped_column(Boolean, default=False)
    AccountedFlag: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (
        Index("JobType", "JobType"),
        Index("JobGroup", "JobGroup"),
        Index("Site", "Site"),
        Index("Owner", "Owner"),
        Index("OwnerGroup", "OwnerGroup"),
        Index("Status", "Status"),
        Index("StatusSite", "Status", "Site"),
        Index("LastUpdateTime", "LastUpdateTime"),
        # Not DIRAC's: what the accounting queries need (migration 0002).
        Index("gd_Jobs_EndExecTime", "EndExecTime"),
        Index("gd_Jobs_StartExecTime", "StartExecTime"),
    )


class JobJDLs(Base):
    __tablename__ = "JobJDLs"
    JobID: Mapped[int] = mapped_column(ForeignKey("Jobs.JobID", ondelete="CASCADE"), primary_key=True)
    JDL: Mapped[str] = mapped_column(LONGTEXT)
    JobRequirements: Mapped[str] = mapped_column(Text, default="")
    OriginalJDL: Mapped[str] = mapped_column(LONGTEXT)


class JobParameters(Base):
    __tablename__ = "JobParameters"
    JobID: Mapped[int] = mapped_column(ForeignKey("Jobs.JobID", ondelete="CASCADE"), primary_key=True)
    Name: Mapped[str] = mapped_column(String(100), primary_key=True)
    Value: Mapped[str] = mapped_column(Text)


class HeartBeatLoggingInfo(Base):
    __tablename__ = "HeartBeatLoggingInfo"
    ID: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    JobID: Mapped[int] = mapped_column(ForeignKey("Jobs.JobID", ondelete="CASCADE"))
    Name: Mapped[str] = mapped_column(String(100))
    Value: Mapped[str] = mapped_column(Text)
    HeartBeatTime: Mapped[dt.datetime] = mapped_column(DateTime)
    __table_args__ = (
        Index("HeartBeatLoggingInfo_JobID", "JobID"),
        Index("gd_HeartBeat_JobID_Name", "JobID", "Name"),  # accounting (migration 0002)
    )


class JobCommands(Base):
    __tablename__ = "JobCommands"
    ID: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    JobID: Mapped[int] = mapped_column(ForeignKey("Jobs.JobID", ondelete="CASCADE"))
    Command: Mapped[str] = mapped_column(String(100))
    Arguments: Mapped[str] = mapped_column(String(100), default="")
    Status: Mapped[str] = mapped_column(String(64), default="Received")
    ReceptionTime: Mapped[dt.datetime] = mapped_column(DateTime)
    ExecutionTime: Mapped[dt.datetime | None] = mapped_column(DateTime)
    __table_args__ = (Index("JobCommands_JobID_Status", "JobID", "Status"),)


# --- JobLoggingDB ------------------------------------------------------------------------------------------------
class LoggingInfo(Base):
    __tablename__ = "LoggingInfo"
    JobID: Mapped[int] = mapped_column(ForeignKey("Jobs.JobID", ondelete="CASCADE"), primary_key=True)
    SeqNum: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    Status: Mapped[str] = mapped_column(String(32), default="")
    MinorStatus: Mapped[str] = mapped_column(String(128), default="")
    ApplicationStatus: Mapped[str] = mapped_column(String(255), default="")
    StatusTime: Mapped[dt.datetime] = mapped_column(DateTime)
    StatusTimeOrder: Mapped[float] = mapped_column(Float)
    StatusSource: Mapped[str] = mapped_column(String(160), default="Unknown")
    __table_args__ = (Index("LoggingInfo_StatusTime", "StatusTime"),)


# --- TaskQueueDB -------------------------------------------------------------------------------------------------
class TaskQueues(Base):
    __tablename__ = "tq_TaskQueues"
    TQId: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    Owner: Mapped[str] = mapped_column(String(64))
    OwnerGroup: Mapped[str] = mapped_column(String(128))
    VO: Mapped[str] = mapped_column(String(32))
    CPUTime: Mapped[int] = mapped_column(BigInteger)
    Priority: Mapped[float] = mapped_column(Float, default=1.0)
    Enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # Not in DIRAC's table: RAM is part of our TQ key (the DESIGN's "RAM range") and a hash of the whole key makes
    # finding a job's TQ one indexed lookup instead of comparing six child tables.
    MinRAM: Mapped[int] = mapped_column(Integer, default=0)
    MaxRAM: Mapped[int] = mapped_column(Integer, default=0)
    KeyHash: Mapped[str] = mapped_column(String(64), unique=True)
    __table_args__ = (Index("tq_CPUTime", "CPUTime"),)


class TQJobs(Base):
    __tablename__ = "tq_Jobs"
    TQId: Mapped[int] = mapped_column(ForeignKey("tq_TaskQueues.TQId", ondelete="CASCADE"), primary_key=True)
    JobId: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    Priority: Mapped[int] = mapped_column(Integer)
    RealPriority: Mapped[float] = mapped_column(Float)
    __table_args__ = (Index("tq_Jobs_pick", "TQId", "Priority", "JobId"), Index("tq_Jobs_JobId", "JobId"))


def _tq_value_table(name: str) -> type[Base]:
    """DIRAC keeps each multi-valued TQ requirement in a (TQId, Value) table."""
    return type(
        name,
        (Base,),
        {
            "__tablename__": name,
            "__annotations__": {"TQId": Mapped[int], "Value": Mapped[str]},
            "TQId": mapped_column(ForeignKey("tq_TaskQueues.TQId", ondelete="CASCADE"), primary_key=True),
            "Value": mapped_column(String(128), primary_key=True),
            "__table_args__": (Index(f"{name}_Value", "Value"),),
        },
    )


TQToSites = _tq_value_table("tq_TQToSites")
TQToGridCEs = _tq_value_table("tq_TQToGridCEs")
TQToBannedSites = _tq_value_table("tq_TQToBannedSites")
TQToPlatforms = _tq_value_table("tq_TQToPlatforms")
TQToJobTypes = _tq_value_table("tq_TQToJobTypes")
TQToTags = _tq_value_table("tq_TQToTags")

#: JDL attribute → (TQ key name, child table), the multi-valued parts of a task queue's key.
TQ_MULTI_VALUED = {
    "Sites": TQToSites,
    "GridCEs": TQToGridCEs,
    "BannedSites": TQToBannedSites,
    "Platforms": TQToPlatforms,
    "JobTypes": TQToJobTypes,
    "Tags": TQToTags,
}


# --- SandboxMetadataDB -------------------------------------------------------------------------------------------
class SBOwners(Base):
    __tablename__ = "sb_Owners"
    OwnerID: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    Owner: Mapped[str] = mapped_column(String(64))
    OwnerGroup: Mapped[str] = mapped_column(String(128))
    VO: Mapped[str] = mapped_column(String(64))
    __table_args__ = (Index("sb_Owners_unique", "Owner", "OwnerGroup", "VO", unique=True),)


class SandBoxes(Base):
    __tablename__ = "sb_SandBoxes"
    SBId: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    OwnerId: Mapped[int] = mapped_column(ForeignKey("sb_Owners.OwnerID"))
    SEName: Mapped[str] = mapped_column(String(64))
    SEPFN: Mapped[str] = mapped_column(String(512))
    Bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    RegistrationTime: Mapped[dt.datetime] = mapped_column(DateTime)
    LastAccessTime: Mapped[dt.datetime] = mapped_column(DateTime)
    Assigned: Mapped[bool] = mapped_column(Boolean, default=False)
    __table_args__ = (Index("sb_SandBoxes_Location", "SEName", "SEPFN", unique=True),)


class SBJobUploads(Base):
    """Not in DIRAC: which job's token uploaded (and so proved it holds) a sandbox. A job token may only attach as
    its output, or read, sandboxes its own job uploaded or was given; the owner's other sandboxes stay closed to it.
    A new table, so databases made before it get it from ``create_schema`` on the next start."""

    __tablename__ = "sb_JobUploads"
    SBId: Mapped[int] = mapped_column(ForeignKey("sb_SandBoxes.SBId", ondelete="CASCADE"), primary_key=True)
    JobID: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    __table_args__ = (Index("sb_JobUploads_JobID", "JobID"),)


class SBEntityMapping(Base):
    __tablename__ = "sb_EntityMapping"
    SBId: Mapped[int] = mapped_column(ForeignKey("sb_SandBoxes.SBId", ondelete="CASCADE"), primary_key=True)
    EntityId: Mapped[str] = mapped_column(String(128), primary_key=True)
    Type: Mapped[str] = mapped_column(String(64), primary_key=True)
    __table_args__ = (Index("sb_EntityMapping_EntityId", "EntityId"),)


# --- PilotAgentsDB -----------------------------------------------------------------------------------------------
class PilotAgents(Base):
    __tablename__ = "PilotAgents"
    PilotID: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    InitialJobID: Mapped[int] = mapped_column(Integer, default=0)
    CurrentJobID: Mapped[int] = mapped_column(Integer, default=0)
    PilotJobReference: Mapped[str] = mapped_column(String(255), default="Unknown")
    PilotStamp: Mapped[str] = mapped_column(String(32), unique=True)
    DestinationSite: Mapped[str] = mapped_column(String(128), default="NotAssigned")
    Queue: Mapped[str] = mapped_column(String(128), default="Unknown")
    GridSite: Mapped[str] = mapped_column(String(128), default="Unknown")
    VO: Mapped[str] = mapped_column(String(128), default="")
    GridType: Mapped[str] = mapped_column(String(32), default="LCG")
    BenchMark: Mapped[float] = mapped_column(Float, default=0.0)
    SubmissionTime: Mapped[dt.datetime | None] = mapped_column(DateTime)
    LastUpdateTime: Mapped[dt.datetime | None] = mapped_column(DateTime)
    Status: Mapped[str] = mapped_column(String(32), default=states.PILOT_UNKNOWN)
    StatusReason: Mapped[str] = mapped_column(String(255), default="Unknown")
    AccountingSent: Mapped[bool] = mapped_column(Boolean, default=False)
    # Not in DIRAC: how many jobs this pilot matched, so empty pilots are visible to the SiteDirector.
    MatchedJobs: Mapped[int] = mapped_column(Integer, default=0)
    __table_args__ = (
        Index("PilotAgents_Status", "Status"),
        Index("PilotAgents_Queue", "Queue", "Status"),
        Index("gd_PilotAgents_SubmissionTime", "SubmissionTime"),  # accounting (migration 0002)
    )


class JobToPilotMapping(Base):
    __tablename__ = "JobToPilotMapping"
    PilotID: Mapped[int] = mapped_column(Integer, primary_key=True)
    JobID: Mapped[int] = mapped_column(Integer, primary_key=True)
    StartTime: Mapped[dt.datetime] = mapped_column(DateTime)
    __table_args__ = (Index("JobToPilotMapping_JobID", "JobID"),)


# --- not in DIRAC ----------------------------------------------------------------------------------------------
class SiteDirectorDecisions(Base):
    """Last SiteDirector decision per queue, for the monitoring page (DIRAC keeps these only in the agent's log)."""

    __tablename__ = "gd_SiteDirectorDecisions"
    Queue: Mapped[str] = mapped_column(String(128), primary_key=True)
    Director: Mapped[str | None] = mapped_column(String(128), default="")
    DecisionTime: Mapped[dt.datetime | None] = mapped_column(DateTime)
    Decision: Mapped[str | None] = mapped_column(Text)


class QueueEvents(Base):
    """One row per transaction that queued jobs (submission, reschedule): its growing ``ID`` tells every API worker
    of every host, with one cheap query a second, that waiting pilots should look again (``signals.follow``)."""

    __tablename__ = "gd_QueueEvents"
    ID: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    At: Mapped[dt.datetime] = mapped_column(DateTime)


class Leases(Base):
    """Who runs a singleton loop (the maintenance agents) among every API worker of every host on this database.

    The holder bumps ``Renewals`` each interval; a contender takes the lease when it has seen the same
    (``Holder``, ``Renewals``) for the lease's duration on its own clock, so hosts' clocks need not agree.
    ``RenewedTime`` is the holder's UTC clock, for operators. An empty ``Holder`` is a lease given up."""

    __tablename__ = "gd_Leases"
    Name: Mapped[str] = mapped_column(String(64), primary_key=True)
    Holder: Mapped[str] = mapped_column(String(255), default="")
    Renewals: Mapped[int] = mapped_column(Integer, default=0)
    AcquiredTime: Mapped[dt.datetime | None] = mapped_column(DateTime)
    RenewedTime: Mapped[dt.datetime | None] = mapped_column(DateTime)


# --- engine --------------------------------------------------------------------------------------------------------
def make_engine(url: str, *, echo: bool = False, pool_size: int = 10) -> Engine:
    """Create an engine with what each backend needs for correct concurrent matching.

    SQLite gets WAL (readers never block the writer), a busy timeout, and transactions that take the write lock
    up front when asked to (``write_transaction``), which is what makes a match exactly-once there.
    """
    kwargs: dict[str, Any] = {"echo": echo, "future": True}
    if url.startswith("sqlite"):
        memory = url in ("sqlite://", "sqlite:///:memory:")
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        if memory:
            from sqlalchemy.pool import StaticPool

            kwargs["poolclass"] = StaticPool
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine, wal=not memory)
        return engine
    if url.startswith(("mysql", "mariadb")):
        kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, pool_recycle=3600)
        kwargs["isolation_level"] = "READ COMMITTED"
        return create_engine(url, **kwargs)
    if url.startswith("postgresql"):
        kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
        return create_engine(url, **kwargs)
    kwargs["poolclass"] = NullPool
    return create_engine(url, **kwargs)


def _configure_sqlite(engine: Engine, *, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself, so write transactions can say IMMEDIATE.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        if wal:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()
        from .safe_regex import install_sqlite_regexp

        install_sqlite_regexp(dbapi_conn)  # replaces SQLAlchemy's unbounded re.search

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def supports_skip_locked(engine: Engine) -> bool:
    """PostgreSQL and MariaDB ≥10.6 / MySQL 8 can skip rows other matchers have locked."""
    if engine.dialect.name == "postgresql":
        return True
    if engine.dialect.name in ("mysql", "mariadb"):
        info = engine.dialect.server_version_info or ()
        is_maria = getattr(engine.dialect, "_is_mariadb", False) or "MariaDB" in str(info)
        return tuple(info[:2]) >= ((10, 6) if is_maria else (8, 0))
    return False


class _SQLiteWriterLock:
    """One writer at a time, across the threads and the processes (API workers) using one SQLite file.

    SQLite admits one writer anyway; waiting here (a thread lock, then ``flock`` on a file beside the database)
    wakes the next writer the moment the previous one commits, where SQLite's busy handler polls with sleeps of
    up to 100 ms that dominate under concurrent requests.
    """

    def __init__(self, database: str | None) -> None:
        self.thread_lock = threading.Lock()
        self.path = f"{database}.writelock" if database and database != ":memory:" else None
        self.fd: int | None = None
        self.pid = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self.thread_lock:
            if self.path is None:
                yield
                return
            if self.fd is None or self.pid != os.getpid():
                self.fd, self.pid = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600), os.getpid()
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)


_SQLITE_WRITERS: dict[str, _SQLiteWriterLock] = {}


@contextlib.contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that will write: on SQLite it holds the write lock from BEGIN, so check-then-update is atomic."""
    if not is_sqlite(engine):
        with engine.connect() as conn, conn.begin():
            yield conn
        return
    lock = _SQLITE_WRITERS.get(str(engine.url))
    if lock is None:
        lock = _SQLITE_WRITERS.setdefault(str(engine.url), _SQLiteWriterLock(engine.url.database))
    with lock.hold(), engine.connect() as conn:
        conn = conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            yield conn


@contextlib.contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn, conn.begin():
        yield conn


T = TypeVar("T")
#: Attempts of a transaction that the database rolled back for a deadlock or lock timeout.
TRANSIENT_ATTEMPTS = 5


def retrying(function: Callable[..., T]) -> Callable[..., T]:
    """Run a function that does its own transaction(s) again when the database rolled it back for a deadlock or a
    lock timeout (MariaDB 1213/1205, PostgreSQL 40P01/40001): concurrent pilots make these normal, not errors.
    The last failure is raised; the API answers it with 503 and Retry-After."""
    from sqlalchemy.exc import DBAPIError

    from .errors import is_transient

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
            try:
                return function(*args, **kwargs)
            except DBAPIError as exc:
                if attempt == TRANSIENT_ATTEMPTS or not is_transient(exc):
                    raise
                time.sleep(random.uniform(0, 0.02 * 2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper


def newest(engine: Engine, column: Any, *where: Any) -> Any:
    """The largest value of an indexed ``column`` (rows matching ``where``), or None: what the long polls' probes
    watch to hear of new queue events, commands and status changes from other hosts."""
    with read_transaction(engine) as conn:
        return conn.execute(select(func.max(column)).where(*where)).scalar()


def create_schema(engine: Engine) -> None:
    """Bring the database to the current schema: create it (empty database) or upgrade it with the migrations in
    ``migrations/``; idempotent and locked, so every server start (and every API worker) may call it."""
    from .migrations import upgrade

    upgrade(engine)
