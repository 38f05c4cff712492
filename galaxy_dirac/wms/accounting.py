"""DIRAC-style accounting: the numbers behind the operators' usual plots, and the plots themselves.

DIRAC's AccountingDB keeps one record per finished job and per pilot; the embedded scheduler already holds the same
facts (site, group, start/end of execution, final status, CPU and wall time from heartbeats, pilot submission and
failure), so the aggregations are computed from its tables for a period cut into equal buckets:

- ``running-jobs-by-group``: average number of jobs executing in each bucket (seconds of execution that fall in
  the bucket / bucket length), stacked by group. A job executes from ``StartExecTime`` to ``EndExecTime`` (to
  "now" while active); after a reschedule only the last attempt is counted, as the Jobs table keeps.
- ``jobs-by-site``: jobs that ended (final status, ``EndExecTime`` in the bucket) per site, with DIRAC's table of
  per-site figures (max/min/average/current per bucket, done/failed, mean wall time, CPU efficiency).
- ``cumulative-jobs-by-site``: the running sum of the above.
- ``cumulative-walltime-by-group``: running sum of wall-clock hours of the jobs that ended, per group; a job's wall
  time is its largest ``WallClockTime`` heartbeat, else ``EndExecTime - StartExecTime``.
- ``pilots-per-ce``: pilots submitted (by ``SubmissionTime``) and failed (Failed/Aborted, by ``LastUpdateTime``)
  per CE.

Images come from matplotlib (Agg backend, imported only when a PNG is asked for).
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import io
import math
import re
import time
from collections import defaultdict
from typing import Any, Sequence

from sqlalchemy import Engine, Float, cast, func, select

from galaxy_dirac import times

from .. import states
from .db import HeartBeatLoggingInfo, Jobs, PilotAgents, read_transaction, utcnow
from .errors import Invalid

KINDS = (
    "running-jobs-by-group",
    "jobs-by-site",
    "cumulative-jobs-by-site",
    "cumulative-walltime-by-group",
    "pilots-per-ce",
)
#: Statuses a job ends in (Deleted jobs were final before and keep their times).
ENDED = (states.DONE, states.COMPLETED, states.FAILED, states.KILLED, states.DELETED)
FAILED = (states.FAILED, states.KILLED)
PILOT_FAILED = (states.PILOT_FAILED, states.PILOT_ABORTED)
MAX_BUCKETS = 2000

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class AccountingError(Invalid):
    """A period, bucket or kind that cannot be plotted (shown to the user as a 400)."""


def parse_duration(text: str | int | float) -> int:
    """``"15m"``, ``"1h"``, ``"1d"``, ``"1w"`` or plain seconds → seconds."""
    if isinstance(text, (int, float)):
        seconds = int(text)
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", text)
        if not match:
            raise AccountingError(f"bad duration {text!r}: use e.g. 900, 15m, 1h, 1d or 1w")
        seconds = int(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds <= 0:
        raise AccountingError("a duration must be positive")
    return seconds


def parse_time(text: str | dt.datetime | None, now: dt.datetime | None = None) -> dt.datetime:
    """An ISO date/time (UTC unless zoned) or a duration meaning "that long ago" (``30d``) → naive UTC."""
    now = now or utcnow()
    if text is None or text == "":
        return now
    if isinstance(text, dt.datetime):
        when = text
    elif re.fullmatch(r"\s*\d+\s*[smhdw]\s*", text):
        return now - dt.timedelta(seconds=parse_duration(text))
    else:
        try:
            when = times.parse_time(text)
        except ValueError as exc:
            raise AccountingError(f"bad time {text!r}: use ISO 8601 (2026-01-31T12:00) or an age like 30d") from exc
    try:
        return times.to_naive_utc(when)
    except OverflowError:
        raise AccountingError(f"time {text!r} is out of range once converted to UTC") from None


def buckets_for(since: dt.datetime, until: dt.datetime, bucket: int) -> list[dt.datetime]:
    """Bucket starts covering [since, until), aligned on multiples of the bucket length since the epoch."""
    if until <= since:
        raise AccountingError("the period is empty: 'until' must be after 'since'")
    epoch = dt.datetime(1970, 1, 1)
    first = math.floor((since - epoch).total_seconds() / bucket) * bucket
    count = math.ceil(((until - epoch).total_seconds() - first) / bucket)
    if count > MAX_BUCKETS:
        raise AccountingError(f"{count} buckets is too many (at most {MAX_BUCKETS}); choose a larger bucket")
    return [epoch + dt.timedelta(seconds=first + i * bucket) for i in range(count)]


def _index(when: dt.datetime, start: dt.datetime, bucket: int) -> int:
    return int((when - start).total_seconds() // bucket)


def _result(kind: str, title: str, unit: str, starts: list[dt.datetime], bucket: int, **extra: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "title": title,
        "unit": unit,
        "since": times.format_time(starts[0]),
        "until": times.format_time(starts[-1] + dt.timedelta(seconds=bucket)),
        "bucket": bucket,
        "buckets": [times.format_time(s) for s in starts],
        **extra,
    }


def _sorted_series(series: dict[str, list[float]]) -> dict[str, list[float]]:
    """Largest total first, as DIRAC orders its legends."""
    return dict(sorted(series.items(), key=lambda kv: (-sum(kv[1]), kv[0])))


# --- aggregations -----------------------------------------------------------------------------------------------------
def running_jobs_by_group(engine: Engine, since: dt.datetime, until: dt.datetime, bucket: int) -> dict[str, Any]:
    """Average number of executing jobs per bucket and group."""
    starts = buckets_for(since, until, bucket)
    lo, hi = starts[0], starts[-1] + dt.timedelta(seconds=bucket)
    now = utcnow()
    series: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(starts))
    query = select(Jobs.OwnerGroup, Jobs.Status, Jobs.StartExecTime, Jobs.EndExecTime, Jobs.LastUpdateTime).where(
        Jobs.StartExecTime < hi, (Jobs.EndExecTime >= lo) | Jobs.EndExecTime.is_(None)
    )
    with read_transaction(engine) as conn:
        for group, status, start, end, last in conn.execute(query):
            if end is None:
                end = now if status in states.ACTIVE_STATES else (last or start)
            start, end = max(start, lo), min(end, hi)
            if end <= start:
                continue
            values = series[group]
            i = _index(start, lo, bucket)
            while i < len(starts) and starts[i] < end:
                b0 = starts[i]
                b1 = b0 + dt.timedelta(seconds=bucket)
                values[i] += (min(end, b1) - max(start, b0)).total_seconds() / bucket
                i += 1
    return _result(
        "running-jobs-by-group",
        "Running jobs by group",
        "jobs",
        starts,
        bucket,
        series=_sorted_series(dict(series)),
        stacked=True,
    )


def _ended_jobs(engine: Engine, lo: dt.datetime, hi: dt.datetime) -> list[dict[str, Any]]:
    """Jobs that ended in [lo, hi) with their wall and CPU seconds (heartbeats, else execution times)."""
    ended = (Jobs.EndExecTime >= lo) & (Jobs.EndExecTime < hi) & Jobs.Status.in_(ENDED)
    with read_transaction(engine) as conn:
        rows = conn.execute(
            select(Jobs.JobID, Jobs.Site, Jobs.OwnerGroup, Jobs.Status, Jobs.StartExecTime, Jobs.EndExecTime).where(
                ended
            )
        ).all()
        reported: dict[tuple[int, str], float] = {}
        for job_id, name, value in conn.execute(
            select(
                HeartBeatLoggingInfo.JobID,
                HeartBeatLoggingInfo.Name,
                func.max(cast(HeartBeatLoggingInfo.Value, Float)),
            )
            .where(
                HeartBeatLoggingInfo.Name.in_(["WallClockTime", "CPUConsumed"]),
                HeartBeatLoggingInfo.JobID.in_(select(Jobs.JobID).where(ended)),
            )
            .group_by(HeartBeatLoggingInfo.JobID, HeartBeatLoggingInfo.Name)
        ):
            reported[(job_id, name)] = float(value)
    result = []
    for job_id, site, group, status, start, end in rows:
        wall = reported.get((job_id, "WallClockTime"))
        if wall is None:
            wall = (end - start).total_seconds() if start is not None else 0.0
        result.append(
            {
                "JobID": job_id,
                "Site": site,
                "OwnerGroup": group,
                "Status": status,
                "EndExecTime": end,
                "WallClockTime": wall,
                "CPUConsumed": reported.get((job_id, "CPUConsumed")),
            }
        )
    return result


def jobs_by_site(
    engine: Engine, since: dt.datetime, until: dt.datetime, bucket: int, *, cumulative: bool = False
) -> dict[str, Any]:
    """Ended jobs per site and bucket, with DIRAC's per-site table under it."""
    starts = buckets_for(since, until, bucket)
    lo, hi = starts[0], starts[-1] + dt.timedelta(seconds=bucket)
    series: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(starts))
    per_site: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"done": 0, "failed": 0, "wall": 0.0, "cpu": 0.0, "cpu_wall": 0.0}
    )
    for job in _ended_jobs(engine, lo, hi):
        site = job["Site"]
        series[site][_index(job["EndExecTime"], lo, bucket)] += 1
        stats = per_site[site]
        stats["failed" if job["Status"] in FAILED else "done"] += 1
        stats["wall"] += job["WallClockTime"]
        if job["CPUConsumed"] is not None:
            stats["cpu"] += job["CPUConsumed"]
            stats["cpu_wall"] += job["WallClockTime"]
    series = _sorted_series(dict(series))
    table = []
    for site, values in series.items():
        stats = per_site[site]
        total = stats["done"] + stats["failed"]
        table.append(
            {
                "Site": site,
                "Max": max(values),
                "Min": min(values),
                "Average": sum(values) / len(values),
                "Current": values[-1],
                "Total": total,
                "Done": stats["done"],
                "Failed": stats["failed"],
                "FailedPercent": 100.0 * stats["failed"] / total if total else 0.0,
                "MeanWallClockHours": stats["wall"] / total / 3600 if total else 0.0,
                "CPUEfficiencyPercent": 100.0 * stats["cpu"] / stats["cpu_wall"] if stats["cpu_wall"] else None,
            }
        )
    if cumulative:
        series = {name: _cumsum(values) for name, values in series.items()}
        return _result(
            "cumulative-jobs-by-site", "Cumulative jobs by site", "jobs", starts, bucket, series=series, stacked=True
        )
    return _result("jobs-by-site", "Jobs by site", "jobs", starts, bucket, series=series, stacked=True, table=table)


def _cumsum(values: Sequence[float]) -> list[float]:
    total, out = 0.0, []
    for value in values:
        total += value
        out.append(total)
    return out


def cumulative_walltime_by_group(engine: Engine, since: dt.datetime, until: dt.datetime, bucket: int) -> dict[str, Any]:
    """Running total of wall-clock hours of ended jobs, per group."""
    starts = buckets_for(since, until, bucket)
    lo, hi = starts[0], starts[-1] + dt.timedelta(seconds=bucket)
    series: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(starts))
    for job in _ended_jobs(engine, lo, hi):
        series[job["OwnerGroup"]][_index(job["EndExecTime"], lo, bucket)] += job["WallClockTime"] / 3600
    series = {name: _cumsum(values) for name, values in _sorted_series(dict(series)).items()}
    return _result(
        "cumulative-walltime-by-group",
        "Cumulative wall-clock time by group",
        "hours",
        starts,
        bucket,
        series=series,
        stacked=True,
    )


def pilots_per_ce(engine: Engine, since: dt.datetime, until: dt.datetime, bucket: int) -> dict[str, Any]:
    """Pilots submitted and failed per CE and bucket, with per-CE totals."""
    starts = buckets_for(since, until, bucket)
    lo, hi = starts[0], starts[-1] + dt.timedelta(seconds=bucket)
    submitted: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(starts))
    failed: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(starts))
    with read_transaction(engine) as conn:
        for ce, when, n in conn.execute(
            select(PilotAgents.DestinationSite, PilotAgents.SubmissionTime, func.count())
            .where(PilotAgents.SubmissionTime >= lo, PilotAgents.SubmissionTime < hi)
            .group_by(PilotAgents.DestinationSite, PilotAgents.SubmissionTime)
        ):
            submitted[ce][_index(when, lo, bucket)] += n
        for ce, when in conn.execute(
            select(PilotAgents.DestinationSite, PilotAgents.LastUpdateTime).where(
                PilotAgents.Status.in_(PILOT_FAILED), PilotAgents.LastUpdateTime >= lo, PilotAgents.LastUpdateTime < hi
            )
        ):
            failed[ce][_index(when, lo, bucket)] += 1
    submitted = _sorted_series(dict(submitted))
    for ce in submitted:
        failed.setdefault(ce, [0.0] * len(starts))
    failed = {ce: failed[ce] for ce in [*submitted, *sorted(set(failed) - set(submitted))]}
    table = [
        {
            "CE": ce,
            "Submitted": sum(submitted.get(ce, [])),
            "Failed": sum(failed[ce]),
            "FailedPercent": 100.0 * sum(failed[ce]) / sum(submitted[ce]) if sum(submitted.get(ce, [])) else 0.0,
        }
        for ce in failed
    ]
    return _result(
        "pilots-per-ce",
        "Pilots submitted and failed per CE",
        "pilots",
        starts,
        bucket,
        series=submitted,
        failed=failed,
        stacked=True,
        table=table,
    )


#: (engine, kind, first bucket, bucket count, bucket) → (expiry, data): the page asks for the numbers and the image
#: of one plot back to back, and "the last 30 days" maps to the same aligned buckets for a whole bucket length.
_CACHE: dict[tuple, tuple[float, dict[str, Any]]] = {}
CACHE_SECONDS = 30.0


def aggregate(
    engine: Engine, kind: str, since: dt.datetime, until: dt.datetime, bucket: int, *, cache: bool = True
) -> dict[str, Any]:
    """The data behind one plot kind (see ``KINDS``), remembered for ``CACHE_SECONDS``."""
    starts = buckets_for(since, until, bucket)
    key = (str(engine.url), id(engine), kind, starts[0], len(starts), bucket)
    hit = _CACHE.get(key) if cache else None
    if hit is not None and hit[0] > time.monotonic():
        return copy.deepcopy(hit[1])
    data = _aggregate(engine, kind, since, until, bucket)
    if cache:
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[key] = (time.monotonic() + CACHE_SECONDS, copy.deepcopy(data))
    return data


def _aggregate(engine: Engine, kind: str, since: dt.datetime, until: dt.datetime, bucket: int) -> dict[str, Any]:
    if kind == "running-jobs-by-group":
        return running_jobs_by_group(engine, since, until, bucket)
    if kind == "jobs-by-site":
        return jobs_by_site(engine, since, until, bucket)
    if kind == "cumulative-jobs-by-site":
        return jobs_by_site(engine, since, until, bucket, cumulative=True)
    if kind == "cumulative-walltime-by-group":
        return cumulative_walltime_by_group(engine, since, until, bucket)
    if kind == "pilots-per-ce":
        return pilots_per_ce(engine, since, until, bucket)
    raise AccountingError(f"unknown plot {kind!r}; use one of {', '.join(KINDS)}")


# --- output formats ---------------------------------------------------------------------------------------------------
def to_csv(data: dict[str, Any]) -> str:
    """One row per bucket, one column per series (failed pilots as ``failed:<CE>``)."""
    columns = list(data["series"])
    failed = data.get("failed") or {}
    header = ["bucket", *columns, *(f"failed:{ce}" for ce in failed)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for i, start in enumerate(data["buckets"]):
        writer.writerow(
            [start, *(_fmt(data["series"][c][i]) for c in columns), *(_fmt(failed[ce][i]) for ce in failed)]
        )
    return out.getvalue()


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def _colors(n: int) -> list[Any]:
    import matplotlib

    palette = list(matplotlib.colormaps["tab20"].colors) + list(matplotlib.colormaps["tab20b"].colors)
    palette += list(matplotlib.colormaps["tab20c"].colors)
    return [palette[i % len(palette)] for i in range(n)]


def render_png(data: dict[str, Any], width: int = 1200, height: int = 600) -> bytes:
    """Draw the data as DIRAC draws it: stacked bars per bucket, stacked areas for cumulative plots."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.dates as mdates
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    # Plain day numbers: matplotlib converts datetime objects bar by bar, which is slow with 30 series.
    days = list(mdates.date2num([times.to_naive_utc(times.parse_time(b)) for b in data["buckets"]]))
    step = data["bucket"] / 86400
    panels = [(data["series"], data["unit"])]
    if data.get("failed") is not None:
        panels = [(data["series"], "pilots submitted"), (data["failed"], "pilots failed")]
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    names = list(dict.fromkeys([n for series, _ in panels for n in series]))
    color = dict(zip(names, _colors(len(names))))
    cumulative = data["kind"].startswith("cumulative")
    for ax, (series, label) in zip(axes, panels):
        if cumulative and len(days) > 1:
            if series:
                ax.stackplot(days, *series.values(), labels=list(series), colors=[color[n] for n in series])
        else:
            # One filled step artist per series (``stairs``): stacked bars without one patch per bar, which
            # matplotlib draws an order of magnitude slower with 30 sites × many buckets.
            edges = [*days, days[-1] + step]
            bottom = [0.0] * len(days)
            for name, values in series.items():
                top = [b + v for b, v in zip(bottom, values)]
                ax.stairs(top, edges, baseline=bottom, fill=True, label=name, color=color[name], linewidth=0)
                bottom = top
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].set_title(f"{data['title']}  ({data['since'][:16]} – {data['until'][:16]} UTC)", fontsize=11)
    axes[-1].xaxis_date()
    axes[-1].set_xlim(days[0], days[-1] + step)
    locator = mdates.AutoDateLocator()
    axes[-1].xaxis.set_major_locator(locator)
    axes[-1].xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    if names:
        handles = {}
        for ax in axes:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="center right",
            fontsize=7,
            ncol=1 if len(names) <= 20 else 2,
            frameon=False,
        )
        fig.subplots_adjust(left=0.07, right=0.8 if len(names) <= 20 else 0.7, top=0.92, bottom=0.08)
    else:
        axes[0].text(0.5, 0.5, "no data in this period", ha="center", va="center", transform=axes[0].transAxes)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=dpi)
    return out.getvalue()
