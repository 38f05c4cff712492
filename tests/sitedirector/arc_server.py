"""A real NorduGrid ARC 6 CE for the tests: A-REX with its REST service and the fork LRMS, on 127.0.0.1.

Debian ships ARC (``nordugrid-arc-arex`` holds A-REX and the REST service); :func:`ensure_installed` installs
it when missing. :class:`ArcCE` lays out a private CE under a scratch directory — its own test CA
(``arcctl test-ca``), host and user certificates, a proxy made by ``arcproxy``, an ``arc.conf`` passed through
``ARC_CONFIG`` (nothing is written to ``/etc/arc.conf``) — and runs the two ``arched`` daemons the systemd units
would (grid manager, and the HTTPS/REST listener) from copies of the packaged start scripts with two changes:
the listener binds 127.0.0.1 only (ARC 6 has no listen-address setting), and the infoprovider runs every
couple of seconds instead of every minute, because REST job states are read from its per-job records and
would otherwise lag by a minute. :class:`TokenIssuer` is a throw-away OIDC issuer (discovery + JWKS over
HTTPS) minting WLCG-style JWTs; A-REX fetches its keys trusting only the system grid CA directory, so the
test CA is linked there for the CE's lifetime (files named ``gd-arc-test-*``, removed by :meth:`ArcCE.stop`).

Jobs run as the unprivileged account :data:`JOB_USER` (A-REX refuses to map to root). The fork LRMS leaves a
killed job's payload running; :meth:`ArcCE.stop` ends every process of that account in the sessions of the
grid-manager daemons it started (arched calls setsid, so their PIDs are the jobs' session ids).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import pwd
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import requests

from tests.conftest import free_port, unavailable

#: Debian packages: A-REX + REST, arcctl (test CA), arcproxy, and the plugins A-REX loads (TLS, HTTP, ...).
PACKAGES = (
    "nordugrid-arc-arex",
    "nordugrid-arc-arcctl",
    "nordugrid-arc-arcctl-service",
    "nordugrid-arc-client",
    "nordugrid-arc-plugins-needed",
)
JOB_USER = "gdarc"
GRID_CA_DIR = Path("/etc/grid-security/certificates")
USER_DN_FILE = "allowed-subjects"


def ensure_installed() -> None:
    """Install the ARC packages when missing (root + apt), else skip (or fail where CI requires everything)."""
    if subprocess.run(["dpkg", "-s", *PACKAGES], capture_output=True).returncode == 0:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        unavailable("ARC CE", "the nordugrid-arc packages are missing and cannot be installed without root + apt")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            unavailable("ARC CE", f"{' '.join(cmd[:2])} failed: {done.stderr.strip()[-500:]}")


def _run(*cmd: str, cwd: Optional[Path] = None, env: Optional[dict] = None, timeout: float = 60) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class TokenIssuer:
    """An HTTPS OIDC issuer on 127.0.0.1 (discovery document and JWKS) that mints RS256 WLCG tokens."""

    def __init__(self, port: int, cert: Path, key: Path) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.port = port
        self.url = f"https://localhost:{port}"
        self.key = rsa.generate_private_key(65537, 2048)
        self.kid = uuid.uuid4().hex[:8]
        self.requests: list[str] = []
        numbers = self.key.public_key().public_numbers()

        def b64(i: int) -> str:
            import base64

            return base64.urlsafe_b64encode(i.to_bytes((i.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()

        jwks = {"keys": [{"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid, "n": b64(numbers.n),
                          "e": b64(numbers.e)}]}  # fmt: skip
        meta = {"issuer": self.url, "jwks_uri": f"{self.url}/jwks", "token_endpoint": f"{self.url}/token",
                "id_token_signing_alg_values_supported": ["RS256"]}  # fmt: skip
        documents = {"/.well-known/openid-configuration": meta, "/jwks": jwks}
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                # A-REX sends the absolute URL as the request target.
                path = self.path[len(issuer.url) :] if self.path.startswith(issuer.url) else self.path
                issuer.requests.append(path)
                body = documents.get(path)
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def mint(self, sub: str = "gd-pilot-token", lifetime: int = 3600, audience: str = "https://localhost") -> str:
        import jwt

        now = int(time.time())
        claims = {
            "iss": self.url, "sub": sub, "aud": audience, "wlcg.ver": "1.0", "iat": now, "nbf": now - 60,
            "exp": now + lifetime, "jti": uuid.uuid4().hex,
            "scope": "compute.read compute.create compute.modify compute.cancel",
        }  # fmt: skip
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ArcCE:
    """A private A-REX (fork LRMS) under a scratch directory; see the module docstring."""

    def __init__(self, info_period: float = 2.0) -> None:
        # Not under pytest's tmp dirs: the job user must traverse every parent of the session directory.
        self.root = Path(tempfile.mkdtemp(prefix="gd-arex-"))
        self.root.chmod(0o755)
        self.port = free_port()
        self.issuer_port = free_port()
        self.endpoint = f"https://localhost:{self.port}/arex"
        self.info_period = info_period
        self.ca_id = f"gd{uuid.uuid4().hex[:6]}"
        self.conf = self.root / "arc.conf"
        self.ca_file = self.root / "ca.pem"
        self.certdir = self.root / "certificates"
        self.proxy = self.root / "user" / "proxy.pem"
        self.intruder_proxy = self.root / "intruder" / "proxy.pem"
        self.shared = self.root / "shared"  # world-writable: test payloads leave PIDs and marks here
        self.gm_pids: list[int] = []
        self.system_files: list[Path] = []
        self.issuer: Optional[TokenIssuer] = None
        self.timings: dict[str, float] = {}

    # --- setup ------------------------------------------------------------------------------------------------
    def setup(self) -> ArcCE:
        started = time.monotonic()
        try:
            pwd.getpwnam(JOB_USER)
        except KeyError:
            _run("useradd", "--system", "--create-home", "--home-dir", f"/var/lib/{JOB_USER}", "--shell", "/bin/sh",
                 JOB_USER)  # fmt: skip
        for sub in ("certificates", "certs", "var/jobstatus", "var/session", "var/tmp", "log", "run", "bin", "user",
                    "intruder", "shared"):  # fmt: skip
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("var", "var/session"):
            (self.root / sub).chmod(0o755)
        (self.root / "var/tmp").chmod(0o1777)
        self.shared.chmod(0o1777)
        arcctl = ["arcctl", "test-ca", "--ca-dir", str(self.certdir), "--ca-id", self.ca_id]
        _run(*arcctl, "init", "-v", "30")
        _run(*arcctl, "hostcert", "-n", "localhost", "-v", "30", "-f", cwd=self.root / "certs")
        for who, name in (("user", "gd-pilot"), ("intruder", "gd-intruder")):
            _run(*arcctl, "usercert", "-n", name, "-v", "30", "-f", "--no-auth", cwd=self.root / who)
        shutil.copy(self.certdir / f"ARC-TestCA-{self.ca_id}.pem", self.ca_file)
        host = self.root / "certs"
        (host / "host-localhost-cert.pem").rename(host / "hostcert.pem")
        (host / "host-localhost-key.pem").rename(host / "hostkey.pem")
        dns = []
        for who, name in (("user", "gd-pilot"), ("intruder", "gd-intruder")):
            d = self.root / who
            (d / f"client-{name}-cert.pem").rename(d / "usercert.pem")
            (d / f"client-{name}-key.pem").rename(d / "userkey.pem")
            (d / "userkey.pem").chmod(0o400)
            dn = _run("openssl", "x509", "-in", str(d / "usercert.pem"), "-noout", "-subject", "-nameopt", "compat")
            dns.append(dn.strip().removeprefix("subject=").strip())
            self._arcproxy(d)
        self.user_dn = dns[0]
        (self.root / USER_DN_FILE).write_text(f'"{self.user_dn}"\n')  # only the pilot user, not the intruder
        # Otherwise the listener's start script runs 'openssl dhparam 4096' (minutes of CPU); DSA-style params
        # take a fraction of a second and pass the script's check.
        dh = self.root / "var/jobstatus/dhparam.pem"
        _run("openssl", "dhparam", "-dsaparam", "-out", str(dh), "2048")
        dh.chmod(0o600)
        self._write_conf()
        self._start_scripts()
        self._trust_ca_for_tokens()
        self.issuer = TokenIssuer(self.issuer_port, host / "hostcert.pem", host / "hostkey.pem")
        self.timings["setup"] = time.monotonic() - started
        return self

    def _arcproxy(self, d: Path) -> None:
        env = {**os.environ, "X509_USER_CERT": str(d / "usercert.pem"), "X509_USER_KEY": str(d / "userkey.pem"),
               "X509_CERT_DIR": str(self.certdir), "X509_USER_PROXY": str(d / "proxy.pem")}  # fmt: skip
        _run("arcproxy", "-c", "validityPeriod=12h", env=env)

    def _write_conf(self) -> None:
        r = self.root
        self.conf.write_text(f"""\
[common]
hostname = localhost
x509_host_key = {r}/certs/hostkey.pem
x509_host_cert = {r}/certs/hostcert.pem
x509_cert_dir = {self.certdir}

[authgroup: gdusers]
file = {r}/{USER_DN_FILE}
authtokens = * https://localhost:{self.issuer_port} * * *

[mapping]
map_to_user = gdusers {JOB_USER}:{JOB_USER}
policy_on_nomap = stop

[authtokens]

[lrms]
lrms = fork

[arex]
loglevel = 3
logfile = {r}/log/arex.log
joblog = {r}/log/arex-jobs.log
helperlog = {r}/log/job.helper.errors
controldir = {r}/var/jobstatus
sessiondir = {r}/var/session
tmpdir = {r}/var/tmp
pidfile = {r}/run/arched-arex.pid
wakeupperiod = 5
defaultttl = 3600 7200

[arex/data-staging]
logfile = {r}/log/datastaging.log

[arex/ws]
wsurl = {self.endpoint}
logfile = {r}/log/ws-interface.log
pidfile = {r}/run/arched-arex-ws.pid
max_infosys_requests = 4

[arex/ws/jobs]
allowaccess = gdusers

[infosys]
logfile = {r}/log/infoprovider.log

[infosys/glue2]

[infosys/cluster]
advertisedvo = gd

[queue: fork]
comment = fork LRMS on localhost
advertisedvo = gd
""")

    def _start_scripts(self) -> None:
        """Copies of the packaged start scripts: infoprovider period (unit: 0.1 s) and a 127.0.0.1 listener."""
        gm = Path("/usr/share/arc/arc-arex-start").read_text()
        anchor = "<arex:gmconfig>$ARC_RUNTIME_CONFIG</arex:gmconfig>"
        period = f"<arex:InfoproviderWakeupPeriod>{int(self.info_period * 10)}</arex:InfoproviderWakeupPeriod>"
        ws = Path("/usr/share/arc/arc-arex-ws-start").read_text()
        listen = "<tcp:Listen><tcp:Port>$arex_port</tcp:Port></tcp:Listen>"
        local = "<tcp:Listen><tcp:Interface>127.0.0.1</tcp:Interface><tcp:Port>$arex_port</tcp:Port></tcp:Listen>"
        if anchor not in gm or listen not in ws:
            raise RuntimeError("the packaged A-REX start scripts changed; cannot set the infoprovider period/listener")
        for name, text in (("arc-arex-start", gm.replace(anchor, anchor + period)),
                           ("arc-arex-ws-start", ws.replace(listen, local))):  # fmt: skip
            path = self.root / "bin" / name
            path.write_text(text)
            path.chmod(0o755)

    def _trust_ca_for_tokens(self) -> None:
        """A-REX checks the token issuer's TLS against the system grid CA directory only: link the test CA there."""
        GRID_CA_DIR.mkdir(parents=True, exist_ok=True)
        name = f"gd-arc-test-{self.ca_id}.pem"
        shutil.copy(self.ca_file, GRID_CA_DIR / name)
        self.system_files.append(GRID_CA_DIR / name)
        hashes = _run("openssl", "x509", "-in", str(self.ca_file), "-noout", "-subject_hash", "-subject_hash_old")
        for h in hashes.split():
            n = 0
            while (GRID_CA_DIR / f"{h}.{n}").exists() or (GRID_CA_DIR / f"{h}.{n}").is_symlink():
                n += 1
            (GRID_CA_DIR / f"{h}.{n}").symlink_to(name)
            self.system_files.append(GRID_CA_DIR / f"{h}.{n}")

    # --- daemons ------------------------------------------------------------------------------------------------
    def _pid(self, name: str) -> int:
        try:
            return int((self.root / "run" / name).read_text().strip())
        except (OSError, ValueError):
            return 0

    def start(self) -> ArcCE:
        started = time.monotonic()
        env = {**os.environ, "ARC_CONFIG": str(self.conf)}
        _run(str(self.root / "bin" / "arc-arex-start"), env=env)  # arched daemonizes and writes its pid file
        deadline = time.monotonic() + 20
        while not self._pid("arched-arex.pid") and time.monotonic() < deadline:
            time.sleep(0.1)
        self.gm_pids.append(self._pid("arched-arex.pid"))
        _run(str(self.root / "bin" / "arc-arex-ws-start"), env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{self.endpoint}/rest", verify=str(self.ca_file), timeout=2)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"A-REX did not answer on {self.endpoint}:\n{self.log_tail()}") from None
                time.sleep(0.2)
        self.timings["start"] = time.monotonic() - started
        return self

    def _stop_daemon(self, name: str) -> None:
        pid = self._pid(name)
        if not pid or not _alive(pid):
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            (self.root / "run" / name).unlink()

    def stop_daemons(self) -> None:
        self._stop_daemon("arched-arex-ws.pid")
        self._stop_daemon("arched-arex.pid")

    def restart(self) -> None:
        """Stop both daemons (running fork jobs survive, as on a real CE) and start them again."""
        self.stop_daemons()
        self.start()

    def job_processes(self) -> list[int]:
        """PIDs of the job user's processes that this CE's jobs started.

        Those in the sessions of the grid managers started here, and those that left them (rootless podman's
        pause process, started by the pilot's runtime probe, calls setsid) but still carry a job's environment
        pointing into this CE's scratch directory.
        """
        uid = pwd.getpwnam(JOB_USER).pw_uid
        mark = str(self.root).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid != uid:
                    continue
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # state ppid pgrp session ...
                if fields[0] == "Z":  # already dead, only waiting for its parent
                    continue
                if int(fields[3]) in self.gm_pids or mark in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
        return pids

    def processes(self) -> str:
        """``ps`` lines of :meth:`job_processes` (for failure messages)."""
        pids = self.job_processes()
        if not pids:
            return "none"
        return subprocess.run(["ps", "-o", "pid,sid,etime,args", "-p", ",".join(map(str, pids))], capture_output=True,
                              text=True).stdout  # fmt: skip

    def kill_jobs(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.job_processes()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if pids:
                time.sleep(1)

    def stop(self) -> None:
        """Stop the daemons by PID, end the jobs they started, remove the CA links and the scratch directory."""
        self.stop_daemons()
        self.kill_jobs()
        if self.issuer is not None:
            self.issuer.stop()
        for path in self.system_files:
            with contextlib.suppress(OSError):
                path.unlink()
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for name in ("arex.log", "ws-interface.log"):
            with contextlib.suppress(OSError):
                out.append(f"--- {name}\n" + "\n".join((self.root / "log" / name).read_text().splitlines()[-lines:]))
        return "\n".join(out)


@contextlib.contextmanager
def running_arex(info_period: int = 2) -> Iterator[ArcCE]:
    """A private A-REX, installed if missing and stopped (with every job process it started) afterwards: the one
    setup the ARC tests' module fixtures share."""
    try:
        import cryptography  # noqa: F401 - proxy delegation and the token issuer need it
    except ImportError:
        unavailable("cryptography", "the ARC backend's proxy delegation needs it (pip install cryptography)")
    ensure_installed()
    ce = ArcCE(info_period=info_period)
    try:
        ce.setup().start()
        print(f"\nA-REX {ce.endpoint}: setup {ce.timings['setup']:.1f}s, start {ce.timings['start']:.1f}s")
        yield ce
    finally:
        ce.stop()
