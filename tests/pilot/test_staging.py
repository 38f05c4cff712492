"""Manifest staging against a local HTTP server with injected failures."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from galaxy_dirac.pilot.http import Backoff
from galaxy_dirac.pilot.staging import (
    InputFile,
    ManifestError,
    OutputFile,
    StagingError,
    Transfers,
    confined_path,
    load_manifest,
    parse_manifest,
)

DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()


def transfers(**kwargs) -> Transfers:
    kwargs.setdefault("retries", 3)
    return Transfers(backoff=Backoff(base=0.01, cap=0.02), timeout=10, **kwargs)


def test_download_retries_after_503(file_server, tmp_path):
    store = file_server.store
    store.files["/a.dat"] = DATA
    store.plan["/a.dat"] = ["503", "503"]
    size = transfers().download(InputFile(file_server.url + "/a.dat", "in/a.dat", size=len(DATA), sha256=SHA), tmp_path)
    assert size == len(DATA)
    assert (tmp_path / "in" / "a.dat").read_bytes() == DATA
    assert [r.method for r in file_server.requests] == ["GET", "GET", "GET"]
    assert not (tmp_path / "in" / "a.dat.part").exists()


def test_dropped_connection_is_resumed_with_range(file_server, tmp_path):
    store = file_server.store
    store.files["/a.dat"] = DATA
    store.plan["/a.dat"] = ["drop"]
    transfers().download(InputFile(file_server.url + "/a.dat", "a.dat", sha256=SHA), tmp_path)
    assert (tmp_path / "a.dat").read_bytes() == DATA
    first, second = file_server.requests
    assert "range" not in first.headers
    assert second.headers["range"] == f"bytes={len(DATA) // 2}-"


def test_dropped_connection_restarts_without_range_support(file_server, tmp_path):
    store = file_server.store
    store.range_support = False
    store.files["/a.dat"] = DATA
    store.plan["/a.dat"] = ["drop"]
    transfers().download(InputFile(file_server.url + "/a.dat", "a.dat", size=len(DATA), sha256=SHA), tmp_path)
    assert (tmp_path / "a.dat").read_bytes() == DATA
    assert len(file_server.requests) == 2


def test_checksum_mismatch_is_detected_and_retried(file_server, tmp_path):
    store = file_server.store
    store.files["/a.dat"] = DATA
    store.plan["/a.dat"] = ["corrupt"]
    transfers().download(InputFile(file_server.url + "/a.dat", "a.dat", sha256=SHA), tmp_path)
    assert (tmp_path / "a.dat").read_bytes() == DATA
    assert len(file_server.requests) == 2


def test_persistent_checksum_mismatch_fails(file_server, tmp_path):
    store = file_server.store
    store.files["/a.dat"] = DATA
    store.plan["/a.dat"] = ["corrupt"] * 10
    spec = InputFile(file_server.url + "/a.dat", "a.dat", sha256=SHA)
    with pytest.raises(StagingError) as caught:
        transfers(retries=2).stage_in([spec], tmp_path)
    assert "sha256 mismatch" in caught.value.failures["a.dat"]
    assert not (tmp_path / "a.dat").exists()
    assert not (tmp_path / "a.dat.part").exists()


def test_size_mismatch_fails(file_server, tmp_path):
    file_server.store.files["/a.dat"] = DATA
    spec = InputFile(file_server.url + "/a.dat", "a.dat", size=len(DATA) + 1)
    with pytest.raises(StagingError, match="size mismatch"):
        transfers(retries=1).stage_in([spec], tmp_path)


def test_not_found_is_not_retried(file_server, tmp_path):
    with pytest.raises(StagingError, match="404"):
        transfers().stage_in([InputFile(file_server.url + "/missing", "m")], tmp_path)
    assert len(file_server.requests) == 1


def test_stage_in_many_with_bounded_concurrency(file_server, tmp_path):
    store = file_server.store
    store.delay = 0.1
    specs = []
    for n in range(8):
        store.files[f"/f{n}"] = bytes([n]) * 1000
        specs.append(InputFile(f"{file_server.url}/f{n}", f"d/f{n}", size=1000))
    result = transfers(concurrency=3).stage_in(specs, tmp_path)
    assert result == {f"d/f{n}": 1000 for n in range(8)}
    assert 1 < store.max_active <= 3


def test_upload_put_and_multipart_post(file_server, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.txt").write_bytes(b"alpha")
    (tmp_path / "out" / "b.txt").write_bytes(b"beta" * 1000)
    outputs = [
        OutputFile(file_server.url + "/put/a", "out/a.txt", method="PUT", headers={"X-Key": "s"}),
        OutputFile(
            file_server.url + "/post/b", "out/b.txt", method="POST", field="upload", fields={"path": "/x/b.txt"}
        ),
        OutputFile(file_server.url + "/put/c", "out/c.txt", optional=True),
    ]
    file_server.store.plan["/post/b"] = ["503"]
    result = transfers().stage_out(outputs, tmp_path)
    assert result == {"out/a.txt": 5, "out/b.txt": 4000, "out/c.txt": None}
    uploads = file_server.store.uploads
    assert uploads["/put/a"] == b"alpha"
    assert uploads["/post/b"] == {"path": "/x/b.txt", "upload": ("b.txt", b"beta" * 1000)}
    put = [r for r in file_server.requests if r.path == "/put/a"][0]
    assert put.headers["x-key"] == "s"


def test_missing_required_output_fails(file_server, tmp_path):
    with pytest.raises(StagingError, match="was not produced"):
        transfers().stage_out([OutputFile(file_server.url + "/p", "nope.txt")], tmp_path)


def test_manifest_parsing_and_validation(tmp_path):
    manifest = {
        "headers": {"Authorization": "Bearer x"},
        "inputs": [{"url": "https://g/api/jobs/1/files?path=a", "path": "inputs/a", "size": 3, "sha256": SHA}],
        "outputs": [{"url": "https://g/o", "path": "o", "method": "post", "optional": True}],
    }
    path = tmp_path / "galaxy_dirac_manifest.json"
    path.write_text(json.dumps(manifest))
    parsed = load_manifest(str(path))
    assert parsed.inputs[0].headers == {"Authorization": "Bearer x"}
    assert parsed.outputs[0].method == "POST" and parsed.outputs[0].field == "file" and parsed.outputs[0].optional
    for bad in ("../x", "/etc/passwd", "a/../../x", "", "a//b"):
        with pytest.raises(ManifestError):
            parse_manifest({"inputs": [{"url": "http://h/x", "path": bad}]})
    with pytest.raises(ManifestError, match="http"):
        parse_manifest({"inputs": [{"url": "file:///etc/passwd", "path": "x"}]})
    with pytest.raises(ManifestError, match="PUT or POST"):
        parse_manifest({"outputs": [{"url": "http://h/x", "path": "x", "method": "DELETE"}]})


def test_paths_cannot_escape_through_symlinks(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    job = tmp_path / "job"
    job.mkdir()
    (job / "link").symlink_to(outside)
    with pytest.raises(ManifestError, match="leaves the job directory"):
        confined_path(str(job), "link/file", create_parents=True)
    (job / "file-link").symlink_to(outside / "x")
    with pytest.raises(ManifestError, match="symbolic link"):
        confined_path(str(job), "file-link")
