"""OpenStack backend: one pilot per Nova server (VM), booted with cloud-init user data that runs the pilot.

Authentication is a keystoneauth1 session from the queue's credential: ``keystone_password`` (v3password),
``application_credential`` (v3applicationcredential) or ``oidc_access_token`` (v3oidcaccesstoken, the EGI
FedCloud flow: Check-in access token → unscoped federated token → the projects that token may scope to, listed
with python-keystoneclient → a project-scoped token).

Nova is spoken to directly over the session (a keystoneauth ``Adapter`` for service type ``compute``) at a pinned
microversion, so behaviour does not change under us when a site upgrades.

Ownership: every VM we boot is named ``<name_prefix><stamp>``, tagged :data:`OWNER_TAG`, and carries metadata
(``galaxy_dirac=pilot``, the queue name, the pilot stamp). Nova ignores ``?metadata=`` filters for non-admin
users, so listings filter by name prefix and tag on the server side and check the metadata on our side.

Queue ``options`` (all optional except flavor and image):
``flavor`` (name or id), ``image`` (id, or name resolved through the image service), ``network`` (id, name
resolved through the network service, ``auto`` or ``none``; or a list), ``key_name``, ``security_groups``,
``availability_zone``, ``name_prefix`` (default ``gd-<queue name>-``), ``microversion`` (default
:data:`MICROVERSION`), ``max_concurrent_creates`` (3), ``build_timeout`` (s, 1800), ``max_lifetime`` (s, 0 =
none), ``idle_timeout`` (s, 0 = none: how long a pilot the director reports idle, or a paused/suspended VM, may
live), ``orphan_grace`` (s, 600), ``region_name``, ``interface`` (public), ``compute_endpoint`` (override of
the catalog), ``verify`` (bool or CA bundle path).
"""

from __future__ import annotations

import base64
import calendar
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from pydantic import Field, StrictBool, field_validator

from .base import (
    DELETED,
    DONE,
    FAILED,
    RUNNING,
    SCHEDULED,
    SUBMITTED,
    UNKNOWN,
    CEError,
    CEOptions,
    CEQueueFull,
    ComputingElement,
    PilotRef,
    PilotStatus,
)

try:  # optional dependency (the ``sitedirector`` extra); the registry imports this module only when needed
    from keystoneauth1 import adapter as ks_adapter
    from keystoneauth1 import exceptions as ks_exc
    from keystoneauth1 import session as ks_session
    from keystoneauth1.identity import v3 as ks_v3
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the OpenStack CE needs keystoneauth1 and python-keystoneclient") from exc

log = logging.getLogger(__name__)

#: Nova API microversion we speak (2.52+ boots with tags; 2.79 is Train, available on every FedCloud site).
MICROVERSION = "2.79"
#: Tag on every VM we own.
OWNER_TAG = "galaxy-dirac-pilot"
#: Largest base64 user data Nova accepts.
MAX_USER_DATA = 65535
_UUID = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")

#: Nova server status → DIRAC pilot state (BUILD is split by task_state in :func:`pilot_state`).
STATUS_MAP: Dict[str, str] = {
    "BUILD": SCHEDULED,
    "ACTIVE": RUNNING,
    "REBOOT": RUNNING,
    "HARD_REBOOT": RUNNING,
    "REBUILD": RUNNING,
    "MIGRATING": RUNNING,
    "RESIZE": RUNNING,
    "VERIFY_RESIZE": RUNNING,
    "REVERT_RESIZE": RUNNING,
    "PASSWORD": RUNNING,
    "PAUSED": RUNNING,
    "SUSPENDED": RUNNING,
    "RESCUE": RUNNING,
    "SHELVED": DONE,
    "SHELVED_OFFLOADED": DONE,
    "SHUTOFF": DONE,
    "STOPPED": DONE,
    "ERROR": FAILED,
    "DELETED": DELETED,
    "SOFT_DELETED": DELETED,
    "UNKNOWN": UNKNOWN,
}
#: Servers in these states have finished their pilot: deleted by :meth:`OpenStackComputingElement.cleanup`.
REAP_STATUSES = frozenset({"SHUTOFF", "STOPPED", "ERROR", "SHELVED", "SHELVED_OFFLOADED"})
#: Resting states that count as idle (the pilot is not running) for ``idle_timeout``.
IDLE_STATUSES = frozenset({"PAUSED", "SUSPENDED"})


# --------------------------------------------------------------------------------------------------------------
# Authentication


def _cred_value(cred: Any, key: str, default: Any = None) -> Any:
    if cred is None:
        return default
    if hasattr(cred, "get"):
        return cred.get(key, default)
    return getattr(cred, key, default)


def _access_token(cred: Any) -> str:
    token = _cred_value(cred, "access_token")
    if token:
        return str(token).strip()
    path = _cred_value(cred, "access_token_file")
    if not path:
        raise CEError("oidc_access_token credential needs access_token or access_token_file")
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError as exc:
        raise CEError(f"cannot read access_token_file {path}: {exc}") from exc


def _scope(cred: Any) -> Dict[str, Any]:
    scope: Dict[str, Any] = {}
    if _cred_value(cred, "project_id"):
        scope["project_id"] = _cred_value(cred, "project_id")
    elif _cred_value(cred, "project_name"):
        scope["project_name"] = _cred_value(cred, "project_name")
        scope["project_domain_name"] = _cred_value(cred, "project_domain_name", "Default")
        if _cred_value(cred, "project_domain_id"):
            scope.pop("project_domain_name")
            scope["project_domain_id"] = _cred_value(cred, "project_domain_id")
    return scope


def _session(auth: Any, cred: Any, verify: Any) -> ks_session.Session:
    if verify is None:
        verify = _cred_value(cred, "verify", _cred_value(cred, "cacert", True))
    return ks_session.Session(auth=auth, verify=verify, timeout=float(_cred_value(cred, "timeout", 60)))


def discover_projects(auth_url: str, unscoped_auth: Any, verify: Any = True) -> List[Dict[str, Any]]:
    """The projects an unscoped (e.g. federated) token may scope to, via python-keystoneclient.

    Returns ``[{"id", "name", "domain_id", "enabled"}]``; raises :class:`CEError` on auth failures.
    """
    from keystoneclient.v3 import client as ks_client

    sess = ks_session.Session(auth=unscoped_auth, verify=verify)
    try:
        projects = ks_client.Client(session=sess, auth_url=auth_url).auth.projects()
    except ks_exc.Unauthorized as exc:
        raise CEError(f"authentication failed at {auth_url}: {exc}") from exc
    except ks_exc.ClientException as exc:
        raise CEError(f"project discovery failed at {auth_url}: {exc}") from exc
    return [
        {"id": p.id, "name": p.name, "domain_id": getattr(p, "domain_id", None), "enabled": getattr(p, "enabled", True)}
        for p in projects
    ]


def choose_project(projects: Sequence[Dict[str, Any]], wanted_id: str = "", wanted_name: str = "") -> Dict[str, Any]:
    """Pick the project to scope to: the one named in the credential, else the only enabled one."""
    enabled = [p for p in projects if p.get("enabled", True)]
    if wanted_id:
        match = [p for p in enabled if p["id"] == wanted_id]
    elif wanted_name:
        match = [p for p in enabled if p["name"] == wanted_name]
    else:
        match = enabled
    if len(match) == 1:
        return match[0]
    names = ", ".join(sorted(f"{p['name']} ({p['id']})" for p in enabled)) or "none"
    if not match:
        want = wanted_id or wanted_name
        raise CEError(f"project {want!r} is not among the projects this token may use: {names}")
    raise CEError(f"several projects available ({names}); set project_id or project_name in the credential")


def make_session(cred: Any, verify: Any = None) -> ks_session.Session:
    """A keystoneauth1 session for a credential (:class:`sitedirector.config.Credential` or a mapping).

    Credential types: ``keystone_password``, ``application_credential``, ``oidc_access_token``.
    """
    ctype = _cred_value(cred, "type") or getattr(cred, "type", None)
    auth_url = _cred_value(cred, "auth_url")
    if not auth_url:
        raise CEError("OpenStack credential without auth_url")
    if ctype in ("keystone_password", "password", "v3password"):
        auth = ks_v3.Password(
            auth_url=auth_url,
            username=_cred_value(cred, "username"),
            password=_cred_value(cred, "password"),
            user_domain_name=_cred_value(cred, "user_domain_name", "Default"),
            **_scope(cred),
        )
        return _session(auth, cred, verify)
    if ctype in ("application_credential", "v3applicationcredential"):
        kwargs: Dict[str, Any] = {"application_credential_secret": _cred_value(cred, "application_credential_secret")}
        if _cred_value(cred, "application_credential_id"):
            kwargs["application_credential_id"] = _cred_value(cred, "application_credential_id")
        else:
            kwargs["application_credential_name"] = _cred_value(cred, "application_credential_name")
            kwargs["username"] = _cred_value(cred, "username")
            kwargs["user_domain_name"] = _cred_value(cred, "user_domain_name", "Default")
        return _session(ks_v3.ApplicationCredential(auth_url=auth_url, **kwargs), cred, verify)
    if ctype in ("oidc_access_token", "v3oidcaccesstoken"):
        oidc = {
            "auth_url": auth_url,
            "identity_provider": _cred_value(cred, "identity_provider"),
            "protocol": _cred_value(cred, "protocol", "openid"),
            "access_token": _access_token(cred),
        }
        scope = _scope(cred)
        if "project_id" not in scope:
            # EGI FedCloud: unscoped federated token → the projects it may use → scoped token.
            sess_verify = _cred_value(cred, "verify", True) if verify is None else verify
            projects = discover_projects(auth_url, ks_v3.OidcAccessToken(**oidc), sess_verify)
            chosen = choose_project(projects, wanted_name=scope.get("project_name", ""))
            scope = {"project_id": chosen["id"]}
        return _session(ks_v3.OidcAccessToken(**oidc, **scope), cred, verify)
    raise CEError(f"credential type {ctype!r} is not usable for OpenStack")


# --------------------------------------------------------------------------------------------------------------
# Helpers


def pilot_state(server: Optional[Dict[str, Any]]) -> PilotStatus:
    """DIRAC pilot state of a Nova server document (None: the server does not exist any more)."""
    if server is None:
        return PilotStatus(DELETED, "server not found")
    status = str(server.get("status", "UNKNOWN")).upper()
    if status == "BUILD":
        task = server.get("OS-EXT-STS:task_state") or ""
        return PilotStatus(SUBMITTED if task in ("", "scheduling") else SCHEDULED, f"BUILD ({task or 'queued'})")
    state = STATUS_MAP.get(status, UNKNOWN)
    reason = status
    if state == FAILED:
        fault = server.get("fault") or {}
        reason = f"ERROR: {fault.get('message', 'no fault message')}"
    return PilotStatus(state, reason)


def parse_time(value: Optional[str]) -> Optional[float]:
    """Nova's ISO-8601 UTC timestamps (``2026-11-24T22:40:00Z``) → epoch seconds."""
    if not value:
        return None
    text = value.rstrip("Z").split(".")[0].split("+")[0]
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return None


def _error_text(resp: Any) -> str:
    try:
        body = resp.json()
    except ValueError:
        return (resp.text or "").strip()[:500]
    if isinstance(body, dict):
        for value in body.values():
            if isinstance(value, dict) and "message" in value:
                return str(value["message"])
        if "message" in body:
            return str(body["message"])
    return str(body)[:500]


def is_quota_error(status_code: int, message: str) -> bool:
    """Nova answers 403 (413 before 2.x microversions) with "Quota exceeded ..." when a project is full."""
    text = message.lower()
    if "quota exceeded" in text or "quota_exceeded" in text or "exceeds quota" in text:
        return True
    return status_code == 413


# --------------------------------------------------------------------------------------------------------------
# The CE


class OpenStackComputingElement(ComputingElement):
    """Pilots as Nova servers. See the module docstring for the queue options."""

    type_name = "openstack"

    class Options(CEOptions):
        """The queue options of the module docstring; flavor and image are checked when the first pilot boots."""

        flavor: str = ""
        image: str = ""
        network: Union[str, List[str], None] = None
        key_name: str = ""
        security_groups: List[str] = Field(default_factory=list)
        availability_zone: str = ""
        #: Default ``gd-<queue name>-``.
        name_prefix: str = ""
        microversion: str = MICROVERSION
        max_concurrent_creates: int = Field(3, ge=1)
        build_timeout: float = Field(1800.0, ge=0)
        max_lifetime: float = Field(0.0, ge=0)
        idle_timeout: float = Field(0.0, ge=0)
        orphan_grace: float = Field(600.0, ge=0)
        region_name: Optional[str] = None
        interface: str = "public"
        compute_endpoint: Optional[str] = None
        verify: Union[StrictBool, str, None] = None

        @field_validator("flavor", "image", "microversion", "network", mode="before")
        @classmethod
        def _numbers_as_text(cls, value: Any) -> Any:
            """YAML reads a flavor id ``2`` or a microversion ``2.79`` as a number; they are names."""
            if isinstance(value, list):
                return [str(v) if isinstance(v, (int, float)) else v for v in value]
            return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    def __init__(
        self,
        queue: Any,
        bundle: Any = None,
        *,
        session: Optional[ks_session.Session] = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(queue, bundle)
        opts = self.read_options(queue)
        self.options = opts
        self.clock = clock
        self.name_prefix = opts.name_prefix or f"gd-{queue.name}-"
        self.microversion = opts.microversion
        self.max_concurrent = opts.max_concurrent_creates
        self.build_timeout = opts.build_timeout
        self.max_lifetime = opts.max_lifetime
        self.idle_timeout = opts.idle_timeout
        self.orphan_grace = opts.orphan_grace
        self._session = session
        self._compute: Optional[ks_adapter.Adapter] = None
        self._resolved: Dict[str, Any] = {}

    # -- plumbing ------------------------------------------------------------------------------------------------

    @property
    def session(self) -> ks_session.Session:
        if self._session is None:
            cred = getattr(self.queue, "credentials", None)
            if cred is None:
                raise CEError(f"queue {self.queue.name}: no credentials for OpenStack")
            self._session = make_session(cred, verify=self.options.verify)
        return self._session

    def _adapter(self, service_type: str, **kwargs: Any) -> ks_adapter.Adapter:
        return ks_adapter.Adapter(
            self.session,
            service_type=service_type,
            interface=self.options.interface,
            region_name=self.options.region_name,
            raise_exc=False,
            **kwargs,
        )

    @property
    def compute(self) -> ks_adapter.Adapter:
        if self._compute is None:
            self._compute = self._adapter(
                "compute",
                endpoint_override=self.options.compute_endpoint,
                default_microversion=self.microversion,
            )
        return self._compute

    def _call(self, method: str, url: str, **kwargs: Any) -> Any:
        """One Nova request; transport and authentication failures become :class:`CEError`."""
        where = f"OpenStack queue {self.queue.name}"
        try:
            return self.compute.request(url, method, **kwargs)
        except ks_exc.Unauthorized as exc:
            raise CEError(f"{where}: authentication failed: {exc}") from exc
        except ks_exc.EndpointNotFound as exc:
            raise CEError(f"{where}: no compute endpoint in the service catalog: {exc}") from exc
        except ks_exc.ConnectFailure as exc:
            raise CEError(f"{where}: cannot connect: {exc}") from exc
        except ks_exc.ClientException as exc:
            raise CEError(f"{where}: {exc}") from exc

    def _check(self, resp: Any, what: str) -> Any:
        if resp.status_code == 401:
            raise CEError(f"OpenStack queue {self.queue.name}: {what}: not authorised (401): {_error_text(resp)}")
        if resp.status_code >= 400:
            raise CEError(f"OpenStack queue {self.queue.name}: {what}: HTTP {resp.status_code}: {_error_text(resp)}")
        return resp.json() if resp.content else {}

    # -- name resolution -----------------------------------------------------------------------------------------

    def _flavor_id(self) -> str:
        wanted = self.options.flavor
        if not wanted:
            raise CEError(f"OpenStack queue {self.queue.name}: options.flavor is required")
        key = f"flavor:{wanted}"
        if key not in self._resolved:
            flavors = self._check(self._call("GET", "/flavors"), "list flavors")["flavors"]
            ids = [f["id"] for f in flavors if f["id"] == str(wanted)] or [
                f["id"] for f in flavors if f["name"] == str(wanted)
            ]
            if len(ids) != 1:
                known = ", ".join(sorted(f["name"] for f in flavors))
                raise CEError(f"OpenStack queue {self.queue.name}: flavor {wanted!r} not found (known: {known})")
            self._resolved[key] = ids[0]
        return self._resolved[key]

    def _lookup(self, service_type: str, path: str, collection: str, name: str, what: str) -> str:
        try:
            resp = self._adapter(service_type).get(path, params={"name": name})
        except ks_exc.EndpointNotFound as exc:
            raise CEError(f"{what} {name!r}: give an id (no {service_type} endpoint to look names up)") from exc
        except ks_exc.ClientException as exc:
            raise CEError(f"{what} {name!r}: lookup failed: {exc}") from exc
        items = self._check(resp, f"look up {what} {name!r}").get(collection, [])
        if len(items) != 1:
            raise CEError(f"OpenStack queue {self.queue.name}: {what} {name!r}: {len(items)} matches, need 1")
        return items[0]["id"]

    def _image_id(self) -> str:
        wanted = self.options.image
        if not wanted:
            raise CEError(f"OpenStack queue {self.queue.name}: options.image is required")
        if _UUID.match(wanted):
            return wanted
        key = f"image:{wanted}"
        if key not in self._resolved:
            self._resolved[key] = self._lookup("image", "/v2/images", "images", wanted, "image")
        return self._resolved[key]

    def _networks(self) -> Any:
        wanted = self.options.network
        if wanted in (None, "", "auto", "none"):
            return wanted or "auto"
        names = wanted if isinstance(wanted, list) else [wanted]
        out = []
        for name in names:
            name = str(name)
            if _UUID.match(name):
                out.append({"uuid": name})
                continue
            key = f"network:{name}"
            if key not in self._resolved:
                self._resolved[key] = self._lookup("network", "/v2.0/networks", "networks", name, "network")
            out.append({"uuid": self._resolved[key]})
        return out

    # -- interface -----------------------------------------------------------------------------------------------

    def server_name(self, stamp: str) -> str:
        return f"{self.name_prefix}{stamp}"

    def _user_data(self, stamp: str) -> str:
        text = self.bundle.cloud_init(stamp) if self.bundle is not None else ""
        data = base64.b64encode(text.encode() if isinstance(text, str) else bytes(text)).decode()
        if len(data) > MAX_USER_DATA:
            raise CEError(
                f"OpenStack queue {self.queue.name}: user data is {len(data)} bytes base64, Nova takes {MAX_USER_DATA}"
            )
        return data

    def _create_one(self, stamp: str, base: Dict[str, Any]) -> PilotRef:
        body = dict(base)
        body["name"] = self.server_name(stamp)
        body["user_data"] = self._user_data(stamp)
        body["metadata"] = {
            "galaxy_dirac": "pilot",
            "gd_queue": str(self.queue.name)[:255],
            "gd_stamp": stamp,
            "gd_site": str(getattr(self.queue, "site", ""))[:255],
        }
        resp = self._call("POST", "/servers", json={"server": body})
        if resp.status_code in (403, 413) and is_quota_error(resp.status_code, _error_text(resp)):
            raise CEQueueFull(f"OpenStack queue {self.queue.name}: queue full: {_error_text(resp)}")
        server = self._check(resp, f"boot {body['name']}")["server"]
        return PilotRef(
            reference=server["id"],
            stamp=stamp,
            extra={"name": body["name"], "submitted": self.clock()},
        )

    def submit(self, stamps: Sequence[str]) -> list[PilotRef]:
        if not stamps:
            return []
        base: Dict[str, Any] = {
            "flavorRef": self._flavor_id(),
            "imageRef": self._image_id(),
            "networks": self._networks(),
            "tags": [OWNER_TAG],
        }
        for key in ("key_name", "availability_zone"):
            if getattr(self.options, key):
                base[key] = getattr(self.options, key)
        if self.options.security_groups:
            base["security_groups"] = [{"name": g} for g in self.options.security_groups]
        refs: List[PilotRef] = []
        errors: List[CEError] = []
        full = threading.Event()  # set at the first quota error: boots not yet started are skipped

        def boot(stamp: str) -> Optional[PilotRef]:
            if full.is_set():
                return None
            try:
                return self._create_one(stamp, base)
            except CEQueueFull:
                full.set()
                raise

        # At most a few creates in flight: Nova and the scheduler are shared with other users of the site.
        with ThreadPoolExecutor(max_workers=min(self.max_concurrent, len(stamps))) as pool:
            futures = [pool.submit(boot, stamp) for stamp in stamps]
            for fut in futures:
                if full.is_set() and fut.cancel():
                    continue
                try:
                    ref = fut.result()  # a boot already under way when the quota error came is still collected
                except CEError as exc:
                    errors.append(exc)
                    continue
                if ref is not None:
                    refs.append(ref)
        if not refs and errors:
            raise next((e for e in errors if isinstance(e, CEQueueFull)), errors[0])
        if errors:
            log.warning(
                "OpenStack queue %s: %d of %d boots failed: %s", self.queue.name, len(errors), len(stamps), errors[0]
            )
        return refs

    def _get(self, server_id: str) -> Optional[Dict[str, Any]]:
        resp = self._call("GET", f"/servers/{server_id}")
        if resp.status_code == 404:
            return None
        return self._check(resp, f"show server {server_id}")["server"]

    def list_owned(self) -> List[Dict[str, Any]]:
        """Our servers in this project: name prefix and tag filtered by Nova, metadata checked here."""
        params = {"name": "^" + re.escape(self.name_prefix), "tags": OWNER_TAG, "limit": 1000}
        servers: List[Dict[str, Any]] = []
        marker = None
        while True:
            if marker:
                params["marker"] = marker
            page = self._check(self._call("GET", "/servers/detail", params=params), "list servers")["servers"]
            servers.extend(page)
            if len(page) < params["limit"]:
                break
            marker = page[-1]["id"]
        return [s for s in servers if self._owned(s)]

    def _owned(self, server: Dict[str, Any]) -> bool:
        meta = server.get("metadata") or {}
        return (
            str(server.get("name", "")).startswith(self.name_prefix)
            and meta.get("galaxy_dirac") == "pilot"
            and meta.get("gd_queue") == str(self.queue.name)[:255]
        )

    def status(self, refs: Sequence[PilotRef]) -> dict[str, PilotStatus]:
        if not refs:
            return {}
        by_id = {s["id"]: s for s in self.list_owned()}
        out: Dict[str, PilotStatus] = {}
        for ref in refs:
            server = by_id.get(ref.reference)
            if server is None:  # not in the filtered listing: ask for it directly before calling it gone
                server = self._get(ref.reference)
            st = pilot_state(server)
            if server is not None and server.get("status") == "BUILD" and self._build_expired(server):
                st = PilotStatus(FAILED, f"still BUILD after {self.build_timeout:.0f}s")
            out[ref.reference] = st
        return out

    def _build_expired(self, server: Dict[str, Any]) -> bool:
        created = parse_time(server.get("created"))
        return created is not None and self.clock() - created > self.build_timeout

    def _delete(self, server_id: str) -> bool:
        resp = self._call("DELETE", f"/servers/{server_id}")
        if resp.status_code in (204, 202, 404):
            return True
        log.warning("OpenStack queue %s: delete %s: HTTP %s %s", self.queue.name, server_id, resp.status_code,
                    _error_text(resp))  # fmt: skip
        return False

    def kill(self, refs: Sequence[PilotRef]) -> None:
        for ref in refs:
            self._delete(ref.reference)

    def reap_reason(self, server: Dict[str, Any], ref: Optional[PilotRef] = None) -> str:
        """Why this server should go now ("" = keep it)."""
        status = str(server.get("status", "")).upper()
        now = self.clock()
        created = parse_time(server.get("created"))
        if status in REAP_STATUSES:
            return f"status {status}"
        if status == "BUILD" and self._build_expired(server):
            return f"BUILD for more than {self.build_timeout:.0f}s"
        if self.max_lifetime and created is not None and now - created > self.max_lifetime:
            return f"older than max_lifetime {self.max_lifetime:.0f}s"
        if self.idle_timeout:
            idle_since = (ref.extra.get("idle_since") if ref is not None else None) or None
            if status in IDLE_STATUSES:
                idle_since = idle_since or parse_time(server.get("updated"))
            if idle_since is not None and now - float(idle_since) > self.idle_timeout:
                return f"idle for more than {self.idle_timeout:.0f}s"
        return ""

    def cleanup(self, refs: Optional[Sequence[PilotRef]] = None) -> list[PilotRef]:
        """Delete our finished, failed, stuck and over-age servers, and orphans the director does not track.

        With ``refs`` (the pilots the director still tracks), an owned server that is not among them and is older
        than ``orphan_grace`` is an orphan (left by a previous director run) and is deleted too. Without ``refs``
        (after a restart, nothing tracked yet) only servers that have a reason of their own to go are deleted.
        """
        tracked = {r.reference: r for r in refs} if refs is not None else {}
        removed: List[PilotRef] = []
        now = self.clock()
        for server in self.list_owned():
            ref = tracked.get(server["id"])
            reason = self.reap_reason(server, ref)
            if not reason and refs is not None and ref is None:
                created = parse_time(server.get("created"))
                if created is None or now - created > self.orphan_grace:
                    reason = "orphan (not tracked by the director)"
            if not reason:
                continue
            meta = server.get("metadata") or {}
            log.info("OpenStack queue %s: deleting %s (%s): %s", self.queue.name, server["name"], server["id"], reason)
            if self._delete(server["id"]):
                removed.append(ref or PilotRef(server["id"], meta.get("gd_stamp", ""), {"name": server.get("name")}))
                removed[-1].extra["reaped"] = reason
        return removed

    def close(self) -> None:
        if self._session is not None:
            self._session.session.close()
