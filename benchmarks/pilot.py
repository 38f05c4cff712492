"""Benchmark the stdlib pilot against the real scheduler on loopback.

    python benchmarks/pilot.py [--jobs 20]

Prints the pilot's RSS (idle, and while a job runs), the time from starting the pilot process to its first match,
and the waiting→matched latency of jobs submitted one at a time to a warm, idle pilot (from the scheduler's own
status history, so both ends use the server's clock), and how long a kill takes to reach a running payload with a
5 s heartbeat. The same figures are measured for a pilot that polls (``--match-wait 0`` with its default back-off,
``--command-wait 0``: commands only with heartbeats) as the baseline in the same run. Targets (issues 3 and 14):
RSS ≤30 MB, start-to-match ≤1 s, p50 waiting→matched ≤0.5 s, kill ≤2 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from table import print_rows  # noqa: E402

from galaxy_dirac.pilot.build import build_zipapp  # noqa: E402
from tests.conftest import WMSServer  # noqa: E402

SITE = "Bench.pilot.org"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def history_times(session: requests.Session, url: str, job_id: int) -> dict[str, dt.datetime]:
    job = session.get(f"{url}/api/x-embedded/jobs/{job_id}", timeout=30).json()
    times: dict[str, dt.datetime] = {}
    for record in job["History"]:
        times.setdefault(record["Status"], dt.datetime.fromisoformat(record["StatusTime"].replace("Z", "+00:00")))
    return times


def wait_status(session: requests.Session, url: str, job_id: int, wanted: tuple[str, ...], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = session.get(f"{url}/api/x-embedded/jobs/{job_id}", timeout=30).json()["Status"]
        if status in wanted:
            return status
        time.sleep(0.02)
    raise TimeoutError(f"job {job_id} not in {wanted} after {timeout} s")


def run(label: str, pilot_args: list[str], args: argparse.Namespace, rows: list[tuple[str, str, str]]) -> None:
    with tempfile.TemporaryDirectory() as home:
        server = WMSServer(Path(home) / "wms", maintenance_interval=0).start()
        pilot = None
        try:
            runner = requests.Session()
            runner.headers["Authorization"] = f"Bearer {server.token('runner', 'bench', 'bench_user')}"
            admin = requests.Session()
            admin.headers["Authorization"] = f"Bearer {server.token('admin')}"
            pyz = build_zipapp(Path(home) / "pilot.pyz")

            def submit(command: str = "/bin/true") -> int:
                body = [f'[Executable = "/bin/sh"; Arguments = "-c \\"{command}\\""; Site = "{SITE}";]']
                response = runner.post(f"{server.url}/api/jobs/jdl", json=body, timeout=30)
                response.raise_for_status()
                return response.json()[0]["JobID"]

            first = submit()
            started = dt.datetime.now(dt.timezone.utc)
            pilot = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    str(pyz),
                    "--url",
                    server.url,
                    "--token",
                    server.token("pilot"),
                    "--site",
                    SITE,
                    "--processors",
                    "1",
                    "--heartbeat-interval",
                    "5",
                    "--max-empty-matches",
                    "1000",
                    "--workdir",
                    str(Path(home) / "pilot"),
                    "--log-level",
                    "WARNING",
                    *pilot_args,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            wait_status(admin, server.url, first, ("Done",), 60)
            to_match = (history_times(admin, server.url, first)["Matched"] - started).total_seconds()
            time.sleep(1.0)
            idle_rss = rss_mb(pilot.pid)
            busy = submit("sleep 2")
            wait_status(admin, server.url, busy, ("Running",), 60)
            time.sleep(0.5)
            busy_rss = rss_mb(pilot.pid)
            wait_status(admin, server.url, busy, ("Done",), 60)
            latencies = []
            for _ in range(args.jobs):
                time.sleep(args.pause)  # the pilot is idle again: back in its long poll, or backing off
                job_id = submit()
                wait_status(admin, server.url, job_id, ("Done",), 120)
                times = history_times(admin, server.url, job_id)
                latencies.append((times["Matched"] - times["Waiting"]).total_seconds())
            latencies.sort()
            # Kill: from the runner's request to the payload process gone, with a 5 s heartbeat.
            pid_file = Path(home) / "victim.pid"
            victim = submit(f"echo $$ > {pid_file}; exec sleep 300")
            wait_status(admin, server.url, victim, ("Running",), 60)
            deadline = time.monotonic() + 30
            while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
                time.sleep(0.05)
            victim_pid = int(pid_file.read_text())
            time.sleep(1.0)  # past the first heartbeat
            kill_started = time.monotonic()
            stamp = dt.datetime.now(dt.timezone.utc).isoformat()
            admin.patch(
                f"{server.url}/api/jobs/status", json={str(victim): {stamp: {"Status": "Killed"}}}, timeout=30
            ).raise_for_status()
            while _alive(victim_pid) and time.monotonic() - kill_started < 60:
                time.sleep(0.02)
            kill_seconds = time.monotonic() - kill_started
            rows += [
                (label, "kill → payload gone, 5 s heartbeat", f"{kill_seconds:.2f} s (target ≤2)"),
                (label, "pilot RSS idle / while a job runs", f"{idle_rss:.1f} MB / {busy_rss:.1f} MB (target ≤30)"),
                (label, "process start → first match", f"{to_match:.2f} s (target ≤1)"),
                (
                    label,
                    f"waiting → matched, warm pilot, {len(latencies)} jobs",
                    f"p50 {statistics.median(latencies):.3f} s, p90 {latencies[int(len(latencies) * 0.9) - 1]:.3f} s,"
                    f" max {latencies[-1]:.3f} s (target p50 ≤0.5)",
                ),
            ]
        finally:
            if pilot is not None and pilot.poll() is None:
                os.killpg(pilot.pid, signal.SIGKILL)
                pilot.wait()
            server.stop()


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--pause", type=float, default=2.0, help="idle seconds before each job of the latency test")
    args = parser.parse_args()
    rows: list[tuple[str, str, str]] = []
    run("long poll (default)", [], args, rows)
    run("baseline: polling", ["--match-wait", "0", "--command-wait", "0"], args, rows)
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
