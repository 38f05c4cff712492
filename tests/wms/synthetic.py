"""A realistic synthetic month for the monitoring and accounting tests: bulk inserts into the scheduler's own tables.

~30 sites (one CE and queue each), ~10 groups, jobs submitted over the month that wait, run (with heartbeats), and
end Done, Failed or Killed; some are rescheduled (their history shows the first attempt), a few hit the reschedule
limit, a few still run at the end. Pilots are submitted per CE, some fail. The generator returns its own records
so tests can compute the expected numbers independently of the SQL under test.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random

from sqlalchemy import Engine, insert

from galaxy_dirac import states
from galaxy_dirac.wms.db import (
    HeartBeatLoggingInfo,
    JobJDLs,
    Jobs,
    JobToPilotMapping,
    LoggingInfo,
    PilotAgents,
    write_transaction,
)

MONTH_START = dt.datetime(2026, 10, 1)
MONTH_END = dt.datetime(2026, 11, 1)
SITES = [f"LCG.Site{i:02d}.{cc}" for i, cc in zip(range(30), ["de", "fr", "it", "uk", "es", "nl"] * 5)]
CES = {site: f"ce{i:02d}.{site.split('.')[1].lower()}.example.org" for i, site in enumerate(SITES)}
GROUPS = [
    f"galaxy_{name}" for name in ("user", "prod", "bio", "astro", "chem", "genomics", "imaging", "ml", "teach", "ops")
]
CHUNK = 20_000


@dataclasses.dataclass
class JobRecord:
    JobID: int
    Site: str
    OwnerGroup: str
    Owner: str
    Status: str
    Submit: dt.datetime
    Start: dt.datetime | None
    End: dt.datetime | None
    Wall: float | None  # the largest WallClockTime heartbeat, None when the job sent none
    CPU: float | None
    Reschedules: int


@dataclasses.dataclass
class PilotRecord:
    PilotID: int
    CE: str
    Site: str
    Status: str
    Submitted: dt.datetime
    LastUpdate: dt.datetime


@dataclasses.dataclass
class Month:
    jobs: list[JobRecord]
    pilots: list[PilotRecord]


def _t(rng: random.Random, lo: dt.datetime, hi: dt.datetime) -> dt.datetime:
    return lo + dt.timedelta(seconds=int(rng.uniform(0, (hi - lo).total_seconds())))


def build_month(engine: Engine, n_jobs: int = 4000, seed: int = 7, heartbeats: bool = True) -> Month:
    """Fill the DB with ``n_jobs`` jobs and their pilots over October 2026; return what was inserted."""
    rng = random.Random(seed)
    pilots: list[PilotRecord] = []
    pilots_of_site: dict[str, list[int]] = {s: [] for s in SITES}
    site_weights = [1 + (i % 7) * 2 for i in range(len(SITES))]
    for pilot_id in range(1, max(60, n_jobs // 3) + 1):
        site = rng.choices(SITES, site_weights)[0]
        submitted = _t(rng, MONTH_START, MONTH_END - dt.timedelta(hours=1))
        roll = rng.random()
        status = states.PILOT_FAILED if roll < 0.07 else states.PILOT_ABORTED if roll < 0.1 else states.PILOT_DONE
        last = submitted + dt.timedelta(minutes=rng.randint(5, 600))
        pilots.append(PilotRecord(pilot_id, CES[site], site, status, submitted, last))
        pilots_of_site[site].append(pilot_id)

    jobs: list[JobRecord] = []
    job_rows, jdl_rows, log_rows, hb_rows, map_rows = [], [], [], [], []
    for job_id in range(1, n_jobs + 1):
        group = rng.choice(GROUPS)
        owner = f"{group.split('_')[1]}{rng.randint(1, 3)}"
        site = rng.choices(SITES, site_weights)[0]
        submit = _t(rng, MONTH_START, MONTH_END - dt.timedelta(hours=2))
        history = [
            (states.RECEIVED, "Job accepted", submit),
            (states.CHECKING, "JobSanity", submit),
            (states.WAITING, "Pilot Agent Submission", submit),
        ]
        now = submit
        reschedules = 0
        if rng.random() < 0.06:  # earlier attempts that ended in a reschedule
            for _ in range(rng.randint(1, 4)):
                now += dt.timedelta(minutes=rng.randint(1, 60))
                history += [(states.MATCHED, "Assigned", now), (states.RUNNING, "Application", now)]
                now += dt.timedelta(minutes=rng.randint(5, 90))
                history += [
                    (states.RESCHEDULED, "Job Rescheduled", now),
                    (states.RECEIVED, "Job Rescheduled", now),
                    (states.CHECKING, "JobSanity", now),
                    (states.WAITING, "Pilot Agent Submission", now),
                ]
                reschedules += 1
        start = end = None
        wall = cpu = None
        minor = ""
        if reschedules > 3:
            status, minor, end = states.FAILED, "Maximum of reschedulings reached", now
            history = [*history[:-3], (states.FAILED, minor, now)]
        else:
            start = now + dt.timedelta(minutes=rng.randint(1, 180))
            duration = min(rng.lognormvariate(8.3, 1.0), 20 * 3600)
            end = start + dt.timedelta(seconds=int(duration))
            history += [(states.MATCHED, "Assigned", start), (states.RUNNING, "Application", start)]
            if end >= MONTH_END - dt.timedelta(hours=1) or (
                end > MONTH_END - dt.timedelta(days=1) and rng.random() < 0.2
            ):
                status, minor, end = states.RUNNING, "Application", None
            else:
                roll = rng.random()
                status, minor = (
                    (states.FAILED, "Application Finished With Errors")
                    if roll < 0.08
                    else (states.KILLED, "Marked for termination")
                    if roll < 0.11
                    else (states.DONE, "Execution Complete")
                )
                history += [(states.COMPLETING, "Uploading Output Sandbox", end), (status, minor, end)]
            if heartbeats and rng.random() < 0.9:
                efficiency = rng.uniform(0.3, 0.98)
                last = (end or MONTH_END - dt.timedelta(minutes=30)) - start
                beats = max(1, min(4, int(last.total_seconds() // 1800)))
                for k in range(1, beats + 1):
                    elapsed = last.total_seconds() * k / beats
                    when = start + dt.timedelta(seconds=elapsed)
                    for name, value in (
                        ("WallClockTime", elapsed),
                        ("CPUConsumed", elapsed * efficiency),
                        ("MemoryUsed", rng.uniform(100, 4000)),
                    ):
                        hb_rows.append({"JobID": job_id, "Name": name, "Value": f"{value:.3f}", "HeartBeatTime": when})
                wall = float(f"{last.total_seconds():.3f}")
                cpu = float(f"{last.total_seconds() * efficiency:.3f}")
            if pilots_of_site[site]:
                map_rows.append({"PilotID": rng.choice(pilots_of_site[site]), "JobID": job_id, "StartTime": start})
        last_update = history[-1][2]
        jobs.append(JobRecord(job_id, site, group, owner, status, submit, start, end, wall, cpu, reschedules))
        job_rows.append(
            {
                "JobID": job_id,
                "JobType": "User",
                "JobGroup": f"wf-{rng.randint(1, 40)}",
                "Site": site,
                "JobName": f"galaxy-{rng.choice(['bwa', 'fastqc', 'hisat2', 'multiqc', 'samtools'])}-{job_id}",
                "Owner": owner,
                "OwnerGroup": group,
                "VO": "galaxy",
                "SubmissionTime": submit,
                "RescheduleTime": None,
                "LastUpdateTime": last_update,
                "StartExecTime": start,
                "HeartBeatTime": start and (end or MONTH_END),
                "EndExecTime": end,
                "Status": status,
                "MinorStatus": minor,
                "ApplicationStatus": "Unknown",
                "UserPriority": 1,
                "RescheduleCounter": reschedules,
                "VerifiedFlag": True,
                "AccountedFlag": False,
            }
        )
        jdl = f'[ Executable = "galaxy.sh"; JobName = "job{job_id}"; OwnerGroup = "{group}"; Site = "{site}"; ]'
        jdl_rows.append({"JobID": job_id, "JDL": jdl, "JobRequirements": "{}", "OriginalJDL": jdl})
        for seq, (st, mi, when) in enumerate(history, 1):
            log_rows.append(
                {
                    "JobID": job_id,
                    "SeqNum": seq,
                    "Status": st,
                    "MinorStatus": mi,
                    "ApplicationStatus": "idem",
                    "StatusTime": when,
                    "StatusTimeOrder": when.replace(tzinfo=dt.timezone.utc).timestamp(),
                    "StatusSource": "JobWrapper" if st in (states.RUNNING, states.COMPLETING) else "WMS",
                }
            )
    pilot_rows = [
        {
            "PilotID": p.PilotID,
            "PilotStamp": f"stamp{p.PilotID:07d}",
            "PilotJobReference": f"htcondorce://{p.CE}/{p.PilotID}",
            "DestinationSite": p.CE,
            "Queue": f"q-{p.Site.split('.')[1].lower()}",
            "GridSite": p.Site,
            "VO": "galaxy",
            "GridType": "HTCondorCE",
            "SubmissionTime": p.Submitted,
            "LastUpdateTime": p.LastUpdate,
            "Status": p.Status,
            "StatusReason": "job wrapper exited 1: cannot reach CVMFS" if p.Status != states.PILOT_DONE else "Done",
            "MatchedJobs": 1,
        }
        for p in pilots
    ]
    with write_transaction(engine) as conn:
        for table, rows in (
            (Jobs, job_rows),
            (JobJDLs, jdl_rows),
            (LoggingInfo, log_rows),
            (HeartBeatLoggingInfo, hb_rows),
            (PilotAgents, pilot_rows),
            (JobToPilotMapping, map_rows),
        ):
            for i in range(0, len(rows), CHUNK):
                conn.execute(insert(table), rows[i : i + CHUNK])
    return Month(jobs, pilots)
