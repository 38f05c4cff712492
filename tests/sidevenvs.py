"""Side virtual environments for tests that need third-party servers (e.g. a real DiracX).

Those servers are GPL or have dependency sets that clash with ours, so they never share our venv: each one gets
its own venv, built once per requirement set and reused by later runs. We only talk to them over HTTP or run
scripts inside them via subprocess. Stdlib only, so `.ci/run` can prebuild with `python -m tests.sidevenvs diracx`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Dict, Iterator, List, Optional

#: The DiracX 0.7 server, its official client and moto (S3 for the sandbox store), for tests/contract.
DIRACX_VERSION = "0.7.0"
DIRACX_REQUIREMENTS: List[str] = [
    f"diracx-core=={DIRACX_VERSION}",
    f"diracx-db=={DIRACX_VERSION}",
    f"diracx-logic=={DIRACX_VERSION}",
    f"diracx-routers=={DIRACX_VERSION}",
    f"diracx-client=={DIRACX_VERSION}",
    f"diracx-testing=={DIRACX_VERSION}",
    "uvicorn",
    "moto[server]",
    "aiosqlite",
    "pyjwt",
]

#: A Galaxy server (backend + web app) for the runner tests in tests/runner; our package goes on its PYTHONPATH.
GALAXY_VERSION = "26.1.*"
GALAXY_REQUIREMENTS: List[str] = [
    f"galaxy-app=={GALAXY_VERSION}",
    f"galaxy-web-apps=={GALAXY_VERSION}",
    "requests",
]

#: Known side venvs by name, for the command line.
KNOWN: Dict[str, List[str]] = {"diracx": DIRACX_REQUIREMENTS, "galaxy": GALAXY_REQUIREMENTS}


def _openstack_requirements() -> List[str]:
    """Keystone + nova-api for the OpenStack CE tests; the list lives beside the fixtures that use it."""
    from tests.sitedirector.openstack_servers import OPENSTACK_REQUIREMENTS

    return OPENSTACK_REQUIREMENTS


KNOWN["openstack"] = _openstack_requirements()

MARKER = ".galaxy-dirac-complete"


def venvs_root() -> pathlib.Path:
    """Where side venvs live; outside the repo so they survive `git clean` and are shared between checkouts."""
    env = os.environ.get("GALAXY_DIRAC_VENVS")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path("~/.cache/galaxy-dirac/venvs").expanduser()


def _requirements_hash(requirements: List[str], python: str) -> str:
    """Short, stable hash so a changed requirement list (or interpreter) gets a fresh venv."""
    text = "\n".join(sorted(requirements)) + "\n" + os.path.realpath(python)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def venv_python(venv: pathlib.Path) -> pathlib.Path:
    """The interpreter of a venv (POSIX layout)."""
    return venv / "bin" / "python"


def _find_uv() -> Optional[str]:
    """uv is much faster than pip; prefer the one installed beside our interpreter, then PATH."""
    candidate = pathlib.Path(sys.executable).parent / "uv"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("uv")


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    """Exclusive lock so concurrent pytest workers (xdist) don't build the same venv twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: List[str]) -> None:
    """Run a build step, showing its output only when it fails (pytest captures it anyway)."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-8000:]}")


def ensure_venv(name: str, requirements: List[str], python: str = sys.executable) -> pathlib.Path:
    """Return a venv with `requirements` installed, building it on first use.

    The marker file is written only after a successful install, so an interrupted build is redone from scratch.
    """
    root = venvs_root()
    venv = root / f"{name}-{_requirements_hash(requirements, python)}"
    marker = venv / MARKER
    if marker.is_file():
        return venv
    with _file_lock(root / f".{venv.name}.lock"):
        if marker.is_file():  # another worker built it while we waited
            return venv
        if venv.exists():
            shutil.rmtree(venv)
        uv = _find_uv()
        started = time.monotonic()
        if uv:
            _run([uv, "venv", "--quiet", "--python", python, str(venv)])
            _run([uv, "pip", "install", "--quiet", "--python", str(venv_python(venv)), *requirements])
        else:
            _run([python, "-m", "venv", str(venv)])
            _run([str(venv_python(venv)), "-m", "pip", "install", "--quiet", *requirements])
        marker.write_text(
            "\n".join(requirements) + f"\n# built in {time.monotonic() - started:.1f}s with {uv or 'pip'}\n"
        )
    return venv


def main(argv: Optional[List[str]] = None) -> int:
    """Prebuild named side venvs (for CI) and print their paths."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="+", choices=sorted(KNOWN))
    args = parser.parse_args(argv)
    for name in args.names:
        started = time.monotonic()
        venv = ensure_venv(name, KNOWN[name])
        print(f"{name}: {venv} ({time.monotonic() - started:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
