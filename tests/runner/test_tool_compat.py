"""Tool compatibility: every tool test that passes on Galaxy's local runner passes through DIRAC, both transports.

The tools under ``tests/tools/compat/`` exercise the Galaxy features where remote execution breaks (the same dataset in
several inputs, extra files and composite datatypes, collections, ``from_work_dir``, discovered outputs,
``galaxy.json``, config files and inputs as JSON with paths, data tables, ``format_source``, environment variables,
``$__tool_directory__`` scripts, stdio rules, OOM resubmission, ``GALAXY_SLOTS``). One Galaxy loads every tool three
times (ids suffixed ``_local``, ``_dg``, ``_ds``); its job conf sends the copies to the local runner and to
``DiracJobRunner`` with transport ``galaxy`` and ``sandbox``. Galaxy's own client ``galaxy-tool-test`` runs all tests
in parallel and its JSON report is compared per test case. Set ``GALAXY_DIRAC_COMPAT_REPORT`` to a path to get the
comparison as Markdown as well.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
import yaml

from tests.conftest import WMSServer
from tests.galaxy_server import ADMIN_KEY, GalaxyServer
from tests.galaxy_stack import GalaxyStack, galaxy_stack

pytestmark = [pytest.mark.galaxy, pytest.mark.slow, pytest.mark.compat]

COMPAT = Path(__file__).resolve().parent.parent / "tools" / "compat"
#: Runner label → (tool id suffix, environment prefix in the generated job conf).
RUNNERS = {"local": "local", "dirac/galaxy": "dg", "dirac/sandbox": "ds"}
#: Tools that need a destination of their own: flavour → environment params per runner (merged into the base one).
FLAVOURED_TOOLS = {"compat_slots": "slots", "compat_oom": "oom_small"}
PARALLEL_TESTS = int(os.environ.get("GALAXY_DIRAC_COMPAT_PARALLEL", "6"))
PAGE_SIZE = 3 * PARALLEL_TESTS
#: Generous: on a loaded 2-core machine one test case took up to 9 min (queued behind upload jobs).
PAGE_TIMEOUT = 2400
JOB_WAIT = 600
#: Incompressible bytes beside the tools that no tool uses: a bundle that carries them ships the whole directory.
UNRELATED_BYTES = 20 << 20
MAX_INPUT_SANDBOX_BYTES = 1 << 20
TIMINGS: Dict[str, float] = {}


def isolated(hidden: List[Path]) -> List[str]:
    """A pilot's command prefix that hides ``hidden`` behind empty tmpfs mounts in a private mount namespace.

    Pilot and Galaxy share this machine, so a Galaxy path the bundle forgot to rewrite or ship would still work on
    the "worker node" and the test would pass for the wrong reason. Here the job sees only what staging gave it.
    """
    mounts = " && ".join(f"mount -t tmpfs -o size=1m,mode=000 galaxy-hidden '{path}'" for path in hidden)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "pilot"]


def _tool_files() -> List[Path]:
    """Every tool XML of the suite, or those named in GALAXY_DIRAC_COMPAT_TOOLS (comma-separated ids; to iterate)."""
    only = {t.strip() for t in os.environ.get("GALAXY_DIRAC_COMPAT_TOOLS", "").split(",") if t.strip()}
    tools = sorted(p for p in COMPAT.glob("*.xml") if re.search(r"^\s*<tool\b", p.read_text(), re.M))
    return [p for p in tools if not only or _base_id(p) in only]


def _base_id(path: Path) -> str:
    found = re.search(r'<tool\s+id="([^"]+)"', path.read_text())
    assert found, path
    return found.group(1)


def _write_tools(tools_dir: Path) -> List[str]:
    """Copy the compat tree and write three copies of each tool, one per runner; return the base tool ids."""
    shutil.copytree(COMPAT, tools_dir)
    unrelated = tools_dir / "unrelated"
    unrelated.mkdir()
    (unrelated / "big_reference.bin").write_bytes(os.urandom(UNRELATED_BYTES))
    for index in range(200):
        (unrelated / f"notes_{index:03d}.txt").write_text(f"unrelated file {index}\n" * 20)
    bases = []
    sections = []
    for path in _tool_files():
        base = _base_id(path)
        bases.append(base)
        text = path.read_text()
        # One section per tool with its three copies side by side: galaxy-tool-test runs them close together, so
        # DIRAC results come in all along the run, not only at its end.
        sections.append(f'  <section id="{base}" name="{base}">\n')
        for label, suffix in RUNNERS.items():
            copy = re.sub(r'(<tool\s+id=")([^"]+)(")', rf"\g<1>\g<2>_{suffix}\g<3>", text, count=1)
            copy = re.sub(r'(<tool\s[^>]*\bname=")([^"]+)(")', rf"\g<1>\g<2> [{label}]\g<3>", copy, count=1)
            name = f"{path.stem}_{suffix}.xml"
            (tools_dir / name).write_text(copy)
            sections.append(f'    <tool file="{name}"/>\n')
        sections.append("  </section>\n")
    (tools_dir / "compat_tool_conf.xml").write_text(
        f'<?xml version="1.0"?>\n<toolbox tool_path="{tools_dir}">\n{"".join(sections)}</toolbox>\n'
    )
    return bases


def _environments() -> Dict[str, Dict[str, Any]]:
    """The base environment of each runner, and the flavoured ones (2 slots; small memory resubmitted to more)."""
    base = {
        "local": {"runner": "local"},
        "dg": {"runner": "dirac", "transport": "galaxy", "site": "Local.test", "job_group": "compat"},
        "ds": {"runner": "dirac", "transport": "sandbox", "site": "Local.test", "job_group": "compat"},
    }
    environments: Dict[str, Dict[str, Any]] = dict(base)
    for prefix, params in base.items():
        slots = {"local_slots": 2} if prefix == "local" else {"processors": 2}
        environments[f"{prefix}_slots"] = {**params, **slots}
        # Galaxy's OOM handling: a fatal_oom stdio rule makes the job "memory_limit_reached"; resubmit with more.
        environments[f"{prefix}_oom_small"] = {
            **params,
            "env": [{"name": "GALAXY_MEMORY_MB", "value": "500"}],
            "resubmit": [{"condition": "memory_limit_reached", "environment": f"{prefix}_oom_big"}],
        }
        environments[f"{prefix}_oom_big"] = {**params, "env": [{"name": "GALAXY_MEMORY_MB", "value": "4000"}]}
    return environments


def _write_job_conf(path: Path, bases: List[str]) -> None:
    tools = []
    for base in bases:
        flavour = FLAVOURED_TOOLS.get(base)
        for suffix in RUNNERS.values():
            tools.append({"id": f"{base}_{suffix}", "environment": f"{suffix}_{flavour}" if flavour else suffix})
    conf = {
        "runners": {
            "local": {"load": "galaxy.jobs.runners.local:LocalJobRunner", "workers": 4},
            "dirac": {"load": "galaxy_dirac.runner:DiracJobRunner", "workers": 4, "transport": "galaxy"},
        },
        "execution": {"default": "local", "environments": _environments()},
        "tools": tools,
    }
    path.write_text(yaml.safe_dump(conf, sort_keys=False))


def _write_data_tables(tool_data: Path) -> Path:
    tool_data.mkdir(parents=True, exist_ok=True)
    for reference in (COMPAT / "tool-data").glob("*.fa"):
        shutil.copy(reference, tool_data / reference.name)
    loc = (COMPAT / "tool-data" / "compat_references.loc.in").read_text().replace("{tool_data}", str(tool_data))
    (tool_data / "compat_references.loc").write_text(loc)
    conf = tool_data / "compat_tool_data_table_conf.xml"
    conf.write_text((COMPAT / "tool_data_table_conf.xml.in").read_text().replace("{tool_data}", str(tool_data)))
    return conf


@pytest.fixture(scope="module")
def compat_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GalaxyStack]:
    started = time.monotonic()
    home = tmp_path_factory.mktemp("compat")
    tools_dir = home / "tools"
    bases = _write_tools(tools_dir)
    job_conf = home / "compat_job_conf.yml"
    _write_job_conf(job_conf, bases)
    table_conf = _write_data_tables(home / "tool-data")
    config = {
        "tool_config_file": str(tools_dir / "compat_tool_conf.xml"),
        "job_config_file": str(job_conf),
        "tool_data_table_config_path": str(table_conf),
    }
    assert shutil.which("unshare"), "unshare (util-linux) is needed to hide Galaxy's files from the pilot"
    try:
        with galaxy_stack(home, config=config) as stack:
            TIMINGS["galaxy_startup"] = stack.galaxy.startup_seconds[-1]
            # Galaxy's state, its tools and reference data, and its venv are not on the worker node.
            hidden = [home / "galaxy", tools_dir, home / "tool-data", stack.galaxy.venv]
            pilot = stack.add_pilot("pilot", processors=4, wrap=isolated(hidden))
            time.sleep(1)
            assert pilot.process.poll() is None, f"pilot exited: {pilot.log_path.read_text()[-3000:]}"
            stack.extra["bases"] = bases
            yield stack
    finally:
        TIMINGS["total"] = time.monotonic() - started
        sys.stderr.write(f"\ntool compat timings (s): { {k: round(v, 1) for k, v in TIMINGS.items()} }\n")


def _tool_test_command(galaxy: GalaxyServer, report: Path, page: int) -> List[str]:
    """One page of Galaxy's own tool-test client; pages append to one JSON report, so a page that hangs loses
    only its own tests and the report can be read while the run goes on."""
    command = [str(galaxy.venv / "bin" / "galaxy-tool-test"), "--galaxy-url", galaxy.url]
    command += ["--key", str(galaxy.api_key), "--admin-key", ADMIN_KEY, "--history-per-test-case"]
    command += ["--with-reference-data"]  # the suite's own data table is installed in this Galaxy
    command += ["--parallel-tests", str(PARALLEL_TESTS), "--page-size", str(PAGE_SIZE), "--page-number", str(page)]
    command += ["--output-json", str(report), "--output", str(report.parent / "tool-test-outputs")]
    return command + (["--append"] if page else [])


def _run_tool_tests(galaxy: GalaxyServer, report: Path, on_page: Callable[[], None]) -> List[str]:
    """Run every page; returns what went wrong with the client itself (a page timed out or wrote nothing)."""
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{galaxy.venv / 'bin'}:{env.get('PATH', '')}"
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["GALAXY_TEST_DEFAULT_WAIT"] = str(JOB_WAIT)  # a job stuck in DIRAC fails its test instead of hanging
    total = sum(
        summary["count"]
        for versions in galaxy.api("GET", "tools/tests_summary").values()
        for summary in versions.values()
    )
    problems = []
    for page in range((total + PAGE_SIZE - 1) // PAGE_SIZE):
        try:
            run = subprocess.run(
                _tool_test_command(galaxy, report, page), env=env, capture_output=True, text=True, timeout=PAGE_TIMEOUT
            )
            if not report.exists():
                problems.append(f"page {page}: no report (rc {run.returncode}): {run.stderr[-3000:]}")
        except subprocess.TimeoutExpired:
            problems.append(f"page {page}: galaxy-tool-test did not finish in {PAGE_TIMEOUT} s")
        on_page()
    return problems


def _split_id(tool_id: str) -> Tuple[str, str]:
    for label, suffix in RUNNERS.items():
        if tool_id.endswith(f"_{suffix}"):
            return tool_id[: -len(suffix) - 1], label
    return tool_id, ""


def _reason(data: Dict[str, Any]) -> str:
    parts = []
    if data.get("execution_problem"):
        parts.append(str(data["execution_problem"]))
    parts.extend(str(p) for p in data.get("output_problems") or [])
    job = data.get("job") or {}
    for key in ("info", "tool_stderr", "job_stderr", "stderr"):
        value = (job.get(key) or "").strip()
        if value and value not in " ".join(parts):
            parts.append(f"{key}: {value[-600:]}")
    text = " | ".join(parts) or f"status {data.get('status')}"
    return re.sub(r"\s+", " ", text)[:1500]


def _results(report: Path) -> Dict[Tuple[str, int], Dict[str, Dict[str, Any]]]:
    """(base tool id, test index) → runner label → the test's data from galaxy-tool-test's report."""
    cases: Dict[Tuple[str, int], Dict[str, Dict[str, Any]]] = {}
    for test in json.loads(report.read_text())["tests"]:
        data = test.get("data") or {}
        base, label = _split_id(data.get("tool_id") or test["id"].rsplit("-", 1)[0])
        if not label:
            continue
        index = int(data.get("test_index", test["id"].rsplit("-", 1)[-1]))
        cases.setdefault((base, index), {})[label] = data
    return cases


def _largest_input_sandboxes(wms: WMSServer, count: int = 3) -> List[Tuple[str, int]]:
    with sqlite3.connect(wms.home / "wms.sqlite") as db:
        return db.execute(
            "SELECT m.EntityId, s.Bytes FROM sb_SandBoxes s JOIN sb_EntityMapping m ON s.SBId = m.SBId "
            "WHERE m.Type = 'Input' ORDER BY s.Bytes DESC LIMIT ?",
            (count,),
        ).fetchall()


def _markdown(counts: Dict[str, Tuple[int, int]], regressions: List[str], wall: float, extra: List[str]) -> str:
    lines = ["# Tool compatibility suite (tests/runner/test_tool_compat.py)", ""]
    lines += [
        "Galaxy's own `galaxy-tool-test` against one Galaxy; each tool as `_local`, `_dg` (DiracJobRunner, transport",
        "galaxy) and `_ds` (transport sandbox). The pilot cannot see Galaxy's files (private mount namespace).",
        "",
    ]
    lines += ["| runner | tests passed |", "|---|---|"]
    lines += [f"| {label} | {passed} / {total} |" for label, (passed, total) in counts.items()]
    lines += ["", f"galaxy-tool-test wall time: {wall:.0f} s", ""]
    lines += ["## Pass locally, fail through DIRAC", ""] + [f"- {r}" for r in regressions or ["none"]]
    return "\n".join(lines + [""] + extra) + "\n"


def _compare(cases: Dict[Tuple[str, int], Dict[str, Dict[str, Any]]]) -> Dict[str, Any]:
    counts: Dict[str, Tuple[int, int]] = {}
    for label in RUNNERS:
        runs = [by_runner[label] for by_runner in cases.values() if label in by_runner]
        counts[label] = (sum(1 for d in runs if d.get("status") == "success"), len(runs))
    regressions: List[str] = []
    local_failures: List[str] = []
    for (base, index), by_runner in sorted(cases.items()):
        local = by_runner.get("local", {})
        if local.get("status") != "success":
            local_failures.append(f"{base} test {index}: {_reason(local) if local else 'not run'}")
            continue
        for label in ("dirac/galaxy", "dirac/sandbox"):
            data = by_runner.get(label)
            if data is None:
                regressions.append(f"{base} test {index} [{label}]: not run")
            elif data.get("status") != "success":
                regressions.append(f"{base} test {index} [{label}]: {_reason(data)}")
    summary = "  ".join(f"{label}: {passed}/{total}" for label, (passed, total) in counts.items())
    return {"counts": counts, "regressions": regressions, "local_failures": local_failures, "summary": summary}


@pytest.mark.timeout(3600)  # every tool test three ways: far over the suite's per-test cap
def test_tools_work_through_dirac_as_locally(compat_stack: GalaxyStack) -> None:
    galaxy: GalaxyServer = compat_stack.galaxy
    report = compat_stack.home / "tool_test_report.json"
    markdown = os.environ.get("GALAXY_DIRAC_COMPAT_REPORT")
    started = time.monotonic()

    def write_markdown(final: bool = False) -> None:
        if not (markdown and report.exists()):
            return
        result = _compare(_results(report))
        extra = ["## Fail locally too (not compared)", ""] + [f"- {r}" for r in result["local_failures"] or ["none"]]
        extra += ["", f"Largest input sandboxes (DIRAC job, bytes): {_largest_input_sandboxes(compat_stack.wms)}"]
        extra += ["", "(final)" if final else "(run in progress: pages still to come)"]
        wall = time.monotonic() - started
        Path(markdown).write_text(_markdown(result["counts"], result["regressions"], wall, extra))

    client_problems = _run_tool_tests(galaxy, report, write_markdown)
    TIMINGS["galaxy_tool_test"] = wall = time.monotonic() - started
    assert report.exists(), f"galaxy-tool-test wrote no report: {client_problems}"
    write_markdown(final=True)
    cases = _results(report)
    result = _compare(cases)
    largest = _largest_input_sandboxes(compat_stack.wms)
    sys.stderr.write(
        f"\ntool compat: {result['summary']}; galaxy-tool-test {wall:.0f} s; largest input sandboxes {largest}\n"
    )
    for line in client_problems:
        sys.stderr.write(f"  CLIENT {line}\n")
    for line in result["local_failures"]:
        sys.stderr.write(f"  fails locally too (not compared): {line}\n")
    for line in result["regressions"]:
        sys.stderr.write(f"  REGRESSION {line}\n")

    missing = sorted(set(compat_stack.extra["bases"]) - {base for base, _ in cases})
    assert not missing, f"galaxy-tool-test ran no test of {missing}: {client_problems}"
    assert result["counts"]["local"][0] > 0, "nothing passed locally:\n" + "\n".join(result["local_failures"])
    regressions = "\n".join(result["regressions"])
    assert not result["regressions"], f"{result['summary']}\npass locally, fail through DIRAC:\n{regressions}"
    # No bundle carries the unrelated files beside the tools: only what a tool needs leaves Galaxy.
    assert largest and largest[0][1] < MAX_INPUT_SANDBOX_BYTES, f"input sandboxes too large: {largest}"
