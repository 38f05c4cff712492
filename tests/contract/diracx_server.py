"""Run a real DiracX 0.7 server for contract tests.

Our WMS client must work against a real DiracX as well as against our embedded scheduler, and our scheduler must
answer like DiracX does. DiracX is GPL, so it never enters our package: it runs from its own side venv
(`tests.sidevenvs`), configured only through environment variables and files generated here, and we talk to it
over HTTP. The setup mirrors DiracX's own `run_local.sh` (`uvicorn --factory diracx.testing.routers:create_app`,
which creates the SQLite schemas and backs the OpenSearch job-parameters DB with SQLite), with moto's S3 server
standing in for the sandbox store. Stdlib only.

Tokens are minted by the server itself through its legacy-exchange route (enabled by
`DIRACX_LEGACY_EXCHANGE_HASHED_API_KEY`), so they carry exactly the claims and signature a real login gives,
together with a refresh token that the official client can use (legacy-exchange refresh tokens do not rotate).
With `with_idp=True` the VO's IdP is the OIDC double of `oidc_idp.py`, and real device-flow logins (whose refresh
tokens rotate) can be completed: see tests/contract/test_diracx_login.py.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pathlib
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from tests.sidevenvs import DIRACX_REQUIREMENTS, ensure_venv, venv_python

VO = "galaxy"
USER_GROUP = "galaxy_user"
ADMIN_GROUP = "galaxy_admin"
#: Users of the generated registry: preferred username -> OIDC subject.
USERS: Dict[str, str] = {
    "alice": "6a1c1d6e-1f0b-4d8e-9a43-5c8f3b2e7a01",
    "bob": "0f4b7c52-2e8d-4c1a-8b7e-9d3a6e1f4c02",
}
#: Group -> (properties, members). NormalUser only for ordinary users: no JobAdministrator.
GROUPS: Dict[str, tuple] = {
    USER_GROUP: (["NormalUser"], ["alice", "bob"]),
    ADMIN_GROUP: (["NormalUser", "JobAdministrator"], ["alice"]),
}
SANDBOX_BUCKET = "sandboxes"
#: The client id DiracX uses at the VO's IdP (the IdP double checks it).
IDP_CLIENT_ID = "galaxy-dirac-tests"
SCRIPTS_DIR = pathlib.Path(__file__).resolve().parent


def free_port() -> int:
    """A free TCP port on loopback (tiny race with other binders; good enough for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def diracx_venv() -> pathlib.Path:
    """The DiracX side venv (built on first use)."""
    return ensure_venv("diracx", DIRACX_REQUIREMENTS)


# Loopback only: never let an HTTP(S)_PROXY from the environment see these requests.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(
    method: str, url: str, *, headers: Optional[Dict[str, str]] = None, timeout: float = 10.0
) -> Tuple[int, bytes]:
    """Minimal HTTP call returning (status, body bytes); never raises on HTTP errors."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _config_document(idp_url: str = "https://idp.invalid") -> dict:
    """The DiracX configuration (CS) the server reads from its git repo: one VO, users, groups, the VO's IdP."""
    return {
        "DIRAC": {},
        "Registry": {
            VO: {
                "DefaultGroup": USER_GROUP,
                "IdP": {"URL": idp_url, "ClientID": IDP_CLIENT_ID},
                "Users": {sub: {"PreferedUsername": name, "Email": None} for name, sub in USERS.items()},
                "Groups": {
                    group: {"Properties": props, "Users": [USERS[name] for name in members]}
                    for group, (props, members) in GROUPS.items()
                },
            }
        },
        "Operations": {
            "Defaults": {"Services": {"JobScheduling": {"MaxRescheduling": 3}}},
        },
        "Systems": {},
    }


def _write_config_repo(repo: pathlib.Path, idp_url: str = "https://idp.invalid") -> None:
    """DiracX reads its configuration from `default.yml` at the `master` branch of a git repo (JSON is YAML)."""
    repo.mkdir(parents=True)
    (repo / "default.yml").write_text(json.dumps(_config_document(idp_url), indent=2))
    git = ["git", "-C", str(repo), "-c", "user.name=galaxy-dirac", "-c", "user.email=tests@galaxy-dirac.invalid"]
    steps = (["-c", "init.defaultBranch=master", "init", "-q"], ["add", "default.yml"], ["commit", "-q", "-m", "cs"])
    for args in steps:
        subprocess.run([*git, *args], check=True, stdout=subprocess.DEVNULL)


def _sqlite_db_urls(python: pathlib.Path, db_dir: pathlib.Path) -> Dict[str, str]:
    """Ask DiracX which DBs it registers (`python -m diracx.db generate-local-urls`) and take its SQLite URLs."""
    out = subprocess.run(
        [str(python), "-m", "diracx.db", "generate-local-urls", str(db_dir)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    env = {}
    for line in out.splitlines():
        if line.startswith("export ") and "=" in line:
            name, _, value = line[len("export ") :].partition("=")
            env[name] = value.strip()[1:-1]  # single-quoted JSON or double-quoted URL
    if not any(name.startswith("DIRACX_DB_URL_") for name in env):
        raise RuntimeError(f"unexpected output of diracx.db generate-local-urls: {out!r}")
    return env


def _die_with_parent() -> Optional[Callable[[], None]]:
    """A preexec_fn asking Linux to SIGTERM the child when pytest dies, so a killed run leaves no server behind."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


def _start(cmd: List[str], env: Dict[str, str], log: pathlib.Path, cwd: pathlib.Path) -> subprocess.Popen:
    """Start a process in its own session so stop() can kill its whole process group."""
    with open(log, "ab") as fh:
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=str(cwd),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a process group, escalating to SIGKILL."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_http(url: str, proc: subprocess.Popen, log: pathlib.Path, timeout: float) -> None:
    """Poll until `url` answers with an accepted status; fail early (with the log tail) if the process died."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            status, _ = _http("GET", url, timeout=2.0)
            if status == 200:
                return
            last = status
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s (last: {last}):\n{_tail(log)}")


def _tail(log: pathlib.Path, size: int = 6000) -> str:
    """The end of a log file, for error messages."""
    try:
        return log.read_bytes()[-size:].decode(errors="replace")
    except OSError:
        return ""


def write_credentials(path: pathlib.Path, tokens: Dict[str, object], valid_for: Optional[float] = None) -> pathlib.Path:
    """Write a diracx-client credentials file (what `DIRACX_CREDENTIALS_PATH` points at) for a token response.

    Same layout as diracx.core.utils.serialize_credentials. The client trusts `expires_on`, not the JWT's `exp`:
    with fewer than 300 s left it refreshes through the token endpoint, so `valid_for=0` forces a refresh.
    """
    if valid_for is None:
        valid_for = float(tokens.get("expires_in", 1200)) - 15  # type: ignore[arg-type]
    data = {
        "access_token": tokens["access_token"],
        "refresh_token": tokens.get("refresh_token"),
        "expires_on": int(time.time() + valid_for),
    }
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    return path


@dataclass
class DiracxServer:
    """A running DiracX server and how to talk to it.

    `token` is an access token of `alice` in the `galaxy_user` group (NormalUser only); `credentials` is the full
    token response (access and refresh token) for the same user.
    """

    url: str
    venv: pathlib.Path
    workdir: pathlib.Path
    legacy_key: str
    token: str = ""
    credentials: Dict[str, object] = field(default_factory=dict)
    s3_url: str = ""
    idp_url: str = ""
    processes: List[subprocess.Popen] = field(default_factory=list)
    startup_seconds: float = 0.0

    @property
    def python(self) -> pathlib.Path:
        """The side venv's interpreter, for scripts that use the official client."""
        return venv_python(self.venv)

    @property
    def log(self) -> pathlib.Path:
        """The server's log (uvicorn and DiracX), worth reading when a contract test fails."""
        return self.workdir / "logs" / "uvicorn.log"

    def mint(
        self, username: str = "alice", group: str = USER_GROUP, expires_minutes: Optional[int] = None
    ) -> Dict[str, object]:
        """A fresh token response `{access_token, expires_in, token_type, refresh_token}` issued by the server.

        Legacy-exchange refresh tokens do not rotate (DiracX hands the same one back on refresh) and live
        `expires_minutes` (default: the server's refresh-token lifetime); device-flow logins rotate.
        """
        params = {"preferred_username": username, "scope": f"vo:{VO} group:{group}"}
        if expires_minutes is not None:
            params["expires_minutes"] = str(expires_minutes)
        query = urllib.parse.urlencode(params)
        raw = base64.urlsafe_b64encode(self.legacy_key.encode()).decode()
        status, body = _http(
            "GET",
            f"{self.url}/api/auth/legacy-exchange?{query}",
            headers={"Authorization": f"Bearer diracx:legacy:{raw}"},
        )
        if status != 200:
            raise RuntimeError(f"legacy exchange for {username}/{group} failed: {status} {body[:500]!r}")
        return json.loads(body)

    def stop(self) -> None:
        """Stop every process we started (uvicorn first, then moto and the IdP double)."""
        for proc in self.processes:
            _stop(proc)
        self.processes.clear()


def start_diracx_server(
    workdir: pathlib.Path,
    *,
    startup_timeout: float = 120.0,
    token_minutes: int = 12 * 60,
    refresh_minutes: Optional[int] = None,
    with_idp: bool = False,
) -> DiracxServer:
    """Start moto (S3) and DiracX on free loopback ports under `workdir`; return once both answer.

    Access tokens live `token_minutes` (DiracX's default is 20) so a long test session can keep one token;
    refresh tokens live `refresh_minutes` (default: twice as long). DiracX counts both in whole minutes. A
    refresh token handed out on rotation only gets what was left of the one it replaces, so `refresh_minutes`
    is how long one login lasts. With `with_idp` the VO's IdP is the OIDC double of `oidc_idp.py` on loopback
    (so the device flow can be completed); otherwise it is an unreachable `https://idp.invalid`. On any failure
    every process already started is stopped before the exception propagates.
    """
    started = time.monotonic()
    venv = diracx_venv()
    python = venv_python(venv)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    (workdir / "db").mkdir(exist_ok=True)
    (workdir / "home").mkdir(exist_ok=True)
    legacy_key = secrets.token_urlsafe(32)
    server = DiracxServer(url="", venv=venv, workdir=workdir, legacy_key=legacy_key)
    try:
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("DIRACX_", "VIRTUAL_ENV", "PYTHON"))}
        base_env.update({"HOME": str(workdir / "home"), "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}"})
        base_env.update({"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})

        moto_port = free_port()
        server.s3_url = f"http://127.0.0.1:{moto_port}"
        moto_log = workdir / "logs" / "moto.log"
        moto = _start(
            [str(venv / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(moto_port)], base_env, moto_log, workdir
        )
        server.processes.append(moto)

        idp_url = "https://idp.invalid"
        if with_idp:
            idp_port = free_port()
            idp_url = server.idp_url = f"http://127.0.0.1:{idp_port}"
            idp_log = workdir / "logs" / "idp.log"
            idp = _start(
                [
                    str(python),
                    str(SCRIPTS_DIR / "oidc_idp.py"),
                    "--port",
                    str(idp_port),
                    "--client-id",
                    IDP_CLIENT_ID,
                    "--users",
                    json.dumps(USERS),
                ],
                base_env,
                idp_log,
                workdir,
            )
            server.processes.append(idp)
            _wait_http(f"{idp_url}/.well-known/openid-configuration", idp, idp_log, 30.0)
        _write_config_repo(workdir / "cs", idp_url)
        keystore = workdir / "jwks.json"
        subprocess.run(
            [str(python), "-m", "diracx.logic", "rotate-jwk", "--jwks-path", str(keystore)],
            check=True,
            capture_output=True,
            env=base_env,
        )

        port = free_port()
        server.url = f"http://127.0.0.1:{port}"
        env = dict(base_env)
        env.update(_sqlite_db_urls(python, workdir / "db"))
        env.update(
            {
                "DIRACX_CONFIG_BACKEND_URL": f"git+file://{workdir / 'cs'}",
                "DIRACX_SERVICE_AUTH_TOKEN_KEYSTORE": f"file://{keystore}",
                "DIRACX_SERVICE_AUTH_STATE_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
                "DIRACX_SERVICE_AUTH_TOKEN_ISSUER": server.url,
                "DIRACX_SERVICE_AUTH_ALLOWED_REDIRECTS": json.dumps([f"{server.url}/api/docs/oauth2-redirect"]),
                "DIRACX_SANDBOX_STORE_BUCKET_NAME": SANDBOX_BUCKET,
                "DIRACX_SANDBOX_STORE_AUTO_CREATE_BUCKET": "true",
                "DIRACX_SANDBOX_STORE_S3_CLIENT_KWARGS": json.dumps(
                    {"endpoint_url": server.s3_url, "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
                ),
                "DIRACX_LEGACY_EXCHANGE_HASHED_API_KEY": hashlib.sha256(legacy_key.encode()).hexdigest(),
                "DIRACX_SERVICE_AUTH_ACCESS_TOKEN_EXPIRE_MINUTES": str(token_minutes),
                "DIRACX_SERVICE_AUTH_REFRESH_TOKEN_EXPIRE_MINUTES": str(refresh_minutes or 2 * token_minutes),
            }
        )
        _wait_http(f"{server.s3_url}/", moto, moto_log, 30.0)

        uvicorn = _start(
            [
                str(python),
                "-m",
                "uvicorn",
                "--factory",
                "diracx.testing.routers:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--no-access-log",
            ],
            env,
            server.log,
            workdir,
        )
        server.processes.insert(0, uvicorn)
        _wait_http(f"{server.url}/api/health/ready", uvicorn, server.log, startup_timeout)
        server.credentials = server.mint()
        server.token = str(server.credentials["access_token"])
        server.startup_seconds = time.monotonic() - started
        return server
    except BaseException:
        server.stop()
        raise


@contextlib.contextmanager
def running_diracx_server(workdir: pathlib.Path, **kwargs: Any) -> Iterator[DiracxServer]:
    """Context manager around start_diracx_server/stop."""
    server = start_diracx_server(workdir, **kwargs)
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":
    # Manual use (from the repo root): python -m tests.contract.diracx_server; Ctrl-C or SIGTERM stops it.
    import tempfile

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    with tempfile.TemporaryDirectory(prefix="diracx-") as tmp, running_diracx_server(pathlib.Path(tmp)) as srv:
        print(
            json.dumps(
                {"url": srv.url, "token": srv.token, "workdir": tmp, "startup_seconds": round(srv.startup_seconds, 1)}
            ),
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            while all(p.poll() is None for p in srv.processes):
                time.sleep(1)
