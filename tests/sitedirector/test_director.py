"""Director behaviour with the real scheduler process: per-queue threads, dry runs, the status table.

The CEs here are small in-test backends (the point is the director's threading, not a CE); the local and
HTCondorCE backends have their own end-to-end tests.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional, Sequence

from sitedirector import cli
from sitedirector.ce.base import ComputingElement, PilotRef, PilotStatus
from sitedirector.config import load
from sitedirector.director import Director

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
