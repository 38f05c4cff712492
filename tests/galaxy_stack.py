"""One running stack for the Galaxy tests: a real scheduler, a real Galaxy sending jobs to it, real pilot processes.

Every module that runs Galaxy jobs through DIRAC (runner, TPV, containers, tool compatibility, benchmarks) starts
the same three parts; they differ only in Galaxy's configuration and in the pilots (site, CE, a private mount
namespace, a container runtime). Each module keeps one stack for all its tests: they are slow to start on 2 cores.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import requests

from galaxy_dirac import jdl
from tests.conftest import WMSServer
from tests.galaxy_server import GalaxyServer


class Pilot:
    """A real pilot process (``python -m galaxy_dirac.pilot``) serving ``site``; ``args`` add to its command line
    and ``wrap`` prefixes it (e.g. a private mount namespace)."""

    def __init__(
        self,
        wms: WMSServer,
        token: str,
        workdir: Path,
        processors: int = 2,
        site: str = "Local.test",
        env: Optional[Dict[str, str]] = None,
        args: Sequence[str] = (),
        wrap: Sequence[str] = (),
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "pilot.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "galaxy_dirac.pilot", "--url", wms.url, "--token", token, "--site", site]
        command += ["--processors", str(processors), "--heartbeat-interval", "1", "--max-empty-matches", "100000"]
        command += ["--max-idle", "3600", "--idle-backoff", "0.2", "--idle-backoff-max", "0.5"]
        command += ["--workdir", str(workdir), *args]
        self.process = subprocess.Popen(
            [*wrap, *command],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env} if env else None,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self._log.close()


@dataclass
class GalaxyStack:
    home: Path
    wms: WMSServer
    galaxy: GalaxyServer
    admin: str  # an admin token of the scheduler
    pilot_token: str
    pilots: List[Pilot] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)  # what a module's fixture adds (image, stamp, …)

    def add_pilot(self, name: str, **kwargs: Any) -> Pilot:
        """Start a pilot in ``home/name``; it is stopped with the stack."""
        pilot = Pilot(self.wms, self.pilot_token, self.home / name, **kwargs)
        self.pilots.append(pilot)
        return pilot

    def scheduler(self, method: str, path: str, **kwargs: Any) -> Any:
        """A call to the scheduler with the admin token; its JSON answer (200 or 206 expected)."""
        headers = {"Authorization": f"Bearer {self.admin}"}
        response = requests.request(method, f"{self.wms.url}/{path}", headers=headers, timeout=30, **kwargs)
        assert response.status_code in (200, 206), response.text
        return response.json()

    def dirac_jobs(self) -> List[Dict[str, Any]]:
        body = {"parameters": ["JobID", "Status"]}
        return self.scheduler("POST", "api/jobs/search", params={"per_page": 10000}, json=body)

    def received_jdl(self, dirac_id: Any) -> Any:
        """The JDL the scheduler stored for a DIRAC job, parsed."""
        return jdl.parse(self.scheduler("GET", f"api/x-embedded/jobs/{int(dirac_id)}")["JDL"])


@contextlib.contextmanager
def galaxy_stack(
    home: Path,
    *,
    config: Optional[Dict[str, Any]] = None,
    before_start: Optional[Callable[[GalaxyServer], None]] = None,
) -> Iterator[GalaxyStack]:
    """Scheduler, then Galaxy (``config`` overrides its galaxy.yml; ``before_start`` may edit its files), stopped in
    reverse order with every pilot the stack started, whatever happens."""
    wms = WMSServer(home / "wms", maintenance_interval=1).start()
    token_file = home / "runner.token"
    token_file.write_text(wms.token("runner", "galaxy", "galaxy_user") + "\n")
    galaxy = GalaxyServer(
        home / "galaxy",
        env={"GALAXY_DIRAC_SCHEDULER_URL": wms.url, "GALAXY_DIRAC_TOKEN_FILE": str(token_file)},
        config=config,
    )
    stack = GalaxyStack(home, wms, galaxy, admin=wms.token("admin"), pilot_token=wms.token("pilot"))
    try:
        if before_start:
            before_start(galaxy)
        galaxy.start()
        yield stack
    finally:
        for pilot in stack.pilots:
            pilot.stop()
        galaxy.stop()
        wms.stop()
