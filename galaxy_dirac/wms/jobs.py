"""Job lifecycle: submit, search, summary, status updates, kill, heartbeat, reschedule.

Plain functions over an engine; the HTTP layer only translates bodies. Every function validates everything before
its single write transaction, so a bad request changes nothing.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

from sqlalchemy import (
    DateTime,
    Engine,
    Float,
    Integer,
    String,
    and_,
    bindparam,
    delete,
    func,
    insert,
    not_,
    or_,
    select,
    update,
)

from galaxy_dirac.times import format_time, parse_time, to_naive_utc

from .. import jdl, states
from ..jdl import JDLError
from . import pilots, policy, safe_regex, taskqueues
from .auth import Principal
from .config import Settings
from .db import (
    HeartBeatLoggingInfo,
    JobCommands,
    JobJDLs,
    JobParameters,
    Jobs,
    LoggingInfo,
    SandBoxes,
    SBEntityMapping,
    newest,
    read_transaction,
    retrying,
    utcnow,
    write_transaction,
)
from .errors import Forbidden, Invalid, NotFound, WMSError  # noqa: F401 - WMSError: re-exported for callers
from .signals import Generation

#: The names other modules and tests know these refusals by (the tree itself is in errors.py).
BadRequest = Invalid


MINOR_ACCEPTED = "Job accepted"
MINOR_CHECKING = "JobSanity"
MINOR_WAITING = "Pilot Agent Submission"
MINOR_RESCHEDULED = "Job Rescheduled"
MINOR_MAX_RESCHEDULING = "Maximum of reschedulings reached"
SANDBOX_SE = "SandboxSE"

JOB_COLUMNS = {c.name: c for c in Jobs.__table__.columns}
HEARTBEAT_FIELDS = ("LoadAverage", "MemoryUsed", "Vsize", "AvailableDiskSpace", "CPUConsumed", "WallClockTime")

LogRecord = tuple  # (job_id, status, minor, application, time, source)


# --- logging history -------------------------------------------------------------------------------------------
#: One record appended with its sequence number computed by the database: the matcher's hot path.
_APPEND_ONE = insert(LoggingInfo).from_select(
    ["JobID", "SeqNum", "Status", "MinorStatus", "ApplicationStatus", "StatusTime", "StatusTimeOrder", "StatusSource"],
    select(
        bindparam("job", type_=Integer),
        func.coalesce(func.max(LoggingInfo.SeqNum), 0) + 1,
        bindparam("status", type_=String),
        bindparam("minor", type_=String),
        bindparam("application", type_=String),
        bindparam("time", type_=DateTime),
        bindparam("order", type_=Float),
        bindparam("source", type_=String),
    ).where(LoggingInfo.JobID == bindparam("job", type_=Integer)),
)


def _log_row(record: LogRecord) -> dict[str, Any]:
    job_id, status, minor, application, when, source = record
    return {
        "JobID": job_id,
        "Status": status or "idem",
        "MinorStatus": (minor or "idem")[:128],
        "ApplicationStatus": (application or "idem")[:255],
        "StatusTime": when,
        "StatusTimeOrder": when.replace(tzinfo=dt.timezone.utc).timestamp(),
        "StatusSource": (source or "Unknown")[:160],
    }


def add_logging(conn: Any, records: Sequence[LogRecord], *, new_jobs: bool = False) -> None:
    """Append records to the jobs' histories (LoggingInfo), numbering each job's records in order."""
    if not records:
        return
    if len(records) == 1 and not new_jobs:
        row = _log_row(records[0])
        conn.execute(
            _APPEND_ONE,
            {
                "job": row["JobID"],
                "status": row["Status"],
                "minor": row["MinorStatus"],
                "application": row["ApplicationStatus"],
                "time": row["StatusTime"],
                "order": row["StatusTimeOrder"],
                "source": row["StatusSource"],
            },
        )
        return
    next_seq: dict[int, int] = defaultdict(lambda: 1)
    if not new_jobs:
        ids = sorted({r[0] for r in records})
        for job_id, seq in conn.execute(
            select(LoggingInfo.JobID, func.max(LoggingInfo.SeqNum))
            .where(LoggingInfo.JobID.in_(ids))
            .group_by(LoggingInfo.JobID)
        ):
            next_seq[job_id] = (seq or 0) + 1
    rows = []
    for record in records:
        row = _log_row(record)
        row["SeqNum"] = next_seq[row["JobID"]]
        next_seq[row["JobID"]] += 1
        rows.append(row)
    conn.execute(insert(LoggingInfo), rows)


# --- submission ------------------------------------------------------------------------------------------------
def _parse_for_submit(texts: Sequence[str], settings: Settings) -> list[dict[str, Any]]:
    if not texts:
        raise BadRequest("no JDL given: send a non-empty list of JDL strings")
    if len(texts) > settings.max_jdls_per_request:
        raise BadRequest(f"{len(texts)} JDLs in one request; at most {settings.max_jdls_per_request} are accepted")
    parsed = []
    for index, text in enumerate(texts):
        try:
            attrs = jdl.parse(text)
            if any(k.lower() == "parameters" for k in attrs):
                raise JDLError("Parameters", "parametric jobs are not accepted; submit one plain JDL per job")
            parsed.append(jdl.validate(attrs))
        except JDLError as exc:
            raise BadRequest(f"JDL #{index}: {exc}") from exc
    return parsed


def _site_column(sites: Sequence[str]) -> str:
    if len(sites) == 1:
        return sites[0]
    return "Multiple" if sites else "ANY"


def sandbox_pfn(principal: Principal, checksum_algorithm: str, checksum: str, fmt: str) -> str:
    """DiracX's sandbox naming: the pfn names owner and group, the content hash makes it unique."""
    return f"{policy.owner_prefix(principal)}{checksum_algorithm}:{checksum}.{fmt}"


def split_sandbox_ref(ref: str) -> tuple[str, str]:
    """``SB:SandboxSE|/S3/...`` → (SE name, pfn)."""
    if not ref.startswith("SB:") or "|" not in ref:
        raise BadRequest(f"not a sandbox reference: {ref!r} (expected SB:<SE>|<pfn>)")
    se_name, pfn = ref[3:].split("|", 1)
    return se_name, pfn


def _sandbox_ids(conn: Any, refs: Iterable[str], principal: Principal) -> dict[str, int]:
    wanted = {split_sandbox_ref(ref): ref for ref in refs}
    if not wanted:
        return {}
    found: dict[str, int] = {}
    for sb_id, se_name, pfn in conn.execute(
        select(SandBoxes.SBId, SandBoxes.SEName, SandBoxes.SEPFN).where(SandBoxes.SEPFN.in_([pfn for _, pfn in wanted]))
    ):
        if (se_name, pfn) in wanted:
            found[wanted[(se_name, pfn)]] = sb_id
    missing = [ref for ref in wanted.values() if ref not in found]
    if missing:
        raise BadRequest(f"input sandbox not found (upload it first with POST /api/jobs/sandbox): {missing[0]}")
    if not principal.is_admin:
        prefix = policy.owner_prefix(principal)
        foreign = [ref for ref in found if not split_sandbox_ref(ref)[1].startswith(prefix)]
        if foreign:
            raise Forbidden(f"input sandbox {foreign[0]} belongs to another owner")
    return found


@retrying
def submit(engine: Engine, texts: Sequence[str], principal: Principal, settings: Settings) -> list[dict[str, Any]]:
    """Insert jobs and queue them at once: Received → Checking → Waiting within the submit transaction."""
    principal.require("admin", "runner")
    descriptions = _parse_for_submit(texts, settings)
    now = utcnow()
    owner, group, vo = principal.owner, principal.group, principal.vo
    rows = []
    for attrs in descriptions:
        rows.append(
            {
                "JobType": str(attrs.get("JobType", "User")),
                "JobGroup": str(attrs.get("JobGroup", ""))[:128],
                "Site": _site_column(attrs.get("Site", [])),
                "JobName": str(attrs.get("JobName", "Unknown"))[:128],
                "Owner": owner,
                "OwnerGroup": group,
                "VO": vo,
                "SubmissionTime": now,
                "LastUpdateTime": now,
                "Status": states.WAITING,
                "MinorStatus": MINOR_WAITING,
                "ApplicationStatus": "Unknown",
                "UserPriority": int(attrs.get("Priority", 1)),
                "RescheduleCounter": 0,
                "VerifiedFlag": True,
                "AccountedFlag": False,
            }
        )
    keys = [taskqueues.key_for_job(attrs, owner, group, vo) for attrs in descriptions]
    with write_transaction(engine) as conn:
        sandbox_refs = {ref for attrs in descriptions for ref in attrs.get("InputSandbox", []) if ref.startswith("SB:")}
        sandbox_ids = _sandbox_ids(conn, sandbox_refs, principal)
        result = conn.execute(insert(Jobs).returning(Jobs.JobID, sort_by_parameter_order=True), rows)
        job_ids = [row[0] for row in result]
        jdl_rows, log_records, mappings = [], [], []
        tq_for_key: dict[taskqueues.TQKey, int] = {}
        new_queue_groups: set[str] = set()
        tq_rows = []
        for job_id, attrs, key, text in zip(job_ids, descriptions, keys, texts):
            full = dict(attrs, JobID=job_id, Owner=owner, OwnerGroup=group, VirtualOrganization=vo)
            jdl_rows.append(
                {
                    "JobID": job_id,
                    "JDL": jdl.render(full),
                    "JobRequirements": json.dumps(key.as_dict()),
                    "OriginalJDL": text,
                }
            )
            log_records += [
                (job_id, states.RECEIVED, MINOR_ACCEPTED, "Unknown", now, "JobManager"),
                (job_id, states.CHECKING, MINOR_CHECKING, "Unknown", now, "JobSanity"),
                (job_id, states.WAITING, MINOR_WAITING, "Unknown", now, "TaskQueue"),
            ]
            for ref in attrs.get("InputSandbox", []):
                if ref in sandbox_ids:
                    mappings.append({"SBId": sandbox_ids[ref], "EntityId": f"Job:{job_id}", "Type": "Input"})
            if key not in tq_for_key:
                before = taskqueues.changes.value
                tq_for_key[key] = taskqueues.find_or_create(conn, key, settings.group_shares, recalculate=False)
                if taskqueues.changes.value != before:
                    new_queue_groups.add(key.OwnerGroup)
            tq_rows.append((tq_for_key[key], job_id, int(attrs.get("Priority", 1))))
        conn.execute(insert(JobJDLs), jdl_rows)
        add_logging(conn, log_records, new_jobs=True)
        if mappings:
            conn.execute(insert(SBEntityMapping), mappings)
            conn.execute(update(SandBoxes).where(SandBoxes.SBId.in_(set(sandbox_ids.values()))).values(Assigned=True))
        taskqueues.insert_jobs(conn, tq_rows)
        if new_queue_groups:
            taskqueues.recalculate_priorities(conn, settings.group_shares, groups=new_queue_groups)
    taskqueues.changes.bump()
    stamp = _jsonable(now)
    return [{"JobID": j, "Status": states.WAITING, "MinorStatus": MINOR_WAITING, "TimeStamp": stamp} for j in job_ids]


# --- search and summary ----------------------------------------------------------------------------------------
SEARCH_OPERATORS = ("eq", "neq", "gt", "lt", "like", "not like", "regex", "in", "not in")


def _column(name: str) -> Any:
    try:
        return JOB_COLUMNS[name]
    except KeyError:
        raise BadRequest(f"unknown job parameter {name!r}; known: {', '.join(JOB_COLUMNS)}") from None


def _coerce_value(column: Any, value: Any) -> Any:
    """Convert a search value to the column's type, or refuse it: no backend should see text compared with a date."""
    kind = column.type.python_type
    if kind is dt.datetime:
        if not isinstance(value, str):
            raise BadRequest(f"{column.name}: {value!r} is not an ISO date/time")
        try:
            parsed = parse_time(value)
        except ValueError:
            raise BadRequest(f"{column.name}: {value!r} is not an ISO date/time") from None
        return _utc(parsed)
    if kind is bool:
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise BadRequest(f"{column.name}: {value!r} is not a boolean")
    if kind is int:
        if isinstance(value, bool):
            raise BadRequest(f"{column.name}: {value!r} is not an integer")
        try:
            number = int(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: 1e400 arrives as an infinite float
            raise BadRequest(f"{column.name}: {value!r} is not an integer") from None
        if number != value and not isinstance(value, str) or not -(2**63) <= number < 2**63:
            raise BadRequest(f"{column.name}: {value!r} is not a 64-bit integer")
        return number
    if isinstance(value, bool) or value is None:
        raise BadRequest(f"{column.name}: {value!r} is not a string")
    return str(value)


#: Values of 'in' / 'not in' searches sent as bind parameters (all but integers) in one request: PostgreSQL takes at
#: most 65,535 parameters per statement and SQLite 32,766, so more would fail inside the driver.
MAX_BOUND_VALUES = 10_000
#: Integer values (rendered into the statement: the runner's bulk status of 10,000 jobs) in one request.
MAX_INTEGER_VALUES = 100_000


def _search_conditions(specs: Sequence[Mapping[str, Any]], principal: Principal) -> list[Any]:
    conds = []
    bound = integers = 0
    for spec in specs:
        column = _column(str(spec.get("parameter")))
        op = spec.get("operator")
        if op in ("in", "not in"):
            values = spec.get("values")
            if not isinstance(values, list):
                raise BadRequest(f"operator {op!r} on {column.name} needs a list in 'values'")
            if column.type.python_type is int:
                integers += len(values)
            else:
                bound += len(values)
            if bound > MAX_BOUND_VALUES or integers > MAX_INTEGER_VALUES:
                raise BadRequest(
                    f"too many values in 'in'/'not in' searches: at most {MAX_BOUND_VALUES} text/time values and "
                    f"{MAX_INTEGER_VALUES} integers per request; split the search"
                )
            values = [_coerce_value(column, v) for v in values]
            if column.type.python_type is int:
                # Integers are rendered into the statement: thousands of bind parameters (a runner's bulk status
                # of 10,000 jobs) cost PostgreSQL far more to plan than the same list written out.
                values = bindparam(f"in_{len(conds)}", values, expanding=True, literal_execute=True)
            conds.append(column.in_(values) if op == "in" else column.not_in(values))
            continue
        if "value" not in spec:
            raise BadRequest(f"operator {op!r} on {column.name} needs a 'value'")
        value = _coerce_value(column, spec["value"])
        if op == "eq":
            conds.append(column == value)
        elif op == "neq":
            conds.append(column != value)
        elif op == "gt":
            conds.append(column > value)
        elif op == "lt":
            conds.append(column < value)
        elif op in ("like", "not like", "regex"):
            if not isinstance(value, str):
                raise BadRequest(f"operator {op!r} works on text parameters, and {column.name} is not one")
            if op == "regex":
                safe_regex.check_pattern(value)
            match = column.regexp_match(value) if op == "regex" else column.like(value)
            conds.append(not_(match) if op == "not like" else match)
        else:
            raise BadRequest(f"unknown search operator {op!r}; use one of {', '.join(SEARCH_OPERATORS)}")
    if principal.role == "runner":
        conds += [Jobs.Owner == principal.owner, Jobs.VO == principal.vo]
    elif principal.role not in ("admin", "reader"):
        raise Forbidden(f"a {principal.role} token may not search jobs")
    return conds


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return format_time(value)
    return value


def _rows_as_dicts(names: Sequence[str], columns: Sequence[Any], result: Any) -> list[dict[str, Any]]:
    """Result rows as JSON-ready dicts; only time columns need converting (the hot path of bulk status)."""
    times = [i for i, c in enumerate(columns) if c.type.python_type is dt.datetime]
    if not times:
        return [dict(zip(names, row)) for row in result]
    out = []
    for row in result:
        values = list(row)
        for i in times:
            if values[i] is not None:
                values[i] = format_time(values[i])
        out.append(dict(zip(names, values)))
    return out


def search(
    engine: Engine,
    principal: Principal,
    *,
    parameters: Sequence[str] | None = None,
    search: Sequence[Mapping[str, Any]] = (),
    sort: Sequence[Mapping[str, Any]] = (),
    distinct: bool = False,
    page: int = 1,
    per_page: int = 100,
) -> tuple[list[dict[str, Any]], int]:
    """One page of jobs and the total count, as DiracX's search (the runner's bulk status call)."""
    if page < 1 or per_page < 1:
        raise BadRequest("page and per_page must be positive")
    names = list(parameters) if parameters else list(JOB_COLUMNS)
    with_history = LOGGING_INFO in names
    if with_history:  # as DiracX 0.7: the pseudo-parameter adds the history; alone it means every column
        rest = [n for n in names if n != LOGGING_INFO]
        names = ["JobID", *(n for n in rest if n != "JobID")] if rest else list(JOB_COLUMNS)
    columns = [_column(n) for n in names]
    conds = _search_conditions(search, principal)
    query = select(*columns).where(*conds)
    if distinct:
        query = query.distinct()
    order = []
    for spec in sort:
        column = _column(str(spec.get("parameter")))
        direction = spec.get("direction", "asc")
        if direction not in ("asc", "desc"):
            raise BadRequest(f"sort direction must be 'asc' or 'desc', not {direction!r}")
        order.append(column.asc() if direction == "asc" else column.desc())
    if not distinct or "JobID" in names:
        order.append(Jobs.JobID.asc())
    # One row more than the page says whether anything follows; only then is a COUNT needed for the total.
    query = query.order_by(*order).limit(per_page + 1).offset((page - 1) * per_page)
    with safe_regex.budget(), read_transaction(engine) as conn:
        rows = _rows_as_dicts(names, columns, conn.execute(query))
        more = len(rows) > per_page
        del rows[per_page:]
        if not more and (page == 1 or rows):
            total = (page - 1) * per_page + len(rows)
        else:
            base = select(*columns).where(*conds)
            if distinct:
                base = base.distinct()
            total = conn.execute(select(func.count()).select_from(base.subquery())).scalar_one()
        if with_history:
            histories = logging_info(conn, [row["JobID"] for row in rows])
            for row in rows:
                row[LOGGING_INFO] = histories.get(row["JobID"], [])
    return rows, total


#: Search pseudo-parameter (DiracX 0.7): each row gets the job's status history.
LOGGING_INFO = "LoggingInfo"


def logging_info(conn: Any, job_ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    """Status histories as DiracX's ``JobLoggingDB.get_records``: time order, ``idem`` filled from the record before
    (a leading ``idem`` application status is ``Unknown``)."""
    histories: dict[int, list[dict[str, Any]]] = defaultdict(list)
    if not job_ids:
        return histories
    ids = bindparam("history_ids", sorted(set(job_ids)), expanding=True, literal_execute=True)
    query = (
        select(
            LoggingInfo.JobID,
            LoggingInfo.Status,
            LoggingInfo.MinorStatus,
            LoggingInfo.ApplicationStatus,
            LoggingInfo.StatusTime,
            LoggingInfo.StatusSource,
        )
        .where(LoggingInfo.JobID.in_(ids))
        .order_by(LoggingInfo.JobID, LoggingInfo.StatusTimeOrder, LoggingInfo.StatusTime, LoggingInfo.SeqNum)
    )
    for job_id, status, minor, application, when, source in conn.execute(query):
        history = histories[job_id]
        previous = history[-1] if history else {"Status": "idem", "MinorStatus": "idem", "ApplicationStatus": "Unknown"}
        record = {"Status": status, "MinorStatus": minor, "ApplicationStatus": application}
        for key, value in record.items():
            if value == "idem":
                record[key] = previous[key]
        record["StatusTime"] = _jsonable(when)
        record["Source"] = source
        history.append(record)
    return histories


def summary(
    engine: Engine, principal: Principal, grouping: Sequence[str], search: Sequence[Mapping[str, Any]] = ()
) -> list[dict[str, Any]]:
    if not grouping:
        raise BadRequest("summary needs at least one grouping parameter")
    columns = [_column(n) for n in grouping]
    conds = _search_conditions(search, principal)
    query = select(*columns, func.count().label("count")).where(*conds).group_by(*columns).order_by(*columns)
    with safe_regex.budget(), read_transaction(engine) as conn:
        return [dict(zip([*grouping, "count"], (_jsonable(v) for v in row))) for row in conn.execute(query)]


# --- access checks -------------------------------------------------------------------------------------------------
def _load_jobs(conn: Any, job_ids: Iterable[int], principal: Principal) -> tuple[dict[int, Any], dict[int, WMSError]]:
    """Rows of the jobs this principal may change, and the typed refusal for each one it may not (policy.py)."""
    ids = sorted(set(job_ids))
    rows = {row.JobID: row for row in conn.execute(select(Jobs).where(Jobs.JobID.in_(ids)))} if ids else {}
    allowed: dict[int, Any] = {}
    refused: dict[int, WMSError] = {}
    for job_id in ids:
        refusal = policy.job_refusal(principal, job_id, rows.get(job_id))
        if refusal is None:
            allowed[job_id] = rows[job_id]
        else:
            refused[job_id] = refusal
    return allowed, refused


def get_job_row(engine: Engine, job_id: int, principal: Principal) -> Any:
    with read_transaction(engine) as conn:
        allowed, refused = _load_jobs(conn, [job_id], principal)
    if job_id in refused:
        raise refused[job_id]
    return allowed[job_id]


# --- status updates ------------------------------------------------------------------------------------------------
def _utc(when: dt.datetime) -> dt.datetime:
    """Naive UTC; a zoned time whose UTC falls outside years 1..9999 (``9999-12-31T23:59:59-23:59``) is refused."""
    try:
        return to_naive_utc(when)
    except OverflowError:
        raise Invalid(f"time {when.isoformat()} is out of range once converted to UTC") from None


@retrying
def set_statuses(
    engine: Engine,
    updates: Mapping[int, Mapping[dt.datetime, Mapping[str, Any]]],
    principal: Principal,
    *,
    force: bool = False,
    clock_skew: float = 0.0,
) -> dict[str, dict[int, Any]]:
    """Apply status updates in timestamp order, as DIRAC's JobStateUpdate does.

    An update older than the job's last applied one is only recorded; an illegal transition changes nothing and is
    recorded with its source marked as rejected; an update identical to one already recorded is ignored, so
    wrappers may resend final statuses after an outage. Updates from a job token up to ``clock_skew`` seconds older
    than the last one are applied in arrival order (node clocks lag the server's). A user's Killed kills: active jobs
    also get a Kill command for their pilot, jobs not yet running leave their task queue (DIRAC forces that edge).
    """
    if force and not principal.is_admin:
        raise Forbidden("force=true is for admin tokens only")
    success: dict[int, Any] = {}
    failed: dict[int, Any] = {}
    with write_transaction(engine) as conn:
        allowed, refused = _load_jobs(conn, [int(j) for j in updates], principal)
        for job_id, refusal in refused.items():
            failed[job_id] = {"detail": refusal.detail}
        recorded = _recorded_updates(conn, allowed)
        now = utcnow()
        log_records: list[LogRecord] = []
        for job_id, row in allowed.items():
            outcome = _apply_job_updates(
                conn,
                row,
                updates[job_id],
                principal,
                force,
                recorded.get(job_id, set()),
                log_records,
                now,
                clock_skew,
            )
            if outcome.get("rejected") and not outcome.get("applied"):
                failed[job_id] = {"detail": outcome["rejected"]}
            else:
                success[job_id] = {k: v for k, v in outcome.items() if k != "applied"}
        add_logging(conn, log_records)
    if any(record[1] == states.KILLED for record in log_records):
        commands_queued.bump()  # after the commit, so a woken long poll finds the Kill
    if success:
        status_changes.bump()
    if not success and failed and all(isinstance(refused.get(j), NotFound) for j in failed):
        raise NotFound(failed)  # none of the jobs exists: 404, with each job's reason
    return {"success": success, "failed": failed}


def _recorded_updates(conn: Any, rows: Mapping[int, Any]) -> dict[int, set[tuple]]:
    recorded: dict[int, set[tuple]] = defaultdict(set)
    if rows:
        for r in conn.execute(
            select(
                LoggingInfo.JobID,
                LoggingInfo.StatusTime,
                LoggingInfo.Status,
                LoggingInfo.MinorStatus,
                LoggingInfo.ApplicationStatus,
                LoggingInfo.StatusSource,
            ).where(LoggingInfo.JobID.in_(list(rows)))
        ):
            recorded[r[0]].add(tuple(r[1:]))
    return recorded


def _apply_job_updates(
    conn: Any,
    row: Any,
    job_updates: Mapping[Any, Mapping[str, Any]],
    principal: Principal,
    force: bool,
    recorded: set[tuple],
    log_records: list[LogRecord],
    now: dt.datetime,
    clock_skew: float,
) -> dict[str, Any]:
    status, minor, application = row.Status, row.MinorStatus, row.ApplicationStatus
    last_time = row.LastUpdateTime
    values: dict[str, Any] = {}
    rejected = ""
    applied = False
    user_kill = principal.role in ("admin", "runner")
    for when_raw in sorted(job_updates, key=lambda t: _utc(_as_datetime(t))):
        update_ = job_updates[when_raw]
        when = _utc(_as_datetime(when_raw))
        new_status = update_.get("Status") or None
        new_minor = update_.get("MinorStatus") or None
        new_app = update_.get("ApplicationStatus") or None
        source = str(update_.get("Source") or ("Heartbeat" if principal.role == "job" else principal.role))
        signature = (when, new_status or "idem", (new_minor or "idem")[:128], (new_app or "idem")[:255], source[:160])
        if signature in recorded:
            applied = True  # a repeat of what is already recorded: nothing to do, and not an error
            continue
        recorded.add(signature)
        late = last_time is not None and when < last_time and not force
        # A job token's update a little older than the last one comes from a node clock behind the server's: the
        # wrapper's update is still newer than the matcher's, so it is applied.
        if late and (principal.role != "job" or (last_time - when).total_seconds() > clock_skew):
            log_records.append((row.JobID, new_status, new_minor, new_app, when, source))
            applied = True
            continue
        if new_status and new_status != status:
            forced = force
            if user_kill and new_status == states.KILLED and status not in states.FINAL_STATES:
                forced = True  # DIRAC kills jobs that are not running by forcing the edge
            if new_status not in states.JOB_TRANSITIONS:
                rejected = f"unknown status {new_status!r}"
                log_records.append(
                    (row.JobID, new_status, new_minor, new_app, when, f"{source} (rejected: {rejected})")
                )
                continue
            if not forced and not states.is_allowed(status, new_status):
                rejected = f"transition {status} -> {new_status} is not allowed"
                log_records.append(
                    (row.JobID, new_status, new_minor, new_app, when, f"{source} (rejected: {rejected})")
                )
                continue
            if new_status == states.KILLED:
                _on_kill(conn, row.JobID, status, now)
            previous, status = status, new_status
            if status == states.RUNNING and row.StartExecTime is None and "StartExecTime" not in values:
                values["StartExecTime"] = when
            if status in states.FINAL_STATES:
                values["EndExecTime"] = when
                if previous in (states.WAITING, states.RECEIVED, states.CHECKING, states.STAGING):
                    taskqueues.remove_jobs(conn, [row.JobID])
            if status == states.KILLED and not new_minor:
                new_minor = "Marked for termination" if previous in states.ACTIVE_STATES else "Killed by user"
        if new_minor:
            minor = new_minor
        if new_app:
            application = new_app
        last_time = max(last_time, when) if last_time is not None else when
        applied = True
        log_records.append((row.JobID, new_status or status, new_minor, new_app, when, source))
    if applied:
        values.update(Status=status, MinorStatus=minor[:128], ApplicationStatus=application[:255])
        if last_time is not None:
            values["LastUpdateTime"] = last_time
        conn.execute(update(Jobs).where(Jobs.JobID == row.JobID).values(**values))
    result: dict[str, Any] = {
        "Status": status,
        "MinorStatus": minor,
        "ApplicationStatus": application,
        "applied": applied,
    }
    for column in ("HeartBeatTime", "StartExecTime", "EndExecTime", "LastUpdateTime"):
        result[column] = _jsonable(values.get(column))  # DiracX: the times this update set, null otherwise
    if rejected:
        result["rejected"] = rejected
    return result


def _as_datetime(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    try:
        return parse_time(str(value))
    except ValueError:
        raise BadRequest(f"status update time {value!r} is not an ISO date/time") from None


def _on_kill(conn: Any, job_id: int, previous: str, now: dt.datetime) -> None:
    if previous in states.ACTIVE_STATES:
        conn.execute(insert(JobCommands).values(JobID=job_id, Command="Kill", Arguments="", ReceptionTime=now))
    else:
        taskqueues.remove_jobs(conn, [job_id])


# --- heartbeats ----------------------------------------------------------------------------------------------------
@retrying
def heartbeat(engine: Engine, data: Mapping[int, Mapping[str, Any]], principal: Principal) -> list[dict[str, Any]]:
    """Record heartbeats and hand out pending commands (Kill) for the jobs that sent them."""
    principal.require("job", "admin")
    now = utcnow()
    commands: list[dict[str, Any]] = []
    with write_transaction(engine) as conn:
        allowed, refused = _load_jobs(conn, [int(j) for j in data], principal)
        if refused:
            raise next(iter(refused.values()))
        if not allowed:
            return []
        ids = list(allowed)
        conn.execute(update(Jobs).where(Jobs.JobID.in_(ids)).values(HeartBeatTime=now))
        # A heartbeat proves the payload runs: Stalled (DIRAC) and Matched (DiracX) jobs become Running.
        revived = [j for j, row in allowed.items() if row.Status in (states.STALLED, states.MATCHED)]
        if revived:
            conn.execute(
                update(Jobs)
                .where(Jobs.JobID.in_(revived), Jobs.Status.in_([states.STALLED, states.MATCHED]))
                .values(Status=states.RUNNING, MinorStatus="Job Heartbeat", LastUpdateTime=now)
            )
            conn.execute(
                update(Jobs).where(Jobs.JobID.in_(revived), Jobs.StartExecTime.is_(None)).values(StartExecTime=now)
            )
            add_logging(conn, [(j, states.RUNNING, "Job Heartbeat", None, now, "Heartbeat") for j in revived])
        hb_rows, stdout = [], []
        for job_id in ids:
            payload = data.get(job_id, data.get(str(job_id), {}))  # type: ignore[call-overload]
            for field in HEARTBEAT_FIELDS:
                if payload.get(field) is not None:
                    hb_rows.append({"JobID": job_id, "Name": field, "Value": str(payload[field]), "HeartBeatTime": now})
            if payload.get("StandardOutput"):
                stdout.append(
                    {"JobID": job_id, "Name": "StandardOutput", "Value": str(payload["StandardOutput"])[-8192:]}
                )
        if hb_rows:
            conn.execute(insert(HeartBeatLoggingInfo), hb_rows)
        if stdout:
            set_parameters(conn, stdout)
        commands = _hand_out_commands(conn, ids, now)
    return commands


def _pending_commands(conn: Any, ids: Sequence[int]) -> list[Any]:
    return conn.execute(
        select(JobCommands.ID, JobCommands.JobID, JobCommands.Command, JobCommands.Arguments).where(
            JobCommands.JobID.in_(ids), JobCommands.Status == "Received"
        )
    ).all()


def _hand_out_commands(conn: Any, ids: Sequence[int], now: dt.datetime) -> list[dict[str, Any]]:
    """The jobs' pending commands, marked Sent: each reaches the node once, by heartbeat or long poll."""
    pending = _pending_commands(conn, ids)
    if not pending:
        return []
    conn.execute(
        update(JobCommands).where(JobCommands.ID.in_([p[0] for p in pending])).values(Status="Sent", ExecutionTime=now)
    )
    return [{"job_id": p[1], "command": p[2], "arguments": p[3] or ""} for p in pending]


#: Bumped after a commit that changed some job's status, so a runner long-polling for its jobs' updates wakes at
#: once (other API workers of the host through the marker file, other hosts through ``Generation.follow``).
status_changes = Generation()

#: Bumped in this process whenever a command is queued, so a long-polling wrapper on this API worker wakes at once
#: (those on other workers find it at their next database check).
commands_queued = Generation()


@retrying
def take_commands(engine: Engine, job_id: int, principal: Principal) -> list[dict[str, Any]]:
    """One job's pending commands (Kill), handed out once: what its wrapper long-polls for between heartbeats.

    Reading first keeps a poll that finds nothing off the write lock (SQLite has one for the whole database).
    """
    principal.require("job", "admin")
    with read_transaction(engine) as conn:
        allowed, refused = _load_jobs(conn, [job_id], principal)
        if refused:
            raise next(iter(refused.values()))
        if not allowed or not _pending_commands(conn, [job_id]):
            return []
    with write_transaction(engine) as conn:
        return _hand_out_commands(conn, [job_id], utcnow())


def set_parameters(conn: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Upsert JobParameters (delete + insert works the same on every backend)."""
    for row in rows:
        conn.execute(
            delete(JobParameters).where(JobParameters.JobID == row["JobID"], JobParameters.Name == row["Name"])
        )
    conn.execute(insert(JobParameters), [dict(r) for r in rows])


# --- rescheduling --------------------------------------------------------------------------------------------------
@retrying
def reschedule(
    engine: Engine, job_ids: Sequence[int], principal: Principal, settings: Settings, *, source: str = "JobManager"
) -> dict[str, dict[int, Any]]:
    """Put jobs back in their task queue (DIRAC's rescheduleJob); past MaxRescheduling they fail instead."""
    if not job_ids:
        raise BadRequest("no job ids given")
    success: dict[int, Any] = {}
    failed: dict[int, Any] = {}
    with write_transaction(engine) as conn:
        allowed, refused = _load_jobs(conn, job_ids, principal)
        for job_id, refusal in refused.items():
            failed[job_id] = {"detail": refusal.detail}
        log_records: list[LogRecord] = []
        for job_id, row in allowed.items():
            outcome = reschedule_in(conn, row, settings, log_records, source)
            (failed if "detail" in outcome else success)[job_id] = outcome
        add_logging(conn, log_records)
    if success:
        taskqueues.changes.bump()
        status_changes.bump()
    return {"success": success, "failed": failed}


def reschedule_in(conn: Any, row: Any, settings: Settings, log_records: list[LogRecord], source: str) -> dict[str, Any]:
    """Reschedule one job inside the caller's transaction."""
    now = utcnow()
    status = row.Status
    if status == states.STALLED:
        # DIRAC's table has no Stalled → Rescheduled edge: a stalled job fails first, then is rescheduled.
        log_records.append((row.JobID, states.FAILED, "Job stalled: pilot not running", None, now, source))
        status = states.FAILED
    if not states.is_allowed(status, states.RESCHEDULED):
        return {"detail": f"job {row.JobID} is {row.Status} and cannot be rescheduled"}
    counter = row.RescheduleCounter + 1
    conn.execute(
        update(JobCommands)
        .where(JobCommands.JobID == row.JobID, JobCommands.Status == "Received")
        .values(Status="Cancelled")
    )
    taskqueues.remove_jobs(conn, [row.JobID])
    if counter > settings.max_rescheduling:
        values = dict(Status=states.FAILED, MinorStatus=MINOR_MAX_RESCHEDULING, LastUpdateTime=now, EndExecTime=now)
        conn.execute(update(Jobs).where(Jobs.JobID == row.JobID).values(**values))
        log_records.append((row.JobID, states.FAILED, MINOR_MAX_RESCHEDULING, None, now, source))
        return {"detail": MINOR_MAX_RESCHEDULING, "Status": states.FAILED, "MinorStatus": MINOR_MAX_RESCHEDULING}
    requirements = conn.execute(select(JobJDLs.JobRequirements).where(JobJDLs.JobID == row.JobID)).scalar_one()
    key_data = json.loads(requirements)
    key = taskqueues.TQKey(**{k: tuple(v) if isinstance(v, list) else v for k, v in key_data.items()})
    tq_id = taskqueues.find_or_create(conn, key, settings.group_shares)
    taskqueues.insert_jobs(conn, [(tq_id, row.JobID, row.UserPriority)])
    conn.execute(
        delete(SBEntityMapping).where(SBEntityMapping.EntityId == f"Job:{row.JobID}", SBEntityMapping.Type == "Output")
    )
    conn.execute(
        update(Jobs)
        .where(Jobs.JobID == row.JobID)
        .values(
            Status=states.WAITING,
            MinorStatus=MINOR_WAITING,
            ApplicationStatus="Unknown",
            RescheduleCounter=counter,
            RescheduleTime=now,
            LastUpdateTime=now,
            StartExecTime=None,
            EndExecTime=None,
            HeartBeatTime=None,
            Site=_site_column(key.Sites),
        )
    )
    log_records += [
        (row.JobID, states.RESCHEDULED, MINOR_RESCHEDULED, "Unknown", now, source),
        (row.JobID, states.RECEIVED, MINOR_RESCHEDULED, None, now, source),
        (row.JobID, states.CHECKING, MINOR_CHECKING, None, now, "JobSanity"),
        (row.JobID, states.WAITING, MINOR_WAITING, None, now, "TaskQueue"),
    ]
    return {"Status": states.WAITING, "MinorStatus": MINOR_WAITING, "RescheduleCounter": counter}


# --- details ---------------------------------------------------------------------------------------------------------
#: At most this many job ids in one answer of :func:`updated_since` (the runner reads their statuses in bulk anyway).
MAX_UPDATED_IDS = 10_000


def updated_since(engine: Engine, principal: Principal, since: dt.datetime | None) -> dict[str, Any] | None:
    """The caller's jobs whose status changed after ``since`` and the cursor to ask with next, or ``None`` when none
    did (a long poll keeps waiting). Without ``since``: no ids, just the cursor to start from."""
    policy.require_role(principal, "admin", "runner")
    owned = [] if principal.is_admin else [Jobs.Owner == principal.owner, Jobs.VO == principal.vo]
    if since is None:
        return {"JobIDs": [], "Cursor": format_time(newest(engine, Jobs.LastUpdateTime, *owned) or utcnow())}
    with read_transaction(engine) as conn:
        rows = conn.execute(
            select(Jobs.JobID, Jobs.LastUpdateTime)
            .where(*owned, Jobs.LastUpdateTime > to_naive_utc(since))
            .order_by(Jobs.LastUpdateTime)
            .limit(MAX_UPDATED_IDS)
        ).all()
    if not rows:
        return None
    return {"JobIDs": [r.JobID for r in rows], "Cursor": format_time(rows[-1].LastUpdateTime)}


def details(engine: Engine, job_id: int, principal: Principal) -> dict[str, Any]:
    """One job with its JDL, history, parameters and pilots (the runner's error reports; monitoring)."""
    row = get_job_row(engine, job_id, policy.reading_as(principal))
    stamps = pilots.stamps_of_job(engine, job_id)
    return {
        **{c: _jsonable(getattr(row, c)) for c in JOB_COLUMNS},
        "JDL": job_jdl(engine, job_id),
        "History": history(engine, job_id),
        "Parameters": parameters(engine, job_id),
        "Pilots": stamps,
        # Where it ran (CE, queue, pilot reference), as DiracX's pilot search gives a VO's users.
        "PilotAgents": pilots.list_pilots(engine, stamps=stamps) if stamps else [],
        "HeartBeat": heartbeat_summary(engine, job_id),
    }


def job_jdl(engine: Engine, job_id: int) -> str:
    with read_transaction(engine) as conn:
        text = conn.execute(select(JobJDLs.JDL).where(JobJDLs.JobID == job_id)).scalar()
    if text is None:
        raise NotFound(f"job {job_id} not found")
    return text


def history(engine: Engine, job_id: int) -> list[dict[str, Any]]:
    with read_transaction(engine) as conn:
        rows = conn.execute(select(LoggingInfo).where(LoggingInfo.JobID == job_id).order_by(LoggingInfo.SeqNum))
        return [
            {
                "Status": r.Status,
                "MinorStatus": r.MinorStatus,
                "ApplicationStatus": r.ApplicationStatus,
                "StatusTime": _jsonable(r.StatusTime),
                "Source": r.StatusSource,
            }
            for r in rows
        ]


def heartbeat_summary(engine: Engine, job_id: int) -> dict[str, float]:
    """The latest value of each heartbeat figure, plus the peak memory: what a job consumed, for its owner."""
    latest: dict[str, float] = {}
    peak = 0.0
    with read_transaction(engine) as conn:
        for name, value in conn.execute(
            select(HeartBeatLoggingInfo.Name, HeartBeatLoggingInfo.Value)
            .where(HeartBeatLoggingInfo.JobID == job_id)
            .order_by(HeartBeatLoggingInfo.ID)
        ):
            try:
                latest[name] = float(value)
            except ValueError:
                continue
            if name == "MemoryUsed":
                peak = max(peak, latest[name])
    if "MemoryUsed" in latest:
        latest["MaxMemoryUsed"] = peak
    return latest


def parameters(engine: Engine, job_id: int) -> dict[str, str]:
    with read_transaction(engine) as conn:
        return dict(
            conn.execute(select(JobParameters.Name, JobParameters.Value).where(JobParameters.JobID == job_id)).all()
        )


def jobs_in_states(conn: Any, statuses: Iterable[str], older_than: dt.datetime, column: Any) -> list[Any]:
    """Rows whose ``column`` (a time) is older than the cut-off: what the maintenance loop acts on."""
    return conn.execute(
        select(Jobs).where(
            Jobs.Status.in_(list(statuses)),
            or_(column < older_than, and_(column.is_(None), Jobs.LastUpdateTime < older_than)),
        )
    ).all()
