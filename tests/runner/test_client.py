"""galaxy_dirac.client against the real scheduler process (no Galaxy)."""

from __future__ import annotations

import io
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from galaxy_dirac.client import WMSClient, WMSError


def _jdl(tag: str, n: int, extra: str = "") -> str:
    return f'Executable = "/bin/echo"; Arguments = "{n}"; JobName = "{tag}-{n}"; JobGroup = "{tag}";{extra}'


@pytest.fixture
def client(wms_server: Any) -> WMSClient:
    return WMSClient(wms_server.url, wms_server.token("runner", "alice", "galaxy_user"), retries=1, backoff=0.1)


def test_submit_chunks_and_groups_and_keeps_order(client: WMSClient) -> None:
    tag = uuid.uuid4().hex[:8]
    jdls = [_jdl(tag, n, ' Site = "Local.test";' if n % 3 == 0 else "") for n in range(45)]
    jobs = client.submit(jdls)
    assert len(jobs) == 45
    ids = [job["JobID"] for job in jobs]
    assert len(set(ids)) == 45
    rows = client.statuses(ids, ["JobID", "JobName"])
    assert [rows[i]["JobName"] for i in ids] == [f"{tag}-{n}" for n in range(45)]


def test_search_follows_pages(client: WMSClient) -> None:
    tag = uuid.uuid4().hex[:8]
    ids = [job["JobID"] for job in client.submit([_jdl(tag, n) for n in range(7)])]
    rows = client.search([{"parameter": "JobGroup", "operator": "eq", "value": tag}], ["JobID"], per_page=3)
    assert [r["JobID"] for r in rows] == ids
    assert set(client.statuses(ids, batch=2)) == set(ids)


def test_kill_and_reschedule(client: WMSClient) -> None:
    tag = uuid.uuid4().hex[:8]
    first, second = (job["JobID"] for job in client.submit([_jdl(tag, 1), _jdl(tag, 2)]))
    result = client.kill([first])
    assert str(first) in result["success"]
    assert client.statuses([first])[first]["Status"] == "Killed"
    again = client.reschedule([second])
    assert again["success"][str(second)]["RescheduleCounter"] == 1


def test_sandbox_up_and_down(client: WMSClient, tmp_path: Path) -> None:
    payload = f"hello {uuid.uuid4()}\n".encode()
    archive = tmp_path / "sb.tar.bz2"
    with tarfile.open(archive, "w:bz2") as tf:
        info = tarfile.TarInfo("hello.txt")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    pfn = client.upload_sandbox(str(archive))
    assert pfn.startswith("SB:") and client.upload_sandbox(str(archive)) == pfn  # dedup: second upload sends nothing
    assert client.download_sandbox(pfn) == archive.read_bytes()
    job_id = client.submit([f'Executable = "/bin/cat"; Arguments = "hello.txt"; InputSandbox = {{"{pfn}"}};'])[0][
        "JobID"
    ]
    client.request("PATCH", f"api/jobs/{job_id}/sandbox/output", json=pfn)
    (blob,) = client.download_output_sandboxes(job_id)
    assert blob.getvalue() == archive.read_bytes()


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
