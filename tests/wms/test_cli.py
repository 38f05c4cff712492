"""The ``galaxy-dirac-wms`` command: tokens, listings, and where its settings come from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import jwt
import pytest
import requests

from galaxy_dirac.wms.auth import verify_token
from galaxy_dirac.wms.config import ConfigError, load_settings
from tests.conftest import WMSServer
from tests.jdl import jdl_text

SCRIPT = Path(sys.executable).parent / "galaxy-dirac-wms"


def command() -> list[str]:
    """The installed console script when there is one (what operators run), else the module."""
    return [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "galaxy_dirac.wms.cli"]


def clean_env(**settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALAXY_DIRAC_WMS_")}
    env.update({f"GALAXY_DIRAC_WMS_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*command(), *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WMSServer]:
    srv = WMSServer(tmp_path_factory.mktemp("cli") / "wms", maintenance_interval=0)
    srv.start()
    yield srv
    srv.stop()


def test_serve_logs_each_line_once(server: WMSServer) -> None:
    log = server.log_path.read_text()
    assert log.count("Application startup complete") == 1, log


# --- tokens --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["admin", "runner", "reader", "pilot"])
def test_token_create_prints_only_a_token_the_server_accepts(server: WMSServer, role: str) -> None:
    done = run("token", "create", "--role", role, "--owner", "alice", "--group", "galaxy_user", env=server.env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and done.stdout == lines[0] + "\n"
    principal = verify_token(server.key, lines[0])
    assert (principal.role, principal.owner, principal.group, principal.vo) == (role, "alice", "galaxy_user", "galaxy")

    headers = {"Authorization": f"Bearer {lines[0]}"}
    if role == "pilot":
        response = requests.get(f"{server.url}/api/x-embedded/taskqueues/demand", headers=headers, timeout=30)
    else:
        response = requests.post(f"{server.url}/api/jobs/search", headers=headers, json={}, timeout=30)
    assert response.status_code == 200, response.text


def test_token_defaults_and_lifetime(server: WMSServer) -> None:
    done = run("token", "create", "--role", "pilot", "--lifetime", "120", env=server.env)
    claims = jwt.decode(done.stdout.strip(), server.key, algorithms=["HS256"], issuer="galaxy-dirac-wms")
    assert claims["exp"] - claims["iat"] == 120
    assert (claims["sub"], claims["role"], claims["dirac_group"]) == ("pilot", "pilot", "galaxy_pilot")


@pytest.mark.parametrize("role", ["wizard", "job", ""])
def test_token_create_rejects_unknown_roles(server: WMSServer, role: str) -> None:
    done = run("token", "create", "--role", role, env=server.env)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "--role" in done.stderr and "invalid choice" in done.stderr


def test_token_create_needs_a_role(server: WMSServer) -> None:
    done = run("token", "create", env=server.env)
    assert done.returncode == 2 and done.stdout == "" and "--role" in done.stderr


# --- listings ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def populated(server: WMSServer) -> dict[str, Any]:
    """Jobs, pilots and a task queue created through the HTTP API."""
    tag = uuid.uuid4().hex[:8]
    owner, site = f"cli{tag}", f"SITE.{tag}.org"
    runner = {"Authorization": f"Bearer {server.token('runner', owner, 'galaxy_user')}"}
    pilot = {"Authorization": f"Bearer {server.token('pilot')}"}
    jdls = [jdl_text(JobName=f"cli-{i}", Site=site) for i in range(3)]
    submitted = requests.post(f"{server.url}/api/jobs/jdl", headers=runner, json=jdls, timeout=30)
    assert submitted.status_code in (200, 201), submitted.text
    ids = [j["JobID"] for j in submitted.json()]
    stamps = [f"{tag}a", f"{tag}b", f"{tag}c"]
    added = requests.post(f"{server.url}/api/x-embedded/pilots", headers=pilot,
                          json={"stamps": stamps, "queue": "cliq", "site": site}, timeout=30)
    assert added.status_code == 200, added.text
    matched = requests.post(f"{server.url}/api/x-embedded/match", headers=pilot,
                            json={"Site": site, "PilotStamp": stamps[0]}, timeout=30)
    assert matched.json()["JobID"] == ids[0]
    done = requests.patch(f"{server.url}/api/x-embedded/pilots/{stamps[2]}", headers=pilot,
                          json={"status": "Done", "matched_jobs": 0}, timeout=30)
    assert done.status_code == 200, done.text
    return {"owner": owner, "site": site, "ids": ids, "stamps": stamps}


def table(stdout: str) -> tuple[list[str], list[list[str]]]:
    lines = stdout.splitlines()
    return lines[0].split(), [line.split() for line in lines[1:]]


def test_jobs_listing(server: WMSServer, populated: dict[str, Any]) -> None:
    ids = populated["ids"]
    done = run("jobs", env=server.env)
    assert done.returncode == 0, done.stderr
    header, rows = table(done.stdout)
    assert header[:3] == ["JobID", "Status", "MinorStatus"] and "Owner" in header
    listed = {int(r[0]): r for r in rows}
    assert {ids[0]: "Matched", ids[1]: "Waiting", ids[2]: "Waiting"} == {i: listed[i][1] for i in ids}

    as_json = json.loads(run("jobs", "--json", "--owner", populated["owner"], env=server.env).stdout)
    assert [j["JobID"] for j in as_json] == sorted(ids, reverse=True)
    assert {j["Owner"] for j in as_json} == {populated["owner"]}
    assert {j["JobName"] for j in as_json} == {"cli-0", "cli-1", "cli-2"}
    filtered = run("jobs", "--json", "--status", "Matched", "--status", "Waiting", "--owner", populated["owner"],
                   "--limit", "2", env=server.env)
    assert [j["JobID"] for j in json.loads(filtered.stdout)] == [ids[2], ids[1]]  # newest first, two of three


def test_pilots_listing(server: WMSServer, populated: dict[str, Any]) -> None:
    busy, idle, done = populated["stamps"]
    header, rows = table(run("pilots", env=server.env).stdout)
    assert header[:3] == ["PilotID", "PilotStamp", "Status"]
    by_stamp = {r[1]: r for r in rows}
    assert (by_stamp[busy][2], by_stamp[idle][2], by_stamp[done][2]) == ("Running", "Submitted", "Done")
    alive = json.loads(run("pilots", "--json", "--status", "Submitted", "--status", "Running", env=server.env).stdout)
    as_json = {p["PilotStamp"]: p for p in alive}
    assert busy in as_json and idle in as_json and done not in as_json
    assert as_json[busy]["MatchedJobs"] == 1 and as_json[idle]["MatchedJobs"] == 0
    assert as_json[busy]["Queue"] == "cliq" and as_json[busy]["GridSite"] == populated["site"]


def test_taskqueues_listing(server: WMSServer, populated: dict[str, Any]) -> None:
    header, rows = table(run("taskqueues", env=server.env).stdout)
    assert header == ["TQId", "Owner", "OwnerGroup", "CPUTime", "Priority", "Sites", "Tags", "WaitingJobs"]
    mine = [r for r in rows if r[1] == populated["owner"]]
    assert len(mine) == 1 and mine[0][5] == populated["site"] and mine[0][-1] == "2"
    queues = [q for q in json.loads(run("taskqueues", "--json", env=server.env).stdout)
              if q["Owner"] == populated["owner"]]
    assert len(queues) == 1
    assert (queues[0]["Sites"], queues[0]["WaitingJobs"], queues[0]["OwnerGroup"]) == (
        [populated["site"]], 2, "galaxy_user")


def test_command_line_db_beats_the_environment(server: WMSServer, populated: dict[str, Any], tmp_path: Path) -> None:
    env = {**server.env, "GALAXY_DIRAC_WMS_DB": f"sqlite:///{(server.home / 'wms.sqlite').absolute()}"}
    assert len(json.loads(run("jobs", "--json", env=env).stdout)) >= 3
    other = f"sqlite:///{tmp_path / 'other.sqlite'}"
    assert json.loads(run("jobs", "--json", "--db", other, env=env).stdout) == []


# --- configuration -------------------------------------------------------------------------------------------------
def test_settings_precedence_file_env_cli(tmp_path: Path) -> None:
    config = tmp_path / "wms.yaml"
    config.write_text("port: 1111\nstalled_after: 5\nvo: filevo\ngroup-shares: {a: 2}\nreschedule_stalled: no\n")
    env = {"GALAXY_DIRAC_WMS_PORT": "2222", "GALAXY_DIRAC_WMS_VO": "envvo", "GALAXY_DIRAC_WMS_FAILED_AFTER": "7.5"}

    only_file = load_settings(str(config), environ={})
    assert (only_file.port, only_file.stalled_after, only_file.vo) == (1111, 5.0, "filevo")
    assert only_file.group_shares == {"a": 2.0} and only_file.reschedule_stalled is False
    with_env = load_settings(str(config), environ=env)
    assert (with_env.port, with_env.vo, with_env.failed_after, with_env.stalled_after) == (2222, "envvo", 7.5, 5.0)
    with_cli = load_settings(str(config), overrides={"port": 3333, "vo": None}, environ=env)
    assert (with_cli.port, with_cli.vo) == (3333, "envvo")  # None means "flag not given"
    by_env_var = load_settings(environ={**env, "GALAXY_DIRAC_WMS_CONFIG": str(config)})
    assert (by_env_var.port, by_env_var.stalled_after) == (2222, 5.0)
    defaults = load_settings(environ={})
    assert (defaults.port, defaults.stalled_after, defaults.reschedule_stalled) == (8686, 600.0, True)


@pytest.mark.parametrize(
    ("config_text", "environ", "named"),
    [
        ("port: 1\nstaled_after: 3\n", {}, "'staled_after'"),
        ("", {"GALAXY_DIRAC_WMS_STALED_AFTER": "3"}, "'staled_after'"),
        ("", {"GALAXY_DIRAC_WMS_PORT": "eighty"}, "'port'"),
        ("max_rescheduling: [1, 2]\n", {}, "'max_rescheduling'"),
        ("reschedule_stalled: perhaps\n", {}, "'reschedule_stalled'"),
        ("- port\n", {}, "mapping"),
        ("port: [\n", {}, "cannot read config file"),
    ],
)
def test_bad_settings_raise_config_error_naming_them(tmp_path: Path, config_text: str, environ: dict,
                                                     named: str) -> None:
    config = tmp_path / "wms.yaml"
    config.write_text(config_text)
    with pytest.raises(ConfigError) as error:
        load_settings(str(config), environ=environ)
    assert named in str(error.value)


def test_cli_reports_config_errors_without_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "wms.yaml"
    config.write_text("colour: blue\n")
    home = tmp_path / "home"
    from_file = run("jobs", "--config", str(config), env=clean_env(home=home))
    assert from_file.returncode == 2 and "unknown setting 'colour'" in from_file.stderr
    assert "Traceback" not in from_file.stderr and from_file.stdout == ""
    from_env = run("token", "create", "--role", "admin", env=clean_env(home=home, colour="blue"))
    assert from_env.returncode == 2 and "GALAXY_DIRAC_WMS_COLOUR" in from_env.stderr and from_env.stdout == ""


def test_secret_file_precedence_through_the_cli(tmp_path: Path) -> None:
    secrets = {}
    for name in ("file", "env", "cli"):
        secrets[name] = tmp_path / f"{name}.secret"
        secrets[name].write_text(f"{name}-secret-".ljust(48, "x"))
    config = tmp_path / "wms.yaml"
    config.write_text(f"secret_file: {secrets['file']}\n")
    base = clean_env(home=tmp_path / "home", config=config)

    def signed_with(env: dict[str, str], *extra: str) -> str:
        done = run("token", "create", "--role", "admin", *extra, env=env)
        assert done.returncode == 0, done.stderr
        for name, path in secrets.items():
            try:
                verify_token(path.read_text().strip().encode(), done.stdout.strip())
                return name
            except Exception:  # noqa: BLE001 - try the next secret
                continue
        return "none"

    assert signed_with(base) == "file"
    with_env = {**base, "GALAXY_DIRAC_WMS_SECRET_FILE": str(secrets["env"])}
    assert signed_with(with_env) == "env"
    assert signed_with(with_env, "--secret-file", str(secrets["cli"])) == "cli"
