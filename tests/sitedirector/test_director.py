"""Director behaviour with the real scheduler process: per-queue threads, dry runs, the status table.

The CEs here are small in-test backends (the point is the director's threading, not a CE); the local and
HTCondorCE backends have their own end-to-end tests.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pytest

from galaxy_dirac.wms.auth import verify_token_with_expiry
from sitedirector import cli
from sitedirector.ce.base import ComputingElement, PilotRef, PilotStatus
from sitedirector.config import load, parse
from sitedirector.director import Director, SchedulerClient
from tests.pilot.conftest import LocalServer, Reply, Request, json_reply

from .conftest import Scheduler, jdl, wait_for, write_config


class RecordingCE(ComputingElement):
    """Accepts pilots; ``gate`` (if set) blocks submit until released, like a hanging CE."""

    gate: Optional[threading.Event] = None

    def submit(self, stamps: Sequence[str]) -> list[PilotRef]:
        if self.gate is not None:
            self.gate.wait(30)
        return [PilotRef(f"rec://{s}", s) for s in stamps]

    def status(self, refs: Sequence[PilotRef]) -> dict[str, PilotStatus]:
        return {r.reference: PilotStatus("Waiting") for r in refs}

    def kill(self, refs: Sequence[PilotRef]) -> None:
        pass

    def cleanup(self, refs: Optional[Sequence[PilotRef]] = None) -> list[PilotRef]:
        return []


def two_queues(scheduler: Scheduler, tmp_path: Path, uid: str) -> tuple[Path, str, str]:
    """Queues slow<uid> and fast<uid> at sites LCG.Slow<uid>.org and LCG.Fast<uid>.org."""
    slow, fast = f"slow{uid}", f"fast{uid}"
    queues = [
        {"name": slow, "type": "local", "site": f"LCG.Slow{uid}.org", "max_waiting": 3},
        {"name": fast, "type": "local", "site": f"LCG.Fast{uid}.org", "max_waiting": 3},
    ]
    return write_config(tmp_path / "sd.yml", scheduler, queues), slow, fast


def test_a_hanging_ce_does_not_stall_other_queues(scheduler: Scheduler, tmp_path: Path, uid: str) -> None:
    cfg, slow, fast = two_queues(scheduler, tmp_path, uid)
    scheduler.submit(jdl(f"LCG.Slow{uid}.org"), jdl(f"LCG.Fast{uid}.org"), jdl(f"LCG.Fast{uid}.org"))
    gate = threading.Event()

    def factory(q, b):  # noqa: ANN001, ANN202 - test factory
        ce = RecordingCE(q, b)
        if q.name == slow:
            ce.gate = gate
        return ce

    director = Director(load(cfg), ce_factory=factory)
    try:
        decisions = {d.queue: d.submit for d in director.cycle()}
        assert decisions == {slow: 1, fast: 2}
        wait_for(lambda: len(scheduler.pilots(queue=fast)) == 2, 10, "the fast queue's pilots")
        assert scheduler.pilots(queue=slow) == []
        wait_for(lambda: not director.queues[fast].busy.is_set(), 10, "the fast queue to be idle")
        second = {d.queue: d for d in director.cycle()}
        assert second[slow].skipped == "previous cycle's CE work still running"
        assert not second[fast].skipped
        gate.set()
        wait_for(lambda: len(scheduler.pilots(queue=slow)) == 1, 10, "the slow queue's pilot")
        wait_for(lambda: not director.queues[slow].busy.is_set(), 10, "the slow queue to be idle")
        # The fast queue's pilots were registered Submitted; its CE says Waiting.
        director.cycle(wait=True)
        assert {p["Status"] for p in scheduler.pilots(queue=fast)} == {"Waiting"}
    finally:
        gate.set()
        director.shutdown()


def test_dry_run_and_status_text(scheduler: Scheduler, tmp_path: Path, capsys, uid: str) -> None:  # noqa: ANN001
    cfg, slow, fast = two_queues(scheduler, tmp_path, uid)
    scheduler.submit(jdl(f"LCG.Fast{uid}.org"))
    director = Director(load(cfg), ce_factory=RecordingCE)
    try:
        decisions = {d.queue: d.submit for d in director.cycle(dry_run=True)}
        assert decisions == {slow: 0, fast: 1}
        assert scheduler.pilots(queue=slow) == scheduler.pilots(queue=fast) == []
        director.cycle(wait=True)
    finally:
        director.shutdown()
    assert cli.main(["status", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["queue", "type", "Submitted", "empty"]
    assert out[1].split() == [slow, "local", "0", "0"] and out[2].split() == [fast, "local", "1", "0"]


def test_once_fails_when_the_scheduler_is_down(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    from tests.conftest import free_port

    cfg = tmp_path / "sd.yml"
    cfg.write_text(
        f"scheduler: {{url: 'http://127.0.0.1:{free_port()}', token: t}}\n"
        f"work_dir: {tmp_path}\nqueues: [{{name: q, type: local, site: S}}]\n"
    )
    assert cli.main(["once", "-c", str(cfg)]) == 1
    assert "scheduler unavailable" in caplog.text


class TokenCE(RecordingCE):
    """Records, at submit time, the token each pilot's payload would carry (what the bundle hands the CE)."""

    def __init__(self, queue, bundle) -> None:  # noqa: ANN001 - the factory signature
        super().__init__(queue, bundle)
        self.carried: dict[str, str] = {}
        self.shared_wrapper: list[str] = []

    def submit(self, stamps: Sequence[str]) -> list[PilotRef]:
        self.carried.update({s: self.bundle.token_for(s) for s in stamps})
        self.shared_wrapper.append(self.bundle.wrapper(None))
        return super().submit(stamps)


def test_every_pilot_gets_a_token_for_its_own_stamp_and_site(scheduler: Scheduler, tmp_path: Path, uid: str) -> None:
    site = f"LCG.Tok{uid}.org"
    cfg = write_config(tmp_path / "sd.yml", scheduler, [{"name": f"tok{uid}", "type": "local", "site": site}])
    scheduler.submit(jdl(site), jdl(site))
    director = Director(load(cfg), ce_factory=TokenCE)
    try:
        director.cycle(wait=True)
        st = director.queues[f"tok{uid}"]
        assert st.submitted == 2 and st.health.failures == 0, st.health
        carried = st.ce.carried
        assert len(set(carried.values())) == 2 and scheduler.director_token not in carried.values()
        key = scheduler.server.key
        for stamp, token in carried.items():
            principal, _ = verify_token_with_expiry(key, token)
            assert (principal.role, principal.pilot_stamp, principal.pilot_site) == ("pilot", stamp, site)
            assert token not in st.ce.shared_wrapper[0]
        assert {p["PilotStamp"] for p in scheduler.pilots(queue=f"tok{uid}")} == set(carried)
    finally:
        director.shutdown()


def test_a_one_pilot_token_cannot_run_a_director(scheduler: Scheduler, tmp_path: Path, uid: str) -> None:
    """A 403 is a misconfiguration, not an older scheduler: nothing is submitted and the queue backs off."""
    site = f"LCG.One{uid}.org"
    tokens = SchedulerClient(scheduler.url, scheduler.director_token).pilot_tokens([f"one{uid}"], site)
    assert tokens is not None
    queues = [{"name": f"one{uid}", "type": "local", "site": site}]
    cfg = write_config(
        tmp_path / "sd.yml", scheduler, queues, scheduler={"url": scheduler.url, "token": tokens[f"one{uid}"]}
    )
    director = Director(load(cfg), ce_factory=TokenCE)
    try:
        st = director.queues[f"one{uid}"]
        director._queue_task(st, [], 1)
        assert st.ce.carried == {} and st.health.failures == 1
        assert "HTTP 403" in st.health.last_error and "may act for that pilot only" in st.health.last_error
    finally:
        director.shutdown()


class OlderScheduler:
    """A scheduler from before per-pilot tokens: it records pilots, and knows no tokens route (404)."""

    def __init__(self) -> None:
        self.added: list[dict] = []

    def __call__(self, request: Request) -> Reply:
        if (request.method, request.path) == ("POST", "/api/x-embedded/pilots"):
            self.added.append(json.loads(request.body))
            return json_reply([len(self.added)])
        return json_reply({"detail": "Not Found"}, 404)


@pytest.fixture
def older_scheduler() -> Iterator[tuple[str, OlderScheduler]]:
    app = OlderScheduler()
    server = LocalServer(app)
    yield server.url, app
    server.close()


def test_an_older_scheduler_gets_the_shared_token_with_one_warning(
    older_scheduler: tuple[str, OlderScheduler], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url, app = older_scheduler
    config = parse(
        {
            "scheduler": {"url": url, "token": "site-wide-pilot-token"},
            "work_dir": str(tmp_path),
            "queues": [{"name": "a", "type": "local", "site": "S.a"}, {"name": "b", "type": "local", "site": "S.b"}],
        }
    )
    director = Director(config, ce_factory=TokenCE)
    try:
        with caplog.at_level(logging.WARNING, logger="sitedirector"):
            for _ in range(2):
                for st in director.queues.values():
                    director._submit(st, 2)
        for st in director.queues.values():
            assert st.submitted == 4 and set(st.ce.carried.values()) == {"site-wide-pilot-token"}
        assert len(app.added) == 4
        warnings = [r.getMessage() for r in caplog.records if "cannot mint per-pilot tokens" in r.getMessage()]
        assert sorted(w.split(":")[0] for w in warnings) == ["a", "b"], "one warning per queue"
    finally:
        director.shutdown()
