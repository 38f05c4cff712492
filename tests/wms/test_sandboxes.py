"""galaxy_dirac.wms.sandboxes: the content-addressed store verifies before publishing, stops reading oversized
uploads early, deduplicates, survives concurrent writers, and its keys and tickets cannot be forged or abused."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading

import pytest

from galaxy_dirac.wms.sandboxes import (
    BadSandboxKey,
    BadTicket,
    SandboxChecksumMismatch,
    SandboxError,
    SandboxNotFound,
    SandboxSizeMismatch,
    SandboxStore,
    SandboxTooLarge,
    key_for,
    key_from_pfn,
    make_ticket,
    read_ticket,
)

DATA = b"sandbox bytes " * 1000
HEX = hashlib.sha256(DATA).hexdigest()
KEY = f"sha256:{HEX}.tar.bz2"
SECRET = b"s3cret-for-tests-only"


@pytest.fixture
def store(tmp_path):
    return SandboxStore(tmp_path / "sb", max_size=1024 * 1024)


def incoming(store):
    return list((store.root / ".incoming").iterdir())


# ----------------------------------------------------------------------------------------------------------- keys


def test_key_for_and_path(store):
    assert store.key_for("sha256", HEX, "tar.bz2") == KEY == key_for("sha256", HEX, "tar.bz2")
    path = store.path_for(KEY)
    assert path == store.root / HEX[:2] / HEX[2:4] / KEY
    assert key_from_pfn(f"SB:SandboxSE|/S3/bucket/vo/group/owner/{KEY}") == KEY


@pytest.mark.parametrize(
    "args",
    [
        ("md5", HEX, "tar.bz2"),
        ("sha256", HEX.upper(), "tar.bz2"),
        ("sha256", HEX[:-1], "tar.bz2"),
        ("sha256", HEX + "0", "tar.bz2"),
        ("sha256", HEX, "rar"),
        ("sha256", HEX, "tar.bz2/../../x"),
        ("sha256", "../" + HEX[3:], "tar"),
    ],
)
def test_key_for_rejects(store, args):
    with pytest.raises(BadSandboxKey):
        store.key_for(*args)


@pytest.mark.parametrize(
    "key",
    [
        "../../etc/passwd",
        f"sha256:{HEX}.tar.bz2/../../x",
        f"sha256:{HEX}.tar.bz2\n",
        f"/sha256:{HEX}.tar",
        f"sha256:{HEX[:62]}/..tar",
        f"sha256:{HEX}.zip\x00",
        "",
        None,
    ],
)
def test_traversal_keys_rejected_everywhere(store, key):
    for call in (store.path_for, store.exists, store.open, store.delete, store.size):
        with pytest.raises(BadSandboxKey):
            call(key)
    with pytest.raises(BadSandboxKey):
        store.write(key, io.BytesIO(DATA), len(DATA))


@pytest.mark.parametrize("pfn", ["SB:SandboxSE|/S3/b/../../etc/passwd", f"SB:SandboxSE|/S3/b/{KEY}/..", None, ""])
def test_bad_pfn(pfn):
    with pytest.raises(BadSandboxKey):
        key_from_pfn(pfn)


# ---------------------------------------------------------------------------------------------------------- store


def test_write_read_delete(store):
    assert not store.exists(KEY)
    path = store.write(KEY, io.BytesIO(DATA), len(DATA))
    assert path == store.path_for(KEY) and store.exists(KEY)
    assert store.size(KEY) == len(DATA)
    with store.open(KEY) as fh:
        assert fh.read() == DATA
    assert list(store.keys()) == [KEY]
    assert incoming(store) == []
    assert store.delete(KEY) is True
    assert store.delete(KEY) is False
    with pytest.raises(SandboxNotFound):
        store.open(KEY)
    with pytest.raises(FileNotFoundError):  # SandboxNotFound is also a FileNotFoundError
        store.size(KEY)


def test_dedup_does_not_read_again(store):
    store.write(KEY, io.BytesIO(DATA), len(DATA))
    stream = io.BytesIO(DATA)
    assert store.write(KEY, stream, len(DATA)) == store.path_for(KEY)
    assert stream.tell() == 0
    assert incoming(store) == []


def test_checksum_mismatch(store):
    wrong = DATA[:-1] + b"!"
    with pytest.raises(SandboxChecksumMismatch, match="sha256"):
        store.write(KEY, io.BytesIO(wrong), len(wrong))
    assert not store.exists(KEY)
    assert incoming(store) == []


def test_short_stream(store):
    with pytest.raises(SandboxSizeMismatch, match="received 100 bytes"):
        store.write(KEY, io.BytesIO(DATA[:100]), len(DATA))
    assert not store.exists(KEY) and incoming(store) == []


class EndlessStream:
    """Would deliver gigabytes; counts what was actually read."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def read(self, n: int = -1) -> bytes:
        assert 0 < n <= 4 * 1024 * 1024, "the store must always ask for a bounded amount"
        self.read_bytes += n
        return b"\0" * n


def test_too_large_stops_reading_early(store):
    declared = 10_000
    stream = EndlessStream()
    with pytest.raises(SandboxTooLarge, match="more than its declared 10000"):
        store.write(KEY, stream, declared)
    assert stream.read_bytes <= declared + 1
    assert incoming(store) == []


def test_declared_over_store_limit_reads_nothing(store):
    stream = EndlessStream()
    with pytest.raises(SandboxTooLarge, match="at most"):
        store.write(KEY, stream, store.max_size + 1)
    assert stream.read_bytes == 0


def test_errors_are_value_errors(store):
    for cls in (SandboxTooLarge, SandboxChecksumMismatch, SandboxSizeMismatch, BadTicket, BadSandboxKey):
        assert issubclass(cls, SandboxError) and issubclass(cls, ValueError)
    with pytest.raises(SandboxError):
        store.write(KEY, io.BytesIO(DATA), -1)


def test_concurrent_writers_same_key(store):
    start = threading.Barrier(8)
    results, errors = [], []

    def writer() -> None:
        try:
            start.wait()
            results.append(store.write(KEY, io.BytesIO(DATA), len(DATA)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert set(results) == {store.path_for(KEY)}
    assert store.path_for(KEY).read_bytes() == DATA
    assert incoming(store) == []


def test_purge_incoming(store):
    leftover = store.root / ".incoming" / "abc-x.part"
    leftover.write_bytes(b"partial")
    assert store.purge_incoming(older_than=3600) == 0
    assert store.purge_incoming(older_than=-1) == 1
    assert not leftover.exists()


def test_invalid_max_size(tmp_path):
    with pytest.raises(ValueError):
        SandboxStore(tmp_path, max_size=0)


# -------------------------------------------------------------------------------------------------------- tickets


def test_upload_ticket_round_trip():
    ticket = make_ticket(SECRET, KEY, "upload", 60, {"size": len(DATA), "job_id": 7}, now=1000)
    payload = read_ticket(SECRET, ticket, "upload", now=1030)
    assert payload["key"] == KEY and payload["size"] == len(DATA) and payload["job_id"] == 7
    assert (payload["checksum_algorithm"], payload["checksum"]) == ("sha256", HEX)
    assert payload["exp"] == 1060
    assert all(c.isalnum() or c in "-_." for c in ticket)  # goes into a URL path as is


def test_download_ticket_round_trip():
    ticket = make_ticket(SECRET, KEY, "download", 60)
    assert read_ticket(SECRET, ticket, "download")["key"] == KEY


def test_ticket_wrong_action():
    ticket = make_ticket(SECRET, KEY, "download", 60)
    with pytest.raises(BadTicket, match="not 'upload'"):
        read_ticket(SECRET, ticket, "upload")


def test_ticket_expired():
    ticket = make_ticket(SECRET, KEY, "download", 60, now=1000)
    with pytest.raises(BadTicket, match="expired"):
        read_ticket(SECRET, ticket, "download", now=1060)


def test_ticket_wrong_secret():
    ticket = make_ticket(SECRET, KEY, "download", 60)
    with pytest.raises(BadTicket, match="signature"):
        read_ticket(b"another secret", ticket, "download")


def test_ticket_tampered_payload():
    ticket = make_ticket(SECRET, KEY, "upload", 60, {"size": 10})
    body, sig = ticket.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["size"] = 10**12
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    with pytest.raises(BadTicket, match="signature"):
        read_ticket(SECRET, forged + "." + sig, "upload")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    with pytest.raises(BadTicket):
        read_ticket(SECRET, body + "." + flipped, "upload")


@pytest.mark.parametrize("junk", ["", "no-dot", "a.b.c", "!!!.???", "x" * 10000, None])
def test_ticket_malformed(junk):
    with pytest.raises(BadTicket):
        read_ticket(SECRET, junk, "download")


def test_make_ticket_validation():
    with pytest.raises(ValueError, match="size"):
        make_ticket(SECRET, KEY, "upload", 60)
    with pytest.raises(ValueError, match="override"):
        make_ticket(SECRET, KEY, "download", 60, {"exp": 10**12})
    with pytest.raises(ValueError):
        make_ticket(SECRET, KEY, "delete", 60)
    with pytest.raises(ValueError):
        make_ticket(SECRET, KEY, "download", 0)
    with pytest.raises(ValueError):
        make_ticket(b"", KEY, "download", 60)
    with pytest.raises(BadSandboxKey):
        make_ticket(SECRET, "../../etc/passwd", "download", 60)
