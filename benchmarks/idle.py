"""What idle pilots cost the scheduler, and how fast a burst of jobs reaches them.

    python benchmarks/idle.py [--pilots 2000] [--seconds 20] [--burst 100] [--no-postgres]

N simulated pilots (asyncio, one keep-alive connection each, in this process) keep asking for a match as the real
pilot does when the queue is empty: with the long poll (``wait=10``, the pilot's default) and, as the baseline in the
same run, with plain polling every 2 seconds (``--match-wait 0`` with a short back-off). Printed: the scheduler's CPU
per wall-clock second (1.0 = one core busy, from ``/proc``) and, on PostgreSQL, its database transactions per second
(``pg_stat_database``). Then --burst jobs are submitted in one request while the long-polling pilots wait, and the
time from the submission's answer to each job reaching a pilot is printed (p50, p90). Targets (issue 14): waiting
pilots cost (almost) nothing and the database load does not grow with their number; burst p50 ≤ 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Optional

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from table import print_rows  # noqa: E402

from tests.conftest import WMSServer, fresh_database  # noqa: E402
from tests.jdl import jdl_text  # noqa: E402

SITE = "Idle.bench"
SLOT = {"Site": SITE, "NumberOfProcessors": 1, "MaxRAM": 2000, "PilotStamp": ""}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stream:
        fields = stream.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Pilots:
    """``n`` pilots in one asyncio loop (a thread), each on its own connection; records when each got a job."""

    def __init__(self, url: str, token: str, n: int, wait: float, pause: float) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        body = json.dumps(SLOT).encode()
        head = (
            f"POST /api/x-embedded/match?wait={wait:g} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.request, self.n, self.pause = head.encode() + body, n, pause
        self.matched: list[float] = []
        self.ready = threading.Event()
        self._stop: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Pilots:
        self._thread.start()
        self.ready.wait(120)
        return self

    def __exit__(self, *_: Any) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        connected = 0

        async def pilot() -> None:
            nonlocal connected
            reader, writer = await asyncio.open_connection(self.host, self.port)
            connected += 1
            if connected == self.n:
                self.ready.set()
            try:
                while not self._stop.is_set():
                    writer.write(self.request)
                    await writer.drain()
                    status = int((await reader.readline()).split()[1])
                    length = 0
                    while (line := await reader.readline()) not in (b"\r\n", b""):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    if length:
                        await reader.readexactly(length)
                    if status == 200:
                        self.matched.append(time.monotonic())
                    if self.pause:
                        await asyncio.sleep(self.pause)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        tasks = [asyncio.create_task(pilot()) for _ in range(self.n)]
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def pg_transactions(db: Optional[str]) -> Callable[[], Optional[int]]:
    """Committed plus rolled-back transactions of the scheduler's PostgreSQL database so far (None elsewhere)."""
    if not db or not db.startswith("postgresql"):
        return lambda: None
    from sqlalchemy import create_engine, text

    engine = create_engine(db)
    name = db.rsplit("/", 1)[1]

    def count() -> Optional[int]:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :n"), {"n": name}
                ).scalar_one()
            )

    return count


def run(label: str, db: Optional[str], args: argparse.Namespace, rows: list[tuple[str, str, str]]) -> None:
    with tempfile.TemporaryDirectory() as home:
        server = WMSServer(Path(home) / "wms", db, maintenance_interval=60).start()
        transactions = pg_transactions(db)
        try:
            token = server.token("pilot")
            for mode, wait, pause in (("long poll (wait 10 s)", 10.0, 0.0), ("baseline: polling every 2 s", 0.0, 2.0)):
                with Pilots(server.url, token, args.pilots, wait, pause) as pilots:
                    time.sleep(min(5.0, wait + 1))  # every pilot is in its loop
                    assert server.process is not None
                    cpu, xacts, started = cpu_seconds(server.process.pid), transactions(), time.monotonic()
                    time.sleep(args.seconds)
                    elapsed = time.monotonic() - started
                    used = (cpu_seconds(server.process.pid) - cpu) / elapsed
                    after = transactions()
                    db_load = f", {(after - xacts) / elapsed:,.0f} DB transactions/s" if after is not None else ""
                    rows.append((label, f"{mode}: {args.pilots} idle pilots", f"{used:.3f} cores{db_load}"))
                    if wait and args.burst:
                        rows.append(
                            (
                                label,
                                f"burst of {args.burst} jobs, {args.pilots} waiting",
                                burst(server, pilots, args.burst),
                            )
                        )
        finally:
            server.stop()


def burst(server: WMSServer, pilots: Pilots, n: int) -> str:
    """Submit ``n`` jobs in one request; from its answer to each job reaching one of the waiting pilots."""
    runner = {"Authorization": f"Bearer {server.token('runner', 'bench', 'bench_user')}"}
    before = len(pilots.matched)
    response = requests.post(f"{server.url}/api/jobs/jdl", headers=runner, json=[jdl_text(Site=SITE)] * n, timeout=120)
    response.raise_for_status()
    submitted = time.monotonic()
    deadline = submitted + 60
    while len(pilots.matched) - before < n and time.monotonic() < deadline:
        time.sleep(0.05)
    delays = sorted(t - submitted for t in pilots.matched[before:])
    if len(delays) < n:
        return f"only {len(delays)} of {n} jobs matched within 60 s"
    p90 = delays[int(0.9 * (n - 1))]
    return f"p50 {statistics.median(delays) * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms (target p50 ≤50 ms)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pilots", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--burst", type=int, default=100, help="jobs submitted at once to the waiting pilots (0: none)")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.pilots + 1024)), hard))  # the server too
    rows: list[tuple[str, str, str]] = []
    run("SQLite", None, args, rows)
    if not args.no_postgres:
        import pytest

        try:
            with fresh_database("postgres") as url:
                run("PostgreSQL", url, args, rows)
        except pytest.skip.Exception as exc:
            rows.append(("PostgreSQL", "all", f"skipped: {exc}"))
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
