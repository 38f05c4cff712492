"""What idle pilots cost the scheduler: CPU of one API worker while N pilots wait for work and no job comes.

    python benchmarks/idle.py [--pilots 200] [--seconds 20]

Each simulated pilot keeps asking for a match in a loop, as the real pilot does when the queue is empty: with the
long poll (``wait=10``, the pilot's default) and, as the baseline in the same run, with plain polling every
2 seconds (``--match-wait 0`` with a short back-off). The figure is the scheduler process's CPU seconds per
wall-clock second (1.0 = one core busy), from ``/proc``. Target (issue 14): idle pilots cost nothing, i.e. well
under the polling baseline and a few percent of a core for hundreds of pilots.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from table import print_rows  # noqa: E402

from tests.conftest import WMSServer  # noqa: E402

SLOT = {"Site": "Idle.bench", "NumberOfProcessors": 1, "MaxRAM": 2000, "PilotStamp": ""}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stream:
        fields = stream.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(server: WMSServer, token: str, pilots: int, seconds: float, wait: float, pause: float) -> float:
    """Scheduler CPU per second while ``pilots`` threads ask for matches (``wait`` long poll, then ``pause``)."""
    stop = threading.Event()

    def pilot() -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        while not stop.is_set():
            with contextlib.suppress(requests.RequestException):
                session.post(f"{server.url}/api/x-embedded/match", params={"wait": wait}, json=SLOT, timeout=wait + 30)
            stop.wait(pause)

    threads = [threading.Thread(target=pilot, daemon=True) for _ in range(pilots)]
    for thread in threads:
        thread.start()
    time.sleep(min(5.0, wait + 1))  # every pilot is in its loop
    assert server.process is not None
    cpu, started = cpu_seconds(server.process.pid), time.monotonic()
    time.sleep(seconds)
    used = (cpu_seconds(server.process.pid) - cpu) / (time.monotonic() - started)
    stop.set()
    for thread in threads:
        thread.join(wait + 35)
    return used


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pilots", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as home:
        server = WMSServer(Path(home) / "wms", maintenance_interval=60).start()
        try:
            token = server.token("pilot")
            for label, wait, pause in (("long poll (wait 10 s)", 10.0, 0.0), ("baseline: polling every 2 s", 0.0, 2.0)):
                used = measure(server, token, args.pilots, args.seconds, wait, pause)
                rows.append((label, f"scheduler CPU, {args.pilots} idle pilots", f"{used:.3f} cores"))
        finally:
            server.stop()
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
