"""The watchdog: process-tree accounting from /proc, limits, heartbeats and kills."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from galaxy_dirac.pilot import watchdog as wd
from galaxy_dirac.pilot.http import Backoff, Client

from .conftest import json_reply

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")

ALLOCATE = "import time; b = b'x' * (80 * 1024 * 1024); print('ready', flush=True); time.sleep(60)"


def spawn(*command: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(list(command), start_new_session=True, **kwargs)


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def run_watchdog(process: subprocess.Popen, tmp_path, **kwargs) -> wd.Watchdog:
    kwargs.setdefault("limits", wd.Limits(min_free_disk_mb=0))
    watchdog = wd.Watchdog(
        process.pid,
        job_id=5,
        client=kwargs.pop("client", None),
        job_dir=str(tmp_path),
        stdout_path=str(tmp_path / "std.out"),
        interval=kwargs.pop("interval", 1.0),
        kill_grace=1.0,
        **kwargs,
    )
    watchdog.start()
    try:
        process.wait(timeout=20)
    finally:
        watchdog.join(5)
        if process.poll() is None:
            process.kill()
            process.wait()
    return watchdog


def test_tree_includes_descendants_that_left_the_session(tmp_path):
    process = spawn("sh", "-c", "sleep 30 & setsid sleep 31 & wait")
    try:
        wait_until(lambda: len(wd.process_tree(process.pid)) >= 3)
        tree = wd.process_tree(process.pid)
        assert process.pid in tree
        wd.kill_tree(process.pid, 1.0, lambda: process.poll() is None)
        process.wait(timeout=5)
        wait_until(lambda: not wd.live(tree), timeout=5)
    finally:
        if process.poll() is None:
            process.kill()


def test_sample_counts_resident_memory(tmp_path):
    process = spawn(sys.executable, "-c", ALLOCATE, stdout=subprocess.PIPE)
    try:
        assert process.stdout.readline().strip() == b"ready"
        sample = wd.sample_tree(wd.process_tree(process.pid))
        assert sample.rss_mb > 70 and sample.vsize_mb >= sample.rss_mb and sample.pids == 1
    finally:
        process.kill()
        process.wait()


def test_memory_limit_kills_the_payload(tmp_path):
    process = spawn(sys.executable, "-c", ALLOCATE, stdout=subprocess.DEVNULL)
    started = time.monotonic()
    watchdog = run_watchdog(process, tmp_path, limits=wd.Limits(memory_mb=40, min_free_disk_mb=0))
    assert watchdog.reason == wd.MEMORY_LIMIT and "MaxRAM 40 MB" in watchdog.detail
    assert process.returncode == -15
    assert time.monotonic() - started < 5


def test_wall_clock_limit(tmp_path):
    process = spawn("sleep", "30")
    watchdog = run_watchdog(process, tmp_path, limits=wd.Limits(wall_clock=1, min_free_disk_mb=0))
    assert watchdog.reason == wd.WALL_LIMIT
    assert watchdog.wall_clock() < 5


def test_cpu_limit_counts_children(tmp_path):
    busy = f"{sys.executable} -c 'while True: pass'"
    process = spawn("sh", "-c", f"{busy} & {busy} & wait")
    watchdog = run_watchdog(process, tmp_path, limits=wd.Limits(cpu_time=1, min_free_disk_mb=0))
    assert watchdog.reason == wd.CPU_LIMIT
    assert watchdog.cpu_seconds > 1


def test_term_ignoring_payload_gets_sigkill(tmp_path):
    process = spawn("sh", "-c", "trap '' TERM; sleep 30 & wait; sleep 30")
    watchdog = run_watchdog(process, tmp_path, limits=wd.Limits(wall_clock=0.5, min_free_disk_mb=0))
    assert watchdog.reason == wd.WALL_LIMIT
    assert process.returncode == -9


def test_disk_limit_of_the_job_directory(tmp_path):
    process = spawn("sh", "-c", "head -c 3000000 /dev/zero > big; sleep 30", cwd=tmp_path)
    watchdog = run_watchdog(process, tmp_path, limits=wd.Limits(disk_mb=1, min_free_disk_mb=0), interval=0.5)
    assert watchdog.reason == wd.DISK_LIMIT and "MaxDiskSpace" in watchdog.detail


def test_heartbeats_report_usage_and_obey_kill(file_server, tmp_path):
    beats = []

    def app(request):
        beats.append(json.loads(request.body))
        return json_reply([{"job_id": 5, "command": "Kill", "arguments": None}] if len(beats) >= 2 else [])

    file_server.app = app
    (tmp_path / "std.out").write_text("line 1\nline 2\n")
    process = spawn("sleep", "30")
    client = Client(file_server.url, "job-token", backoff=Backoff(0.01, 0.02))
    started = time.monotonic()
    watchdog = run_watchdog(process, tmp_path, client=client, interval=0.5, command_wait=0)  # heartbeats only
    assert watchdog.reason == "Kill"
    assert time.monotonic() - started < 3
    assert file_server.requests[0].method == "PATCH" and file_server.requests[0].path == "/api/jobs/heartbeat"
    body = beats[-1]["5"]
    assert set(body) == {
        "LoadAverage",
        "MemoryUsed",
        "Vsize",
        "AvailableDiskSpace",
        "CPUConsumed",
        "WallClockTime",
        "StandardOutput",
    }
    assert body["StandardOutput"] == "line 1\nline 2\n"
    assert body["AvailableDiskSpace"] > 0 and body["WallClockTime"] >= 0.4


def test_tail_keeps_whole_lines(tmp_path):
    path = tmp_path / "out"
    path.write_text("".join(f"line {n}\n" for n in range(2000)))
    text = wd.tail(str(path), max_bytes=100)
    assert text.endswith("line 1999\n") and text.startswith("line ") and len(text) <= 100
    assert wd.tail(str(tmp_path / "missing")) == ""


def test_refused_heartbeat_means_the_job_was_lost(file_server, tmp_path):
    file_server.app = lambda request: json_reply({"detail": "job 5 was rescheduled since this token was issued"}, 403)
    process = spawn("sleep", "30")
    client = Client(file_server.url, "old-token", backoff=Backoff(0.01, 0.02))
    watchdog = run_watchdog(process, tmp_path, client=client, interval=0.5)
    assert watchdog.reason == wd.LOST and "rescheduled" in watchdog.detail


def test_final_heartbeat_reports_the_payloads_totals(file_server, tmp_path):
    """After the payload ends, one more heartbeat carries its peak memory, CPU and wall clock."""
    beats = []

    def app(request):
        beats.append(json.loads(request.body)["5"])
        return json_reply([])

    file_server.app = app
    burn = (
        "import time; b = b'x' * (60 * 1024 * 1024); t = time.time()\n"
        "while time.time() - t < 1.5: pass"
    )
    process = spawn(sys.executable, "-c", burn)
    client = Client(file_server.url, "job-token", backoff=Backoff(0.01, 0.02))
    watchdog = run_watchdog(process, tmp_path, client=client, interval=30.0, sample_period=0.2)
    before = len(beats)
    watchdog.final_beat()
    assert len(beats) == before + 1
    final = beats[-1]
    assert final["MemoryUsed"] > 50, final  # the peak, not the (gone) process's last sample
    assert final["CPUConsumed"] > 0.5 and final["WallClockTime"] >= 1.4, final


def test_a_kill_arrives_by_the_command_poll_between_heartbeats(file_server, tmp_path):
    """The heartbeat is a minute away; the long poll for the job's commands brings the Kill."""
    polls = []

    def app(request):
        if request.method == "GET" and request.path == "/api/x-embedded/jobs/5/commands":
            polls.append(request.query)
            return json_reply([{"job_id": 5, "command": "Kill", "arguments": ""}] if len(polls) >= 2 else [])
        return json_reply([])

    file_server.app = app
    process = spawn("sleep", "30")
    client = Client(file_server.url, "job-token", backoff=Backoff(0.01, 0.02))
    watchdog = run_watchdog(process, tmp_path, client=client, interval=60, command_wait=0.2)
    assert watchdog.reason == "Kill"
    assert polls[0] == {"wait": ["0.2"]}
    assert sum(1 for r in file_server.requests if r.method == "PATCH") == 1  # only the first heartbeat went


def test_a_server_without_the_command_poll_leaves_kills_to_heartbeats(file_server, tmp_path):
    seen = []

    def app(request):
        seen.append((request.method, request.path))
        if request.method == "GET":
            return json_reply({"detail": "Not Found"}, status=404)
        return json_reply([{"job_id": 5, "command": "Kill", "arguments": ""}] if len(seen) >= 3 else [])

    file_server.app = app
    process = spawn("sleep", "30")
    client = Client(file_server.url, "job-token", backoff=Backoff(0.01, 0.02))
    watchdog = run_watchdog(process, tmp_path, client=client, interval=0.3, command_wait=5)
    assert watchdog.reason == "Kill"
    assert [m for m, _ in seen].count("GET") == 1  # asked once, then left it to the heartbeats
