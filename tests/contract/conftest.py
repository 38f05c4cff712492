"""Fixtures for contract tests: the same checks run against every server that claims to speak the DiracX 0.7 API.

`diracx_server` is a real DiracX 0.7 (side venv, SQLite, moto for S3), started once per session (per xdist
worker). It is skipped, with the reason, when its side venv cannot be built (e.g. no package index) or git is
missing, unless GALAXY_DIRAC_REQUIRE_DIRACX=1 (CI), which turns those skips into errors. A server that is
installed but fails to start is always an error. GALAXY_DIRAC_SKIP_DIRACX=1 skips it outright.

`contract_server` is parametrized over CONTRACT_SERVERS: each entry names a session fixture `<name>_server`
yielding an object with `.url` (base URL, no trailing slash), `.token` (access token of an ordinary user with
NormalUser only) and `.credentials` (a token response: access_token, expires_in, refresh_token or None).
"""

from __future__ import annotations

import os
import pathlib
import shutil
from dataclasses import dataclass
from typing import Dict, Iterator

import pytest

from galaxy_dirac.wms.auth import create_refresh_token
from tests.conftest import WMSServer, unavailable
from tests.contract.diracx_server import DiracxServer, diracx_venv, start_diracx_server

#: Servers every contract test runs against. Add e.g. `pytest.param("embedded")` with an `embedded_server`
#: session fixture to hold another implementation to the same contract.
CONTRACT_SERVERS = [pytest.param("diracx", marks=pytest.mark.diracx), pytest.param("embedded")]

#: Where a server deliberately differs, what each one answers (everything else must be identical).
EXPECT = {
    # DiracX alone has no optimizers: jobs stay Received. Ours queues them in the submit transaction.
    "diracx": {"queued": ("Received", "Job accepted"), "rescheduled": ("Received", "Job Rescheduled"),
               "reassign_output": (400, {"detail": "Sandbox already assigned"}),
               # A status update replayed with the same timestamp is applied again: the history shows it twice.
               "replayed_kill_records": 2},
    # Re-assigning the same output sandbox is a no-op for us, so a wrapper retrying after a lost reply is safe.
    "embedded": {"queued": ("Waiting", "Pilot Agent Submission"), "rescheduled": ("Waiting", "Pilot Agent Submission"),
                 "reassign_output": (200, None), "replayed_kill_records": 1},
}


def _unavailable(reason: str) -> None:
    """Skip, or fail when the run requires DiracX (CI)."""
    unavailable("DiracX", reason)


@pytest.fixture(scope="session")
def diracx_python() -> pathlib.Path:
    """The DiracX side venv's interpreter (runs the official diracx-client script), built on first use."""
    if os.environ.get("GALAXY_DIRAC_SKIP_DIRACX") == "1":
        pytest.skip("GALAXY_DIRAC_SKIP_DIRACX=1")
    try:
        venv = diracx_venv()
    except Exception as exc:  # no index, no network, broken wheel...: an environment problem, not a test failure
        _unavailable(f"cannot build the side venv: {exc}")
    return venv / "bin" / "python"


@pytest.fixture(scope="session")
def diracx_server(diracx_python: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DiracxServer]:
    """A real DiracX 0.7 server on a free loopback port, stopped (process groups killed) at session end."""
    if shutil.which("git") is None:
        _unavailable("git is needed for DiracX's configuration repository")
    server = start_diracx_server(tmp_path_factory.mktemp("diracx"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def diracx_login_server(
    diracx_python: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DiracxServer]:
    """A second real DiracX with DiracX-like short tokens (access 1 min, login 30 min) whose VO IdP is the OIDC
    double of `oidc_idp.py`, so device-flow logins (rotating refresh tokens) can be completed in tests."""
    if shutil.which("git") is None:
        _unavailable("git is needed for DiracX's configuration repository")
    server = start_diracx_server(
        tmp_path_factory.mktemp("diracx-login"), token_minutes=1, refresh_minutes=30, with_idp=True
    )
    try:
        yield server
    finally:
        server.stop()


@dataclass
class EmbeddedServer:
    """Our scheduler, seen like a DiracX server: base URL, alice's token and a refreshable credentials pair.

    The interface the contract tests share with :class:`DiracxServer` (``.token`` is a string there too), over a
    :class:`tests.conftest.WMSServer`.
    """

    url: str
    token: str
    credentials: Dict[str, object]


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """The real ``galaxy-dirac-wms serve`` process, holding alice's runner token as DiracX's alice."""
    server = WMSServer(tmp_path_factory.mktemp("embedded") / "wms").start()
    try:
        token = server.token("runner", "alice", "galaxy_user")
        credentials = {
            "access_token": token,
            "expires_in": 86400,
            "token_type": "Bearer",
            "refresh_token": create_refresh_token(server.key, token),
        }
        yield EmbeddedServer(server.url, token, credentials)
    finally:
        server.stop()


@pytest.fixture(scope="session", params=CONTRACT_SERVERS)
def contract_server(request: pytest.FixtureRequest) -> object:
    """One server under contract test (see CONTRACT_SERVERS), with ``.expect`` for its deliberate differences."""
    server = request.getfixturevalue(f"{request.param}_server")
    server.expect = EXPECT[request.param]
    return server
