"""The scheduler's content-addressed sandbox store on disk, and signed transfer tickets.

A sandbox is stored once under its key, ``sha256:<hex>.<format>``, the last path component of DiracX's sandbox
pfns. Bytes only become visible under a key after their size and sha256 have been checked, so a key always names
exactly its content and concurrent uploads of the same content are harmless. The database side (sb_SandBoxes,
sb_EntityMapping: which owner and job see which sandbox) lives elsewhere; this module never touches the DB.

Uploads and downloads go through short-lived HMAC-signed tickets embedded in URLs (like S3 presigned URLs), so the
byte-transfer routes need no bearer token.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import hmac
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterator, Optional, Tuple, Union

from galaxy_dirac.archive import ARCHIVE_FORMATS

from .errors import InsufficientStorage, Invalid, NotFound, TooLarge

DEFAULT_MAX_SIZE = 100 * 1024 * 1024
CHECKSUM_ALGORITHM = "sha256"
TICKET_ACTIONS = ("upload", "download")
_CHUNK = 1024 * 1024
_MAX_TICKET_LENGTH = 8192
_KEY_RE = re.compile(r"sha256:([0-9a-f]{64})\.(" + "|".join(re.escape(f) for f in ARCHIVE_FORMATS) + r")")
_INCOMING = ".incoming"


class SandboxError(Invalid):
    """Base class for everything the store refuses (a 400 unless a subclass says otherwise; also a ValueError)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)


class BadSandboxKey(SandboxError):
    """A key that is not ``sha256:<64 lowercase hex>.<format>`` (this also rules out any path traversal)."""


class SandboxNotFound(NotFound, SandboxError, FileNotFoundError):
    """No sandbox is stored under that key."""


class SandboxTooLarge(TooLarge, SandboxError):
    """More bytes than declared, or than the store accepts; reading stopped as soon as this was known."""


class SandboxSizeMismatch(SandboxError):
    """The stream ended before the declared size was reached."""


class SandboxChecksumMismatch(SandboxError):
    """The bytes do not hash to the checksum in the key."""


class BadTicket(SandboxError):
    """A transfer ticket that is malformed, badly signed, expired, or for another action."""


class SandboxStoreFull(InsufficientStorage):
    """The store's disk has no room for the upload; nothing of it is left behind."""


# ------------------------------------------------------------------------------------------------------------ keys


def parse_key(key: str) -> Tuple[str, str, str]:
    """Split a key into (algorithm, hex, format), refusing anything else so keys can safely become file names."""
    match = _KEY_RE.fullmatch(key) if isinstance(key, str) else None
    if match is None:
        raise BadSandboxKey(
            f"bad sandbox key {key!r}: expected 'sha256:<64 lowercase hex digits>.<format>' with format one of "
            f"{', '.join(ARCHIVE_FORMATS)}"
        )
    return CHECKSUM_ALGORITHM, match.group(1), match.group(2)


def key_for(checksum_algorithm: str, checksum: str, fmt: str) -> str:
    """Build the key for a sandbox from what a client declares (the body of ``POST /api/jobs/sandbox``)."""
    if checksum_algorithm != CHECKSUM_ALGORITHM:
        raise BadSandboxKey(f"unsupported checksum algorithm {checksum_algorithm!r}; only sha256 is accepted")
    if fmt not in ARCHIVE_FORMATS:
        raise BadSandboxKey(f"unsupported sandbox format {fmt!r}; expected one of {', '.join(ARCHIVE_FORMATS)}")
    key = f"{checksum_algorithm}:{checksum}.{fmt}"
    parse_key(key)  # checks the hex part
    return key


def key_from_pfn(pfn: str) -> str:
    """Take the key out of a DiracX-style pfn (``SB:SandboxSE|/S3/<bucket>/<vo>/<group>/<owner>/<key>``)."""
    if not isinstance(pfn, str):
        raise BadSandboxKey(f"bad sandbox pfn {pfn!r}")
    key = pfn.rsplit("/", 1)[-1]
    parse_key(key)
    return key


# ----------------------------------------------------------------------------------------------------------- store


class SandboxStore:
    """Content-addressed files under ``root/<hex[0:2]>/<hex[2:4]>/<key>``; uploads are staged in ``root/.incoming``
    (same filesystem, so the final rename is atomic)."""

    def __init__(self, root: Union[str, Path], max_size: int = DEFAULT_MAX_SIZE) -> None:
        if not isinstance(max_size, int) or isinstance(max_size, bool) or max_size <= 0:
            raise ValueError(f"max_size must be a positive integer, not {max_size!r}")
        self.root = Path(root)
        self.max_size = max_size
        self._incoming = self.root / _INCOMING
        self._incoming.mkdir(parents=True, exist_ok=True)

    # The module-level helpers, also reachable from the store for callers that only hold a store.
    key_for = staticmethod(key_for)
    parse_key = staticmethod(parse_key)

    def path_for(self, key: str) -> Path:
        """Where the sandbox with this key lives (whether or not it exists yet)."""
        _, hexdigest, _ = parse_key(key)
        return self.root / hexdigest[:2] / hexdigest[2:4] / key

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self.path_for(key).stat().st_size
        except FileNotFoundError:
            raise SandboxNotFound(f"no sandbox {key}") from None

    def open(self, key: str) -> BinaryIO:
        """Open a stored sandbox for reading (the caller closes it)."""
        try:
            return self.path_for(key).open("rb")
        except FileNotFoundError:
            raise SandboxNotFound(f"no sandbox {key}") from None

    def delete(self, key: str) -> bool:
        """Remove a sandbox; returns False if it was not there. Shard directories are kept (no rmdir races with
        concurrent writers)."""
        try:
            self.path_for(key).unlink()
        except FileNotFoundError:
            return False
        return True

    def keys(self) -> Iterator[str]:
        """Every stored key, for retention cleaning and orphan checks."""
        for path in self.root.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/sha256:*"):
            if _KEY_RE.fullmatch(path.name):
                yield path.name

    def write(self, key: str, stream: BinaryIO, expected_size: int, *, prove: bool = False) -> Path:
        """Store the bytes read from stream under key and return the final path.

        Reads at most min(expected_size, max_size) + 1 bytes: as soon as the stream yields more than declared,
        SandboxTooLarge is raised without reading the rest. Size and sha256 are verified before an atomic rename
        makes the file visible. Content already stored is not read again unless ``prove`` is set: then the stream
        must still hash to the key (an uploader proves it holds the bytes, so knowing a checksum is not enough); a
        concurrent writer of the same key that finished first wins and our identical copy is dropped. A full disk
        raises SandboxStoreFull and leaves no partial file.
        """
        _, hexdigest, _ = parse_key(key)
        if not isinstance(expected_size, int) or isinstance(expected_size, bool) or expected_size < 0:
            raise SandboxSizeMismatch(f"declared size must be a non-negative integer, not {expected_size!r}")
        if expected_size > self.max_size:
            raise SandboxTooLarge(
                f"sandbox {key} declares {expected_size} bytes; this store accepts at most {self.max_size}"
            )
        final = self.path_for(key)
        if final.is_file():
            if prove:
                _verify(key, hexdigest, stream, expected_size)
            return final
        try:
            return self._write_new(key, hexdigest, final, stream, expected_size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SandboxStoreFull(
                    f"the sandbox store has no room for sandbox {key} ({expected_size} bytes): {exc.strerror}"
                ) from exc
            raise

    def _write_new(self, key: str, hexdigest: str, final: Path, stream: BinaryIO, expected_size: int) -> Path:
        self._incoming.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._incoming, prefix=hexdigest[:16] + "-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                _checked_copy(key, hexdigest, stream, expected_size, out.write)
                out.flush()
                os.fsync(out.fileno())
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.is_file():  # someone else stored the same content meanwhile
                os.unlink(tmp)
            else:
                os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return final

    def purge_incoming(self, older_than: float = 3600.0) -> int:
        """Remove upload leftovers (a scheduler killed mid-upload) older than `older_than` seconds; returns count."""
        limit = time.time() - older_than
        removed = 0
        for path in self._incoming.glob("*.part"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < limit:
                    path.unlink()
                    removed += 1
        return removed


def _verify(key: str, hexdigest: str, stream: BinaryIO, expected_size: int) -> None:
    """Read and hash a stream without storing it (the content is stored already), with write()'s size checks."""
    _checked_copy(key, hexdigest, stream, expected_size, lambda _chunk: None)


def _checked_copy(
    key: str, hexdigest: str, stream: BinaryIO, expected_size: int, sink: Callable[[bytes], object]
) -> None:
    """Feed ``stream`` to ``sink`` in chunks, refusing more or fewer than ``expected_size`` bytes, or other bytes."""
    digest = hashlib.sha256()
    received = 0
    while True:
        chunk = stream.read(min(_CHUNK, expected_size + 1 - received))
        if not chunk:
            break
        received += len(chunk)
        if received > expected_size:
            raise SandboxTooLarge(f"sandbox {key} sent more than its declared {expected_size} bytes; upload refused")
        digest.update(chunk)
        sink(chunk)
    if received != expected_size:
        raise SandboxSizeMismatch(f"sandbox {key}: received {received} bytes, {expected_size} were declared")
    if digest.hexdigest() != hexdigest:
        raise SandboxChecksumMismatch(
            f"sandbox {key}: content has sha256 {digest.hexdigest()}, not the declared {hexdigest}"
        )


# --------------------------------------------------------------------------------------------------------- tickets

_RESERVED = {"v", "key", "action", "iat", "exp", "size", "checksum", "checksum_algorithm"}


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not url-safe base64")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _ticket_mac(secret: bytes, body: str) -> bytes:
    """HMAC under a key derived for tickets only, so nothing signed with the same secret for another purpose
    (bearer JWTs) can ever pass as a ticket."""
    if not isinstance(secret, bytes) or not secret:
        raise ValueError("the ticket secret must be non-empty bytes")
    subkey = hmac.new(secret, b"galaxy-dirac sandbox ticket v1", hashlib.sha256).digest()
    return hmac.new(subkey, body.encode("ascii"), hashlib.sha256).digest()


def make_ticket(
    secret: bytes,
    key: str,
    action: str,
    expires_in: int,
    extra: Optional[Dict[str, Any]] = None,
    *,
    now: Optional[float] = None,
) -> str:
    """Sign a ticket allowing one action on one sandbox key until now + expires_in seconds.

    Upload tickets must carry the declared size as ``extra["size"]``; the checksum comes from the key. Other
    JSON-serialisable extra fields (job id, owner...) are signed along and returned by read_ticket.
    """
    if action not in TICKET_ACTIONS:
        raise ValueError(f"ticket action must be one of {TICKET_ACTIONS}, not {action!r}")
    algorithm, hexdigest, _ = parse_key(key)
    if not isinstance(expires_in, int) or isinstance(expires_in, bool) or expires_in <= 0:
        raise ValueError(f"expires_in must be a positive number of seconds, not {expires_in!r}")
    extra = dict(extra or {})
    issued = int(time.time() if now is None else now)
    payload: Dict[str, Any] = {"v": 1, "key": key, "action": action, "iat": issued, "exp": issued + expires_in}
    if action == "upload":
        size = extra.pop("size", None)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"an upload ticket needs extra['size'] as a non-negative integer, not {size!r}")
        payload.update(size=size, checksum_algorithm=algorithm, checksum=hexdigest)
    clash = sorted(set(extra) & _RESERVED)
    if clash:
        raise ValueError(f"extra ticket fields may not override {', '.join(clash)}")
    payload.update(extra)
    body = _b64encode(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    return body + "." + _b64encode(_ticket_mac(secret, body))


def read_ticket(secret: bytes, ticket: str, action: str, *, now: Optional[float] = None) -> Dict[str, Any]:
    """Verify a ticket for `action` and return its payload (key, action, iat, exp, and for uploads size,
    checksum_algorithm, checksum, plus any extra fields). Raises BadTicket otherwise."""
    if not isinstance(ticket, str) or len(ticket) > _MAX_TICKET_LENGTH or ticket.count(".") != 1:
        raise BadTicket("malformed sandbox ticket")
    body, signature = ticket.split(".")
    try:
        given = _b64decode(signature)
    except (ValueError, binascii.Error):
        raise BadTicket("malformed sandbox ticket signature") from None
    if not hmac.compare_digest(given, _ticket_mac(secret, body)):
        raise BadTicket("bad sandbox ticket signature")
    try:
        payload = json.loads(_b64decode(body).decode("utf-8"))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadTicket("malformed sandbox ticket payload") from None
    if not isinstance(payload, dict) or payload.get("v") != 1:
        raise BadTicket("unsupported sandbox ticket version")
    if payload.get("action") != action:
        raise BadTicket(f"this ticket allows {payload.get('action')!r}, not {action!r}")
    expires = payload.get("exp")
    if not isinstance(expires, int) or (time.time() if now is None else now) >= expires:
        raise BadTicket("sandbox ticket expired")
    try:
        parse_key(payload.get("key"))  # type: ignore[arg-type]
    except BadSandboxKey:
        raise BadTicket("sandbox ticket names an invalid key") from None
    return payload


__all__ = [
    "CHECKSUM_ALGORITHM",
    "DEFAULT_MAX_SIZE",
    "BadSandboxKey",
    "BadTicket",
    "SandboxChecksumMismatch",
    "SandboxError",
    "SandboxNotFound",
    "SandboxSizeMismatch",
    "SandboxStore",
    "SandboxStoreFull",
    "SandboxTooLarge",
    "key_for",
    "key_from_pfn",
    "make_ticket",
    "parse_key",
    "read_ticket",
]
