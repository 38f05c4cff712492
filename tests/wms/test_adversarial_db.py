"""The scheduler under a hostile or failing environment: a regex meant to freeze it, a database that goes away, a
deadlock between concurrent transactions, a full sandbox disk."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from fastapi.testclient import TestClient
from sqlalchemy import select, text, update

from galaxy_dirac.wms import db as wms_db
from galaxy_dirac.wms import jobs
from galaxy_dirac.wms.api import create_app
from galaxy_dirac.wms.auth import create_token
from galaxy_dirac.wms.db import HeartBeatLoggingInfo, Jobs, read_transaction
from tests.conftest import fresh_database, small_tmpfs
from tests.wms.helpers import ADMIN, jdl_text, make_db, make_settings, submit


def bearer(key: bytes, role: str = "runner", owner: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {create_token(key, role=role, owner=owner, group='galaxy_user')}"}


# --- a regex meant to freeze the server ------------------------------------------------------------------------------
def test_a_backtracking_regex_does_not_freeze_the_server(wms_server_factory: Any) -> None:
    """``^(a|a)*$`` against a 29-character JobName ran Python's re for ~17 s inside the server (SQLite), holding
    every other request; now it is refused at once and the server keeps answering."""
    server = wms_server_factory("freeze", maintenance_interval=0)
    runner = bearer(server.key)
    names = ["a" * 27] * 3  # ~4 s each for Python's re: 29 characters took 17 s
    response = requests.post(f"{server.url}/api/jobs/jdl", headers=runner,
                             json=[jdl_text(JobName=n) for n in names], timeout=30)
    assert response.status_code == 201, response.text
    search = {"search": [{"parameter": "JobName", "operator": "regex", "value": "^(a|a)*$"}]}
    outcome: dict[str, Any] = {}

    def hostile() -> None:
        outcome["regex"] = requests.post(f"{server.url}/api/jobs/search", headers=runner, json=search, timeout=120)

    thread = threading.Thread(target=hostile)
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    other = requests.post(f"{server.url}/api/jobs/search", headers=runner, json={}, timeout=120)
    elapsed = time.monotonic() - started
    thread.join(120)
    assert other.status_code == 200 and len(other.json()) == 3
    assert elapsed < 2.0, f"another request waited {elapsed:.1f} s behind the regex search"
    assert outcome["regex"].status_code == 400, outcome["regex"].text
    assert "repeats a group" in outcome["regex"].json()["detail"]


# --- a database that goes away ---------------------------------------------------------------------------------------
class TcpProxy:
    """A loopback TCP forwarder that can be cut (every connection closed, new ones refused) and restored."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self.sockets: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.lock = threading.Lock()
        self.start()

    def start(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        assert self.listener is not None
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close alone does not)
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.sockets.clear()


@pytest.mark.parametrize("kind", [pytest.param("postgres", marks=pytest.mark.postgres),
                                  pytest.param("mariadb", marks=pytest.mark.mariadb)])
def test_a_database_outage_is_503_with_retry_after_and_heals(tmp_path: Path, kind: str) -> None:
    with fresh_database(kind) as url:
        from sqlalchemy.engine import make_url

        real = make_url(url)
        proxy = TcpProxy((real.host or "127.0.0.1", real.port or (5432 if kind == "postgres" else 3306)))
        try:
            via_proxy = real.set(port=proxy.port).render_as_string(hide_password=False)
            app = create_app(make_settings(tmp_path, via_proxy, maintenance_interval=0))
            key = app.state.ctx.key
            with TestClient(app, raise_server_exceptions=False) as client:
                runner = bearer(key)
                assert client.post("/api/jobs/jdl", headers=runner, json=[jdl_text()]).status_code == 201
                proxy.cut()
                for method, path, body, headers in [
                    ("POST", "/api/jobs/search", {}, runner),
                    ("POST", "/api/jobs/jdl", [jdl_text()], runner),
                    ("POST", "/api/x-embedded/match", {"Site": "x"}, bearer(key, "pilot", "pilot")),
                    ("GET", "/api/x-embedded/jobs/1/commands", None, bearer(key, "admin", "admin")),
                    ("GET", "/api/x-embedded/health", None, {}),
                ]:
                    response = client.request(method, path, headers=headers, json=body)
                    assert response.status_code == 503, (path, response.status_code, response.text)
                    assert int(response.headers["Retry-After"]) > 0
                    assert "database is unavailable" in response.json()["detail"]
                proxy.start()
                found = client.post("/api/jobs/search", headers=runner, json={})
                assert found.status_code == 200 and len(found.json()) == 1
        finally:
            proxy.cut()


# --- deadlocks -------------------------------------------------------------------------------------------------------
@pytest.fixture
def mariadb_engine(tmp_path: Path) -> Iterator[Any]:
    with fresh_database("mariadb") as url:
        engine = make_db(url)
        yield engine
        engine.dispose()


def _deadlocked_heartbeat(engine: Any, settings: Any) -> tuple[int, BaseException | None]:
    """Make InnoDB choose a heartbeat as the victim of a deadlock: another transaction, heavier, holds the job's
    StandardOutput parameter and then asks for the job row the heartbeat has locked."""
    [job_id, *others] = submit(engine, settings, 21)
    jobs.heartbeat(engine, {job_id: {"StandardOutput": "first"}}, ADMIN)
    outcome: dict[str, BaseException | None] = {"error": None}
    with engine.connect() as other:
        other.begin()
        other.execute(update(Jobs).where(Jobs.JobID.in_(others)).values(MinorStatus="heavier"))
        other.execute(text("SELECT Value FROM JobParameters WHERE JobID = :j FOR UPDATE"), {"j": job_id})

        def beat() -> None:
            try:
                jobs.heartbeat(engine, {job_id: {"CPUConsumed": 1.0, "StandardOutput": "second"}}, ADMIN)
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                outcome["error"] = exc

        thread = threading.Thread(target=beat)
        thread.start()
        deadline = time.monotonic() + 10
        waiting = text("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'DELETE FROM `JobParam%'")
        with engine.connect() as probe:  # until the heartbeat waits for the parameter row
            while not probe.execute(waiting).scalar():
                assert time.monotonic() < deadline, f"the heartbeat never waited for the lock: {outcome}"
                time.sleep(0.05)
        time.sleep(0.2)
        other.execute(update(Jobs).where(Jobs.JobID == job_id).values(MinorStatus="other"))  # closes the cycle
        other.commit()
    thread.join(30)
    return job_id, outcome["error"]


@pytest.mark.mariadb
def test_a_transaction_chosen_as_deadlock_victim_is_run_again(
    mariadb_engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path, str(mariadb_engine.url))
    # Without retries the heartbeat fails with MariaDB's 1213: the scenario really is a deadlock...
    monkeypatch.setattr(wms_db, "TRANSIENT_ATTEMPTS", 1)
    _, error = _deadlocked_heartbeat(mariadb_engine, settings)
    assert error is not None and "1213" in str(error), error
    # ...and with them the same heartbeat is simply recorded.
    monkeypatch.setattr(wms_db, "TRANSIENT_ATTEMPTS", 5)
    job_id, error = _deadlocked_heartbeat(mariadb_engine, settings)
    assert error is None, error
    assert jobs.parameters(mariadb_engine, job_id)["StandardOutput"] == "second"
    with read_transaction(mariadb_engine) as conn:
        names = conn.execute(select(HeartBeatLoggingInfo.Name).where(HeartBeatLoggingInfo.JobID == job_id)).scalars()
        assert list(names) == ["CPUConsumed"]


# --- a full sandbox disk ---------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (needs root)."""
    with small_tmpfs(tmp_path, "256k") as mount_point:
        yield mount_point


def test_a_full_sandbox_disk_is_507_and_leaves_nothing(tmp_path: Path, small_disk: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'wms.sqlite'}", maintenance_interval=0,
                             sandbox_dir=str(small_disk / "sandboxes"))
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        runner = bearer(app.state.ctx.key)
        data = os.urandom(400 * 1024)
        info = {"checksum_algorithm": "sha256", "checksum": hashlib.sha256(data).hexdigest(), "size": len(data),
                "format": "tar"}
        answer = client.post("/api/jobs/sandbox", headers=runner, json=info)
        assert answer.status_code == 200, answer.text
        put = client.put(answer.json()["url"], content=data)
        assert put.status_code == 507, put.text
        assert "no room" in put.json()["detail"]
        leftovers = [p for p in (small_disk / "sandboxes").rglob("*") if p.is_file()]
        # Dot files are the server's own lock and wake-up markers, not sandboxes.
        assert [p.name for p in leftovers if not p.name.startswith(".")] == []
        missing = client.get("/api/jobs/sandbox", headers=runner, params={"pfn": answer.json()["pfn"]})
        assert missing.status_code == 404
        small = os.urandom(1000)  # the store still takes what fits
        info.update(checksum=hashlib.sha256(small).hexdigest(), size=len(small))
        again = client.post("/api/jobs/sandbox", headers=runner, json=info).json()
        assert client.put(again["url"], content=small).status_code == 204
