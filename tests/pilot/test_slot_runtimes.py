"""The pilot offers the container runtimes that work on its node as tags, and only those."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from galaxy_dirac.pilot.slot import RUNTIMES_ENV, Slot, detect_container_runtimes


def _command(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def test_named_stand_ins_answer_or_not(tmp_path: Path) -> None:
    """Stand-ins named ``apptainer`` (answers) and ``docker`` (a client whose daemon is down): only one is offered."""
    _command(tmp_path, "apptainer", 'echo "apptainer version 1.3.0"')
    _command(tmp_path, "docker", '[ "$1" = --version ] && echo "Docker version 24" && exit 0; exit 1')
    assert detect_container_runtimes({"PATH": str(tmp_path)}) == ["apptainer"]
    assert detect_container_runtimes({"PATH": "/nonexistent"}) == []


@pytest.mark.podman
def test_real_podman_is_detected_when_it_works(tmp_path: Path) -> None:
    podman = shutil.which("podman")
    assert podman, "podman is not installed (scripts/ensure-services.sh installs it)"
    conf = tmp_path / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = []\n\n[engine]\ncgroup_manager = "cgroupfs"\n')
    env = {"PATH": os.path.dirname(podman), "CONTAINERS_CONF": str(conf), "HOME": str(tmp_path)}
    assert "podman" in detect_container_runtimes(env)
    # Installed but unusable (its configuration cannot be read): `podman info` fails, so it is not offered.
    conf.write_text("[engine\n")
    assert "podman" not in detect_container_runtimes({**env, "HOME": str(tmp_path / "other")})


def test_the_pilot_environment_overrides_detection() -> None:
    assert detect_container_runtimes({RUNTIMES_ENV: "none", "PATH": os.environ.get("PATH", "")}) == []
    assert detect_container_runtimes({RUNTIMES_ENV: "apptainer,singularity"}) == ["apptainer", "singularity"]


def test_slot_offers_configured_tags_and_runtimes_once() -> None:
    slot = Slot(site="S", tags=["podman", "GPU"], runtimes=["podman", "apptainer"], processors=1, memory_mb=1000)
    assert slot.all_tags() == ["podman", "GPU", "apptainer", "1Processors"]
    assert slot.registration("host")["tags"] == slot.all_tags()
