"""The README's install command puts the runner into Galaxy's venv, beside galaxy-app 26.1, without moving its pins.

The shared Galaxy side venv stays untouched: the install goes into an overlay venv (same interpreter, Galaxy's
site-packages behind it through a ``.pth`` file), which is what pip sees as "Galaxy's venv". Then Galaxy's Python
loads ``galaxy_dirac.runner:DiracJobRunner`` the way Galaxy's job configuration does, from the installed wheel,
and the installed package carries every file the runner ships to worker nodes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from galaxy_dirac.pilot.build import payload_sources, pilot_sources
from tests.galaxy_server import ROOT, galaxy_venv

pytestmark = [pytest.mark.galaxy, pytest.mark.slow]

#: Galaxy's own way of loading a runner named by ``load:`` in job_conf.yml (galaxy.jobs.JobConfiguration).
LOAD_CHECK = r"""
import hashlib, importlib.metadata, json, os, sys
load = "galaxy_dirac.runner:DiracJobRunner"
module_name, class_name = load.rsplit(":", 1)
module = __import__(module_name)
for comp in module_name.split(".")[1:]:
    module = getattr(module, comp)
runner = getattr(module, class_name)
import galaxy.jobs
from galaxy.jobs.runners import AsynchronousJobRunner
from galaxy_dirac.pilot.build import payload_sources, pilot_sources
dist = importlib.metadata.distribution("galaxy-dirac")
static = os.path.join(os.path.dirname(module.__file__), "wms", "static")
print(json.dumps({
    "runner_file": module.__file__,
    "is_galaxy_runner": issubclass(runner, AsynchronousJobRunner),
    "galaxy_file": galaxy.jobs.__file__,
    "direct_url": json.loads(dist.read_text("direct_url.json") or "{}"),
    "payload": {n: hashlib.sha256(c).hexdigest() for n, c in payload_sources()},
    "pilot": {n: hashlib.sha256(c).hexdigest() for n, c in pilot_sources()},
    "static": sorted(os.listdir(static)),
}))
"""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _clean_env() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _distributions(python: Path) -> Dict[str, str]:
    """Name → version of what ``python`` sees, run away from the work tree (its egg-info would count too)."""
    code = "import importlib.metadata as m, json; print(json.dumps({d.name: d.version for d in m.distributions()}))"
    out = subprocess.run(
        [str(python), "-c", code], cwd="/", env=_clean_env(), check=True, capture_output=True, text=True
    ).stdout
    return {_canonical(k): v for k, v in json.loads(out).items()}


def _checkout_copy(target: Path) -> Path:
    """The work tree as a fresh checkout would have it (tracked and new files, nothing ignored), outside the repo."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, names):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            (target / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / os.fsdecode(name))
    return target


def _digests(sources: List) -> Dict[str, str]:
    return {name: hashlib.sha256(content).hexdigest() for name, content in sources}


def test_readme_install_command_puts_the_runner_into_galaxys_venv(tmp_path: Path) -> None:
    timings: Dict[str, float] = {}
    galaxy = galaxy_venv()
    galaxy_python = galaxy / "bin" / "python"
    galaxy_site = Path(
        subprocess.run(
            [str(galaxy_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    galaxy_before = _distributions(galaxy_python)
    assert "galaxy-dirac" not in galaxy_before  # the other tests put the work tree on PYTHONPATH instead
    assert galaxy_before["galaxy-app"].startswith("26.1."), galaxy_before["galaxy-app"]

    started = time.monotonic()
    _checkout_copy(tmp_path / "galaxy-dirac")
    timings["copy_checkout"] = time.monotonic() - started

    started = time.monotonic()
    venv = tmp_path / "galaxy-venv"
    subprocess.run([str(galaxy_python), "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "galaxy_side_venv.pth").write_text(f"{galaxy_site}\n")
    timings["overlay_venv"] = time.monotonic() - started

    env = _clean_env()
    # The README's command (section "Sending Galaxy jobs to DIRAC"), with this venv and checkout filled in.
    readme = (ROOT / "README.md").read_text()
    assert '"$GALAXY_VIRTUAL_ENV/bin/python" -m pip install ./galaxy-dirac' in readme
    started = time.monotonic()
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "./galaxy-dirac"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    timings["pip_install"] = time.monotonic() - started
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]

    # pip's resolver: everything Galaxy already has is "already satisfied"; what it installed is new to Galaxy.
    installed_line = [line for line in install.stdout.splitlines() if line.startswith("Successfully installed ")]
    assert installed_line, install.stdout[-4000:]
    installed = dict(item.rsplit("-", 1) for item in installed_line[0].split()[2:])
    installed = {_canonical(k): v for k, v in installed.items()}
    assert installed.get("galaxy-dirac") == "0.1.0", installed
    moved = {name: (galaxy_before[name], v) for name, v in installed.items() if name in galaxy_before}
    assert not moved, f"installing galaxy-dirac changes Galaxy's pins: {moved}"
    for requirement in ("sqlalchemy", "fastapi", "pydantic", "requests"):
        assert re.search(rf"Requirement already satisfied: {requirement}\b", install.stdout, re.I), requirement
    check = subprocess.run([str(python), "-m", "pip", "check"], env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert _distributions(galaxy_python) == galaxy_before  # the shared Galaxy venv is as it was

    started = time.monotonic()
    loaded = subprocess.run(
        [str(python), "-c", LOAD_CHECK], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    timings["load_runner"] = time.monotonic() - started
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    found = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert found["is_galaxy_runner"], found
    assert Path(found["runner_file"]).resolve() == (site / "galaxy_dirac" / "runner.py").resolve(), found
    assert not str(Path(found["runner_file"]).resolve()).startswith(str(ROOT)), found
    assert Path(found["galaxy_file"]).resolve().is_relative_to(galaxy_site.resolve()), found
    assert found["direct_url"].get("dir_info", {}).get("editable") is not True, found["direct_url"]
    # The wheel carries what the runner ships to worker nodes and the scheduler's pages, byte for byte.
    assert found["payload"] == _digests(payload_sources())
    assert found["pilot"] == _digests(pilot_sources())
    assert found["static"] == sorted(os.listdir(ROOT / "galaxy_dirac" / "wms" / "static"))
    sys.stderr.write(f"\ninstall timings: {timings}; new beside Galaxy: {sorted(installed)}\n")
