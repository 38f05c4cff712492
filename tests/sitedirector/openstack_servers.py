"""Real OpenStack servers for the OpenStack CE tests: Keystone under gunicorn and nova-api in one process.

This file has two lives:

* imported by the tests (our venv, stdlib only at import time): :func:`openstack_venv` builds the side venv,
  :class:`Keystone` and :class:`Nova` start the servers as subprocesses on free loopback ports (each in its own
  process group, killed on stop) and wait until they answer.
* run inside the side venv: ``python openstack_servers.py nova ...`` assembles a real nova-api (real API WSGI
  application with keystonemiddleware validating tokens against our Keystone, real conductor, scheduler and
  compute manager with nova's fake virt driver, the real placement service, oslo.messaging's in-memory transport,
  SQLite) out of the fixtures nova ships for its own functional tests, and serves it on a loopback socket; and
  gunicorn loads :func:`keystone_app` as Keystone's WSGI application.

The only non-OpenStack piece is :func:`_oidc_frontend`, which plays the part of Apache's mod_auth_openidc in front
of Keystone (it turns a known bearer token into the OIDC claim variables mod_auth_openidc would set); Keystone's
own federation code (identity provider, mapping, protocol, unscoped federated token, project discovery) is real.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional

HERE = pathlib.Path(__file__).resolve().parent

#: The side venv: Keystone and nova-api (with nova's functional-test fixtures' own deps), never in our venv.
OPENSTACK_REQUIREMENTS: List[str] = [
    "keystone==30.0.0",
    "nova==34.0.0",
    "openstack-placement==16.0.0",
    "SQLAlchemy<2.1",
    "gunicorn",
    # what nova.tests.fixtures / nova.tests.functional import
    "fixtures",
    "testtools",
    "oslotest",
    "wsgi-intercept",
    "requests-mock",
    "testscenarios",
    "testresources",
]

OIDC_ISSUER = "https://aai.test.invalid/auth/realms/egi"
#: Images nova's GlanceFixture serves: a normal one, and one whose VMs our harness keeps in BUILD for a while.
IMAGE_ID = "155d900f-4e14-4e4c-a73d-069cbf4541e6"
SLOW_IMAGE_ID = "a2459075-d96c-40d5-893e-577ff92e721c"
SLOW_SPAWN_SECONDS = 6.0
#: A network nova's NeutronFixture serves.
NETWORK_ID = "3cb9bc59-5699-4588-a4b1-b87f96708bc6"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def openstack_venv() -> pathlib.Path:
    """Build (once) and return the side venv."""
    sys.path.insert(0, str(HERE.parent.parent))
    from tests.sidevenvs import ensure_venv

    return ensure_venv("openstack", OPENSTACK_REQUIREMENTS)


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: pathlib.Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited ({proc.returncode}):\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url}: no answer after {timeout}s:\n{log.read_text()[-6000:]}")


def _stop(proc: Optional[subprocess.Popen]) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class Keystone:
    """Keystone (SQLite, fernet tokens) served by gunicorn on a loopback port, bootstrapped with an admin."""

    ADMIN_PASSWORD = "admin-secret"

    def __init__(self, venv: pathlib.Path, workdir: pathlib.Path) -> None:
        self.venv = venv
        self.dir = workdir / "keystone"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v3"
        self.proc: Optional[subprocess.Popen] = None
        self.started_in = 0.0
        self.oidc_tokens = self.dir / "oidc-tokens.json"

    def _manage(self, *commands: List[str]) -> None:
        """Run keystone-manage commands concurrently (each pays ~5 s of imports) and check them all."""
        procs = []
        for args in commands:
            cmd = [str(self.venv / "bin" / "keystone-manage"), "--config-file", str(self.conf), *args]
            procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        for cmd, proc in procs:
            out, _ = proc.communicate()
            if proc.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-6000:]}")

    def _synced_db(self) -> pathlib.Path:
        """An empty Keystone database with the schema (db_sync takes ~15 s), made once per side venv."""
        template = self.venv / "keystone-schema.db"
        if not template.exists():
            self._manage(["db_sync"])  # into this run's database (see the config), then kept as the template
            tmp = self.venv / f".keystone-schema.{os.getpid()}"
            shutil.copyfile(self.dir / "keystone.db", tmp)
            os.replace(tmp, template)  # atomic: concurrent runs may both build it, one wins
        return template

    def start(self) -> None:
        started = time.monotonic()
        self.dir.mkdir(parents=True)
        self.conf = self.dir / "keystone.conf"
        self.oidc_tokens.write_text("{}")
        self.conf.write_text(
            f"""[DEFAULT]
log_file = {self.dir / "keystone.log"}
[database]
connection = sqlite:///{self.dir / "keystone.db"}
[token]
provider = fernet
expiration = 3600
[fernet_tokens]
key_repository = {self.dir / "fernet"}
[fernet_receipts]
key_repository = {self.dir / "fernet"}
[credential]
key_repository = {self.dir / "credential"}
[auth]
methods = password,token,application_credential,openid,mapped
[openid]
remote_id_attribute = OIDC_CLAIM_iss
[federation]
trusted_dashboard = http://127.0.0.1/dashboard
"""
        )
        user, group = str(os.getuid()), str(os.getgid())
        template = self._synced_db()
        if not (self.dir / "keystone.db").exists():
            shutil.copyfile(template, self.dir / "keystone.db")
        self._manage(
            ["fernet_setup", "--keystone-user", user, "--keystone-group", group],
            ["credential_setup", "--keystone-user", user, "--keystone-group", group],
            [
                "bootstrap",
                "--bootstrap-password", self.ADMIN_PASSWORD,
                "--bootstrap-admin-url", self.url,
                "--bootstrap-public-url", self.url,
                "--bootstrap-internal-url", self.url,
                "--bootstrap-region-id", "RegionOne",
            ],
        )  # fmt: skip
        env = dict(os.environ, OS_KEYSTONE_CONFIG_FILES=str(self.conf), GD_OIDC_TOKENS=str(self.oidc_tokens))
        log = self.dir / "gunicorn.log"
        with open(log, "wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [
                    str(self.venv / "bin" / "gunicorn"),
                    "--bind", f"127.0.0.1:{self.port}",
                    "--workers", "1",
                    "--threads", "4",
                    "--pythonpath", str(HERE),
                    "openstack_servers:keystone_app()",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )  # fmt: skip
        _wait_http(self.url, self.proc, 60, log)
        self.started_in = time.monotonic() - started

    def stop(self) -> None:
        _stop(self.proc)

    def add_oidc_token(self, token: str, claims: Dict[str, Any]) -> None:
        """Make ``token`` valid at the OIDC front (as if the IdP had issued it with these claims)."""
        tokens = json.loads(self.oidc_tokens.read_text())
        tokens[token] = claims
        self.oidc_tokens.write_text(json.dumps(tokens))


class Nova:
    """The real nova-api (plus conductor, scheduler, compute with the fake driver, placement) in one process."""

    def __init__(self, venv: pathlib.Path, workdir: pathlib.Path, keystone_url: str, service_password: str) -> None:
        self.venv = venv
        self.dir = workdir / "nova"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v2.1"
        self.keystone_url = keystone_url
        self.service_password = service_password
        self.proc: Optional[subprocess.Popen] = None
        self.started_in = 0.0

    def start(self) -> None:
        started = time.monotonic()
        self.dir.mkdir(parents=True)
        log = self.dir / "nova.log"
        env = dict(os.environ, OS_NOVA_DISABLE_EVENTLET_PATCHING="1", GD_NOVA_SERVICE_PASSWORD=self.service_password)
        with open(log, "wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [
                    str(self.venv / "bin" / "python"), str(HERE / "openstack_servers.py"), "nova",
                    "--port", str(self.port), "--keystone", self.keystone_url, "--state", str(self.dir),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )  # fmt: skip
        _wait_http(f"http://127.0.0.1:{self.port}/", self.proc, 120, log)
        self.started_in = time.monotonic() - started

    def stop(self) -> None:
        _stop(self.proc)

    def log(self) -> str:
        path = self.dir / "nova.log"
        return path.read_text(errors="replace") if path.exists() else ""


def admin_session(keystone_url: str) -> Any:
    """A keystoneauth session as Keystone's bootstrap admin (admin project); needs keystoneauth1 (our venv)."""
    from keystoneauth1 import session
    from keystoneauth1.identity import v3

    auth = v3.Password(
        auth_url=keystone_url,
        username="admin",
        password=Keystone.ADMIN_PASSWORD,
        project_name="admin",
        user_domain_id="default",
        project_domain_id="default",
    )
    return session.Session(auth=auth)


def _role(ks: Any, name: str) -> Any:
    found = ks.roles.list(name=name)
    return found[0] if found else ks.roles.create(name=name)


def register_nova_service(keystone_url: str, nova_url: str, password: str) -> None:
    """The nova service user (service role, for keystonemiddleware) and the compute endpoint in the catalog."""
    from keystoneclient.v3 import client

    ks = client.Client(session=admin_session(keystone_url))
    service_project = ks.projects.create("service", domain="default")
    nova_user = ks.users.create("nova", domain="default", password=password, default_project=service_project)
    ks.roles.grant(_role(ks, "service"), user=nova_user, project=service_project)
    ks.roles.grant(_role(ks, "admin"), user=nova_user, project=service_project)
    svc = ks.services.create("nova", type="compute")
    for interface in ("public", "internal", "admin"):
        ks.endpoints.create(svc, nova_url, interface=interface, region="RegionOne")


def create_tenant(keystone_url: str, project: str, user: str, password: str) -> Dict[str, str]:
    """A project with a member user (what a site gives a VO); returns ids."""
    from keystoneclient.v3 import client

    ks = client.Client(session=admin_session(keystone_url))
    proj = ks.projects.create(project, domain="default")
    usr = ks.users.create(user, domain="default", password=password, default_project=proj)
    ks.roles.grant(_role(ks, "member"), user=usr, project=proj)
    ks.roles.grant(_role(ks, "reader"), user=usr, project=proj)
    return {"project_id": proj.id, "user_id": usr.id}


def setup_federation(keystone_url: str, idp: str, entitlement: str, projects: List[str]) -> Dict[str, str]:
    """Keystone's OIDC federation as an EGI FedCloud site sets it up: an identity provider whose remote id is the
    Check-in issuer, a mapping from a VO entitlement to a group, the ``openid`` protocol, and the group given the
    member role on ``projects`` (created here). Returns project name → id."""
    from keystoneclient.v3 import client

    ks = client.Client(session=admin_session(keystone_url))
    group = ks.groups.create(f"{idp}-members", domain="default")
    ids = {}
    for name in projects:
        proj = ks.projects.create(name, domain="default")
        ks.roles.grant(_role(ks, "member"), group=group, project=proj)
        ks.roles.grant(_role(ks, "reader"), group=group, project=proj)
        ids[name] = proj.id
    ks.federation.identity_providers.create(id=idp, remote_ids=[OIDC_ISSUER], enabled=True)
    rules = [
        {
            "local": [{"user": {"name": "{0}"}}, {"group": {"id": group.id}}],
            "remote": [
                {"type": "OIDC_CLAIM_sub"},
                {"type": "OIDC_CLAIM_eduperson_entitlement", "any_one_of": [entitlement]},
            ],
        }
    ]
    ks.federation.mappings.create(mapping_id=f"{idp}-mapping", rules=rules)
    ks.federation.protocols.create("openid", identity_provider=idp, mapping=f"{idp}-mapping")
    return ids


# --------------------------------------------------------------------------------------------------------------
# Below: runs inside the side venv only.


def _oidc_frontend(app: Any, tokens_file: str) -> Any:
    """Stand-in for mod_auth_openidc in front of Keystone's federation auth route (not Keystone code).

    A request to ``/v3/OS-FEDERATION/identity_providers/*/protocols/openid/auth`` must carry a bearer token known
    in ``tokens_file`` (what the test's pretend IdP issued); its claims become ``OIDC_CLAIM_*`` environ variables
    and REMOTE_USER, as mod_auth_openidc sets them. Unknown tokens get 401 like from the real module.
    """

    def frontend(environ: Dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if "/OS-FEDERATION/identity_providers/" in path and path.endswith("/protocols/openid/auth"):
            auth = environ.get("HTTP_AUTHORIZATION", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            with open(tokens_file) as fh:
                claims = json.load(fh).get(token) if token else None
            if not claims:
                start_response("401 Unauthorized", [("Content-Type", "text/plain")])
                return [b"invalid or missing bearer token\n"]
            for key, value in claims.items():
                environ[f"OIDC_CLAIM_{key}"] = ";".join(value) if isinstance(value, list) else str(value)
            environ["REMOTE_USER"] = str(claims.get("sub", ""))
        return app(environ, start_response)

    return frontend


def keystone_app() -> Any:
    """gunicorn entry (``openstack_servers:keystone_app()``): Keystone's public WSGI application.

    oslo.config parses ``sys.argv`` and would choke on gunicorn's options, so the entry resets it first.
    """
    sys.argv = [sys.argv[0]]
    from keystone.server import wsgi

    app = wsgi.initialize_public_application()
    return _oidc_frontend(app, os.environ["GD_OIDC_TOKENS"])


def _nova_main(argv: List[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--keystone", required=True)
    parser.add_argument("--state", required=True)
    args = parser.parse_args(argv)
    sys.argv = [sys.argv[0]]  # oslo.config again
    os.environ.setdefault("OS_NOVA_DISABLE_EVENTLET_PATCHING", "1")
    os.environ["TMPDIR"] = args.state  # nova's fixtures put their SQLite files in temp dirs
    from nova import monkey_patch  # first: decides threading vs eventlet before anything imports eventlet

    monkey_patch.patch()
    from keystoneauth1 import loading as ks_loading
    from nova import conf as nova_conf
    from nova import test
    from nova.api import openstack as _api  # noqa: F401 - registers the API options
    from nova.tests import fixtures as nova_fixtures
    from nova.tests.functional import fixtures as func_fixtures

    conf = nova_conf.CONF

    class Cloud(test.TestCase):
        """Not a test: nova's functional-test harness set up once and then served until we are killed."""

        def runTest(self) -> None:  # testtools wants a test method name
            pass

        def setUp(self) -> None:
            super().setUp()
            self.useFixture(func_fixtures.PlacementFixture())
            self.neutron = self.useFixture(nova_fixtures.NeutronFixture(self))
            self.useFixture(nova_fixtures.CinderFixture(self))
            self.useFixture(nova_fixtures.GlanceFixture(self))
            self.useFixture(nova_fixtures.RealPolicyFixture())
            self.useFixture(nova_fixtures.NotificationFixture(self))
            self.flags(transport_url=self.cell_mappings["cell1"].transport_url)
            self._slow_image_spawns()
            self.start_service("conductor")
            self.start_service("scheduler")
            self._start_compute("compute1")
            self._start_compute("compute2")
            # keystonemiddleware validates every token against our Keystone with the nova service user
            group = "keystone_authtoken"
            ks_loading.register_auth_conf_options(conf, group)
            conf.register_opts(ks_loading.get_auth_plugin_conf_options("password"), group=group)
            self.flags(
                auth_type="password",
                auth_url=args.keystone,
                username="nova",
                password=os.environ["GD_NOVA_SERVICE_PASSWORD"],
                project_name="service",
                user_domain_name="Default",
                project_domain_name="Default",
                www_authenticate_uri=args.keystone,
                group=group,
            )
            self.flags(api_paste_config=os.path.join(sys.prefix, "etc", "nova", "api-paste.ini"), group="wsgi")

        def _slow_image_spawns(self) -> None:
            """VMs of :data:`SLOW_IMAGE_ID` take :data:`SLOW_SPAWN_SECONDS` to spawn in the fake virt driver, so the
            tests can see a real BUILD (task_state spawning); every other image spawns at once as usual."""
            import time as _time

            import fixtures
            from nova.virt import fake

            real_spawn = fake.FakeDriver.spawn

            def spawn(driver: Any, context: Any, instance: Any, *a: Any, **kw: Any) -> Any:
                if instance.image_ref == SLOW_IMAGE_ID:
                    _time.sleep(SLOW_SPAWN_SECONDS)
                return real_spawn(driver, context, instance, *a, **kw)

            self.useFixture(fixtures.MonkeyPatch("nova.virt.fake.FakeDriver.spawn", spawn))

    cloud = Cloud()
    try:
        return _serve(cloud, args.port)
    except Exception:
        import traceback

        traceback.print_exc(file=sys.__stderr__)  # nova's fixtures capture sys.stderr
        raise


def _serve(cloud: Any, port: int) -> int:
    import wsgiref.simple_server
    from socketserver import ThreadingMixIn

    from nova import conf as nova_conf
    from nova.api import wsgi as nova_wsgi
    from nova.api.openstack import wsgi_app

    conf = nova_conf.CONF
    cloud.setUp()

    app = nova_wsgi.Loader().load_app("osapi_compute")
    wsgi_app._setup_service(conf.host, "osapi_compute")

    class Server(ThreadingMixIn, wsgiref.simple_server.WSGIServer):
        daemon_threads = True

    class Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

    httpd = wsgiref.simple_server.make_server("127.0.0.1", port, app, server_class=Server, handler_class=Quiet)
    print(f"nova-api listening on 127.0.0.1:{port}", file=sys.__stdout__, flush=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    try:
        httpd.serve_forever()
    finally:
        cloud.doCleanups()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "nova":
        sys.exit(_nova_main(sys.argv[2:]))
    print("usage: openstack_servers.py nova --port P --keystone URL --state DIR", file=sys.stderr)
    sys.exit(2)
