"""Sandbox archives: extraction that refuses hostile members, and deterministic creation.

Standard library only and Python >= 3.8, because this module is also shipped to worker nodes inside the pilot.

Input sandboxes come from users and output sandboxes from payloads, so neither is trusted: `safe_extract` reads and
checks every member before it writes a single byte, and refuses anything that is not a plain file or directory
inside the destination. `create_archive` writes byte-identical archives for identical content (sorted members, zero
times and owners), because the sandbox store is content-addressed and deduplicates on the sha256.
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import hashlib
import lzma
import os
import re
import stat
import tarfile
import tempfile
import zipfile
import zlib
from typing import IO, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

StrPath = Union[str, "os.PathLike[str]"]

#: Formats we write and read, by the suffix DIRAC/DiracX use in sandbox names.
ARCHIVE_FORMATS = ("tar.bz2", "tar.gz", "tar.xz", "tar", "zip")
DEFAULT_MAX_TOTAL_BYTES = 10 * 1024**3
DEFAULT_MAX_MEMBERS = 100_000

_CHUNK = 1024 * 1024
# tarfile reads a whole pax/GNU long-name header with one read(); a bigger one can only be an attack on memory.
_MAX_HEADER_READ = 32 * 1024 * 1024
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_DATA_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, tarfile.TarError, zipfile.BadZipFile)
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class ArchiveError(ValueError):
    """Base class: the archive cannot be used (ValueError, so callers that only know ValueError still catch it)."""


class UnsafeArchiveError(ArchiveError):
    """A member (or a path to archive) that we refuse, with the member's name and the reason."""

    def __init__(self, member: str, reason: str) -> None:
        self.member = member
        self.reason = reason
        super().__init__(f"unsafe archive member {member!r}: {reason}")

    def __reduce__(self):  # keep it picklable despite the two-argument constructor
        return (type(self), (self.member, self.reason))


class CorruptArchiveError(ArchiveError):
    """The archive is not a readable tar/zip, or its data is damaged (bad CRC, truncated stream)."""


# --------------------------------------------------------------------------------------------------------- helpers


def sha256_file(path: StrPath) -> Tuple[str, int]:
    """Return (sha256 hex, size) of a file, reading it in chunks so sandboxes of any size fit in memory."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _clean_name(name: str) -> str:
    """Normalise a member name to a relative posix path ('' for the root itself) or raise UnsafeArchiveError.

    Backslashes count as separators for the '..' check because Windows-made zips use them.
    """
    if not name:
        raise UnsafeArchiveError(name, "empty name")
    if "\x00" in name:
        raise UnsafeArchiveError(name, "name contains a NUL byte")
    if name.startswith(("/", "\\")) or _DRIVE_RE.match(name):
        raise UnsafeArchiveError(name, "absolute path")
    if ".." in re.split(r"[/\\]", name):
        raise UnsafeArchiveError(name, "'..' path component")
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def _inside(path: str, root: str) -> bool:
    """True when the (already resolved) path is root or below it."""
    return path == root or os.path.commonpath([path, root]) == root


def _file_mode(mode: int) -> int:
    """Sanitised permissions: drop setuid/setgid/sticky and group/other write, keep only the executable bit."""
    return 0o755 if mode & 0o111 else 0o644


class _Member(NamedTuple):
    raw: str  # name as stored in the archive (for messages)
    name: str  # normalised relative posix path
    is_dir: bool
    size: int
    mode: int
    ref: object  # TarInfo or ZipInfo


# -------------------------------------------------------------------------------------------------------- reading


class _GuardedReader:
    """File wrapper handed to tarfile: refuses the giant single reads a hostile extended header would cause."""

    def __init__(self, fileobj: IO[bytes]) -> None:
        self._f = fileobj
        self.name = None

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > _MAX_HEADER_READ:
            raise UnsafeArchiveError("<tar header>", f"extended header larger than {_MAX_HEADER_READ} bytes")
        return self._f.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


def _check_count_and_size(raw: str, count: int, total: int, max_members: int, max_total_bytes: int) -> None:
    if count > max_members:
        raise UnsafeArchiveError(raw, f"archive has more than {max_members} members")
    if total > max_total_bytes:
        raise UnsafeArchiveError(raw, f"total uncompressed size exceeds the limit of {max_total_bytes} bytes")


def _tar_members(tf: tarfile.TarFile, max_members: int, max_total_bytes: int) -> List[_Member]:
    """Read and check tar headers one by one, stopping at the first member over a limit (so a bomb is never
    decompressed past the limit: tarfile only skips a member's data when asked for the next header)."""
    members: List[_Member] = []
    total = 0
    while True:
        try:
            info = tf.next()
        except tarfile.TarError as exc:
            raise CorruptArchiveError(f"unreadable tar header after {len(members)} members: {exc}") from exc
        if info is None:
            return members
        raw = info.name
        name = _clean_name(raw)
        if info.issym():
            raise UnsafeArchiveError(raw, f"symbolic link (to {info.linkname!r}); links are not extracted")
        if info.islnk():
            raise UnsafeArchiveError(raw, f"hard link (to {info.linkname!r}); links are not extracted")
        if info.ischr() or info.isblk():
            raise UnsafeArchiveError(raw, "device file; only regular files and directories are extracted")
        if info.isfifo():
            raise UnsafeArchiveError(raw, "FIFO; only regular files and directories are extracted")
        if not (info.isreg() or info.isdir()):
            raise UnsafeArchiveError(raw, f"unsupported member type {info.type!r}")
        if info.size < 0:
            raise UnsafeArchiveError(raw, "negative size")
        size = info.size if info.isreg() else 0
        total += size
        _check_count_and_size(raw, len(members) + 1, total, max_members, max_total_bytes)
        members.append(_Member(raw, name, info.isdir(), size, info.mode, info))


def _data_filter_opinion(members: Sequence[_Member], dest_real: str) -> None:
    """Python's own extraction rules (tarfile.data_filter: 3.12 and security backports) as a second opinion, after
    our checks so their more specific messages win. Our checks already refuse everything it refuses."""
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is None:
        return
    for m in members:
        try:
            data_filter(m.ref, dest_real)
        except tarfile.FilterError as exc:
            raise UnsafeArchiveError(m.raw, f"refused by tarfile's data filter: {exc}") from exc


def _zip_members(zf: zipfile.ZipFile, max_members: int, max_total_bytes: int) -> List[_Member]:
    """Check zip central-directory entries; zipfile never yields more bytes than file_size, so the sum is a bound."""
    infos = zf.infolist()
    if len(infos) > max_members:
        raise UnsafeArchiveError(infos[max_members].filename, f"archive has more than {max_members} members")
    members: List[_Member] = []
    total = 0
    for info in infos:
        raw = info.filename
        name = _clean_name(raw)
        if "\\" in raw:
            raise UnsafeArchiveError(raw, "backslash in name (Windows path separator)")
        unix_mode = info.external_attr >> 16
        kind = stat.S_IFMT(unix_mode)
        if kind == stat.S_IFLNK:
            raise UnsafeArchiveError(raw, "symbolic link; links are not extracted")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError(raw, "special file; only regular files and directories are extracted")
        is_dir = raw.endswith("/") or kind == stat.S_IFDIR
        if info.flag_bits & 0x1:
            raise UnsafeArchiveError(raw, "encrypted member")
        if info.compress_type not in _ZIP_METHODS:
            raise UnsafeArchiveError(raw, f"unsupported compression method {info.compress_type}")
        size = 0 if is_dir else info.file_size
        total += size
        _check_count_and_size(raw, len(members) + 1, total, max_members, max_total_bytes)
        mode = unix_mode if info.create_system == 3 else 0o644
        members.append(_Member(raw, name, is_dir, size, mode, info))
    return members


def _check_layout(members: Sequence[_Member], dest_real: str) -> None:
    """Refuse members that clash with each other or with what is already in dest (escape through an existing
    symlink, file where a directory is needed and vice versa), so extraction cannot fail half-way for these."""
    files: Dict[str, _Member] = {}
    dirs: Dict[str, _Member] = {}
    for m in members:
        if m.name == "":
            if m.is_dir:
                continue  # "./" entry: the destination itself
            raise UnsafeArchiveError(m.raw, "file entry names the destination directory itself")
        parts = m.name.split("/")
        for i in range(1, len(parts)):
            dirs.setdefault("/".join(parts[:i]), m)
        if m.is_dir:
            dirs.setdefault(m.name, m)
        elif m.name in files:
            raise UnsafeArchiveError(m.raw, "duplicate member (ambiguous which content wins)")
        else:
            files[m.name] = m
    for name in sorted(set(files) & set(dirs)):
        raise UnsafeArchiveError(files[name].raw, "used both as a file and as a directory")
    for name in sorted(dirs):
        target = os.path.join(dest_real, name)
        if os.path.lexists(target):
            if not _inside(os.path.realpath(target), dest_real):
                raise UnsafeArchiveError(dirs[name].raw, f"escapes the destination through existing {name!r}")
            if not os.path.isdir(target):
                raise UnsafeArchiveError(dirs[name].raw, f"needs directory {name!r} but a file exists there")
    for name, m in files.items():
        target = os.path.join(dest_real, name)
        if os.path.islink(target):
            # replaced, never written through; but one pointing out of dest is suspicious enough to stop
            if not _inside(os.path.realpath(target), dest_real):
                raise UnsafeArchiveError(m.raw, "an existing symbolic link there points outside the destination")
        elif os.path.isdir(target):
            raise UnsafeArchiveError(m.raw, "would replace an existing directory")


def _copy_exact(src: IO[bytes], fd: int, size: int, raw: str) -> None:
    """Copy exactly `size` bytes; more or fewer means the archive lies about the member."""
    written = 0
    while True:
        try:
            chunk = src.read(min(_CHUNK, size - written + 1))
        except _DATA_ERRORS as exc:  # decompression/CRC trouble is the archive's fault; write errors are not
            raise CorruptArchiveError(f"member {raw!r}: damaged data: {exc}") from exc
        if not chunk:
            break
        written += len(chunk)
        if written > size:
            raise CorruptArchiveError(f"member {raw!r} has more data than its declared {size} bytes")
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]
    if written != size:
        raise CorruptArchiveError(f"member {raw!r} is truncated ({written} of {size} bytes)")


def _detect(path: StrPath) -> str:
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    if magic[:2] == b"\x1f\x8b":
        return "tar.gz"
    if magic[:3] == b"BZh":
        return "tar.bz2"
    if magic == b"\xfd7zXZ\x00":
        return "tar.xz"
    return "tar"


def safe_extract(
    archive_path: StrPath,
    dest: StrPath,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> List[str]:
    """Extract a tar (plain, gz, bz2, xz) or zip archive into dest, all or nothing, and return the extracted
    relative paths (files and directories, archive order).

    Every member is checked before anything is written: absolute names, '..', escapes through existing symlinks,
    links of any kind, devices, FIFOs, NUL bytes, empty names, duplicates, too many members or bytes all raise
    UnsafeArchiveError naming the member. Modes are sanitised (no setuid/setgid/sticky, executable bit kept),
    owners and times are not restored (files get the extraction time). If the data itself turns out damaged while
    writing, CorruptArchiveError is raised and the files and directories created so far are removed again (files
    the archive replaced are not restored).
    """
    dest_real = os.path.realpath(os.fspath(dest))
    kind = _detect(archive_path)
    with contextlib.ExitStack() as stack:
        opener: Callable[[_Member], IO[bytes]]
        if kind == "zip":
            try:
                zf = stack.enter_context(zipfile.ZipFile(archive_path))
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise CorruptArchiveError(f"{os.fspath(archive_path)!r} is not a readable zip: {exc}") from exc
            members = _zip_members(zf, max_members, max_total_bytes)

            def opener(m: _Member) -> IO[bytes]:
                return zf.open(m.ref)  # type: ignore[arg-type]

        else:
            raw_fh = stack.enter_context(open(archive_path, "rb"))
            stream: IO[bytes] = raw_fh
            if kind == "tar.gz":
                stream = stack.enter_context(gzip.GzipFile(fileobj=raw_fh, mode="rb"))
            elif kind == "tar.bz2":
                stream = stack.enter_context(bz2.BZ2File(raw_fh, "rb"))
            elif kind == "tar.xz":
                stream = stack.enter_context(lzma.LZMAFile(raw_fh, "rb"))
            try:
                tf = stack.enter_context(
                    tarfile.open(
                        fileobj=_GuardedReader(stream),  # type: ignore[arg-type]
                        mode="r:",
                        encoding="utf-8",
                        errors="surrogateescape",
                    )
                )
            except (tarfile.TarError, OSError, EOFError, lzma.LZMAError) as exc:
                raise CorruptArchiveError(f"{os.fspath(archive_path)!r} is not a readable archive: {exc}") from exc
            try:
                members = _tar_members(tf, max_members, max_total_bytes)
            except (OSError, EOFError, lzma.LZMAError) as exc:
                raise CorruptArchiveError(f"{os.fspath(archive_path)!r}: damaged compressed data: {exc}") from exc

            def opener(m: _Member) -> IO[bytes]:
                fh = tf.extractfile(m.ref)  # type: ignore[arg-type]
                assert fh is not None  # regular members always have data
                return fh

        _check_layout(members, dest_real)
        if kind != "zip":
            _data_filter_opinion(members, dest_real)
        extracted = _extract(members, dest_real, opener)
    return extracted


def _extract(members: Sequence[_Member], dest_real: str, opener: Callable[[_Member], IO[bytes]]) -> List[str]:
    created_files: List[str] = []
    created_dirs: List[str] = []

    def ensure_dir(path: str) -> None:
        missing = []
        while not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for d in reversed(missing):
            os.mkdir(d, 0o755)
            os.chmod(d, 0o755)
            created_dirs.append(d)

    extracted: List[str] = []
    seen = set()
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    try:
        ensure_dir(dest_real)
        for m in members:
            if m.name == "":
                continue
            target = os.path.join(dest_real, m.name)
            if m.is_dir:
                ensure_dir(target)
            else:
                ensure_dir(os.path.dirname(target))
                if os.path.lexists(target):
                    os.unlink(target)  # an existing file or link: replaced, never written through
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow, 0o600)
                created_files.append(target)
                try:
                    with opener(m) as src:
                        _copy_exact(src, fd, m.size, m.raw)
                finally:
                    os.close(fd)
                os.chmod(target, _file_mode(m.mode))
            if m.name not in seen:
                seen.add(m.name)
                extracted.append(m.name)
    except BaseException as exc:
        for path in reversed(created_files):
            with contextlib.suppress(OSError):
                os.unlink(path)
        for path in reversed(created_dirs):
            with contextlib.suppress(OSError):
                os.rmdir(path)
        if isinstance(exc, (tarfile.TarError, zipfile.BadZipFile)):
            raise CorruptArchiveError(f"damaged archive data: {exc}") from exc
        raise
    return extracted


# -------------------------------------------------------------------------------------------------------- writing


def _check_pattern(pattern: str) -> None:
    if not pattern or "\x00" in pattern:
        raise UnsafeArchiveError(pattern, "empty output pattern or NUL byte in it")
    if pattern.startswith(("/", "\\", "~")) or _DRIVE_RE.match(pattern) or os.path.isabs(pattern):
        raise UnsafeArchiveError(pattern, "absolute output pattern; patterns are relative to the job directory")
    if ".." in re.split(r"[/\\]", pattern):
        raise UnsafeArchiveError(pattern, "'..' in output pattern")


def _matches(workdir: str, pattern: str) -> List[str]:
    _check_pattern(pattern)
    return sorted(glob.glob(os.path.join(glob.escape(workdir), pattern), recursive=True))


def collect_outputs(workdir: StrPath, patterns: Iterable[str]) -> List[Tuple[str, str]]:
    """Expand DIRAC OutputSandbox patterns (file names or shell globs, `**` allowed) relative to workdir.

    Returns sorted, de-duplicated (arcname, path) pairs; matched directories are returned as such and archived
    recursively by create_archive. Absolute patterns, '..' and matches that resolve outside workdir (through
    symlinks) raise UnsafeArchiveError. Patterns matching nothing are skipped; see missing_outputs.
    """
    wd = os.path.realpath(os.fspath(workdir))
    found: Dict[str, str] = {}
    for pattern in patterns:
        for match in _matches(wd, pattern):
            arcname = os.path.relpath(match, wd).replace(os.sep, "/")
            if arcname in (".", ""):
                continue  # `**` also matches the job directory itself
            if not _inside(os.path.realpath(match), wd):
                raise UnsafeArchiveError(arcname, f"resolves outside the job directory {wd!r}")
            found.setdefault(arcname, match)
    return sorted(found.items())


def missing_outputs(workdir: StrPath, patterns: Iterable[str]) -> List[str]:
    """The patterns that match nothing, for the job wrapper's 'missing output files' report."""
    wd = os.path.realpath(os.fspath(workdir))
    return [p for p in patterns if not [m for m in _matches(wd, p) if os.path.relpath(m, wd) != "."]]


def _plan(pairs: Iterable[Tuple[str, StrPath]], base: Optional[str], skip: str) -> List[Tuple[str, str, bool]]:
    """Resolve pairs to sorted (arcname, real source, is_dir), walking directories and checking symlinks.

    Symlinks are stored as the file they point to (our extractor refuses links, so storing a link would make the
    sandbox unusable), but only when the target is a regular file inside `base` (or inside the directory being
    walked): following a link out of the job directory could ship the pilot's credentials or another user's data
    to the sandbox store, or a huge file from a shared filesystem. Such links, dangling links and links to
    directories raise UnsafeArchiveError, so the job fails visibly instead of silently losing an output.
    """
    plan: Dict[str, Tuple[str, bool]] = {}

    def add(arcname: str, path: str, is_dir: bool) -> None:
        path = os.path.normpath(path)
        prev = plan.get(arcname)
        if prev is not None and prev != (path, is_dir):
            raise UnsafeArchiveError(arcname, f"given twice, from {prev[0]!r} and {path!r}")
        plan[arcname] = (path, is_dir)

    def visit(arcname: str, path: str, root: Optional[str]) -> None:
        _clean_name(arcname)  # refuse now what extraction would refuse later
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(path)
            if root is not None and not _inside(real, root):
                raise UnsafeArchiveError(arcname, f"symbolic link to {real!r}, outside {root!r}")
            try:
                st = os.stat(path)
            except OSError as exc:
                raise UnsafeArchiveError(arcname, "dangling symbolic link") from exc
            if stat.S_ISDIR(st.st_mode):
                raise UnsafeArchiveError(arcname, "symbolic link to a directory (not followed)")
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeArchiveError(arcname, "symbolic link to a special file")
            if real != skip:
                add(arcname, path, False)
        elif stat.S_ISDIR(st.st_mode):
            add(arcname, path, True)
            for child in sorted(os.listdir(path)):
                visit(arcname + "/" + child, os.path.join(path, child), root)
        elif stat.S_ISREG(st.st_mode):
            if os.path.realpath(path) != skip:
                add(arcname, path, False)
        else:
            raise UnsafeArchiveError(arcname, "not a regular file or directory (socket, FIFO or device)")

    for arcname, source in pairs:
        name = _clean_name(arcname)
        if not name:
            raise UnsafeArchiveError(arcname, "empty archive name")
        src = os.fspath(source)
        root = base
        if root is None and os.path.isdir(src) and not os.path.islink(src):
            root = os.path.realpath(src)
        visit(name, src, root)
    return [(name, path, is_dir) for name, (path, is_dir) in sorted(plan.items())]


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _pax_record(keyword: str, value: bytes) -> bytes:
    """One 'LEN keyword=value\n' record; LEN counts itself, hence the loop."""
    body = b" " + keyword.encode("ascii") + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length).encode()) + len(body) != length:
        length += 1
    return str(length).encode() + body


def _tar_header(name: bytes, size: int, mode: int, typeflag: bytes) -> bytes:
    """A ustar header block with zero times and owners; fields follow POSIX.1-1988 ustar."""
    header = (
        name.ljust(100, b"\0")
        + _octal(mode, 8)
        + _octal(0, 8)  # uid
        + _octal(0, 8)  # gid
        + _octal(size, 12)
        + _octal(0, 12)  # mtime
        + b" " * 8  # checksum placeholder
        + typeflag
        + b"\0" * 100  # linkname
        + b"ustar\x0000"
        + b"\0" * 64  # uname, gname
        + _octal(0, 8)  # devmajor
        + _octal(0, 8)  # devminor
        + b"\0" * 155  # prefix
    ).ljust(tarfile.BLOCKSIZE, b"\0")
    checksum = b"%06o\0 " % sum(header)
    return header[:148] + checksum + header[156:]


def _tar_member_header(name: str, size: int, mode: int, is_dir: bool) -> bytes:
    """Header block(s) for one member: plain ustar when the name is short ASCII and the size fits, else a pax
    extended header first (the same layout every time, so archives stay byte-identical)."""
    try:
        encoded = (name + "/" if is_dir else name).encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeArchiveError(name, "file name is not valid UTF-8") from None
    records = b""
    if len(encoded) > 100 or not encoded.isascii():
        records += _pax_record("path", encoded)
        encoded = b"././@LongName"
    if size >= 8**11:
        records += _pax_record("size", str(size).encode())
        size_field = 0
    else:
        size_field = size
    out = b""
    if records:
        out += _tar_header(b"././@PaxHeader", len(records), 0o644, tarfile.XHDTYPE)
        out += records + b"\0" * (-len(records) % tarfile.BLOCKSIZE)
    return out + _tar_header(encoded, size_field, mode, tarfile.DIRTYPE if is_dir else tarfile.REGTYPE)


def _write_tar(fileobj: IO[bytes], plan: Sequence[Tuple[str, str, bool]]) -> None:
    """Write a pax/ustar tar ourselves rather than with tarfile: tarfile's header details change between Python
    versions (device fields since 3.11), and pilots (3.8+) and the scheduler must produce identical bytes."""
    written = 0
    for name, path, is_dir in plan:
        if is_dir:
            block = _tar_member_header(name, 0, 0o755, True)
            fileobj.write(block)
            written += len(block)
            continue
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            block = _tar_member_header(name, st.st_size, _file_mode(st.st_mode), False)
            fileobj.write(block)
            remaining = st.st_size
            while remaining:
                chunk = fh.read(min(_CHUNK, remaining))
                if not chunk:
                    raise OSError(f"{path!r} shrank while it was being archived")
                fileobj.write(chunk)
                remaining -= len(chunk)
            padding = b"\0" * (-st.st_size % tarfile.BLOCKSIZE)
            fileobj.write(padding)
            written += len(block) + st.st_size + len(padding)
    end = b"\0" * (2 * tarfile.BLOCKSIZE)
    written += len(end)
    fileobj.write(end + b"\0" * (-written % tarfile.RECORDSIZE))


def _write_zip(fileobj: IO[bytes], plan: Sequence[Tuple[str, str, bool]]) -> None:
    with zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, path, is_dir in plan:
            info = zipfile.ZipInfo(name + "/" if is_dir else name, date_time=_ZIP_EPOCH)
            info.create_system = 3  # unix, so the mode bits below are honoured
            if is_dir:
                info.external_attr = ((stat.S_IFDIR | 0o755) << 16) | 0x10
                info.compress_type = zipfile.ZIP_STORED
                zf.writestr(info, b"")
                continue
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                info.external_attr = (stat.S_IFREG | _file_mode(st.st_mode)) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                info.file_size = st.st_size  # lets zipfile decide on zip64 up front
                with zf.open(info, "w") as out:
                    while True:
                        chunk = fh.read(_CHUNK)
                        if not chunk:
                            break
                        out.write(chunk)


def create_archive(
    dest: StrPath,
    files: Union[StrPath, Iterable[Tuple[str, StrPath]]],
    fmt: str = "tar.bz2",
    *,
    patterns: Optional[Sequence[str]] = None,
    base: Optional[StrPath] = None,
) -> Tuple[str, int]:
    """Write a deterministic archive and return its (sha256 hex, size).

    `files` is either (arcname, path) pairs or a directory; with a directory, `patterns` (OutputSandbox globs, see
    collect_outputs) select what goes in, default everything. Directories are added recursively. Members are sorted,
    times are zero, owners 0 with no names, modes 0644/0755, and compressor headers carry no time or name, so the
    same content always gives the same checksum (the sandbox store deduplicates on it). Symlinks: see _plan; the
    containment root is `base`, else the directory argument, else each directory pair itself. The archive is
    written to a temporary file next to dest and renamed, so dest is never half-written.
    """
    if fmt not in ARCHIVE_FORMATS:
        raise ValueError(f"unknown archive format {fmt!r}; expected one of {', '.join(ARCHIVE_FORMATS)}")
    dest_path = os.path.abspath(os.fspath(dest))
    base_real = os.path.realpath(os.fspath(base)) if base is not None else None
    if isinstance(files, (str, os.PathLike)):
        directory = os.path.realpath(os.fspath(files))
        if base_real is None:
            base_real = directory
        if patterns is None:
            pairs: List[Tuple[str, StrPath]] = [(n, os.path.join(directory, n)) for n in sorted(os.listdir(directory))]
        else:
            pairs = list(collect_outputs(directory, patterns))
    else:
        if patterns is not None:
            raise ValueError("patterns can only be used when files is a directory")
        pairs = list(files)
    plan = _plan(pairs, base_real, os.path.realpath(dest_path))

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest_path), prefix=".archive-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            if fmt == "zip":
                _write_zip(raw, plan)
            elif fmt == "tar":
                _write_tar(raw, plan)
            elif fmt == "tar.gz":
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
                    _write_tar(gz, plan)  # type: ignore[arg-type]
            elif fmt == "tar.bz2":
                with bz2.BZ2File(raw, "wb", compresslevel=9) as bz:
                    _write_tar(bz, plan)  # type: ignore[arg-type]
            else:
                with lzma.LZMAFile(raw, "wb", preset=6) as xz:
                    _write_tar(xz, plan)  # type: ignore[arg-type]
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return sha256_file(dest_path)


__all__ = [
    "ARCHIVE_FORMATS",
    "ArchiveError",
    "CorruptArchiveError",
    "UnsafeArchiveError",
    "collect_outputs",
    "create_archive",
    "missing_outputs",
    "safe_extract",
    "sha256_file",
]
