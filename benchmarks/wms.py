"""Benchmark the embedded scheduler over real HTTP, and a real DiracX 0.7 server in the same run.

    python benchmarks/wms.py [--jobs 100000] [--queues 1000] [--pilots 8] [--matches 20000] [--no-diracx]

Prints one table: submission (1 and 20 JDLs per request), match rate with --jobs waiting in --queues task queues
and --pilots concurrent pilot processes (checking that no job was handed out twice), and one bulk status query of
10,000 jobs; on SQLite, and on PostgreSQL when 127.0.0.1:5432 answers.

The match rate is also measured in process (``matcher.match_job`` in a loop, no HTTP), which bounds the HTTP
figure on SQLite.

Submission is compared with a real DiracX 0.7 (its side venv) interleaved: both servers run at once and take
alternate batches of one-JDL requests (--rounds of --batch requests, the order flipped every round), so load drift
hits both alike; the ratio is printed per round and as the median of those. Figures, not assertions: compare them
with the targets (≥4× DiracX submission, ≥1,000 matches/s on SQLite, ≤50 ms for 10k statuses).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from table import print_rows  # noqa: E402

from tests.conftest import WMSServer, fresh_database  # noqa: E402

SITE = "LCG.Bench.org"
CPU_TIMES = (300, 1000, 3000, 20000, 40000, 80000, 150000, 250000, 300000, 500000)


def bench_jdl(i: int, queues: int) -> str:
    """JDLs spread over ``queues`` task queues, all of which a pilot at SITE can run."""
    other = (i % queues) // len(CPU_TIMES)
    cpu = CPU_TIMES[i % len(CPU_TIMES)]
    return (
        f'[Executable = "/bin/true"; JobName = "bench-{i}"; CPUTime = {cpu}; '
        f'Site = {{"{SITE}", "LCG.Other{other}.org"}};]'
    )


def plain_jdl(i: int) -> str:
    return f'Executable = "/bin/echo"; Arguments = "{i}"; JobName = "bench-{i}"; JobGroup = "bench";'


def submit_rate(session: requests.Session, url: str, per_request: int, requests_count: int) -> float:
    start = time.perf_counter()
    for r in range(requests_count):
        body = [plain_jdl(r * per_request + k) for k in range(per_request)]
        response = session.post(f"{url}/api/jobs/jdl", json=body, timeout=60)
        response.raise_for_status()
    return per_request * requests_count / (time.perf_counter() - start)


def _pilot(url: str, token: str, stamp: str, limit: int, start: Any, out: Any) -> None:
    session = requests.Session()
    session.trust_env = False
    session.headers["Authorization"] = f"Bearer {token}"
    slot = {"Site": SITE, "NumberOfProcessors": 1, "PilotStamp": stamp}
    got = []
    start.wait(60)
    t0 = time.perf_counter()
    while len(got) < limit:
        response = session.post(f"{url}/api/x-embedded/match", json=slot, timeout=60)
        if response.status_code == 204:
            break
        response.raise_for_status()
        got.append(response.json()["JobID"])
    out.put((stamp, got, t0, time.perf_counter()))


def match_rate(server: WMSServer, admin: requests.Session, pilots: int, matches: int) -> tuple[float, int, bool]:
    token = server.token("pilot")
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    per_pilot = matches // pilots
    procs = [
        ctx.Process(target=_pilot, args=(server.url, token, f"bench-{i}", per_pilot, start, out)) for i in range(pilots)
    ]
    for proc in procs:
        proc.start()
    time.sleep(1.0)  # let every client import and connect before the race starts
    start.set()
    results = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    taken = [job for _, got, _, _ in results for job in got]
    elapsed = max(r[3] for r in results) - min(r[2] for r in results)
    unique = len(set(taken)) == len(taken)
    matched = admin.post(
        f"{server.url}/api/jobs/summary",
        json={"grouping": ["Status"], "search": [{"parameter": "Status", "operator": "eq", "value": "Matched"}]},
        timeout=60,
    ).json()
    in_db = matched[0]["count"] if matched else 0
    return len(taken) / elapsed, len(taken), unique and in_db == len(taken)


def status_time(session: requests.Session, url: str, job_ids: list[int]) -> float:
    body = {
        "parameters": ["JobID", "Status", "MinorStatus"],
        "search": [{"parameter": "JobID", "operator": "in", "values": job_ids}],
    }
    timings = []
    for _ in range(5):
        t0 = time.perf_counter()
        response = session.post(f"{url}/api/jobs/search", params={"per_page": len(job_ids)}, json=body, timeout=60)
        response.raise_for_status()
        assert len(response.json()) == len(job_ids)
        timings.append(time.perf_counter() - t0)
    return statistics.median(timings) * 1000


def _session(token: str) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.headers["Authorization"] = f"Bearer {token}"
    return session


def run_embedded(label: str, db: str | None, args: argparse.Namespace, rows: list[tuple[str, str, str]]) -> None:
    with tempfile.TemporaryDirectory() as home:
        server = WMSServer(
            Path(home) / "wms", db, maintenance_interval=0, max_jdls_per_request=1000, workers=args.workers
        ).start()
        try:
            session = _session(server.token("runner", "bench", "bench_user"))
            rate20 = submit_rate(session, server.url, 20, args.single_requests // 4)
            rows.append((label, "submit, 20 JDLs/request", f"{rate20:,.0f} jobs/s"))
            t0 = time.perf_counter()
            ids: list[int] = []
            for first in range(0, args.jobs, 1000):
                body = [bench_jdl(i, args.queues) for i in range(first, min(first + 1000, args.jobs))]
                response = session.post(f"{server.url}/api/jobs/jdl", json=body, timeout=300)
                response.raise_for_status()
                ids += [job["JobID"] for job in response.json()]
            fill = time.perf_counter() - t0
            rows.append((label, f"fill {args.jobs:,} jobs, 1000 JDLs/request", f"{args.jobs / fill:,.0f} jobs/s"))
            demand = _session(server.token("admin")).get(f"{server.url}/api/x-embedded/taskqueues/demand", timeout=60)
            rows.append((label, "task queues", f"{len(demand.json()):,}"))
            rate, n, once = match_rate(server, session, args.pilots, args.matches)
            rows.append(
                (
                    label,
                    f"match, {args.pilots} pilot processes ({n:,} matches)",
                    f"{rate:,.0f} matches/s (target ≥1,000 on SQLite), exactly-once: {'yes' if once else 'NO'}",
                )
            )
            ms = status_time(session, server.url, ids[-10000:])
            rows.append((label, "bulk status of 10,000 jobs (one search)", f"{ms:.1f} ms (target ≤50 ms)"))
        finally:
            server.stop()


def in_process_match_rate(args: argparse.Namespace, rows: list[tuple[str, str, str]]) -> None:
    """The same matching with no HTTP, server or client: ``matcher.match_job`` called in a loop on a SQLite file,
    what bounds the HTTP figure (SQLite takes one writer at a time)."""
    from galaxy_dirac.wms import jobs, matcher
    from galaxy_dirac.wms.auth import Principal
    from galaxy_dirac.wms.config import load_settings
    from galaxy_dirac.wms.db import create_schema, make_engine

    with tempfile.TemporaryDirectory() as home:
        url = f"sqlite:///{home}/wms.sqlite"
        settings = load_settings(overrides={"home": home, "db": url}, environ={})
        engine = make_engine(url)
        create_schema(engine)
        owner = Principal("runner", "bench", "bench_user", "galaxy")
        for first in range(0, args.jobs, 1000):
            texts = [bench_jdl(i, args.queues) for i in range(first, min(first + 1000, args.jobs))]
            jobs.submit(engine, texts, owner, settings)
        slot = matcher.Slot(site=SITE, pilot_stamp="bench")
        n = min(args.matches, args.jobs)
        t0 = time.perf_counter()
        matched = sum(matcher.match_job(engine, slot) is not None for _ in range(n))
        elapsed = time.perf_counter() - t0
        engine.dispose()
    rows.append(("in process, SQLite", f"match_job in a loop, no HTTP ({matched:,} matches)",
                 f"{matched / elapsed:,.0f} matches/s ({elapsed / n * 1000:.2f} ms each)"))  # fmt: skip


def compare_submission(args: argparse.Namespace, rows: list[tuple[str, str, str]]) -> None:
    """One-JDL submissions, embedded (SQLite) against DiracX 0.7, in alternate batches."""
    with contextlib.ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        ours = WMSServer(home / "wms", None, maintenance_interval=0, workers=args.workers).start()
        stack.callback(ours.stop)
        systems = {"embedded": (ours.url, _session(ours.token("runner", "bench", "bench_user")))}
        if not args.no_diracx:
            try:
                from tests.contract.diracx_server import running_diracx_server

                diracx = stack.enter_context(running_diracx_server(home / "diracx"))
                systems["DiracX 0.7"] = (diracx.url, _session(diracx.token))
            except Exception as exc:  # noqa: BLE001 - a DiracX that cannot start is reported, not fatal
                rows.append(("DiracX 0.7", "submit", f"skipped: {exc}"))
        for url, session in systems.values():
            submit_rate(session, url, 1, 20)  # warm both (imports, connections, SQLite file)
        rates: dict[str, list[float]] = {name: [] for name in systems}
        for round_no in range(args.rounds):
            order = list(systems) if round_no % 2 == 0 else list(reversed(systems))
            for name in order:
                url, session = systems[name]
                rates[name].append(submit_rate(session, url, 1, args.batch))
        for name, values in rates.items():
            spread = f"min {min(values):,.0f}, max {max(values):,.0f}"
            rows.append(
                (
                    name,
                    f"submit, 1 JDL/request ({args.rounds}×{args.batch}, interleaved)",
                    f"median {statistics.median(values):,.0f} jobs/s ({spread})",
                )
            )
        if "DiracX 0.7" in rates:
            ratios = [a / b for a, b in zip(rates["embedded"], rates["DiracX 0.7"])]
            rows.append(("ratio", "embedded / DiracX per round",
                         f"median {statistics.median(ratios):.1f}x (min {min(ratios):.1f}x, max {max(ratios):.1f}x;"
                         " target ≥4x)"))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--queues", type=int, default=1000)
    parser.add_argument("--pilots", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="API worker processes (one per core here)")
    parser.add_argument("--matches", type=int, default=20_000)
    parser.add_argument("--single-requests", type=int, default=400, help="requests of the 20-JDL submission test")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved submission rounds per system")
    parser.add_argument("--batch", type=int, default=100, help="one-JDL requests per round")
    parser.add_argument("--no-diracx", action="store_true")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    rows: list[tuple[str, str, str]] = []
    compare_submission(args, rows)
    run_embedded(f"embedded, SQLite, {args.workers} workers", None, args, rows)
    in_process_match_rate(args, rows)
    if not args.no_postgres:
        import pytest

        try:
            with fresh_database("postgres") as url:
                run_embedded(f"embedded, PostgreSQL, {args.workers} workers", url, args, rows)
        except pytest.skip.Exception as exc:
            rows.append(("embedded, PostgreSQL", "all", f"skipped: {exc}"))
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
