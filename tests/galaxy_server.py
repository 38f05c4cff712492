"""A real Galaxy server for the runner tests: side venv (galaxy-app + galaxy-web-apps), SQLite, offline.

Our package is put on Galaxy's PYTHONPATH (not installed in its venv), so the runner runs from the work tree with
only Galaxy's own dependencies plus requests. Jobs go through ``examples/job_conf.yml``; the scheduler URL, token
and Galaxy URL reach the runner through GALAXY_DIRAC_* environment variables.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import requests
import yaml

from tests.conftest import free_port, stop_process_group
from tests.sidevenvs import GALAXY_REQUIREMENTS, ensure_venv

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ADMIN_KEY = "galaxy-dirac-test-admin-key"


def galaxy_venv() -> Path:
    return ensure_venv("galaxy", GALAXY_REQUIREMENTS)


class GalaxyServer:
    """``galaxy-web`` on a free port, with a fresh SQLite database under ``home``."""

    def __init__(
        self, home: Path, env: Optional[Dict[str, str]] = None, config: Optional[Dict[str, Any]] = None
    ) -> None:
        """``config`` overrides keys of the ``galaxy:`` section (e.g. another tool_config_file or job_config_file)."""
        self.home = home
        self.config_overrides = dict(config or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.venv = galaxy_venv()
        self.extra_env = dict(env or {})
        self.process: Optional[subprocess.Popen] = None
        self.log_path = home / "galaxy.log"
        self.api_key: Optional[str] = None
        self.session = requests.Session()
        self.session.trust_env = False
        self.startup_seconds: List[float] = []
        self._write_config()

    def _write_config(self) -> None:
        data = self.home / "data"
        for sub in ("files", "jobs", "tmp", "config", "tool-data", "cache"):
            (data / sub).mkdir(parents=True, exist_ok=True)
        # The same galaxy.yml an admin starts from (examples/), with this server's paths and URL filled in.
        config = (
            (EXAMPLES / "galaxy.yml")
            .read_text()
            .format(
                data_dir=data,
                examples=EXAMPLES,
                url=self.url,
                admin_key=ADMIN_KEY,
                id_secret="galaxy-dirac-tests-id-secret",
            )
        )
        if self.config_overrides:
            parsed = yaml.safe_load(config)
            parsed["galaxy"].update(self.config_overrides)
            config = yaml.safe_dump(parsed, sort_keys=False)
        (data / "config" / "tool_sheds_conf.xml").write_text("<tool_sheds></tool_sheds>\n")
        self.config_path = self.home / "galaxy.yml"
        self.config_path.write_text(config)

    def start(self, timeout: float = 300.0) -> GalaxyServer:
        env = dict(os.environ)
        env.pop("VIRTUAL_ENV", None)
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '')}"
        env["PYTHONPATH"] = str(ROOT)
        env["GALAXY_DIRAC_GALAXY_URL"] = self.url
        env.update(self.extra_env)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        started = time.monotonic()
        self.process = subprocess.Popen(
            [str(self.venv / "bin" / "galaxy-web"), "-c", str(self.config_path), "-b", f"127.0.0.1:{self.port}"],
            cwd=str(self.home),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._log = log
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Galaxy exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if self.session.get(f"{self.url}/api/version", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"Galaxy did not start in {timeout} s:\n{self.log_tail()}")
        self.startup_seconds.append(time.monotonic() - started)
        if self.api_key is None:
            self.api_key = self._user_key()
        self.session.headers["x-api-key"] = self.api_key
        return self

    def log_tail(self, chars: int = 12000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process_group(self.process, timeout=30)
        if self.process:
            self._log.close()
        self.process = None

    def kill_hard(self) -> None:
        """Crash-stop (SIGKILL), as a machine failure would."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self._log.close()
        self.process = None

    # -- API helpers ------------------------------------------------------------------------------------------------

    def _user_key(self) -> str:
        admin = {"x-api-key": ADMIN_KEY}
        created = self.session.post(
            f"{self.url}/api/users",
            json={"username": "tester", "email": "tester@galaxy-dirac.test", "password": "testpass123"},
            headers=admin,
        )
        created.raise_for_status()
        user_id = created.json()["id"]
        key = self.session.post(f"{self.url}/api/users/{user_id}/api_key", headers=admin)
        key.raise_for_status()
        return key.json()

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.session.request(method, f"{self.url}/api/{path.lstrip('/')}", timeout=60, **kwargs)
        if not response.ok:
            raise AssertionError(f"{method} {path}: {response.status_code} {response.text[:2000]}")
        return response.json() if response.content else None

    def new_history(self, name: str = "test") -> str:
        return self.api("POST", "histories", json={"name": name})["id"]

    def upload(self, history_id: str, content: str, name: str = "input.txt", ext: str = "txt") -> str:
        """Paste content through the fetch API; returns the dataset id once it is ok."""
        payload = {
            "history_id": history_id,
            "targets": [
                {
                    "destination": {"type": "hdas"},
                    "elements": [{"src": "pasted", "paste_content": content, "name": name, "ext": ext}],
                }
            ],
        }
        answer = self.api("POST", "tools/fetch", json=payload)
        dataset_id = answer["outputs"][0]["id"]
        self.wait_dataset(dataset_id, timeout=180)
        return dataset_id

    def run_tool(self, history_id: str, tool_id: str, inputs: Dict[str, Any]) -> Dict[str, Any]:
        return self.api("POST", "tools", json={"history_id": history_id, "tool_id": tool_id, "inputs": inputs})

    def job(self, job_id: str, full: bool = True) -> Dict[str, Any]:
        """The job as an admin sees it (external_id, command line and DIRAC metrics are admin-only)."""
        return self.api("GET", f"jobs/{job_id}", params={"full": str(full).lower()}, headers={"x-api-key": ADMIN_KEY})

    def wait_job(self, job_id: str, states=("ok", "error", "deleted", "failed"), timeout: float = 180) -> Dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id, full=False)
            if job["state"] in states:
                return self.job(job_id)
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {self.job(job_id)}\n{self.log_tail()}")

    def wait_dataset(self, dataset_id: str, timeout: float = 180) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ds = self.api("GET", f"datasets/{dataset_id}")
            if ds["state"] in ("ok", "error", "failed_metadata", "deferred", "discarded"):
                return ds
            time.sleep(0.3)
        raise AssertionError(f"dataset {dataset_id} not ready after {timeout} s\n{self.log_tail()}")

    def wait_invocation_output(self, invocation_id: str, name: str, timeout: float) -> Dict[str, Any]:
        """The workflow output ``name`` once its dataset is final (ok or error); fails with the invocation's state."""
        deadline = time.monotonic() + timeout
        state: Dict[str, Any] = {}
        while time.monotonic() < deadline:
            state = self.api("GET", f"invocations/{invocation_id}")
            output = (state.get("outputs") or {}).get(name)
            if output and self.api("GET", f"datasets/{output['id']}")["state"] in ("ok", "error"):
                return output
            time.sleep(1)
        raise AssertionError(f"workflow output {name!r} not ready in {timeout} s: {state}\n{self.log_tail()}")

    def content(self, dataset_id: str) -> str:
        response = self.session.get(f"{self.url}/api/datasets/{dataset_id}/display", params={"preview": "false"})
        response.raise_for_status()
        return response.text
