"""galaxy_dirac.client against the real scheduler process (no Galaxy): what the contract suite does not cover.

Bulk submission, kill, reschedule and sandboxes are in tests/contract/test_client_contract.py, which runs them
against this same scheduler (and a real DiracX); here are errors, token files and refreshable logins.
"""

from __future__ import annotations

import json
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from galaxy_dirac.client import LoginExpired, WMSClient, WMSError
from galaxy_dirac.wms.auth import create_refresh_token
from tests.jdl import jdl_text


def _jdl(tag: str, n: int) -> str:
    return jdl_text(brackets=False, Executable="/bin/echo", Arguments=str(n), JobName=f"{tag}-{n}", JobGroup=tag)


@pytest.fixture
def client(wms_server: Any) -> WMSClient:
    return WMSClient(wms_server.url, wms_server.token("runner", "alice", "galaxy_user"), retries=1, backoff=0.1)


def test_search_follows_pages(client: WMSClient) -> None:
    tag = uuid.uuid4().hex[:8]
    ids = [job["JobID"] for job in client.submit([_jdl(tag, n) for n in range(7)])]
    rows = client.search([{"parameter": "JobGroup", "operator": "eq", "value": tag}], ["JobID"], per_page=3)
    assert [r["JobID"] for r in rows] == ids
    assert set(client.statuses(ids, batch=2)) == set(ids)


def test_errors_are_clear(client: WMSClient, wms_server: Any) -> None:
    with pytest.raises(WMSError) as info:
        client.submit(["this is not a JDL ["])
    assert info.value.status == 400
    bad = WMSClient(wms_server.url, "not.a.jwt", retries=0)
    with pytest.raises(WMSError) as info:
        bad.statuses([1])
    assert info.value.status == 401
    down = WMSClient("http://127.0.0.1:9", "x", retries=1, backoff=0.01)
    with pytest.raises(WMSError, match="cannot reach"):
        down.statuses([1])


def test_token_file_is_reread(wms_server: Any, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("expired\n")
    client = WMSClient(wms_server.url, token_file=str(token_file), retries=0)
    with pytest.raises(WMSError):
        client.statuses([1])
    token_file.write_text(wms_server.token("runner", "alice", "galaxy_user") + "\n")
    assert client.statuses([10**9]) == {}


# -- a refreshable login (credentials file), against the embedded scheduler's refresh grant ----------------------


def _credentials(wms_server: Any, path: Path, *, expires_on: float, access: str = "", refresh: str = "") -> Path:
    token = wms_server.token("runner", "alice", "galaxy_user")
    path.write_text(
        json.dumps(
            {
                "access_token": access or token,
                "refresh_token": refresh or create_refresh_token(wms_server.key, token),
                "expires_on": int(expires_on),
            }
        )
    )
    return path


def test_credentials_file_is_refreshed_atomically(wms_server: Any, tmp_path: Path) -> None:
    (tmp_path / "login").mkdir()
    path = _credentials(wms_server, tmp_path / "login" / "creds.json", expires_on=time.time() - 1)
    before = json.loads(path.read_text())
    inode = path.stat().st_ino
    client = WMSClient(wms_server.url, credentials_file=str(path))
    assert client.statuses([10**9]) == {}
    after = json.loads(path.read_text())
    assert client.credentials is not None and client.credentials.refreshes == 1
    assert after["access_token"] != before["access_token"] and after["refresh_token"] != before["refresh_token"]
    assert after["expires_on"] > time.time() + 60
    assert path.stat().st_ino != inode and stat.S_IMODE(path.stat().st_mode) == 0o600  # replaced, not rewritten
    assert sorted(p.name for p in path.parent.iterdir()) == ["creds.json", "creds.json.lock"]  # no temp file left
    assert client.statuses([10**9]) == {} and client.credentials.refreshes == 1  # fresh: no refresh


def test_a_401_refreshes_once(wms_server: Any, tmp_path: Path) -> None:
    """The file says the token is good for an hour, the server disagrees: one refresh, then the call works."""
    path = _credentials(wms_server, tmp_path / "creds.json", expires_on=time.time() + 3600, access="not.a.jwt")
    client = WMSClient(wms_server.url, credentials_file=str(path))
    assert client.statuses([10**9]) == {}
    assert client.credentials is not None and client.credentials.refreshes == 1


def test_unrefreshable_login_raises_login_expired(wms_server: Any, tmp_path: Path) -> None:
    path = _credentials(wms_server, tmp_path / "creds.json", expires_on=0, refresh="not-a-refresh-token")
    client = WMSClient(wms_server.url, credentials_file=str(path))
    with pytest.raises(LoginExpired) as info:
        client.submit([_jdl("x", 1)])
    assert isinstance(info.value, WMSError) and info.value.status == 401
    assert f"galaxy-dirac login --url {wms_server.url} --group galaxy_user --credentials {path}" in str(info.value)
    missing = WMSClient(wms_server.url, credentials_file=str(tmp_path / "none.json"))
    with pytest.raises(LoginExpired, match="no DiracX login"):
        missing.statuses([1])


def test_one_login_kind_at_a_time(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        WMSClient("http://127.0.0.1:9")
    with pytest.raises(ValueError):
        WMSClient("http://127.0.0.1:9", "tok", credentials_file=str(tmp_path / "c.json"))
