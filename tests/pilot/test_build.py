"""The shipped pilot: one deterministic zipapp, standard library only, Python 3.8 syntax."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import zipfile

import pytest

from galaxy_dirac.pilot.build import build_zipapp, payload_sources, pilot_sources, zipapp_bytes

ALLOWED_OWN = (
    "galaxy_dirac.archive",
    "galaxy_dirac.pilot",
    "galaxy_dirac.states",
    "galaxy_dirac.times",
    "galaxy_dirac.payload",
)
SHIPPED = pilot_sources() + payload_sources()


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    return build_zipapp(tmp_path_factory.mktemp("pyz") / "pilot.pyz")


def test_zipapp_is_deterministic_and_self_contained(pyz):
    data = pyz.read_bytes()
    assert data == zipapp_bytes()
    assert data.startswith(b"#!/usr/bin/env python3\n")
    assert pyz.stat().st_mode & 0o777 == 0o755
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert names[0] == "__main__.py"
    assert {"galaxy_dirac/__init__.py", "galaxy_dirac/archive.py", "galaxy_dirac/pilot/pilot.py"} <= set(names)
    assert "galaxy_dirac/pilot/build.py" not in names
    assert zipfile.ZipFile(io.BytesIO(data)).read("galaxy_dirac/__init__.py") == b""


def test_zipapp_runs_isolated_and_prints_help(pyz, tmp_path):
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(pyz), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for option in ("--url", "--token", "--site", "--processors", "--max-empty-matches", "--heartbeat-interval"):
        assert option in result.stdout
    assert "GALAXY_DIRAC_PILOT_CPU_TIME" in result.stdout


def test_zipapp_refuses_to_start_without_url(pyz, tmp_path):
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(pyz), "--site", "S"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 2
    assert "missing --url, --token" in result.stderr


@pytest.mark.parametrize("name,source", SHIPPED, ids=[name for name, _ in SHIPPED])
def test_sources_are_python38_and_stdlib_only(name, source):
    tree = ast.parse(source, filename=name, feature_version=(3, 8))
    stdlib = sys.stdlib_module_names
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module or ""]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            assert top in stdlib or module.startswith(ALLOWED_OWN), f"{name} imports {module}"
