"""The SiteDirector loop: read demand and pilots from the scheduler, decide, act through the CEs.

The main thread does one cheap, pure decision per cycle (two HTTP requests for all queues, then
:func:`sitedirector.policy.plan`); each queue's CE work (status, submit, cleanup) runs in that queue's own
thread, so a slow or hanging CE only delays its own queue: a queue whose previous work is still running
is skipped for the cycle. The director keeps almost no state — the scheduler's PilotAgents rows (stamp,
reference, status) are the record — so a restart picks up where it left off.

Every pilot gets a token of its own: before a batch goes to the CE the director asks the scheduler for one token
per new stamp, bound to that stamp and the queue's site, and hands them to the queue's :class:`Bundle`. The
director's own token (a ``director`` token) never reaches a worker node; only a scheduler too old to mint pilot
tokens makes the pilots share the configured token again, with a warning.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import queue as queue_mod
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import requests

from galaxy_dirac.sessions import retrying_session

from . import policy
from .bundle import Bundle
from .ce.base import (
    FINAL_STATES,
    UNKNOWN,
    WAITING_STATES,
    CEError,
    CEQueueFull,
    ComputingElement,
    PilotRef,
    PilotStatus,
    make_ce,
)
from .config import Config, QueueConfig

log = logging.getLogger("sitedirector")

LIVE_STATES = sorted(WAITING_STATES | {"Running", UNKNOWN})
#: Failed pilots per queue whose reason (the CE's error, the end of the pilot's stderr) ``status`` shows.
FAILED_SHOWN = 5


def decision_records(decisions: Sequence[policy.Decision]) -> list[dict[str, Any]]:
    """A cycle's decisions as the scheduler's monitoring page records them."""
    return [
        {
            "queue": d.queue,
            "submit": d.submit,
            "matching_jobs": d.matching_jobs,
            "skipped": d.skipped,
            "tqs": d.tqs,
            "counts": dataclasses.asdict(d.counts),
            "summary": d.describe(),
        }
        for d in decisions
    ]


class SchedulerError(Exception):
    """The scheduler could not be reached or refused a request (``status``: its HTTP status, 0 if none)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class SchedulerClient:
    """The few ``/api/x-embedded`` routes the director uses, with its ``director`` (or site-wide pilot) token."""

    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.token = token
        self._local = threading.local()  # requests.Session is not thread-safe; queue threads get their own

    def session(self, replay: bool) -> requests.Session:
        """This thread's HTTP session (kept open between cycles); reads are replayed on a lost answer, changes not."""
        sessions = getattr(self._local, "sessions", None)
        if sessions is None:
            headers = {"Authorization": f"Bearer {self.token}"}
            sessions = self._local.sessions = {
                kind: retrying_session(3, 0.5, replay=kind, headers=headers) for kind in (True, False)
            }
        return sessions[replay]

    def _call(self, method: str, path: str, replay: Optional[bool] = None, **kwargs: Any) -> Any:
        try:
            session = self.session(replay=method == "GET" if replay is None else replay)
            resp = session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise SchedulerError(f"{method} {path}: {exc}") from exc
        if resp.status_code >= 400:
            raise SchedulerError(f"{method} {path}: HTTP {resp.status_code} {resp.text[:200]}", resp.status_code)
        return resp.json() if resp.content else None

    def demand(self) -> list[dict[str, Any]]:
        """Non-empty task queues with their waiting-job counts."""
        return self._call("GET", "/api/x-embedded/taskqueues/demand")

    def pilots(self, statuses: Sequence[str] = (), stamps: Sequence[str] = (), queue: str = "") -> list[dict]:
        """PilotAgents rows, filtered; one request for all queues keeps a 100-queue cycle cheap."""
        params: dict[str, Any] = {"limit": 100000}
        if statuses:
            params["status"] = list(statuses)
        if stamps:
            params["stamp"] = list(stamps)
        if queue:
            params["queue"] = queue
        return self._call("GET", "/api/x-embedded/pilots", params=params)

    def pilot_tokens(
        self, stamps: Sequence[str], site: str, lifetime: Optional[float] = None
    ) -> Optional[dict[str, str]]:
        """One token per pilot about to be submitted, each valid for its own stamp at ``site`` only; ``None``
        from a scheduler that predates per-pilot tokens (HTTP 404). Minting changes nothing, so it is replayed."""
        body: dict[str, Any] = {"stamps": list(stamps), "site": site}
        if lifetime:
            body["lifetime"] = lifetime
        try:
            answer = self._call("POST", "/api/x-embedded/pilots/tokens", replay=True, json=body)
        except SchedulerError as exc:
            if exc.status == 404:
                return None
            raise
        tokens = (answer or {}).get("tokens") or {}
        missing = [s for s in stamps if not tokens.get(s)]
        if missing:
            raise SchedulerError(f"POST /api/x-embedded/pilots/tokens: no token for {len(missing)} of {len(stamps)}")
        return {s: str(tokens[s]) for s in stamps}

    def add_pilots(self, q: QueueConfig, refs: Sequence[PilotRef]) -> None:
        """Register freshly submitted pilots as Submitted, with their CE references."""
        body = {
            "stamps": [r.stamp for r in refs],
            "queue": q.ce_queue,
            "site": q.site,
            "ce": q.ce,
            "grid_type": q.type,
            "references": {r.stamp: r.reference for r in refs},
        }
        self._call("POST", "/api/x-embedded/pilots", json=body)

    def report_decisions(self, decisions: Sequence[policy.Decision]) -> None:
        """Show this cycle's decisions on the scheduler's monitoring page (one place to look)."""
        body = decision_records(decisions)
        if body:
            self._call("POST", "/api/x-embedded/monitoring/sitedirector", json=body)

    def set_status(self, stamp: str, status: str, reason: str = "") -> None:
        """Record what the CE says about a pilot that cannot say it itself."""
        self._call("PATCH", f"/api/x-embedded/pilots/{stamp}", json={"status": status, "reason": reason})


def new_stamp() -> str:
    """A pilot stamp: 32 hex characters, like DIRAC's."""
    return uuid.uuid4().hex


@dataclass
class QueueState:
    """What the director remembers per queue between cycles (all of it is rebuildable)."""

    config: QueueConfig
    ce: ComputingElement
    bundle: Optional[Bundle] = None
    health: policy.Health = field(default_factory=policy.Health)
    first_unknown: dict[str, float] = field(default_factory=dict)
    live: set[str] = field(default_factory=set)
    submitted: int = 0
    empty: int = 0
    finished: int = 0
    busy: threading.Event = field(default_factory=threading.Event)
    #: The "pilots share the director's token" warning was logged (once per queue).
    warned_shared_token: bool = False


class QueueWorker(threading.Thread):
    """One thread per queue running that queue's CE calls, one task at a time."""

    def __init__(self, name: str) -> None:
        super().__init__(name=f"queue-{name}", daemon=True)
        self.inbox: queue_mod.Queue = queue_mod.Queue()

    def run(self) -> None:
        """Run tasks until a ``None`` arrives."""
        while True:
            task = self.inbox.get()
            if task is None:
                return
            try:
                task()
            except Exception:  # noqa: BLE001 - a task bug must not kill the queue's thread
                log.exception("%s: unexpected error", self.name)


class Director:
    """Runs cycles over every configured queue."""

    def __init__(
        self,
        config: Config,
        client: Optional[SchedulerClient] = None,
        ce_factory: Optional[Callable[[QueueConfig, Bundle], ComputingElement]] = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.client = client or SchedulerClient(config.url, config.token)
        self.clock = clock
        self.stop_event = threading.Event()
        factory = ce_factory or make_ce
        self.queues: dict[str, QueueState] = {}
        for q in config.queues:
            q.options.setdefault("work_dir", f"{config.work_dir.rstrip('/')}/{q.name}")
            bundle = Bundle(config.url, config.token, q, config.pilot)
            self.queues[q.name] = QueueState(q, factory(q, bundle), bundle)
        #: (CE, queue) as PilotAgents records them (DestinationSite, Queue) → configured queue name.
        self._owner = {(st.config.ce, st.config.ce_queue): name for name, st in self.queues.items()}
        self.workers: dict[str, QueueWorker] = {}
        self.cycles = 0
        self.last_error = ""

    # --- one cycle -------------------------------------------------------------------------------------
    def decide(self) -> tuple[list[policy.Decision], dict[str, list[dict]]]:
        """Fetch demand and live pilots, return the decisions and each queue's live PilotAgents rows."""
        demand = self.client.demand()
        rows = self.client.pilots(statuses=LIVE_STATES)
        by_queue: dict[str, list[dict]] = {name: [] for name in self.queues}
        for row in rows:
            name = self._owner.get((row.get("DestinationSite", ""), row.get("Queue", "")))
            if name is not None:
                by_queue[name].append(row)
        now = dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc)
        counts = {name: policy.count_pilots(r, now, self.config.boot_grace) for name, r in by_queue.items()}
        skip: dict[str, str] = {}
        for name, st in self.queues.items():
            # While busy, the queue's thread owns st.health; only an idle queue's clock is advanced here.
            if st.busy.is_set():
                skip[name] = "previous cycle's CE work still running"
                continue
            st.health, skipped = policy.tick(st.health)
            if skipped:
                skip[name] = f"backing off after: {st.health.last_error}"
        decisions = policy.plan([st.config for st in self.queues.values()], demand, counts, skip)
        return decisions, by_queue

    def cycle(self, dry_run: bool = False, wait: bool = False) -> list[policy.Decision]:
        """One cycle; with ``wait`` return only after every queue's CE work finished (``once``, tests)."""
        self.cycles += 1
        self.last_error = ""
        try:
            decisions, by_queue = self.decide()
        except SchedulerError as exc:
            self.last_error = str(exc)
            log.error("cycle %d: scheduler unavailable: %s", self.cycles, exc)
            return []
        if dry_run:
            return decisions
        try:
            self.client.report_decisions(decisions)
        except SchedulerError as exc:  # monitoring only: never a reason to skip the cycle
            log.warning("cycle %d: could not report decisions: %s", self.cycles, exc)
        self._count_finished(by_queue)
        dispatched = []
        for d in decisions:
            if d.skipped:
                log.info("%s", d.describe())
                continue
            if d.submit:
                log.info("%s", d.describe())
            st = self.queues[d.queue]
            st.busy.set()
            task = functools.partial(self._queue_task, st, by_queue[d.queue], d.submit)
            self._worker(d.queue).inbox.put(task)
            dispatched.append(st)
        if wait:
            for st in dispatched:
                while st.busy.is_set() and not self.stop_event.is_set():
                    time.sleep(0.01)
        return decisions

    def _worker(self, name: str) -> QueueWorker:
        worker = self.workers.get(name)
        if worker is None or not worker.is_alive():
            worker = self.workers[name] = QueueWorker(name)
            worker.start()
        return worker

    def _count_finished(self, by_queue: dict[str, list[dict]]) -> None:
        """Pilots that left the live set since the last cycle: count them, and the empty ones."""
        gone: dict[str, str] = {}
        for name, rows in by_queue.items():
            st = self.queues[name]
            live = {r["PilotStamp"] for r in rows}
            gone.update((s, name) for s in st.live - live)
            st.live = live
        if not gone:
            return
        try:
            rows = self.client.pilots(stamps=list(gone))
        except SchedulerError as exc:
            log.warning("cannot read finished pilots: %s", exc)
            return
        for row in rows:
            st = self.queues[gone[row["PilotStamp"]]]
            st.finished += 1
            if row.get("Status") == "Done" and not row.get("MatchedJobs"):
                st.empty += 1
                log.info("%s: pilot %s ended empty (%s)", st.config.name, row["PilotStamp"], row.get("StatusReason"))

    # --- per-queue CE work (queue thread) --------------------------------------------------------------
    def _queue_task(self, st: QueueState, rows: list[dict], n: int) -> None:
        error: Optional[str] = None
        try:
            self._sync_status(st, rows)
            if n > 0:
                self._submit(st, n)
            st.ce.cleanup([PilotRef(r["PilotJobReference"], r["PilotStamp"]) for r in rows])
        except CEError as exc:
            error = str(exc)
            log.warning("%s: CE error, skipping %d cycles: %s", st.config.name, self.config.backoff_cycles, exc)
        except SchedulerError as exc:
            error = str(exc)
            log.warning("%s: scheduler error: %s", st.config.name, exc)
        finally:
            st.health = policy.after_cycle(st.health, error, self.config.backoff_cycles)
            st.busy.clear()

    def _submit(self, st: QueueState, n: int) -> None:
        stamps = [new_stamp() for _ in range(n)]
        self._issue_tokens(st, stamps)
        try:
            refs = st.ce.submit(stamps)
        except CEQueueFull as exc:
            log.info("%s: CE full, no pilots this cycle: %s", st.config.name, exc)
            return
        if refs:
            self.client.add_pilots(st.config, refs)
            st.submitted += len(refs)
        log.info("%s: submitted %d/%d pilots", st.config.name, len(refs), n)

    def _issue_tokens(self, st: QueueState, stamps: list[str]) -> None:
        """Give each new pilot its own token (one request per batch), or the shared one on an older scheduler."""
        if st.bundle is None:
            return
        tokens = self.client.pilot_tokens(stamps, st.config.site)
        if tokens is None and not st.warned_shared_token:
            st.warned_shared_token = True
            log.warning(
                "%s: the scheduler cannot mint per-pilot tokens (HTTP 404, an older version): pilots carry the "
                "configured token, with which each of them can act for any other; upgrade the scheduler",
                st.config.name,
            )
        st.bundle.issue(tokens)

    def _sync_status(self, st: QueueState, rows: list[dict]) -> None:
        """Ask the CE about the queue's live pilots and tell the scheduler what changed."""
        if not rows:
            st.first_unknown = {}
            return
        refs = [PilotRef(r["PilotJobReference"], r["PilotStamp"]) for r in rows]
        answer = st.ce.status(refs)
        states: dict[str, str] = {}
        for row, ref in zip(rows, refs):
            got = answer.get(ref.reference, PilotStatus(UNKNOWN, "not reported by the CE"))
            states[ref.stamp] = got.state
            self._reconcile(row, got)
        now = self.clock()
        st.first_unknown = policy.track_unknown(st.first_unknown, states, now)
        expired, st.first_unknown = policy.unknown_to_abort(st.first_unknown, now, self.config.unknown_timeout)
        for stamp in expired:
            log.warning("%s: pilot %s Unknown too long, Aborted", st.config.name, stamp)
            self.client.set_status(stamp, "Aborted", f"Unknown for more than {self.config.unknown_timeout:g} s")

    def _reconcile(self, row: dict, got: PilotStatus) -> None:
        current, new = row.get("Status"), got.state
        if new in (current, UNKNOWN):
            return
        if new in FINAL_STATES or (current in WAITING_STATES and new != "Submitted"):
            # The pilot itself reports Running and Done; the CE's word matters before it starts and
            # when it dies without reporting.
            if current == "Running" and new in WAITING_STATES:
                return
            self.client.set_status(row["PilotStamp"], new, got.reason)

    # --- loop ------------------------------------------------------------------------------------------
    def run(self, dry_run: bool = False, print_fn: Callable[[str], None] = print) -> None:
        """Cycle every ``cycle_interval`` seconds until :meth:`stop`."""
        while not self.stop_event.is_set():
            started = self.clock()
            try:
                decisions = self.cycle(dry_run=dry_run)
            except Exception:  # noqa: BLE001 - the daemon must outlive one bad cycle
                log.exception("cycle %d failed", self.cycles)
                decisions = []
            if dry_run:
                for d in decisions:
                    print_fn(d.describe())
            elapsed = self.clock() - started
            self.stop_event.wait(max(0.0, self.config.cycle_interval - elapsed))
        self.shutdown()

    def stop(self) -> None:
        """Ask :meth:`run` to finish after the current cycle (the SIGTERM handler)."""
        self.stop_event.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Let in-flight CE work finish (up to ``timeout``), then close the CEs."""
        for worker in self.workers.values():
            worker.inbox.put(None)
        deadline = time.monotonic() + timeout
        for worker in self.workers.values():
            worker.join(max(0.0, deadline - time.monotonic()))
        for st in self.queues.values():
            try:
                st.ce.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.exception("%s: error closing the CE", st.config.name)

    def status_table(self) -> list[dict[str, Any]]:
        """Pilots per queue and state, plus empty pilots, from the scheduler (``sitedirector status``)."""
        rows = self.client.pilots()
        out = []
        for st in self.queues.values():
            key = (st.config.ce, st.config.ce_queue)
            mine = [r for r in rows if (r.get("DestinationSite"), r.get("Queue")) == key]
            by_state: dict[str, int] = {}
            for r in mine:
                by_state[r["Status"]] = by_state.get(r["Status"], 0) + 1
            empty = sum(1 for r in mine if r["Status"] == "Done" and not r.get("MatchedJobs"))
            failed = sorted(
                (r for r in mine if r["Status"] in ("Failed", "Aborted")),
                key=lambda r: str(r.get("LastUpdateTime") or ""),
                reverse=True,
            )
            recent = [
                {"stamp": r.get("PilotStamp"), "status": r["Status"], "reason": r.get("StatusReason") or ""}
                for r in failed[:FAILED_SHOWN]
            ]
            out.append(
                {"queue": st.config.name, "type": st.config.type, "states": by_state, "empty": empty, "failed": recent}
            )
        return out
