"""galaxy_dirac.archive: hostile archives are refused before anything is written; created archives are
deterministic and round-trip."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from galaxy_dirac.archive import (
    ARCHIVE_FORMATS,
    CorruptArchiveError,
    UnsafeArchiveError,
    collect_outputs,
    create_archive,
    missing_outputs,
    safe_extract,
    sha256_file,
)

# ---------------------------------------------------------------------------------------------- building archives


def _file(name: str, data: bytes = b"x", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def _special(name: str, type_: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.linkname = linkname
    return info, None


def make_tar(path: Path, members, mode: str = "w") -> Path:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def make_zip(path: Path, members) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, attr in members:
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            if attr is not None:
                info.external_attr = attr << 16
            zf.writestr(info, data)
    return path


def assert_refused(archive: Path, dest: Path, member_fragment: str, **limits) -> UnsafeArchiveError:
    with pytest.raises(UnsafeArchiveError) as excinfo:
        safe_extract(archive, dest, **limits)
    assert member_fragment in excinfo.value.member
    assert repr(excinfo.value.member) in str(excinfo.value)
    assert not dest.exists() or list(dest.iterdir()) == [], "nothing may be written on refusal"
    return excinfo.value


GOOD = _file("good.txt", b"fine")  # placed first in every hostile archive: it must not be extracted either


# ------------------------------------------------------------------------------------------------ hostile archives


@pytest.mark.parametrize(
    "name,why",
    [
        ("/etc/evil", "absolute"),
        ("../evil", ".."),
        ("a/../../evil", ".."),
        ("a/..", ".."),
        ("..\\evil", ".."),
        ("C:/evil", "absolute"),
    ],
)
def test_traversal_names_refused(tmp_path, name, why):
    archive = make_tar(tmp_path / "t.tar", [GOOD, _file(name)])
    err = assert_refused(archive, tmp_path / "dest", name)
    assert why in err.reason


@pytest.mark.parametrize(
    "member,why",
    [
        (_special("link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
        (_special("inner-link", tarfile.SYMTYPE, "good.txt"), "symbolic link"),
        (_special("hard", tarfile.LNKTYPE, "good.txt"), "hard link"),
        (_special("fifo", tarfile.FIFOTYPE), "FIFO"),
        (_special("chr", tarfile.CHRTYPE), "device"),
        (_special("blk", tarfile.BLKTYPE), "device"),
        (_special("contig-but-odd", b"V"), "unsupported member type"),
    ],
)
def test_links_and_special_files_refused(tmp_path, member, why):
    archive = make_tar(tmp_path / "t.tar", [GOOD, member])
    err = assert_refused(archive, tmp_path / "dest", member[0].name)
    assert why in err.reason


def test_link_then_write_through_it_refused(tmp_path):
    # classic: a symlink to /tmp followed by a file under it
    archive = make_tar(tmp_path / "t.tar", [_special("d", tarfile.SYMTYPE, str(tmp_path)), _file("d/evil")])
    assert_refused(archive, tmp_path / "dest", "d")
    assert not (tmp_path / "evil").exists()


def test_nul_in_name_refused(tmp_path):
    info, data = _file("placeholder")
    info.pax_headers = {"path": "bad\x00name"}  # ustar names cannot carry NUL, pax records can
    archive = make_tar(tmp_path / "t.tar", [GOOD, (info, data)])
    err = assert_refused(archive, tmp_path / "dest", "bad")
    assert "NUL" in err.reason


def test_empty_name_refused(tmp_path):
    info, data = _file("placeholder")
    info.pax_headers = {"path": ""}
    archive = make_tar(tmp_path / "t.tar", [GOOD, (info, data)])
    err = assert_refused(archive, tmp_path / "dest", "")
    assert "empty" in err.reason


def test_total_size_limit(tmp_path):
    archive = make_tar(tmp_path / "t.tar.gz", [GOOD, _file("big", b"0" * 5000)], "w:gz")
    err = assert_refused(archive, tmp_path / "dest", "big", max_total_bytes=1000)
    assert "1000 bytes" in err.reason


def test_member_count_limit(tmp_path):
    archive = make_tar(tmp_path / "t.tar.bz2", [_file(f"f{i}") for i in range(6)], "w:bz2")
    err = assert_refused(archive, tmp_path / "dest", "f5", max_members=5)
    assert "more than 5 members" in err.reason
    assert safe_extract(archive, tmp_path / "ok", max_members=6) == [f"f{i}" for i in range(6)]


def test_duplicate_and_file_dir_clash_refused(tmp_path):
    archive = make_tar(tmp_path / "dup.tar", [GOOD, _file("a"), _file("a", b"other")])
    assert "duplicate" in assert_refused(archive, tmp_path / "d1", "a").reason
    archive = make_tar(tmp_path / "clash.tar", [GOOD, _file("a"), _file("a/b")])
    assert "both as a file and as a directory" in assert_refused(archive, tmp_path / "d2", "a").reason


def test_escape_through_existing_symlink_in_dest(tmp_path):
    dest = tmp_path / "dest"
    outside = tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "sub").symlink_to(outside)
    archive = make_tar(tmp_path / "t.tar", [GOOD, _file("sub/evil")])
    with pytest.raises(UnsafeArchiveError, match="escapes the destination"):
        safe_extract(archive, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["sub"]
    assert list(outside.iterdir()) == []


def test_existing_symlink_file_is_replaced_not_followed(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "other").write_text("keep")
    (dest / "f").symlink_to("other")
    safe_extract(make_tar(tmp_path / "t.tar", [_file("f", b"new")]), dest)
    assert (dest / "other").read_text() == "keep"
    assert not (dest / "f").is_symlink()
    assert (dest / "f").read_bytes() == b"new"


def test_existing_symlink_pointing_outside_refused(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (dest / "f").symlink_to(victim)
    with pytest.raises(UnsafeArchiveError, match="points outside"):
        safe_extract(make_tar(tmp_path / "t.tar", [GOOD, _file("f", b"new")]), dest)
    assert victim.read_text() == "keep"
    assert sorted(p.name for p in dest.iterdir()) == ["f"]


@pytest.mark.parametrize(
    "name,attr,why",
    [
        ("../evil", None, ".."),
        ("a/../../evil", None, ".."),
        ("/abs", None, "absolute"),
        ("..\\evil", None, ".."),
        ("link", stat.S_IFLNK | 0o777, "symbolic link"),
        ("fifo", stat.S_IFIFO | 0o644, "special file"),
    ],
)
def test_hostile_zip_refused(tmp_path, name, attr, why):
    archive = make_zip(tmp_path / "z.zip", [("good.txt", b"fine", None), (name, b"/etc/passwd", attr)])
    err = assert_refused(archive, tmp_path / "dest", name)
    assert why in err.reason


def test_zip_size_and_count_limits(tmp_path):
    archive = make_zip(tmp_path / "z.zip", [(f"f{i}", b"0" * 100, None) for i in range(4)])
    assert "more than 3" in assert_refused(archive, tmp_path / "d1", "f3", max_members=3).reason
    assert "exceeds" in assert_refused(archive, tmp_path / "d2", "f2", max_total_bytes=250).reason


def test_setuid_stripped_exec_kept(tmp_path):
    archive = make_tar(
        tmp_path / "t.tar",
        [_file("run.sh", b"#!/bin/sh\n", 0o6755), _file("data", b"d", 0o4666), _file("sticky", b"s", 0o1777)],
    )
    safe_extract(archive, tmp_path / "dest")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "dest").iterdir()}
    assert modes == {"run.sh": 0o755, "data": 0o644, "sticky": 0o755}


def test_dot_entries_and_dirs(tmp_path):
    d = tarfile.TarInfo("./")
    d.type = tarfile.DIRTYPE
    sub = tarfile.TarInfo("./sub")
    sub.type = tarfile.DIRTYPE
    sub.mode = 0o500  # would make extraction into it fail if kept
    archive = make_tar(tmp_path / "t.tar", [(d, None), (sub, None), _file("./sub/f", b"1"), _file("x//y", b"2")])
    assert safe_extract(archive, tmp_path / "dest") == ["sub", "sub/f", "x/y"]
    assert (tmp_path / "dest/sub/f").read_bytes() == b"1"
    assert (tmp_path / "dest/x/y").read_bytes() == b"2"


def test_corrupt_archive_rolls_back(tmp_path):
    archive = make_tar(tmp_path / "t.tar.gz", [_file("a", b"A" * 1000), _file("b", os.urandom(300_000))], "w:gz")
    data = archive.read_bytes()
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(data[: len(data) // 2])  # headers of a and b readable, b's data truncated
    dest = tmp_path / "dest"
    with pytest.raises(CorruptArchiveError):
        safe_extract(broken, dest)
    assert not dest.exists() or list(dest.iterdir()) == []


def test_bad_crc_during_extraction_rolls_back(tmp_path):
    # headers are fine, so validation passes; the damage only shows while writing the second file
    archive = tmp_path / "z.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("first/a.txt", b"A" * 100)
        zf.writestr("second/b.txt", b"B" * 100)
        offset = zf.getinfo("second/b.txt").header_offset + 30 + len("second/b.txt")
    data = bytearray(archive.read_bytes())
    data[offset + 50] ^= 0xFF
    archive.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "preexisting").write_text("stays")
    with pytest.raises(CorruptArchiveError, match="second/b.txt"):
        safe_extract(archive, dest)
    assert [p.name for p in dest.iterdir()] == ["preexisting"]


def test_giant_extended_header_not_read(tmp_path):
    # a pax header claiming 1 GiB: tarfile would read it into memory in one go; the guard refuses first
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 1024**3
    archive = tmp_path / "t.tar"
    archive.write_bytes(header.tobuf(tarfile.USTAR_FORMAT) + b"0" * 4096)
    with pytest.raises(UnsafeArchiveError, match="extended header larger"):
        safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_not_an_archive(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello, this is not a tar file at all" * 10)
    with pytest.raises(CorruptArchiveError):
        safe_extract(junk, tmp_path / "dest")


# ------------------------------------------------------------------------------------------- creation, round trip


def _populate(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 50)
    (root / "sub" / "deeper" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "sub" / "deeper" / "run.sh", 0o750)
    (root / ("long-" + "n" * 150)).write_text("long name")
    (root / "ünïcode.txt").write_text("utf-8 name")


@pytest.mark.parametrize("fmt", ARCHIVE_FORMATS)
def test_round_trip(tmp_path, fmt):
    src = tmp_path / "src"
    src.mkdir()
    _populate(src)
    out = tmp_path / f"out.{fmt}"
    checksum, size = create_archive(out, src, fmt)
    assert (checksum, size) == sha256_file(out)
    names = safe_extract(out, tmp_path / "dest")
    assert "empty" in names and "sub/deeper/run.sh" in names
    for path in src.rglob("*"):
        twin = tmp_path / "dest" / path.relative_to(src)
        assert twin.is_dir() == path.is_dir()
        if path.is_file():
            assert twin.read_bytes() == path.read_bytes()
    assert stat.S_IMODE((tmp_path / "dest/sub/deeper/run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "dest/a.txt").stat().st_mode) == 0o644


@pytest.mark.parametrize("fmt", ARCHIVE_FORMATS)
def test_deterministic_checksum(tmp_path, fmt):
    first, second = tmp_path / "one", tmp_path / "two"
    for root in (first, second):
        root.mkdir()
        _populate(root)
    for path in second.rglob("*"):
        os.utime(path, (1_234_567_890, 1_234_567_890))  # different mtimes, same content
    a = create_archive(tmp_path / f"1.{fmt}", first, fmt)
    b = create_archive(tmp_path / f"2.{fmt}", second, fmt)
    assert a == b
    # pairs given in another order give the same archive too
    pairs = [(p.relative_to(first).as_posix(), p) for p in first.rglob("*") if p.is_file()]
    c = create_archive(tmp_path / f"3.{fmt}", pairs, fmt)
    d = create_archive(tmp_path / f"4.{fmt}", list(reversed(pairs)), fmt)
    assert c == d


def test_tar_bytes_are_pinned(tmp_path):
    """The tar writer is ours, not tarfile's, so every Python (pilot 3.8 ... scheduler 3.13) writes these bytes;
    a change here breaks dedup against sandboxes already stored."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "hello.txt").write_text("hello\n")
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "run.sh", 0o700)
    pairs = [("d", tmp_path / "d"), ("run.sh", tmp_path / "run.sh")]
    assert create_archive(tmp_path / "o.tar", pairs, "tar") == (
        "45bc673e53e67586ed03216599289a00bf1a561ad6dfc2e74edebeba403bd735",
        10240,
    )


def test_pax_headers_for_long_names_and_huge_sizes(tmp_path):
    from galaxy_dirac.archive import _tar_member_header

    archive = tmp_path / "headers-only.tar"
    archive.write_bytes(_tar_member_header("é" * 80, 9 * 1024**3, 0o755, False))
    with tarfile.open(archive) as tf:
        member = tf.next()
        assert (member.name, member.size, member.mode) == ("é" * 80, 9 * 1024**3, 0o755)


def test_tar_headers_carry_no_owner_or_time(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _populate(src)
    create_archive(tmp_path / "o.tar", src, "tar")
    with tarfile.open(tmp_path / "o.tar") as tf:
        for m in tf.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")


def test_symlink_inside_is_dereferenced_outside_refused(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "real.txt").write_text("content")
    (work / "alias.txt").symlink_to("real.txt")
    create_archive(tmp_path / "ok.tar", work, "tar")
    with tarfile.open(tmp_path / "ok.tar") as tf:
        alias = tf.getmember("alias.txt")
        assert alias.isreg() and tf.extractfile(alias).read() == b"content"

    secret = tmp_path / "proxy"
    secret.write_text("credentials")
    (work / "leak").symlink_to(secret)
    with pytest.raises(UnsafeArchiveError, match="outside"):
        create_archive(tmp_path / "bad.tar", work, "tar")
    (work / "leak").unlink()
    (work / "dangling").symlink_to(work / "nope")
    with pytest.raises(UnsafeArchiveError, match="dangling"):
        create_archive(tmp_path / "bad.tar", work, "tar")
    assert not (tmp_path / "bad.tar").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".archive-")] == []


def test_create_refuses_bad_arcnames(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    for bad in ("../f", "/abs", ""):
        with pytest.raises(UnsafeArchiveError):
            create_archive(tmp_path / "o.tar", [(bad, f)], "tar")
    with pytest.raises(ValueError):
        create_archive(tmp_path / "o.rar", [("f", f)], "rar")


def test_archive_inside_its_own_directory(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "a").write_text("a")
    create_archive(work / "out.tar", work, "tar")
    first = sha256_file(work / "out.tar")
    create_archive(work / "out.tar", work, "tar")  # the previous out.tar is not archived into the new one
    assert sha256_file(work / "out.tar") == first


# ----------------------------------------------------------------------------------------------- output patterns


def test_collect_outputs(tmp_path):
    work = tmp_path / "work"
    (work / "res").mkdir(parents=True)
    for name in ("std.out", "std.err", "res/one.root", "res/two.root", ".hidden"):
        (work / name).write_text(name)
    pairs = collect_outputs(work, ["std.out", "*.err", "res/*.root", "std.out", "nothing-*"])
    assert [a for a, _ in pairs] == ["res/one.root", "res/two.root", "std.err", "std.out"]
    assert all(Path(p).read_text() == a for a, p in pairs)
    assert missing_outputs(work, ["std.out", "nothing-*", "res"]) == ["nothing-*"]
    everything = ["res", "res/one.root", "res/two.root", "std.err", "std.out"]
    assert [a for a, _ in collect_outputs(work, ["**"])] == everything


@pytest.mark.parametrize("pattern", ["/etc/passwd", "../*", "res/../../x", "~/x", ""])
def test_collect_outputs_refuses_patterns(tmp_path, pattern):
    with pytest.raises(UnsafeArchiveError):
        collect_outputs(tmp_path, [pattern])


def test_collect_outputs_refuses_symlinked_escape(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("s")
    (work / "data").symlink_to(tmp_path / "outside")
    with pytest.raises(UnsafeArchiveError, match="outside the job directory"):
        collect_outputs(work, ["data/*"])


def test_create_from_patterns(tmp_path):
    work = tmp_path / "work"
    (work / "res").mkdir(parents=True)
    (work / "res" / "x.root").write_text("x")
    (work / "std.out").write_text("o")
    (work / "ignored").write_text("i")
    create_archive(tmp_path / "o.tar.bz2", work, patterns=["std.out", "res"])
    assert safe_extract(tmp_path / "o.tar.bz2", tmp_path / "dest") == ["res", "res/x.root", "std.out"]


def test_sha256_file(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    assert sha256_file(f) == ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", 3)
