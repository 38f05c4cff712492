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
from typing import Dict, Iterator, List, Optional, Sequence

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
    "total-perspective-vortex==3.3.*",  # TPV job routing, as usegalaxy.* do (tests/runner/test_tpv.py)
]

#: A Pulsar server for benchmarks/galaxy.py (Galaxy's PulsarRESTJobRunner against it); Galaxy's own venv has the
#: client side (pulsar-galaxy-lib).
PULSAR_VERSION = "0.16.*"
PULSAR_REQUIREMENTS: List[str] = [f"pulsar-app[web]=={PULSAR_VERSION}"]  # [web]: gunicorn for pulsar-serve

#: DIRAC itself (its JobWrapper, for tests/dirac_node), installed with --no-deps: its metadata requires
#: gfal2-python, which has no wheel and needs the gfal2 C library; nothing on the JobWrapper path imports it.
DIRAC_VERSION = "9.1.22"
DIRAC_NO_DEPS: List[str] = [f"DIRAC=={DIRAC_VERSION}"]
#: DIRAC 9.1.22's own Requires-Dist (no extras) minus gfal2-python, with diracx pinned to the DiracX we test
#: against; plus mysqlclient and opensearch-py, which DIRAC's JobAgent utilities (createJobWrapper, which writes
#: the real JobWrapperTemplate) import through the JobDB.
#: M2Crypto and mysqlclient build from source: Debian's swig + libssl-dev and libmariadb-dev + pkg-config
#: (scripts/ensure-services.sh installs them).
DIRAC_REQUIREMENTS: List[str] = [
    "boto3>=1.35", "botocore>=1.35", "cachetools", "certifi", "cwltool", "diraccfg",
    f"DIRACCommon=={DIRAC_VERSION}", f"diracx-client=={DIRACX_VERSION}", f"diracx-core=={DIRACX_VERSION}",
    f"diracx-cli=={DIRACX_VERSION}", "db12", "fabric", "fts3", "importlib_metadata>=4.4", "importlib_resources",
    "invoke", "M2Crypto>=0.50", "packaging", "paramiko", "pexpect", "prompt-toolkit>=3", "psutil", "pyasn1",
    "pyasn1-modules", "pydantic>=2.4", "pyparsing", "python-dateutil", "pytz", "requests", "rucio-clients>=34.4.2",
    "sqlalchemy", "typing_extensions>=4.3.0", "Authlib>=1.0.0.a2", "pyjwt", "dominate", "zstandard", "xattr",
    "mysqlclient", "opensearch-py",
]

#: Known side venvs by name, for the command line.
KNOWN: Dict[str, List[str]] = {
    "diracx": DIRACX_REQUIREMENTS,
    "galaxy": GALAXY_REQUIREMENTS,
    "dirac": DIRAC_REQUIREMENTS,
    "pulsar": PULSAR_REQUIREMENTS,
}
#: Packages a known venv installs with --no-deps after its requirements (part of its cache key).
NO_DEPS: Dict[str, List[str]] = {"dirac": DIRAC_NO_DEPS}


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


def _requirements_hash(requirements: List[str], python: str, no_deps: Sequence[str] = ()) -> str:
    """Short, stable hash so a changed requirement list (or interpreter) gets a fresh venv."""
    text = "\n".join(sorted(requirements)) + "\n" + os.path.realpath(python)
    if no_deps:  # only when present, so the venvs built before no_deps existed keep their names
        text += "\n--no-deps " + " ".join(sorted(no_deps))
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


def ensure_venv(
    name: str, requirements: List[str], python: str = sys.executable, no_deps: Sequence[str] = ()
) -> pathlib.Path:
    """Return a venv with `requirements` installed (then `no_deps` without their dependencies), built on first use.

    The two-step install is for packages whose declared dependencies cannot all be installed (DIRAC's
    gfal2-python): `requirements` lists what they really need. The marker file is written only after a
    successful install, so an interrupted build is redone from scratch.
    """
    root = venvs_root()
    venv = root / f"{name}-{_requirements_hash(requirements, python, no_deps)}"
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
            install = [uv, "pip", "install", "--quiet", "--python", str(venv_python(venv))]
        else:
            _run([python, "-m", "venv", str(venv)])
            install = [str(venv_python(venv)), "-m", "pip", "install", "--quiet"]
        _run([*install, *requirements])
        if no_deps:
            _run([*install, "--no-deps", *no_deps])
        listed = [*requirements, *(f"--no-deps {req}" for req in no_deps)]
        marker.write_text("\n".join(listed) + f"\n# built in {time.monotonic() - started:.1f}s with {uv or 'pip'}\n")
    return venv


def ensure_known(name: str) -> pathlib.Path:
    """The KNOWN side venv `name` (with its --no-deps packages), built on first use."""
    return ensure_venv(name, KNOWN[name], no_deps=NO_DEPS.get(name, ()))


def main(argv: Optional[List[str]] = None) -> int:
    """Prebuild named side venvs (for CI) and print their paths."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="+", choices=sorted(KNOWN))
    args = parser.parse_args(argv)
    for name in args.names:
        started = time.monotonic()
        venv = ensure_known(name)
        print(f"{name}: {venv} ({time.monotonic() - started:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
