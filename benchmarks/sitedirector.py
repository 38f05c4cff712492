"""CPU time of one SiteDirector cycle: 100 queues, 10,000 waiting jobs (target ≤ 1 s).

    python benchmarks/sitedirector.py [--queues 100] [--jobs 10000] [--http]

The demand comes from a real scheduler database filled through the scheduler's own functions
(``galaxy_dirac.wms.jobs.submit``), spread over one site per queue and several CPU-time/tag classes, so
there are hundreds of task queues. The CE of every queue is a no-op (it returns references, starts
nothing), so the figure is the director's own cost: reading demand and pilots, the policy, dispatching
to the per-queue threads and registering the pilots. By default the scheduler routes are called
in-process (their DB queries are part of the figure); ``--http`` instead starts the real
``galaxy-dirac-wms serve`` on that database and measures the director process only, as deployed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from galaxy_dirac.wms import jobs as wms_jobs  # noqa: E402
from galaxy_dirac.wms import monitoring, pilots, taskqueues  # noqa: E402
from galaxy_dirac.wms.auth import Principal, create_pilot_tokens  # noqa: E402
from galaxy_dirac.wms.config import Settings  # noqa: E402
from galaxy_dirac.wms.db import create_schema, make_engine, read_transaction  # noqa: E402
from sitedirector import policy  # noqa: E402
from sitedirector.ce.base import ComputingElement, PilotRef, PilotStatus  # noqa: E402
from sitedirector.config import parse  # noqa: E402
from sitedirector.director import Director, decision_records  # noqa: E402

CPU_TIMES = (3600, 86400, 172800)
TAGS = ("", "GPU", "4Processors")


class NullCE(ComputingElement):
    """Accepts every pilot and reports it Waiting; does nothing."""

    type_name = "null"

    def submit(self, stamps: Sequence[str]) -> list[PilotRef]:
        return [PilotRef(f"null://{s}", s) for s in stamps]

    def status(self, refs: Sequence[PilotRef]) -> dict[str, PilotStatus]:
        return {r.reference: PilotStatus("Submitted") for r in refs}

    def kill(self, refs: Sequence[PilotRef]) -> None:
        pass

    def cleanup(self, refs: Optional[Sequence[PilotRef]] = None) -> list[PilotRef]:
        return []


class InProcessClient:
    """The director's scheduler client, calling the scheduler's functions on its engine directly."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        monitoring.ensure_schema(engine)

    def report_decisions(self, decisions: Sequence[Any]) -> None:
        monitoring.record_decisions(self.engine, decision_records(decisions), "benchmark")

    def demand(self) -> list[dict]:
        with read_transaction(self.engine) as conn:
            return taskqueues.demand(conn)

    def pilots(self, statuses: Sequence[str] = (), stamps: Sequence[str] = (), queue: str = "") -> list[dict]:
        return pilots.list_pilots(self.engine, stamps=stamps, statuses=statuses, queue=queue, limit=100000)

    def add_pilots(self, q: Any, refs: Sequence[PilotRef]) -> None:
        pilots.add_pilots(
            self.engine, [r.stamp for r in refs], queue=q.ce_queue, site=q.site, ce=q.ce, grid_type=q.type,
            vo="galaxy", references={r.stamp: r.reference for r in refs},
        )  # fmt: skip

    def set_status(self, stamp: str, status: str, reason: str = "") -> None:
        pilots.set_status(self.engine, stamp, status, reason)

    def pilot_tokens(self, stamps: Sequence[str], site: str, lifetime: float | None = None) -> dict[str, str]:
        key = b"a benchmark's signing key, 32 bytes or more"
        return create_pilot_tokens(key, list(stamps), site=site, vo="galaxy", lifetime=lifetime or 3600)


def fill(db_url: str, n_jobs: int, n_queues: int) -> int:
    """Submit ``n_jobs`` waiting jobs spread over the queues' sites; returns the number of task queues."""
    engine = make_engine(db_url)
    create_schema(engine)
    principal = Principal(role="runner", owner="bench", group="galaxy_user", vo="galaxy")
    texts = []
    for i in range(n_jobs):
        tag = TAGS[(i // n_queues) % len(TAGS)]
        tags = f'Tags = {{"{tag}"}};' if tag else ""
        texts.append(
            f'[Executable = "/bin/true"; JobName = "sd-{i}"; CPUTime = {CPU_TIMES[i % len(CPU_TIMES)]}; '
            f'Site = "LCG.Bench{i % n_queues}.org"; {tags}]'
        )
    for start in range(0, len(texts), 500):
        wms_jobs.submit(engine, texts[start : start + 500], principal, Settings())
    with read_transaction(engine) as conn:
        n_tqs = len(taskqueues.demand(conn))
    engine.dispose()
    return n_tqs


def config(n_queues: int, url: str, token: str, work: str) -> Any:
    return parse(
        {
            "scheduler": {"url": url, "token": token},
            "work_dir": work,
            "queues": [
                {
                    "name": f"q{i}",
                    "type": "local",
                    "site": f"LCG.Bench{i}.org",
                    "ce": f"ce{i}.bench.org",
                    "processors": 4,
                    "tags": ["GPU"] if i % 2 else [],
                    "cpu_time": 172800,
                    "max_total": 200,
                    "max_waiting": 50,
                    "per_cycle": 100,
                }
                for i in range(n_queues)
            ],
        }
    )


def timed_cycle(director: Director) -> tuple[float, float, int]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    decisions = director.cycle(wait=True)
    return time.process_time() - cpu0, time.perf_counter() - wall0, sum(d.submit for d in decisions)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queues", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--http", action="store_true", help="through the real scheduler process over HTTP")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db_url = f"sqlite:///{tmp}/wms.sqlite"
        t0 = time.perf_counter()
        n_tqs = fill(db_url, args.jobs, args.queues)
        print(f"filled {args.jobs} waiting jobs in {n_tqs} task queues ({time.perf_counter() - t0:.1f} s)")
        server = None
        if args.http:
            from tests.conftest import WMSServer

            server = WMSServer(Path(tmp) / "wms", db=db_url).start()
            client: Any = None
            cfg = config(args.queues, server.url, server.token("director"), f"{tmp}/work")
        else:
            client = InProcessClient(make_engine(db_url))
            cfg = config(args.queues, "http://in-process", "unused", f"{tmp}/work")
        try:
            director = Director(cfg, client=client, ce_factory=lambda q, b: NullCE(q, b))
            demand = director.client.demand()
            cpu0 = time.process_time()
            policy.plan(cfg.queues, demand, {})
            plan_cpu = time.process_time() - cpu0
            first = timed_cycle(director)
            second = timed_cycle(director)
            director.shutdown()
        finally:
            if server is not None:
                server.stop()
    mode = "HTTP, director process only" if args.http else "in-process scheduler functions"
    print(f"{args.queues} queues, {args.jobs} waiting jobs, {n_tqs} task queues, {mode}:")
    print(f"  policy.plan alone          CPU {plan_cpu * 1000:8.1f} ms")
    for name, (cpu, wall, n) in (("first cycle (submits)", first), ("second cycle (steady)", second)):
        verdict = "OK" if cpu <= 1.0 else "OVER TARGET"
        print(f"  {name:26s} CPU {cpu * 1000:8.1f} ms  wall {wall * 1000:8.1f} ms  pilots {n:5d}  "
              f"(target ≤ 1000 ms: {verdict})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
