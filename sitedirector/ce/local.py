"""Pilots as processes on this machine: the single-machine default and the reference backend.

Each pilot gets a directory ``<work_dir>/<stamp>`` holding its pid, its log and, once it exits, its exit
code (written by the ``sh`` that starts it), so status survives a director restart. ``slots`` (option,
default the CPU count) caps concurrently running pilots; beyond that :class:`CEQueueFull`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from pydantic import Field

from .base import (
    ABORTED,
    DELETED,
    DONE,
    FAILED,
    RUNNING,
    UNKNOWN,
    CEError,
    CEOptions,
    CEQueueFull,
    ComputingElement,
    PilotRef,
    PilotStatus,
)

log = logging.getLogger(__name__)


class LocalComputingElement(ComputingElement):
    """Runs ``python3 pilot.pyz`` in its own session per pilot, at most ``options.slots`` at a time."""

    type_name = "local"

    class Options(CEOptions):
        """``slots``: pilots running at once (default the CPU count); ``python``: default the pilot settings'."""

        slots: Optional[int] = Field(None, ge=1)
        python: str = ""

    def __init__(self, queue: Any, bundle: Any = None) -> None:
        super().__init__(queue, bundle)
        opts = self.read_options(queue)
        self.slots = opts.slots or os.cpu_count() or 1
        work = opts.work_dir or os.path.join(tempfile.gettempdir(), "sitedirector", queue.name)
        self.work_dir = Path(work)
        self.python = opts.python or str(getattr(getattr(bundle, "pilot", None), "python", "python3"))
        self.host = socket.gethostname()
        self._procs: dict[str, subprocess.Popen] = {}

    # --- helpers ---------------------------------------------------------------------------------------
    def _dir(self, stamp: str) -> Path:
        return self.work_dir / stamp

    def _zipapp(self) -> Path:
        path = self.work_dir / "pilot.pyz"
        if not path.exists() or path.read_bytes() != self.bundle.zipapp:
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(self.bundle.zipapp)
            tmp.replace(path)
        return path

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _state(self, stamp: str) -> PilotStatus:
        d = self._dir(stamp)
        proc = self._procs.get(stamp)
        if proc is not None and proc.poll() is not None:
            self._procs.pop(stamp, None)
        if (d / "killed").exists():
            return PilotStatus(DELETED, "killed by the SiteDirector")
        rc_file = d / "rc"
        if rc_file.exists():
            text = rc_file.read_text().strip()
            if text == "0":
                return PilotStatus(DONE)
            return PilotStatus(FAILED, f"pilot exited with status {text or '?'}")
        pid_file = d / "pid"
        if pid_file.exists():
            try:
                pid = int(pid_file.read_text())
            except ValueError:
                return PilotStatus(UNKNOWN, "unreadable pid file")
            if self._alive(pid):
                return PilotStatus(RUNNING)
            return PilotStatus(ABORTED, "pilot process vanished without an exit code")
        return PilotStatus(UNKNOWN, "no such local pilot")

    def running(self) -> int:
        """Pilots of this queue whose process is alive (the slot count)."""
        if not self.work_dir.is_dir():
            return 0
        return sum(1 for d in self.work_dir.iterdir() if d.is_dir() and self._state(d.name).state == RUNNING)

    # --- interface -------------------------------------------------------------------------------------
    def submit(self, stamps: Sequence[str]) -> list[PilotRef]:
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            zipapp = self._zipapp()
        except OSError as exc:
            raise CEError(f"cannot prepare {self.work_dir}: {exc}") from exc
        free = self.slots - self.running()
        if free <= 0:
            raise CEQueueFull(f"all {self.slots} local slots busy")
        refs = []
        for stamp in list(stamps)[:free]:
            d = self._dir(stamp)
            d.mkdir()
            cmd = [self.python, str(zipapp), *self.bundle.pilot_args(stamp), "--workdir", str(d / "run")]
            (d / "run").mkdir()
            # sh records the exit code so a restarted director still knows Done from Failed.
            script = f'{shlex.join(cmd)} >"$1/pilot.log" 2>&1; echo $? >"$1/rc.tmp"; mv "$1/rc.tmp" "$1/rc"'
            try:
                proc = subprocess.Popen(
                    ["sh", "-c", script, "sh", str(d)],
                    env={**os.environ, **self.bundle.pilot_env(stamp)},  # this pilot's own token, off the command line
                    cwd=d,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as exc:
                shutil.rmtree(d, ignore_errors=True)
                if refs:
                    break
                raise CEError(f"cannot start a local pilot: {exc}") from exc
            (d / "pid").write_text(str(proc.pid))
            self._procs[stamp] = proc
            refs.append(PilotRef(f"local://{self.host}/{proc.pid}", stamp))
        log.info("%s: started %d local pilots (%d slots)", self.queue.name, len(refs), self.slots)
        return refs

    def status(self, refs: Sequence[PilotRef]) -> dict[str, PilotStatus]:
        return {ref.reference: self._state(ref.stamp) for ref in refs}

    def kill(self, refs: Sequence[PilotRef]) -> None:
        for ref in refs:
            d = self._dir(ref.stamp)
            try:
                pid = int((d / "pid").read_text())
            except (OSError, ValueError):
                continue
            if self._state(ref.stamp).state == RUNNING:
                (d / "killed").touch()
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGTERM)

    def cleanup(self, refs: Optional[Sequence[PilotRef]] = None) -> list[PilotRef]:
        """Delete the directories of finished pilots the director no longer tracks."""
        if not self.work_dir.is_dir():
            return []
        tracked = {r.stamp for r in refs or ()}
        removed = []
        for d in self.work_dir.iterdir():
            if not d.is_dir() or d.name in tracked:
                continue
            state = self._state(d.name)
            if state.state != RUNNING:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(PilotRef(f"local://{self.host}/{d.name}", d.name))
        return removed

    def close(self) -> None:
        for proc in self._procs.values():
            proc.poll()
