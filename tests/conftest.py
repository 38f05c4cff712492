"""Fixtures shared by every test package: free ports, fresh server databases, a real scheduler process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests

from galaxy_dirac.archive import create_archive, safe_extract
from galaxy_dirac.wms.auth import create_token
from galaxy_dirac.wms.config import load_settings

PG_ADMIN_URL = os.environ.get("GALAXY_DIRAC_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
MARIADB_ADMIN_URL = os.environ.get("GALAXY_DIRAC_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/mysql")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something true (and return that), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def stop_process_group(process: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM a server's whole process group, SIGKILL it if it is still there after ``timeout`` seconds."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def unavailable(component: str, reason: str) -> None:
    """Skip for a missing third-party component (DiracX, DIRAC...), or fail when CI requires them all."""
    if os.environ.get("GALAXY_DIRAC_REQUIRE_DIRACX") == "1":
        pytest.fail(f"{component} required but unavailable: {reason}")
    pytest.skip(f"{component} unavailable: {reason}")


@contextlib.contextmanager
def small_tmpfs(parent: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "256k") under ``parent``, unmounted afterwards; skips where mounting needs root."""
    mount_point = parent / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def fresh_database(kind: str) -> Iterator[str]:
    """A new empty database on the machine's PostgreSQL or MariaDB, dropped afterwards; SQLite needs none."""
    from sqlalchemy import create_engine, text

    admin_url = PG_ADMIN_URL if kind == "postgres" else MARIADB_ADMIN_URL
    name = f"gdwms_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
    except Exception as exc:  # noqa: BLE001 - a missing server is a skip, not a failure, outside CI
        admin.dispose()
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{kind} not reachable: {exc}")
    base, _, _ = admin_url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as conn:
            # Connections a failed test left open would make DROP DATABASE wait forever.
            if kind == "postgres":
                conn.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name}
                )
            else:
                for (pid,) in conn.execute(
                    text("SELECT id FROM information_schema.processlist WHERE db = :n"), {"n": name}
                ).all():
                    with contextlib.suppress(Exception):  # it may have closed meanwhile
                        conn.execute(text(f"KILL {int(pid)}"))
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


DB_KINDS = [
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("mariadb", marks=pytest.mark.mariadb),
]


@pytest.fixture(params=DB_KINDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL for each backend the scheduler supports."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'wms.sqlite'}"
    else:
        with fresh_database(request.param) as url:
            yield url


class WMSServer:
    """The real ``galaxy-dirac-wms serve`` in its own process, on a free loopback port, and a client of its API.

    Its settings are the keywords given here and nothing from the caller's environment (a stray
    ``GALAXY_DIRAC_WMS_*`` there would change what every test sees).
    """

    def __init__(self, home: Path, db: str | None = None, **settings: Any) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GALAXY_DIRAC_WMS_")}
        self.env.update({f"GALAXY_DIRAC_WMS_{k.upper()}": str(v) for k, v in settings.items()})
        self.env["GALAXY_DIRAC_WMS_HOME"] = str(home)
        if db:
            self.env["GALAXY_DIRAC_WMS_DB"] = db
        self.process: subprocess.Popen | None = None
        self.log_path = home / "server.log"

    def cli(self, *args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "galaxy_dirac.wms.cli", *args],
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    def token(self, role: str, owner: str = "", group: str = "") -> str:
        args = ["token", "create", "--role", role]
        if owner:
            args += ["--owner", owner]
        if group:
            args += ["--group", group]
        return self.cli(*args).strip()

    @property
    def key(self) -> bytes:
        """The token signing secret, found the way ``serve`` finds it (the ``secret`` setting or the home's file)."""
        return load_settings(environ=self.env).signing_key(create=True)

    def api(
        self,
        method: str,
        path: str,
        role: str = "admin",
        owner: str = "alice",
        group: str = "galaxy_user",
        **kwargs: Any,
    ) -> Any:
        """One call with a token of ``role`` minted in-process; fails the test on an error status, returns the JSON."""
        headers = {"Authorization": f"Bearer {create_token(self.key, role=role, owner=owner, group=group)}"}
        response = requests.request(method, self.url + path, headers=headers, timeout=30, **kwargs)
        assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text}"
        return response.json() if response.content else None

    def submit(self, jdls: list[str], owner: str = "alice", group: str = "galaxy_user") -> list[int]:
        """Submit as ``owner``'s runner; the new job ids in the order of ``jdls``."""
        return [job["JobID"] for job in self.api("POST", "/api/jobs/jdl", "runner", owner, group, json=jdls)]

    def job(self, job_id: int) -> dict[str, Any]:
        """Everything the scheduler keeps about a job (history, parameters, heartbeats), as an admin sees it."""
        return self.api("GET", f"/api/x-embedded/jobs/{job_id}")

    def wait_status(
        self, job_id: int, statuses: tuple[str, ...], timeout: float, minor: str | None = None
    ) -> dict[str, Any]:
        """The job once its status is one of ``statuses`` (and its minor status ``minor``); fails showing the job."""

        def reached() -> dict[str, Any] | None:
            job = self.job(job_id)
            if job["Status"] in statuses and (minor is None or job["MinorStatus"] == minor):
                return job
            return None

        try:
            return wait_for(reached, timeout, f"job {job_id} to reach {statuses} {minor or ''}", interval=0.1)
        except AssertionError:
            raise AssertionError(f"job {job_id}: {json.dumps(self.job(job_id), indent=1)[-4000:]}") from None

    def pilot_row(self, stamp: str) -> dict[str, Any]:
        rows = self.api("GET", "/api/x-embedded/pilots", params={"stamp": stamp})
        assert len(rows) == 1, rows
        return rows[0]

    def upload_sandbox(self, files: dict[str, bytes], tmp: Path) -> str:
        """Upload an input sandbox the way a DiracX client does (``*.sh`` executable); returns its pfn."""
        source = tmp / f"isb-{uuid.uuid4().hex}"
        source.mkdir()
        for name, content in files.items():
            (source / name).write_bytes(content)
            if name.endswith(".sh"):
                (source / name).chmod(0o755)
        archive = tmp / f"{source.name}.tar.bz2"
        sha, size = create_archive(archive, [(name, source / name) for name in files])
        return self.upload_archive(archive, sha, size)

    def upload_archive(self, archive: Path, sha: str, size: int) -> str:
        info = {"checksum_algorithm": "sha256", "checksum": sha, "size": size, "format": "tar.bz2"}
        target = self.api("POST", "/api/jobs/sandbox", json=info)
        if target["url"]:
            with open(archive, "rb") as stream:
                response = requests.post(
                    target["url"], data=target["fields"], files={"file": (archive.name, stream)}, timeout=30
                )
            assert response.status_code < 300, response.text
        return target["pfn"]

    def output_sandbox(self, job_id: int, tmp: Path) -> dict[str, bytes]:
        """The files of the job's one output sandbox, by name."""
        pfns = self.api("GET", f"/api/jobs/{job_id}/sandbox/output")
        assert len(pfns) == 1, pfns
        url = self.api("GET", "/api/jobs/sandbox", params={"pfn": pfns[0]})["url"]
        archive = tmp / f"osb-{job_id}.tar.bz2"
        archive.write_bytes(requests.get(url, timeout=30).content)
        dest = tmp / f"osb-{job_id}"
        names = safe_extract(archive, dest)
        return {name: (dest / name).read_bytes() for name in names if (dest / name).is_file()}

    def start(self) -> WMSServer:
        """Start and wait until it answers; a server that does not is stopped, its log in the error."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> WMSServer:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "galaxy_dirac.wms.cli", "serve", "--port", str(self.port)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._log = log
        deadline = time.monotonic() + 60  # a loaded two-core machine may take that long
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"scheduler exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if requests.get(f"{self.url}/api/x-embedded/health", timeout=1).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"scheduler did not start:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        stop_process_group(self.process)
        if self.process:
            self._log.close()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def wms_server_factory(tmp_path: Path) -> Iterator[Any]:
    """Start real scheduler processes with settings of the test's choosing; all are stopped at the end."""
    servers: list[WMSServer] = []

    def start(name: str = "wms", db: str | None = None, **settings: Any) -> WMSServer:
        server = WMSServer(tmp_path / name, db, **settings)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def wms_server(wms_server_factory: Any) -> WMSServer:
    return wms_server_factory(maintenance_interval=1)
