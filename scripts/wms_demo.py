"""One command, the whole path on one machine: scheduler → pilots → jobs → outputs.

Starts the embedded scheduler and local pilots, runs a three-step workflow as DIRAC jobs (split a text into parts,
count the words of each part in parallel, merge the counts) whose data moves only through sandboxes, prints each
step's DIRAC job id, site, pilot, state and timings and the outputs, then stops what it started. Everything lives
under ``var/demo`` (logs included) and is recreated on every run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from galaxy_dirac.archive import create_archive
from galaxy_dirac.client import WMSClient

ROOT = Path(__file__).resolve().parents[1]
VAR = ROOT / "var" / "wms-demo"
SITE = "Local.demo"
PILOTS = 2
TEXT = """\
Galaxy runs tools and workflows for biologists on any infrastructure.
DIRAC is the interware behind the EGI Workload Manager.
Pilots are started on worker nodes by a SiteDirector.
A pilot asks the matcher for work and runs the job wrapper.
The job wrapper downloads the input sandbox and runs the payload.
Heartbeats carry CPU, memory and the tail of standard output.
Outputs come back through the output sandbox or Galaxy's job files API.
Task queues group jobs with identical requirements.
A kill reaches the payload within one heartbeat interval.
"""


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """The processes the demo starts, stopped in reverse order whatever happens."""

    def __init__(self) -> None:
        self.processes: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(VAR / "logs" / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child process
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((name, proc))
        return proc

    def stop(self) -> None:
        for _name, proc in reversed(self.processes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _name, proc in reversed(self.processes):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def sandbox(client: WMSClient, files: dict[str, bytes]) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        pairs = []
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
            pairs.append((name, Path(tmp) / name))
        archive = Path(tmp) / "sandbox.tar.bz2"
        create_archive(archive, pairs)
        return client.upload_sandbox(str(archive))


def outputs(client: WMSClient, job_id: int) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for blob in client.download_output_sandboxes(job_id):
        with tarfile.open(fileobj=blob) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    found[member.name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return found


def jdl(name: str, command: str, inputs: list[str], outputs_: list[str]) -> str:
    quoted = ", ".join(f'"{p}"' for p in inputs)
    outs = ", ".join(f'"{p}"' for p in [*outputs_, "std.out", "std.err"])
    command = command.replace('"', '\\"')
    return (
        f'[JobName = "{name}"; JobGroup = "demo"; Executable = "/bin/sh"; Arguments = "-c \\"{command}\\"";'
        f" InputSandbox = {{{quoted}}}; OutputSandbox = {{{outs}}}; CPUTime = 600;]"
    )


def wait(client: WMSClient, job_ids: list[int], step: str) -> dict[int, dict[str, Any]]:
    last = ""
    while True:
        rows = client.statuses(job_ids)
        states = ", ".join(f"{j}:{rows[j]['Status']}" for j in job_ids)
        if states != last:
            say(f"  {step}: {states}")
            last = states
        if all(rows[j]["Status"] in ("Done", "Failed", "Killed") for j in job_ids):
            return rows
        time.sleep(0.5)


def describe(admin: requests.Session, url: str, job_ids: list[int]) -> None:
    for job_id in job_ids:
        job = admin.get(f"{url}/api/x-embedded/jobs/{job_id}", timeout=30).json()
        times = {h["Status"]: h["StatusTime"] for h in job["History"]}
        pilots = ",".join(job.get("Pilots", [])) or "-"
        print(
            f"    job {job_id:>4}  {job['JobName']:<10} site={job['Site']:<11} pilot={pilots:<14} "
            f"{job['Status']:<7} submitted {job['SubmissionTime'][11:19]}  running {times.get('Running', '?')[11:19]}"
            f"  done {times.get(job['Status'], '?')[11:19]}"
        )


def main() -> int:
    started = time.monotonic()
    shutil.rmtree(VAR, ignore_errors=True)
    (VAR / "logs").mkdir(parents=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, GALAXY_DIRAC_WMS_HOME=str(VAR / "wms"), GALAXY_DIRAC_WMS_MAINTENANCE_INTERVAL="5")
    wms = [sys.executable, "-m", "galaxy_dirac.wms.cli"]
    stack = Stack()
    try:
        say(f"starting the embedded scheduler on {url} (SQLite in {VAR / 'wms'})")
        stack.start("wms", [*wms, "serve", "--port", str(port)], env)
        for _ in range(100):
            try:
                if requests.get(f"{url}/api/x-embedded/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        token = {
            role: subprocess.run(
                [*wms, "token", "create", "--role", role, "--owner", "demo", "--group", "demo_user"],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            for role in ("runner", "pilot", "admin")
        }
        say(f"starting {PILOTS} local pilots at site {SITE}")
        for i in range(PILOTS):
            stack.start(
                f"pilot-{i}",
                [
                    sys.executable,
                    "-m",
                    "galaxy_dirac.pilot",
                    "--url",
                    url,
                    "--token",
                    token["pilot"],
                    "--site",
                    SITE,
                    "--ce",
                    "localhost",
                    "--queue",
                    "demo",
                    "--stamp",
                    f"demo-pilot-{i}",
                    "--heartbeat-interval",
                    "2",
                    "--max-empty-matches",
                    "100000",
                    "--idle-backoff",
                    "0.5",
                    "--idle-backoff-max",
                    "1",
                    "--workdir",
                    str(VAR / f"pilot-{i}"),
                ],
                env,
            )
        client = WMSClient(url, token["runner"])
        admin = requests.Session()
        admin.headers["Authorization"] = f"Bearer {token['admin']}"

        say("step 1/3 split: one job splits the text into parts")
        text_sb = sandbox(client, {"input.txt": TEXT.encode()})
        (split_id,) = [
            j["JobID"] for j in client.submit([jdl("split", "split -l 3 input.txt part_", [text_sb], ["part_*"])])
        ]
        rows = wait(client, [split_id], "split")
        if rows[split_id]["Status"] != "Done":
            raise SystemExit(f"split failed: {rows[split_id]['MinorStatus']}")
        parts = {k: v for k, v in outputs(client, split_id).items() if k.startswith("part_")}
        describe(admin, url, [split_id])

        say(f"step 2/3 count: {len(parts)} jobs count words in parallel")
        count_jdls = []
        for name, data in sorted(parts.items()):
            part_sb = sandbox(client, {name: data})
            count_jdls.append(
                jdl(f"count-{name[-2:]}", f"wc -w < {name} > count_{name}.txt", [part_sb], [f"count_{name}.txt"])
            )
        count_ids = [j["JobID"] for j in client.submit(count_jdls)]
        wait(client, count_ids, "count")
        counts = {}
        for job_id in count_ids:
            counts.update({k: v for k, v in outputs(client, job_id).items() if k.startswith("count_")})
        describe(admin, url, count_ids)

        say("step 3/3 merge: one job adds the counts")
        merge_sb = sandbox(client, counts)
        (merge_id,) = [
            j["JobID"]
            for j in client.submit(
                [jdl("merge", "cat count_*.txt | awk '{s+=$1} END {print s}' > total.txt", [merge_sb], ["total.txt"])]
            )
        ]
        wait(client, [merge_id], "merge")
        describe(admin, url, [merge_id])
        total = outputs(client, merge_id).get("total.txt", b"?").decode().strip()
        expected = len(TEXT.split())
        say(f"result: {total} words (wc over the whole text says {expected})")
        for name, data in sorted(counts.items()):
            print(f"    {name}: {data.decode().strip()}")
        say(f"logs: {VAR / 'logs'}   wall time: {time.monotonic() - started:.1f} s")
        return 0 if total == str(expected) else 1
    finally:
        stack.stop()
        say("stopped the scheduler and pilots")


if __name__ == "__main__":
    sys.exit(main())
