"""One Galaxy, five ways to run the same tool and workflow: submit→ok, workflow wall time, where the time goes.

    python benchmarks/galaxy.py [--n 7] [--workflow-n 3] [--burst [20]]

Starts the real scheduler with one warm pilot (2 processors), a real Pulsar server (``pulsar-app``, its own side
venv) and one Galaxy 26.1 (side venv, SQLite) whose job_conf has a destination per system:

- ``local``: Galaxy's local runner (the baseline);
- ``pulsar_transfer`` / ``pulsar_remote_transfer``: Galaxy's PulsarRESTJobRunner with Galaxy pushing and pulling
  the files, or with Pulsar fetching and posting them through Galaxy's job files API (metadata set by Galaxy);
- ``dirac_galaxy`` / ``dirac_sandbox``: galaxy_dirac.runner:DiracJobRunner, transports ``galaxy`` and ``sandbox``.

A dynamic rule (benchmarks/galaxy_routes) sends every job to the destination its history is named after, so the
tool (gd_cat) and the workflow (examples/workflows/split-count-merge) are the same for all five. Runs are
interleaved round-robin, the order rotating each round, so machine noise falls on every system alike. Each system
has two slots (runner workers, Pulsar's concurrent jobs, the pilot's processors). Figures, not assertions.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from table import print_rows  # noqa: E402

from galaxy_dirac.times import parse_time  # noqa: E402
from tests.conftest import free_port, stop_process_group  # noqa: E402
from tests.galaxy_server import ADMIN_KEY, GalaxyServer  # noqa: E402
from tests.galaxy_stack import GalaxyStack, galaxy_stack  # noqa: E402
from tests.sidevenvs import ensure_known  # noqa: E402

SYSTEMS = ("local", "pulsar_transfer", "pulsar_remote_transfer", "dirac_galaxy", "dirac_sandbox")
WORKFLOW = ROOT / "examples" / "workflows" / "split-count-merge.gxwf.yml"
POEM = ROOT / "examples" / "data" / "poem.txt"
ROUTED_TOOLS = ("gd_cat", "gd_split", "gd_wc", "gd_collection_cat")
DIRAC_STATES = ("Received", "Matched", "Running", "Done")
FINAL = ("ok", "error", "deleted", "failed")
POLL = 0.2


class PulsarServer:
    """``pulsar-serve`` (gunicorn) on a free port with a private token; staging and persistence under ``home``."""

    def __init__(self, home: Path, token: str) -> None:
        self.home = home
        self.token = token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = home / "pulsar.log"
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 120.0) -> PulsarServer:
        venv = ensure_known("pulsar")
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "server.ini").write_text(
            f"[server:main]\nhost = 127.0.0.1\nport = {self.port}\n\n[app:main]\napp_config = app.yml\n"
        )
        app = {
            "staging_directory": str(self.home / "staging"),
            "persistence_directory": str(self.home / "persisted"),
            "tool_dependency_dir": str(self.home / "dependencies"),
            "private_token": self.token,
            "managers": {"_default_": {"type": "queued_python", "num_concurrent_jobs": 2}},
        }
        (self.home / "app.yml").write_text(yaml.safe_dump(app))
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.process = subprocess.Popen(
            [str(venv / "bin" / "pulsar-serve"), str(self.home / "server.ini")],
            cwd=str(self.home),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "PULSAR_CONFIG_DIR": str(self.home)},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Pulsar exited with {self.process.returncode}: {self.log_path.read_text()[-4000:]}")
            try:
                requests.get(self.url, timeout=30)  # gunicorn builds the app on the first request
                return self
            except requests.RequestException:
                time.sleep(0.5)
        raise RuntimeError(f"Pulsar did not answer in {timeout} s: {self.log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process, timeout=20)
            self._log.close()
            self.process = None


def job_conf(pulsar: PulsarServer) -> Dict[str, Any]:
    """Galaxy's job_conf: one environment per system and a dynamic one that picks among them by history name."""
    remote = {"runner": "pulsar", "url": pulsar.url, "private_token": pulsar.token, "remote_metadata": False}
    return {
        "runners": {
            "local": {"load": "galaxy.jobs.runners.local:LocalJobRunner", "workers": 2},
            "pulsar": {"load": "galaxy.jobs.runners.pulsar:PulsarRESTJobRunner", "workers": 2},
            "dirac": {"load": "galaxy_dirac.runner:DiracJobRunner", "workers": 2, "transport": "galaxy"},
        },
        "execution": {
            "default": "local",
            "environments": {
                "local": {"runner": "local"},
                "pulsar_transfer": {**remote, "default_file_action": "transfer"},
                "pulsar_remote_transfer": {**remote, "default_file_action": "remote_transfer"},
                "dirac_galaxy": {"runner": "dirac", "transport": "galaxy", "site": "Local.test"},
                "dirac_sandbox": {"runner": "dirac", "transport": "sandbox", "site": "Local.test"},
                "by_history": {
                    "runner": "dynamic",
                    "type": "python",
                    "function": "bench_route",
                    "rules_module": "benchmarks.galaxy_routes",
                },
            },
        },
        "tools": [{"id": tool, "environment": "by_history"} for tool in ROUTED_TOOLS],
    }


@dataclass
class Run:
    """One measured submission: when it was sent (epoch), how long until Galaxy said ok, and the jobs it made."""

    system: str
    sent: float
    seconds: float
    jobs: List[Dict[str, Any]] = field(default_factory=list)  # Galaxy's job listing rows


@dataclass
class Bench:
    stack: GalaxyStack
    histories: Dict[str, str]
    inputs: Dict[str, Dict[str, str]]
    workflow_id: str

    @property
    def galaxy(self) -> GalaxyServer:
        return self.stack.galaxy

    def states(self, history: str) -> Dict[str, Dict[str, Any]]:
        rows = self.galaxy.api("GET", "jobs", params={"history_id": history, "limit": 10000})
        return {row["id"]: row for row in rows}

    def wait_jobs(self, history: str, job_ids: Sequence[str], timeout: float = 600) -> List[Dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.states(history)
            if all(rows.get(j, {}).get("state") in FINAL for j in job_ids):
                failed = [rows[j] for j in job_ids if rows[j]["state"] != "ok"]
                if failed:
                    raise SystemExit(
                        f"{failed[0]['tool_id']} ended {failed[0]['state']}: {self.galaxy.job(failed[0]['id'])}"
                    )
                return [rows[j] for j in job_ids]
            time.sleep(POLL)
        raise SystemExit(f"jobs not final after {timeout} s in history {history}")

    def submit_cat(self, system: str) -> str:
        files = self.inputs[system]
        inputs = {"input1": {"src": "hda", "id": files["a"]}, "input2": {"src": "hda", "id": files["b"]}}
        return self.galaxy.run_tool(self.histories[system], "gd_cat", inputs)["jobs"][0]["id"]

    def single(self, system: str) -> Run:
        sent = time.time()
        started = time.monotonic()
        job_id = self.submit_cat(system)
        jobs = self.wait_jobs(self.histories[system], [job_id])
        return Run(system, sent, time.monotonic() - started, jobs)

    def burst(self, system: str, count: int) -> Run:
        """``count`` submissions at once (four client threads, as a few users would), until all are ok."""
        sent = time.time()
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            job_ids = list(pool.map(lambda _: self.submit_cat(system), range(count)))
        jobs = self.wait_jobs(self.histories[system], job_ids)
        return Run(system, sent, time.monotonic() - started, jobs)

    def workflow(self, system: str, timeout: float = 900) -> Run:
        sent = time.time()
        started = time.monotonic()
        history = self.histories[system]
        invocation = self.galaxy.api(
            "POST",
            f"workflows/{self.workflow_id}/invocations",
            json={
                "history_id": history,
                "inputs": {"text": {"src": "hda", "id": self.inputs[system]["poem"]}},
                "inputs_by": "name",
            },
        )
        output = self.galaxy.wait_invocation_output(invocation["id"], "merged", timeout=timeout)
        seconds = time.monotonic() - started
        if self.galaxy.api("GET", f"datasets/{output['id']}")["state"] != "ok":
            raise SystemExit(f"{system}: workflow output not ok")
        jobs = self.galaxy.api("GET", "jobs", params={"invocation_id": invocation["id"], "limit": 1000})
        return Run(system, sent, seconds, jobs)


def rounds(count: int) -> Iterator[List[str]]:
    """Every system once per round, the order rotated by one each round."""
    for i in range(count):
        yield [SYSTEMS[(i + k) % len(SYSTEMS)] for k in range(len(SYSTEMS))]


# -- what Galaxy and the scheduler recorded --------------------------------------------------------------------------


def epoch(value: Any) -> float:
    return parse_time(value).timestamp()


class Records:
    """Galaxy's job state history (from its database: the API has none), job metrics and DIRAC's job history."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.db = sqlite3.connect(f"file:{bench.galaxy.home / 'data' / 'universe.sqlite'}?mode=ro", uri=True)

    def decoded(self, job_id: str) -> int:
        admin = {"x-api-key": ADMIN_KEY}
        return self.bench.galaxy.api("GET", f"configuration/decode/{job_id}", headers=admin)["decoded_id"]

    def milestones(self, system: str, job_id: str) -> Dict[str, float]:
        """Epoch seconds of each Galaxy state (first time entered), the tool's own start and end on the node
        (core job metrics), and DIRAC's states for our runner's jobs."""
        rows = self.db.execute(
            "SELECT state, MIN(create_time) FROM job_state_history WHERE job_id = ? GROUP BY state",
            (self.decoded(job_id),),
        )
        at = {f"galaxy {state}": epoch(when) for state, when in rows}
        metrics = self.bench.galaxy.api("GET", f"jobs/{job_id}/metrics")
        raw = {m["name"]: m.get("raw_value") for m in metrics if m.get("plugin") == "core"}
        for name, label in (("start_epoch", "tool start"), ("end_epoch", "tool end")):
            if raw.get(name) not in (None, ""):
                at[label] = float(raw[name])
        external = self.bench.galaxy.job(job_id).get("external_id")
        if external and system.startswith("dirac"):
            details = self.bench.stack.scheduler("GET", f"api/x-embedded/jobs/{int(external)}")
            for entry in details.get("History", []):
                at.setdefault(f"DIRAC {entry['Status']}", epoch(entry["StatusTime"]))
        return at


# -- figures ---------------------------------------------------------------------------------------------------------


def p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def fmt(value: Optional[float]) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def wall_table(title: str, runs: List[Run]) -> None:
    """Median and p90 per system, and the difference of medians to the local runner's from the same run."""
    by_system = {s: [r.seconds for r in runs if r.system == s] for s in SYSTEMS}
    base = statistics.median(by_system["local"]) if by_system["local"] else float("nan")
    rows = [["system", "n", f"{title} median s", "p90 s", "min s", "max s", "median - local s"]]
    for system, values in by_system.items():
        if values:
            median = statistics.median(values)
            rows.append(
                [
                    system,
                    str(len(values)),
                    fmt(median),
                    fmt(p90(values)),
                    fmt(min(values)),
                    fmt(max(values)),
                    f"{median - base:+.2f}",
                ]
            )
    print_rows(rows)


def phase_table(runs: List[Run], records: Records) -> None:
    """Median seconds after the submit request at which each milestone was reached, per system."""
    columns = [
        "galaxy new",
        "galaxy queued",
        "galaxy running",
        *(f"DIRAC {s}" for s in DIRAC_STATES),
        "tool start",
        "tool end",
        "galaxy ok",
    ]
    offsets: Dict[str, Dict[str, List[float]]] = {s: {c: [] for c in columns} for s in SYSTEMS}
    for run in runs:
        at = records.milestones(run.system, run.jobs[0]["id"])
        for column in columns:
            if column in at:
                offsets[run.system][column].append(at[column] - run.sent)
    rows = [["system (median s after submit)", *columns, "ok seen"]]
    for system in SYSTEMS:
        seen = [r.seconds for r in runs if r.system == system]
        if seen:
            cells = [fmt(statistics.median(v)) if v else "-" for v in offsets[system].values()]
            rows.append([system, *cells, fmt(statistics.median(seen))])
    print_rows(rows)


def workflow_phase_table(runs: List[Run], records: Records) -> None:
    """Median seconds after the invocation request at which each step's jobs were all ok, and the summed time
    the tools themselves ran (core metrics), per system."""
    steps = ("gd_split", "gd_wc", "gd_collection_cat")
    offsets: Dict[str, Dict[str, List[float]]] = {s: {t: [] for t in (*steps, "tool s")} for s in SYSTEMS}
    for run in runs:
        tool_seconds = 0.0
        for step in steps:
            ends = []
            for job in (j for j in run.jobs if j["tool_id"] == step):
                at = records.milestones(run.system, job["id"])
                ends.append(at["galaxy ok"])
                if "tool start" in at and "tool end" in at:
                    tool_seconds += at["tool end"] - at["tool start"]
            if ends:
                offsets[run.system][step].append(max(ends) - run.sent)
        offsets[run.system]["tool s"].append(tool_seconds)
    rows = [["system (median s after invoke)", "split ok", "all counts ok", "merge ok", "tool time sum s"]]
    for system in SYSTEMS:
        if any(r.system == system for r in runs):
            rows.append([system, *(fmt(statistics.median(v)) if v else "-" for v in offsets[system].values())])
    print_rows(rows)


def burst_table(runs: List[Run], records: Records) -> None:
    rows = [["system", "jobs", "all ok s", "first ok s", "last ok s (job table)", "all ok / local's"]]
    base = [r.seconds for r in runs if r.system == "local"]
    for run in runs:
        oks = [records.milestones(run.system, j["id"]).get("galaxy ok", float("nan")) - run.sent for j in run.jobs]
        rows.append(
            [
                run.system,
                str(len(run.jobs)),
                fmt(run.seconds),
                fmt(min(oks)),
                fmt(max(oks)),
                f"{run.seconds / statistics.median(base):.2f}x" if base else "-",
            ]
        )
    print_rows(rows)


# -- setup and main --------------------------------------------------------------------------------------------------


def prepare(stack: GalaxyStack) -> Bench:
    """A history per system with the same inputs: uploaded once (an upload is a local job), copied to the others."""
    galaxy = stack.galaxy
    histories = {system: galaxy.new_history(f"bench:{system}") for system in SYSTEMS}
    first = histories[SYSTEMS[0]]
    uploaded = {
        "a": galaxy.upload(first, "a\n"),
        "b": galaxy.upload(first, "b\n"),
        "poem": galaxy.upload(first, POEM.read_text(), name=POEM.name),
    }
    inputs = {SYSTEMS[0]: uploaded}
    for system in SYSTEMS[1:]:
        inputs[system] = {
            key: galaxy.api(
                "POST",
                f"histories/{histories[system]}/contents",
                json={"source": "hda", "content": hda, "type": "dataset"},
            )["id"]
            for key, hda in uploaded.items()
        }
    workflow = galaxy.api("POST", "workflows", json={"workflow": yaml.safe_load(WORKFLOW.read_text())})
    return Bench(stack, histories, inputs, workflow["id"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=7, help="single-job runs per system (default 7)")
    parser.add_argument("--workflow-n", type=int, default=3, help="workflow runs per system (default 3)")
    parser.add_argument(
        "--burst",
        type=int,
        nargs="?",
        const=20,
        default=0,
        metavar="N",
        help="also submit N trivial jobs at once per system (N=20 when given alone)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop every server on the way out, as on Ctrl-C
    with tempfile.TemporaryDirectory(prefix="gd-bench-") as tmp:
        home = Path(tmp)
        pulsar = PulsarServer(home / "pulsar", token="galaxy-dirac-bench-pulsar-token")
        conf = home / "job_conf.yml"
        try:
            pulsar.start()
            conf.write_text(yaml.safe_dump(job_conf(pulsar), sort_keys=False))
            with galaxy_stack(home, config={"job_config_file": str(conf)}) as stack:
                print(f"galaxy startup: {stack.galaxy.startup_seconds[-1]:.1f} s")
                stack.add_pilot("pilot", processors=2)
                bench = prepare(stack)
                for system in SYSTEMS:  # warm-up: first job of each path (tool caches, Pulsar's manager, pilot)
                    bench.single(system)
                singles = [bench.single(s) for order in rounds(args.n) for s in order]
                workflows = [bench.workflow(s) for order in rounds(args.workflow_n) for s in order]
                bursts = [bench.burst(s, args.burst) for s in next(rounds(1))] if args.burst else []
                records = Records(bench)
                if singles:
                    print(f"\ngd_cat submit→ok (n={args.n} per system, interleaved):")
                    wall_table("submit→ok", singles)
                    print("\nwhere a single job's time goes:")
                    phase_table(singles, records)
                if workflows:
                    print(f"\n{WORKFLOW.name} wall time, invoke→merged ok (n={args.workflow_n} per system):")
                    wall_table("workflow", workflows)
                    workflow_phase_table(workflows, records)
                if bursts:
                    print(f"\nburst: {args.burst} gd_cat jobs submitted at once, submit→all ok:")
                    burst_table(bursts, records)
        finally:
            pulsar.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
