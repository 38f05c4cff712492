"""How many pilots each queue gets this cycle: pure functions, no I/O, so the rules are table-tested.

The rules follow DIRAC's SiteDirector: a queue gets
``min(per-cycle cap, MaxTotal − running − waiting, MaxWaiting − waiting, matching waiting jobs − waiting)``
pilots, where "matching" uses the same rules as the scheduler's matcher (a pilot started for demand it
cannot match would come back empty). Damping: a pilot that has booted but not matched yet still counts as
"waiting" for ``boot_grace`` seconds, and demand one queue is already serving is not offered again to the
next queue in the same cycle.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

from galaxy_dirac.times import parse_time

from .ce.base import FINAL_STATES, RUNNING, UNKNOWN, WAITING_STATES


@dataclass(frozen=True)
class Offer:
    """What a queue's pilots offer the matcher (mirrors ``galaxy_dirac.wms.matcher.Slot``)."""

    site: str
    ce: str = ""
    platform: str = ""
    tags: frozenset = frozenset()
    processors: int = 1
    memory: int = 0  # MB; 0 = no limit
    cpu_time: int = 0  # s; 0 = no limit

    @classmethod
    def from_queue(cls, queue: Any) -> Offer:
        """What pilots of a configured queue will tell the matcher."""
        return cls(
            site=queue.site,
            ce=queue.ce,
            platform=queue.platform,
            tags=frozenset(offered_tags(queue.tags, queue.processors)),
            processors=queue.processors,
            memory=queue.memory,
            cpu_time=queue.cpu_time,
        )


def offered_tags(tags: Iterable[str], processors: int) -> set[str]:
    """Declared tags plus ``1Processors``..``NProcessors`` and ``MultiProcessor`` (DIRAC's convention)."""
    out = set(tags)
    out.update(f"{n}Processors" for n in range(1, max(1, processors) + 1))
    if processors > 1:
        out.add("MultiProcessor")
    return out


def tq_matches(tq: Mapping[str, Any], offer: Offer) -> bool:
    """Whether a pilot with this offer could match a job of this task queue (same rules as the matcher).

    Empty Sites/GridCEs/Platforms lists allow anything; BannedSites excludes; every required tag must be
    offered; the TQ's CPUTime must fit the queue's and its MinRAM the queue's memory.
    """
    sites = tq.get("Sites") or ()
    if sites and offer.site not in sites:
        return False
    if offer.site in (tq.get("BannedSites") or ()):
        return False
    ces = tq.get("GridCEs") or ()
    if ces and offer.ce not in ces:
        return False
    platforms = tq.get("Platforms") or ()
    if platforms and offer.platform not in platforms:
        return False
    tags = tq.get("Tags") or ()
    if tags and not offer.tags.issuperset(tags):
        return False
    if offer.cpu_time > 0 and int(tq.get("CPUTime") or 0) > offer.cpu_time:
        return False
    return not (offer.memory > 0 and int(tq.get("MinRAM") or 0) > offer.memory)


def pilots_to_submit(
    *, cap: int, max_total: int, max_waiting: int, running: int, waiting: int, matching_jobs: int, booting: int = 0
) -> int:
    """DIRAC's formula, never negative; ``booting`` (running, nothing matched yet) damps the demand term."""
    return max(0, min(cap, max_total - running - waiting, max_waiting - waiting, matching_jobs - waiting - booting))


@dataclass
class PilotCounts:
    """A queue's live pilots as the policy sees them; ``booting`` ⊆ running (started, nothing matched yet)."""

    waiting: int = 0
    running: int = 0
    booting: int = 0
    unknown: int = 0
    done: int = 0
    empty: int = 0


def _age(row: Mapping[str, Any], now: dt.datetime) -> float:
    when = row.get("SubmissionTime")
    if not when:
        return 0.0
    when = parse_time(when)
    return (now - when).total_seconds()


def count_pilots(rows: Iterable[Mapping[str, Any]], now: dt.datetime, boot_grace: float) -> PilotCounts:
    """Count PilotAgents rows of one queue. Unknown pilots count as waiting: they may still start."""
    c = PilotCounts()
    for row in rows:
        status = row.get("Status")
        if status in WAITING_STATES:
            c.waiting += 1
        elif status == UNKNOWN:
            c.unknown += 1
            c.waiting += 1
        elif status == RUNNING:
            c.running += 1
            if not row.get("MatchedJobs") and _age(row, now) < boot_grace:
                c.booting += 1
        elif status in FINAL_STATES:
            c.done += 1
            if status == "Done" and not row.get("MatchedJobs"):
                c.empty += 1
    return c


@dataclass
class Decision:
    """What the policy decided for one queue this cycle, and why (printed by ``--dry-run``)."""

    queue: str
    submit: int
    matching_jobs: int
    counts: PilotCounts
    skipped: str = ""
    tqs: list[int] = field(default_factory=list)

    def describe(self) -> str:
        """One line for logs and ``--dry-run``."""
        c = self.counts
        head = f"{self.queue}: submit {self.submit}"
        if self.skipped:
            head = f"{self.queue}: skipped ({self.skipped})"
        return (
            f"{head} [matching jobs {self.matching_jobs}, waiting {c.waiting}, running {c.running}, "
            f"booting {c.booting}, empty {c.empty}, TQs {len(self.tqs)}]"
        )


def plan(
    queues: Sequence[Any],
    demand: Sequence[Mapping[str, Any]],
    counts: Mapping[str, PilotCounts],
    skip: Optional[Mapping[str, str]] = None,
) -> list[Decision]:
    """Decide every queue's pilots for one cycle.

    Queues are served in order; each consumes the demand it will serve (its new pilots plus its pilots
    still waiting or booting) from the TQs it matches, so two queues at one site do not both chase the
    same jobs.
    """
    skip = skip or {}
    remaining = {int(tq["TQId"]): int(tq.get("WaitingJobs") or 0) for tq in demand}
    # Precompute the TQ fields as sets once: 100 queues × 1000s of TQs must stay well under a second.
    prepared = [
        (
            int(tq["TQId"]),
            {
                **tq,
                "Sites": frozenset(tq.get("Sites") or ()),
                "BannedSites": frozenset(tq.get("BannedSites") or ()),
                "GridCEs": frozenset(tq.get("GridCEs") or ()),
                "Platforms": frozenset(tq.get("Platforms") or ()),
                "Tags": frozenset(tq.get("Tags") or ()),
            },
        )
        for tq in demand
    ]
    decisions = []
    for queue in queues:
        c = counts.get(queue.name) or PilotCounts()
        offer = Offer.from_queue(queue)
        tqs = [tq_id for tq_id, tq in prepared if tq_matches(tq, offer)]
        matching = sum(remaining[t] for t in tqs)
        pending = c.waiting + c.booting
        if queue.name in skip:
            decisions.append(Decision(queue.name, 0, matching, c, skipped=skip[queue.name], tqs=tqs))
            n = 0
        else:
            n = pilots_to_submit(
                cap=queue.per_cycle,
                max_total=queue.max_total,
                max_waiting=queue.max_waiting,
                running=c.running,
                waiting=c.waiting,
                booting=c.booting,
                matching_jobs=matching,
            )
            decisions.append(Decision(queue.name, n, matching, c, tqs=tqs))
        consume = n + pending
        for t in tqs:
            if consume <= 0:
                break
            used = min(consume, remaining[t])
            remaining[t] -= used
            consume -= used
    return decisions


@dataclass
class Health:
    """A queue's failure record: consecutive failures and cycles still to skip."""

    failures: int = 0
    skip_cycles: int = 0
    last_error: str = ""


def after_cycle(health: Health, error: Optional[str], backoff_cycles: int) -> Health:
    """A failure skips the queue for ``backoff_cycles`` × consecutive failures (capped at 10×); success resets."""
    if error is None:
        return Health()
    failures = health.failures + 1
    return Health(failures=failures, skip_cycles=backoff_cycles * min(failures, 10), last_error=error)


def tick(health: Health) -> tuple[Health, bool]:
    """Start of a cycle: (new health, whether to skip the queue this cycle)."""
    if health.skip_cycles > 0:
        return Health(health.failures, health.skip_cycles - 1, health.last_error), True
    return health, False


def unknown_to_abort(
    first_unknown: Mapping[str, float], now: float, timeout: float
) -> tuple[list[str], dict[str, float]]:
    """Stamps Unknown for longer than ``timeout`` seconds (to set Aborted), and the ones still being timed."""
    expired = [s for s, t in first_unknown.items() if now - t >= timeout]
    return expired, {s: t for s, t in first_unknown.items() if now - t < timeout}


def track_unknown(first_unknown: Mapping[str, float], states: Mapping[str, str], now: float) -> dict[str, float]:
    """Update the "Unknown since" clock from the CE's answer: start it for new Unknowns, stop it otherwise."""
    out = {s: t for s, t in first_unknown.items() if states.get(s) == UNKNOWN}
    for stamp, state in states.items():
        if state == UNKNOWN and stamp not in out:
            out[stamp] = now
    return out
