"""A DiracX login that lasts, against a real DiracX 0.7 with 1-minute access tokens (`diracx_login_server`).

Logins go through DiracX's real device flow; the browser step is done with requests, and the VO's IdP is the OIDC
double of `oidc_idp.py`. What DiracX does and these tests rely on: device-flow refresh tokens rotate (the old one
is revoked, the new one keeps the old one's expiry), and presenting a revoked one revokes all of the user's refresh
tokens. Destructive tests use bob, so alice's logins in other tests stay valid.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import pytest
import requests

from galaxy_dirac.client import LoginExpired, WMSClient
from galaxy_dirac.credentials import CLIENT_ID, device_login, token_claims
from tests.contract.diracx_server import USER_GROUP, DiracxServer
from tests.jdl import jdl_text

pytestmark = pytest.mark.diracx

REPO = Path(__file__).resolve().parents[2]
#: The `galaxy-dirac` console script of our venv; `python -m galaxy_dirac.cli` until the venv is re-installed.
_SCRIPT = shutil.which("galaxy-dirac", path=str(Path(sys.executable).parent))
GALAXY_DIRAC = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "galaxy_dirac.cli"]


def _browser() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


def visit(verification_url: str, user: Optional[str] = None) -> None:
    """What the user's browser does: DiracX redirects to the IdP, which logs `user` in and sends it back."""
    browser = _browser()
    to_idp = browser.get(verification_url, allow_redirects=False)
    assert to_idp.status_code in (302, 307), to_idp.text
    idp_url = to_idp.headers["Location"] + (f"&login_hint={user}" if user else "")
    done = browser.get(idp_url)
    assert done.status_code == 200 and "close the window" in done.text, done.text


def login(server: DiracxServer, path: Path, user: str = "alice", group: Optional[str] = None) -> Dict[str, Any]:
    """A device-flow login of `user` stored in `path` (through our device_login; the browser step inline)."""

    def show(text: str) -> None:
        visit(text.split()[1], user)  # "Open <verification_uri_complete> in a browser..."

    return device_login(server.url, str(path), group=group, interval=0.05, show=show)


def _expire(path: Path) -> Dict[str, Any]:
    """Mark the stored access token as expired (expires_on in the past): the next call must refresh."""
    data = json.loads(path.read_text())
    data["expires_on"] = int(time.time()) - 1
    path.write_text(json.dumps(data))
    return data


def _probe(client: WMSClient) -> None:
    assert client.statuses([10**9]) == {}


def test_login_command_end_to_end(diracx_login_server: DiracxServer, tmp_path: Path) -> None:
    """`galaxy-dirac login` as a subprocess: prints the URL, polls, writes a 0600 file that the client can use."""
    path = tmp_path / "conf" / "credentials.json"
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    proc = subprocess.Popen(
        [*GALAXY_DIRAC, "login", "--url", diracx_login_server.url]
        + ["--group", USER_GROUP, "--credentials", str(path), "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        first = proc.stdout.readline()  # type: ignore[union-attr]
        assert first.startswith("Open "), first + proc.stderr.read()  # type: ignore[union-attr]
        visit(first.split()[1])
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    assert "alice" in out and USER_GROUP in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert set(data) == {"access_token", "refresh_token", "expires_on"}
    claims = token_claims(data["access_token"])
    assert (claims["preferred_username"], claims["dirac_group"]) == ("alice", USER_GROUP)
    assert abs(data["expires_on"] - (claims["exp"] - 15)) <= 2  # diracx-client's layout: 15 s early
    assert not token_claims(data["refresh_token"])["legacy_exchange"]  # a real login: rotating refresh token
    _probe(WMSClient(diracx_login_server.url, credentials_file=str(path)))
    status = subprocess.run(
        [*GALAXY_DIRAC, "login", "--status", "--credentials", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert status.returncode == 0 and "alice" in status.stdout and USER_GROUP in status.stdout, status.stdout


def test_refresh_rotates_and_never_extends_the_login(diracx_login_server: DiracxServer, tmp_path: Path) -> None:
    """Several expiries in a row: every refresh rotates the refresh token, whose expiry stays the login's."""
    path = tmp_path / "credentials.json"
    first = login(diracx_login_server, path)
    deadline = token_claims(first["refresh_token"])["exp"]
    client = WMSClient(diracx_login_server.url, credentials_file=str(path))
    seen = {first["refresh_token"]}
    for round_ in range(1, 4):
        _expire(path)
        _probe(client)
        data = json.loads(path.read_text())
        assert client.credentials is not None and client.credentials.refreshes == round_
        assert data["refresh_token"] not in seen and data["expires_on"] > time.time() + 30
        # DiracX: the new refresh token only gets what was left of the old one (to the second, rounding down)
        assert deadline - 2 <= token_claims(data["refresh_token"])["exp"] <= deadline
        seen.add(data["refresh_token"])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    _probe(client)  # a fresh token is used as is
    assert client.credentials.refreshes == 3


def test_new_login_is_picked_up_without_restart(diracx_login_server: DiracxServer, tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    login(diracx_login_server, path)
    client = WMSClient(diracx_login_server.url, credentials_file=str(path))
    _probe(client)
    login(diracx_login_server, path, group="galaxy_admin")  # alice logs in again, as admin
    assert client.token == json.loads(path.read_text())["access_token"]
    assert token_claims(client.token)["dirac_group"] == "galaxy_admin"


WORKER = textwrap.dedent(
    """
    import json, sys, time
    from galaxy_dirac.client import WMSClient
    url, path, start, calls = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    # refresh_margin larger than any token's life: every call refreshes, all processes contend for the lock
    client = WMSClient(url, credentials_file=path, refresh_margin=1e9, retries=0)
    time.sleep(max(0.0, start - time.time()))
    ok = 0
    for _ in range(calls):
        assert client.statuses([10**9]) == {}
        ok += 1
    print(json.dumps({"ok": ok, "refreshes": client.credentials.refreshes}))
    """
)


def test_processes_sharing_a_file_never_reuse_a_refresh_token(
    diracx_login_server: DiracxServer, tmp_path: Path
) -> None:
    """Three processes refreshing at once, 8 times each: one reused refresh token would make DiracX revoke the
    whole login (and every later call fail); instead every refresh rotates and the login still works."""
    path = tmp_path / "credentials.json"
    first = login(diracx_login_server, path)
    start, calls, workers = time.time() + 3.0, 8, 3
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, diracx_login_server.url, str(path), str(start), str(calls)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for _ in range(workers)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert [r["ok"] for r in results] == [calls] * workers
    assert sum(r["refreshes"] for r in results) == calls * workers
    final = json.loads(path.read_text())
    assert final["refresh_token"] != first["refresh_token"]
    after = WMSClient(diracx_login_server.url, credentials_file=str(path))
    _expire(path)
    _probe(after)  # the rotation chain is intact: the last refresh token is still good
    assert after.credentials is not None and after.credentials.refreshes == 1


def _assert_login_expired(client: WMSClient, path: Path, call: Callable[[], Any]) -> LoginExpired:
    with pytest.raises(LoginExpired) as info:
        call()
    message = str(info.value)
    assert f"galaxy-dirac login --url {client.url}" in message and str(path) in message, message
    assert info.value.status == 401
    return info.value


def test_reused_refresh_token_ends_the_login(diracx_login_server: DiracxServer, tmp_path: Path) -> None:
    """A stale copy of the file (its refresh token already rotated) is refused, and DiracX revokes the rest."""
    path = tmp_path / "credentials.json"
    stale = login(diracx_login_server, path, user="bob")
    client = WMSClient(diracx_login_server.url, credentials_file=str(path))
    _expire(path)
    _probe(client)
    rotated = path.read_text()
    (tmp_path / "stale.json").write_text(
        json.dumps({"access_token": stale["access_token"], "refresh_token": stale["refresh_token"], "expires_on": 0})
    )
    os.replace(tmp_path / "stale.json", path)
    error = _assert_login_expired(client, path, lambda: client.submit([jdl_text(brackets=False, JobName="x")]))
    assert "reused" in str(error)
    path.write_text(rotated)  # even the good token is gone now: DiracX revoked all of bob's refresh tokens
    _expire(path)
    _assert_login_expired(client, path, lambda: _probe(client))


def test_revoked_login(diracx_login_server: DiracxServer, tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    tokens = login(diracx_login_server, path, user="bob")
    revoked = _browser().post(
        f"{diracx_login_server.url}/api/auth/revoke", data={"token": tokens["refresh_token"], "client_id": CLIENT_ID}
    )
    assert revoked.status_code == 200, revoked.text
    client = WMSClient(diracx_login_server.url, credentials_file=str(path))
    _probe(client)  # the access token itself still works until it expires
    _expire(path)
    _assert_login_expired(client, path, lambda: _probe(client))


def test_missing_login_says_what_to_run(diracx_login_server: DiracxServer, tmp_path: Path) -> None:
    path = tmp_path / "nowhere.json"
    client = WMSClient(diracx_login_server.url, credentials_file=str(path))
    _assert_login_expired(client, path, lambda: _probe(client))


@pytest.mark.slow
def test_real_expiry(diracx_login_server: DiracxServer, tmp_path: Path) -> None:
    """Wait out real 1-minute tokens once: a proactive refresh, a refresh after a 401 (the file claims the token
    is still valid), and a login whose refresh token itself expired (legacy exchange, 1 minute) → LoginExpired."""
    on_time, lied, short = tmp_path / "on_time.json", tmp_path / "lied.json", tmp_path / "short.json"
    login(diracx_login_server, on_time)
    login(diracx_login_server, lied)
    data = json.loads(lied.read_text())
    data["expires_on"] = int(time.time()) + 3600
    lied.write_text(json.dumps(data))
    minted = diracx_login_server.mint("bob", expires_minutes=1)
    short.write_text(
        json.dumps(
            {
                "access_token": minted["access_token"],
                "refresh_token": minted["refresh_token"],
                "expires_on": int(time.time()) + 45,
            }
        )
    )
    clients = {p: WMSClient(diracx_login_server.url, credentials_file=str(p)) for p in (on_time, lied, short)}
    for client in clients.values():
        _probe(client)
        assert client.credentials is not None and client.credentials.refreshes == 0
    latest = max(
        token_claims(json.loads(p.read_text())["refresh_token" if p == short else "access_token"])["exp"]
        for p in clients
    )
    time.sleep(max(0.0, latest - time.time()) + 2)
    for path in (on_time, lied):
        rejected = json.loads(path.read_text())["access_token"]
        probe = requests.Session()
        probe.trust_env = False
        assert (
            probe.post(
                f"{diracx_login_server.url}/api/jobs/search", json={}, headers={"Authorization": f"Bearer {rejected}"}
            ).status_code
            == 401
        )  # really expired
        _probe(clients[path])
        assert clients[path].credentials.refreshes == 1
    _assert_login_expired(clients[short], short, lambda: _probe(clients[short]))
