"""Archive bombs in the input sandbox: the pilot's extraction cap comes from its configuration and its slot's disk,
not a fixed 10 GiB, and going over fails the job with a message that names the limit."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from galaxy_dirac.pilot.pilot import Pilot
from tests.conftest import small_tmpfs
from tests.pilot.test_pilot_loop import match, pilot_options, statuses


def add_bomb(app: Any, size: int) -> str:
    """A tar.bz2 of a few hundred bytes that expands to ``size`` bytes of zeros."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:bz2") as tar:
        info = tarfile.TarInfo("zeros.bin")
        info.size = size
        tar.addfile(info, io.BytesIO(bytes(size)))
    assert len(buffer.getvalue()) < 1000
    sha = hashlib.sha256(buffer.getvalue()).hexdigest()
    app.sandboxes[sha] = buffer.getvalue()
    return f"SB:SandboxSE|/S3/b/vo/g/o/sha256:{sha}.tar.bz2"


def test_the_configured_cap_fails_a_bomb_with_a_clear_message(
    fake_scheduler: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = fake_scheduler.app_state
    monkeypatch.setenv("GALAXY_DIRAC_PILOT_MAX_SANDBOX_BYTES", str(1_000_000))
    app.matches.append(match(8, Executable="/bin/true", InputSandbox=[add_bomb(app, 3_000_000)]))
    assert Pilot(pilot_options(fake_scheduler.url, tmp_path / "w")).run() == 0
    assert statuses(app, 8)[-1] == ("Failed", "Input sandbox rejected")
    assert "exceeds the limit of 1000000 bytes" in app.statuses[-1]["ApplicationStatus"]
    assert not list(tmp_path.rglob("zeros.bin"))


@pytest.fixture
def small_workdir(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs as the pilot's work directory (needs root)."""
    with small_tmpfs(tmp_path, "1m") as mount_point:
        yield mount_point


def test_a_bomb_larger_than_the_slots_free_disk_fails_before_filling_it(
    fake_scheduler: Any, small_workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = fake_scheduler.app_state
    monkeypatch.delenv("GALAXY_DIRAC_PILOT_MAX_SANDBOX_BYTES", raising=False)
    app.matches.append(match(9, Executable="/bin/true", InputSandbox=[add_bomb(app, 5_000_000)]))
    assert Pilot(pilot_options(fake_scheduler.url, small_workdir / "w")).run() == 0
    assert statuses(app, 9)[-1] == ("Failed", "Input sandbox rejected")
    assert "exceeds the limit of" in app.statuses[-1]["ApplicationStatus"]
    assert not list(small_workdir.rglob("zeros.bin"))
