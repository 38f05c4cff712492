"""Pilots on a NorduGrid ARC CE (A-REX) through its REST interface, 1.0 (ARC 6) or 1.1 where the CE offers it.

Plain ``requests`` + ``cryptography`` rather than ``pyarcrest`` (0.5, what Galaxy's own ARC runner uses), because
against ARC 6 pyarcrest cannot do what a pilot factory needs without patching it in place:

* its delegation fails out of the box: A-REX 6 puts ``version = 2`` in the delegation CSR (RFC 2986 allows only
  0) and ``cryptography`` refuses to load it; the fix is replacing a module-global function of pyarcrest;
* its REST 1.0 client refuses bearer tokens, and 1.0 is all ARC 6 serves;
* with a proxy it does not verify the CE's certificate, and its ``submitJobs`` needs the ARC C++ bindings
  (``import arc``), which exist only for the system's own python3.

What we need is a dozen REST calls and one RFC 3820 proxy certificate per delegation; ``cryptography`` is
imported only for proxy delegation, so token-only queues work without it.

How the CE is used:

* N pilots are one ``POST /jobs?action=new`` with an ADL ``<ActivityDescriptions>`` (chunks of
  ``max_per_request``); the single pilot wrapper (stamp as ``$1``) is then uploaded to each job's session
  directory, with that pilot's own token as a second input file, ``pilot-token-<stamp>`` (A-REX holds a job in
  PREPARING until its declared inputs are there). status, kill, clean and info are bulk calls too.
* A-REX binds the client identity to the TLS connection (a different token on a kept-alive connection is not
  looked at), so each credential identity has its own one-connection session, rebuilt when the token or proxy
  file changes and dropped after an authorisation failure.
* Proxy queues delegate once (CSR from the CE, signed with the proxy) and name the delegation in every job;
  the delegation is renewed before it expires (``delegation_lifetime``, capped by the proxy's own lifetime),
  which refreshes the proxy of every job using it. Token queues need no delegation (REST 1.0 has none).
* REST 1.0 quirks handled: one item comes as an object rather than a list, "nothing" as an empty body, batch
  answers are HTTP 201 with a status code per job, the delegation id is the last segment of ``Location``.
* Job states come from the infoprovider's per-job record, so they lag by up to its period (minutes on a
  default CE); the director's status cycle is slower than that anyway.

References are ``<endpoint>/<job id>``. Jobs are named ``gdpilot.<queue>.<stamp>`` so that :meth:`cleanup`
finds this queue's finished pilots among all jobs of the identity after a director restart.

Queue ``options`` (all optional): ``verify`` (CA file or directory, or a bool; default ``$X509_CERT_DIR``,
else the grid CA directory if present, else the system CAs), ``rest_version`` (auto, 1.0, 1.1),
``delegation_lifetime`` (s, 86400), ``timeout`` (s, 60), ``max_per_request`` (100), ``environment`` (mapping
set in the pilot's environment), ``runtime_environments`` (ARC RTE names), ``wall_time`` (s, default the
queue's ``cpu_time``), ``work_dir`` (where failed pilots' outputs are kept; set by the director).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence, Union
from urllib.parse import quote, urlsplit
from xml.sax.saxutils import escape

import requests
from pydantic import Field, StrictBool, ValidationError, field_validator
from requests.adapters import HTTPAdapter

from galaxy_dirac.configfile import describe

from ..bundle import token_file
from .base import (
    ABORTED,
    DELETED,
    DONE,
    FAILED,
    RUNNING,
    SCHEDULED,
    UNKNOWN,
    WAITING,
    CEError,
    CEOptions,
    CEQueueFull,
    ComputingElement,
    PilotRef,
    PilotStatus,
)

log = logging.getLogger(__name__)

#: Credential types an ARC queue takes: an X.509 proxy file, or a file holding a WLCG/SciToken JWT.
ARC_CREDENTIALS = ("proxy", "scitoken")
#: REST versions this client speaks, oldest first.
REST_VERSIONS = ("1.0", "1.1")
WRAPPER = "pilot-wrapper.sh"
STDOUT = "pilot.out"
STDERR = "pilot.err"
ADL_NS = "http://www.eu-emi.eu/es/2010/12/adl"
NORDUGRID_ADL_NS = "http://www.nordugrid.org/es/2011/12/nordugrid-adl"
GRID_CA_DIR = "/etc/grid-security/certificates"

#: ARC REST job state → pilot state. ACCEPTING..SUBMITTING: A-REX still prepares the job; QUEUING: in the batch
#: system; EXITINGLRMS..FINISHING: the payload ended, outputs are being handled (the pilot reports Done itself).
STATE_MAP: dict[str, str] = {
    "ACCEPTING": WAITING,
    "ACCEPTED": WAITING,
    "PREPARING": WAITING,
    "SUBMITTING": WAITING,
    "QUEUING": SCHEDULED,
    "HELD": SCHEDULED,
    "RUNNING": RUNNING,
    "EXITINGLRMS": RUNNING,
    "EXECUTED": RUNNING,
    "FINISHING": RUNNING,
    "KILLING": RUNNING,
    "FINISHED": DONE,
    "FAILED": FAILED,
    "KILLED": ABORTED,
    "WIPED": DELETED,
}
#: ARC states after which a job never changes again (its session may be cleaned).
TERMINAL = frozenset({"FINISHED", "FAILED", "KILLED", "WIPED"})
#: Per-job refusals that mean "no room now" rather than a fault: A-REX's own job-limit messages ("No more jobs
#: allowed", "Reached limit of total allowed jobs"; ARC 6's REST create does not apply them, later ones may) and
#: the usual wording of batch-system and quota limits.
_FULL = re.compile(r"no more jobs|limit of total allowed jobs|too many jobs|job limit|quota", re.I)

# --- options ----------------------------------------------------------------------------------------------------


def default_verify() -> Union[bool, str]:
    """Grid CAs where this host has them ($X509_CERT_DIR, the grid CA directory), else the system's."""
    cert_dir = os.environ.get("X509_CERT_DIR", "")
    if cert_dir and os.path.isdir(cert_dir):
        return cert_dir
    return GRID_CA_DIR if os.path.isdir(GRID_CA_DIR) else True


class ArcOptions(CEOptions):
    """A queue's validated ``options`` (see the module docstring)."""

    verify: Union[StrictBool, str] = Field(default_factory=default_verify)
    rest_version: Literal["auto", "1.0", "1.1"] = "auto"
    delegation_lifetime: int = Field(86400, ge=600)
    timeout: float = Field(60.0, gt=0)
    max_per_request: int = Field(100, ge=1)
    environment: dict[str, str] = Field(default_factory=dict)
    runtime_environments: list[str] = Field(default_factory=list)
    wall_time: int = Field(0, ge=0)

    @field_validator("verify")
    @classmethod
    def _verify(cls, value: Union[bool, str]) -> Union[bool, str]:
        if value == "":
            raise ValueError("must be true, false or a CA file/directory path, not empty")
        return value

    @field_validator("rest_version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) else value  # YAML reads 1.0 as a number

    @field_validator("environment", mode="before")
    @classmethod
    def _environment(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        bad = [k for k in value if not (isinstance(k, str) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k))]
        if bad:
            raise ValueError(f"must be a mapping of variable names to strings; {bad[0]!r} is not a variable name")
        return {k: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for k, v in value.items()}

    @field_validator("runtime_environments")
    @classmethod
    def _rtes(cls, value: list[str]) -> list[str]:
        if not all(value):
            raise ValueError("must be a list of runtime environment names, not empty ones")
        return value


OPTION_KEYS = frozenset(ArcOptions.model_fields)


def parse_options(options: Optional[Mapping[str, Any]]) -> ArcOptions:
    """Validate an ARC queue's options; ``ValueError("options.<key>: ...")`` names the offending key."""
    try:
        return ArcOptions.model_validate(dict(options or {}))
    except ValidationError as exc:
        raise ValueError(describe(exc, prefix=("options",))) from None


def normalise_endpoint(endpoint: str) -> str:
    """The A-REX service URL: ``ce.example.org`` → ``https://ce.example.org:443/arex``; https only."""
    text = endpoint.strip().rstrip("/")
    if "://" not in text:
        text = f"https://{text}"
    parts = urlsplit(text)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"must be an https URL of the A-REX service (https://host[:port]/arex), got {endpoint!r}")
    port = parts.port or 443
    path = parts.path.rstrip("/") or "/arex"
    return f"https://{parts.hostname}:{port}{path}"


# --- X.509: proxies and the delegation CSR -----------------------------------------------------------------------

PROXY_CERT_INFO_OID = "1.3.6.1.5.5.7.1.14"
#: DER of ProxyCertInfo ::= SEQUENCE { proxyPolicy SEQUENCE { policyLanguage id-ppl-inheritAll } } (RFC 3820).
PROXY_CERT_INFO_INHERIT_ALL = bytes.fromhex("300c300a06082b06010505071501")
_PEM = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----\n?", re.S)


def _crypto() -> Any:
    try:
        from cryptography import x509
    except ImportError as exc:  # pragma: no cover - exercised only without the package
        raise CEError("ARC proxy delegation needs the 'cryptography' package") from exc
    return x509


@dataclass
class Proxy:
    """A proxy file as read: its PEM certificates (proxy first), its key, and when it expires."""

    path: str
    certs: list[str]
    key_pem: str
    not_after: float
    subject: str


def load_proxy(path: str) -> Proxy:
    """Read a proxy file (proxy cert, key, then the chain, as ``arcproxy``/``voms-proxy-init`` write it)."""
    x509 = _crypto()
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CEError(f"cannot read the proxy file {path}: {exc.strerror}") from exc
    blocks = [(m.group(1), m.group(0)) for m in _PEM.finditer(text)]
    certs = [pem for kind, pem in blocks if kind == "CERTIFICATE"]
    keys = [pem for kind, pem in blocks if kind.endswith("PRIVATE KEY")]
    if not certs or not keys:
        raise CEError(f"proxy file {path}: needs a certificate and its private key (PEM)")
    cert = x509.load_pem_x509_certificate(certs[0].encode())
    not_after = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after.replace(tzinfo=dt.timezone.utc)
    return Proxy(path, certs, keys[0], not_after.timestamp(), cert.subject.rfc4514_string())


def _der_header_end(der: bytes, offset: int) -> int:
    """Offset just past the tag and DER length of the element at ``offset``."""
    first = der[offset + 1]
    return offset + 2 + (first & 0x7F if first & 0x80 else 0)


def load_csr_public_key(pem: str) -> Any:
    """The public key of A-REX's delegation CSR.

    ARC 6 writes ``version = 2`` into the request, which ``cryptography`` refuses ("not a valid CSR version");
    only the key matters for delegation, so a request that fails to load is read again with that byte set to 0
    (its self-signature then no longer verifies, which is why only the key is used).
    """
    x509 = _crypto()
    try:
        return x509.load_pem_x509_csr(pem.encode()).public_key()
    except (ValueError, x509.InvalidVersion):
        body = "".join(line for line in pem.strip().splitlines() if line and not line.startswith("-----"))
        try:
            der = bytearray(base64.b64decode(body))
        except ValueError as exc:
            raise CEError(f"the CE's delegation request is not PEM: {exc}") from exc
        version = _der_header_end(der, _der_header_end(der, 0))  # CertificationRequest { CRInfo { version
        if der[version : version + 2] != b"\x02\x01":
            raise CEError("the CE's delegation request is not a PKCS#10 request") from None
        der[version + 2] = 0
        return x509.load_der_x509_csr(bytes(der)).public_key()


def sign_proxy(proxy: Proxy, public_key: Any, lifetime: float) -> tuple[str, float]:
    """An RFC 3820 proxy certificate for ``public_key`` signed by ``proxy``; (PEM with chain, expiry)."""
    x509 = _crypto()
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

    issuer = x509.load_pem_x509_certificate(proxy.certs[0].encode())
    key = serialization.load_pem_private_key(proxy.key_pem.encode(), None)
    now = dt.datetime.now(dt.timezone.utc)
    not_after = min(now + dt.timedelta(seconds=lifetime), dt.datetime.fromtimestamp(proxy.not_after, dt.timezone.utc))
    serial = int.from_bytes(os.urandom(4), "big") | 1
    subject = x509.Name([*issuer.subject, x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, str(serial))])
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=True, data_encipherment=False,
        key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    builder = (
        x509.CertificateBuilder()
        .issuer_name(issuer.subject)
        .subject_name(subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(usage, critical=True)
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(PROXY_CERT_INFO_OID), PROXY_CERT_INFO_INHERIT_ALL),
            critical=True,
        )
    )
    # Ed25519/Ed448 keys sign without a separate hash; RSA and EC proxies use SHA-256.
    algorithm = None if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) else hashes.SHA256()
    cert = builder.sign(key, algorithm)
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return pem + "".join(proxy.certs), not_after.timestamp()


# --- helpers ------------------------------------------------------------------------------------------------------


def pilot_state(state: Optional[str]) -> PilotStatus:
    """An ARC REST job state as a pilot state (unknown or missing → Unknown, naming what the CE said)."""
    name = (state or "").upper()
    mapped = STATE_MAP.get(name)
    if mapped is None:
        return PilotStatus(UNKNOWN, f"ARC state {state!r}" if state and state != "None" else "not known to the CE")
    if mapped == ABORTED:
        return PilotStatus(ABORTED, "killed on the ARC CE")
    if mapped == DELETED:
        return PilotStatus(DELETED, "wiped by the ARC CE")
    return PilotStatus(mapped, "" if mapped != FAILED else "ARC: job failed")


def _items(resp: requests.Response, key: str) -> list[dict[str, Any]]:
    """REST 1.0 lists: an empty body is none, one item comes as an object."""
    if not resp.content.strip():
        return []
    try:
        value = resp.json().get(key, [])
    except (ValueError, AttributeError):
        return []
    if isinstance(value, dict):
        return [value]
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _tail(text: str, lines: int) -> str:
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


# --- the backend ----------------------------------------------------------------------------------------------------


class ArcComputingElement(ComputingElement):
    """One queue of an ARC CE (A-REX REST). See the module docstring for how it uses the CE and its options."""

    type_name = "arc"
    Options = ArcOptions

    def __init__(self, queue: Any, bundle: Any = None) -> None:
        super().__init__(queue, bundle)
        try:
            self.options = parse_options(queue.options)
            self.endpoint = normalise_endpoint(queue.endpoint or queue.ce)
        except ValueError as exc:
            raise CEError(f"ARC queue {queue.name}: {exc}") from None
        cred = queue.credentials
        if cred is None or cred.type not in ARC_CREDENTIALS:
            kind = "none" if cred is None else repr(cred.type)
            raise CEError(f"ARC queue {queue.name}: needs a proxy or scitoken credential, has {kind}")
        self.cred = cred
        self.cred_file = str(cred.get("file"))
        self.name_prefix = f"gdpilot.{queue.name}."
        self.work_dir = Path(self.options.work_dir) if self.options.work_dir else None
        self._lock = threading.RLock()
        self._session: Optional[requests.Session] = None
        self._identity = ""
        self._version = "" if self.options.rest_version == "auto" else self.options.rest_version
        self._delegation_id = ""
        self._delegation_expiry = 0.0
        self._delegated_from = ""  # the proxy file state the delegation was signed with
        self._failures: dict[str, str] = {}

    # --- connection -------------------------------------------------------------------------------------------
    def _credential_identity(self) -> tuple[str, str]:
        """(identity key, bearer token or ""): a new key means a new TLS connection."""
        path = self.cred_file
        if self.cred.type == "scitoken":
            try:
                token = Path(path).read_text().strip()
            except OSError as exc:
                raise CEError(
                    f"ARC queue {self.queue.name}: cannot read the token file {path}: {exc.strerror}"
                ) from None
            if not token:
                raise CEError(f"ARC queue {self.queue.name}: the token file {path} is empty")
            return "token:" + hashlib.sha256(token.encode()).hexdigest(), token
        try:
            st = os.stat(path)
        except OSError as exc:
            raise CEError(f"ARC queue {self.queue.name}: cannot read the proxy file {path}: {exc.strerror}") from None
        return f"proxy:{path}:{st.st_mtime_ns}:{st.st_size}", ""

    def session(self) -> requests.Session:
        """This queue's HTTP session for the current credential (one connection, rebuilt on a new credential)."""
        with self._lock:
            identity, token = self._credential_identity()
            if self._session is None or identity != self._identity:
                self._drop_session()
                s = requests.Session()
                # Exactly this queue's credential, straight to the CE: no netrc, no proxies, no CA from the env.
                s.trust_env = False
                s.mount("https://", HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0))
                s.headers["Accept"] = "application/json"
                if token:
                    s.headers["Authorization"] = f"Bearer {token}"
                else:
                    s.cert = self.cred_file
                self._session, self._identity = s, identity
            return self._session

    def _drop_session(self) -> None:
        if self._session is not None:
            self._session.close()
        self._session, self._identity = None, ""

    def _describe_credential(self) -> str:
        kind = "token" if self.cred.type == "scitoken" else "proxy"
        return f"{kind} {self.cred_file} (credential {self.cred.name!r})"

    def _http(self, method: str, url: str, what: str, ok: Sequence[int], **kwargs: Any) -> requests.Response:
        session = self.session()
        try:
            resp = session.request(method, url, verify=self.options.verify, timeout=self.options.timeout, **kwargs)
        except requests.exceptions.SSLError as exc:
            self._drop_session()
            raise CEError(f"{self.endpoint}: {what}: TLS failed with {self._describe_credential()}: {exc}") from exc
        except requests.RequestException as exc:
            self._drop_session()
            raise CEError(f"{self.endpoint}: {what}: cannot reach the CE: {exc}") from exc
        if resp.status_code in (401, 403):
            self._drop_session()  # the refusal sticks to the connection; try a fresh one next time
            raise CEError(
                f"{self.endpoint}: {what}: not authorised (HTTP {resp.status_code} {resp.reason}): the CE does not "
                f"accept the {self._describe_credential()}; check that it is valid and its identity allowed on the CE"
            )
        if resp.status_code not in ok:
            raise CEError(f"{self.endpoint}: {what}: HTTP {resp.status_code} {resp.reason}: {resp.text[:200]}")
        return resp

    def rest_version(self) -> str:
        """The REST version used with this CE: the newest both sides speak (``GET <endpoint>/rest``)."""
        if not self._version:
            resp = self._http("GET", f"{self.endpoint}/rest", "REST version", (200,))
            try:
                offered = resp.json().get("version", [])
            except (ValueError, AttributeError):
                offered = []
            offered = [offered] if isinstance(offered, str) else [str(v) for v in offered or []]
            common = [v for v in REST_VERSIONS if v in offered]
            if not common:
                raise CEError(f"{self.endpoint}: the CE offers REST {offered or '?'}, this client {REST_VERSIONS}")
            self._version = common[-1]
        return self._version

    def _api(self, method: str, path: str, what: str, ok: Sequence[int] = (200,), **kwargs: Any) -> requests.Response:
        return self._http(method, f"{self.endpoint}/rest/{self.rest_version()}{path}", what, ok, **kwargs)

    # --- delegation -------------------------------------------------------------------------------------------
    def _proxy_state(self) -> str:
        st = os.stat(self.cred_file)
        return f"{st.st_mtime_ns}:{st.st_size}"

    def delegation(self) -> str:
        """The delegation id for new pilots (proxy queues; "" for tokens), renewed before it expires."""
        if self.cred.type != "proxy":
            return ""
        with self._lock:
            margin = min(3600.0, self.options.delegation_lifetime / 4)
            fresh = self._delegation_expiry - time.time() > margin
            if self._delegation_id and fresh and self._delegated_from == self._proxy_state():
                return self._delegation_id
            proxy = load_proxy(self.cred_file)
            if proxy.not_after <= time.time() + 60:
                when = dt.datetime.fromtimestamp(proxy.not_after, dt.timezone.utc).isoformat(timespec="seconds")
                raise CEError(f"ARC queue {self.queue.name}: the proxy {self.cred_file} expired ({when})")
            if self._delegation_id:
                try:
                    self._sign_delegation(proxy, self._delegation_id, renew=True)
                    return self._delegation_id
                except CEError as exc:
                    log.info(
                        "%s: renewing delegation %s failed, making a new one: %s",
                        self.queue.name,
                        self._delegation_id,
                        exc,
                    )
            resp = self._api("POST", "/delegations", "new delegation", (200, 201), params={"action": "new"})
            location = resp.headers.get("Location", "")
            # ARC 6 answers "Location: /arex/rest/1.0/delegations?action=new/<id>": the id is the last segment.
            delegation_id = location.rstrip("/").rsplit("/", 1)[-1]
            if not location or not re.match(r"^[A-Za-z0-9_.-]+$", delegation_id):
                raise CEError(f"{self.endpoint}: new delegation: no usable Location header ({location!r})")
            self._sign_delegation(proxy, delegation_id, csr=resp.text)
            self._delegation_id = delegation_id
            return delegation_id

    def _sign_delegation(self, proxy: Proxy, delegation_id: str, csr: str = "", renew: bool = False) -> None:
        if renew:
            path = f"/delegations/{quote(delegation_id)}"
            csr = self._api("POST", path, "renew delegation", (200, 201), params={"action": "renew"}).text
        state = self._proxy_state()
        pem, expiry = sign_proxy(proxy, load_csr_public_key(csr), self.options.delegation_lifetime)
        self._api(
            "PUT", f"/delegations/{quote(delegation_id)}", "upload delegated proxy", (200, 201, 204),
            data=pem.encode(), headers={"Content-Type": "application/x-pem-file"},
        )  # fmt: skip
        self._delegation_expiry, self._delegated_from = expiry, state
        log.info(
            "%s: delegation %s valid until %s",
            self.queue.name,
            delegation_id,
            dt.datetime.fromtimestamp(expiry, dt.timezone.utc).isoformat(timespec="seconds"),
        )

    # --- job descriptions ---------------------------------------------------------------------------------------
    def job_name(self, stamp: str) -> str:
        return f"{self.name_prefix}{stamp}"

    def description(self, stamp: str, delegation_id: str = "", token: bool = False) -> str:
        """One pilot's ADL: run the uploaded wrapper with the stamp, keep its stdout/stderr for diagnosis; with
        ``token``, the pilot's own token is an input file too (uploaded like the wrapper, never in the ADL)."""
        q, o = self.queue, self.options
        env = "".join(
            f"<Environment><Name>{escape(k)}</Name><Value>{escape(v)}</Value></Environment>"
            for k, v in o.environment.items()
        )
        res = "".join(
            f"<RuntimeEnvironment><Name>{escape(r)}</Name></RuntimeEnvironment>" for r in o.runtime_environments
        )
        if q.memory:
            res += f"<IndividualPhysicalMemory>{q.memory * 1024 * 1024}</IndividualPhysicalMemory>"
        if q.processors > 1:
            n = q.processors
            res += (
                f"<SlotRequirement><NumberOfSlots>{n}</NumberOfSlots><SlotsPerHost>{n}</SlotsPerHost></SlotRequirement>"
            )
        if q.queue:
            res += f"<QueueName>{escape(q.queue)}</QueueName>"
        if q.cpu_time:
            res += f"<IndividualCPUTime>{q.cpu_time}</IndividualCPUTime>"
        if o.wall_time or q.cpu_time:
            res += f"<WallTime>{o.wall_time or q.cpu_time}</WallTime>"
        staging = f"<InputFile><Name>{WRAPPER}</Name><IsExecutable>true</IsExecutable></InputFile>"
        if token:
            staging += f"<InputFile><Name>{escape(token_file(stamp))}</Name></InputFile>"
        staging += f"<OutputFile><Name>{STDOUT}</Name></OutputFile><OutputFile><Name>{STDERR}</Name></OutputFile>"
        if delegation_id:
            staging += f"<nordugrid-adl:DelegationID>{escape(delegation_id)}</nordugrid-adl:DelegationID>"
        return (
            f'<ActivityDescription xmlns="{ADL_NS}" xmlns:nordugrid-adl="{NORDUGRID_ADL_NS}">'
            f"<ActivityIdentification><Name>{escape(self.job_name(stamp))}</Name></ActivityIdentification>"
            f"<Application><Executable><Path>{WRAPPER}</Path><Argument>{escape(stamp)}</Argument></Executable>"
            f"<Output>{STDOUT}</Output><Error>{STDERR}</Error>{env}</Application>"
            f"<Resources>{res}</Resources><DataStaging>{staging}</DataStaging></ActivityDescription>"
        )

    def descriptions(self, stamps: Sequence[str], delegation_id: str = "", tokens: Iterable[str] = ()) -> str:
        """The ADL document for one request: several pilots go in one ``<ActivityDescriptions>``; ``tokens``:
        the stamps whose token file is uploaded."""
        with_token = set(tokens)
        body = "".join(self.description(s, delegation_id, s in with_token) for s in stamps)
        return body if len(stamps) == 1 else f"<ActivityDescriptions>{body}</ActivityDescriptions>"

    # --- references ---------------------------------------------------------------------------------------------
    def reference(self, job_id: str) -> str:
        return f"{self.endpoint}/{job_id}"

    def job_id(self, reference: str) -> str:
        """The CE's job id in one of our references ("" for references of other CEs)."""
        prefix = self.endpoint + "/"
        if not reference.startswith(prefix):
            return ""
        job_id = reference[len(prefix) :]
        return job_id if re.match(r"^[A-Za-z0-9_.-]+$", job_id) else ""

    def _manage(self, action: str, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """One bulk ``POST /jobs?action=...`` per chunk; each job's answer by id."""
        out: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(list(job_ids), self.options.max_per_request):
            body = {"job": [{"id": i} for i in chunk]}
            resp = self._api(
                "POST", "/jobs", f"{action} of {len(chunk)} jobs", (200, 201), params={"action": action}, json=body
            )
            for item in _items(resp, "job"):
                if item.get("id"):
                    out[str(item["id"])] = item
        return out

    # --- interface ----------------------------------------------------------------------------------------------
    def submit(self, stamps: Sequence[str]) -> list[PilotRef]:
        if not stamps:
            return []
        wrapper = self.bundle.wrapper(None).encode()
        tokens = self.bundle.token_files(stamps)
        delegation_id = self.delegation()
        refs: list[PilotRef] = []
        refused: list[str] = []
        for chunk in _chunks(list(stamps), self.options.max_per_request):
            try:
                created = self._create(chunk, delegation_id, refused, tokens)
            except CEError:
                if refs:  # keep what already started; the next cycle asks again for the rest
                    break
                raise
            for stamp, job_id in created:
                # The shared wrapper, then this pilot's own token (A-REX holds the job until both are there).
                uploads = [("the wrapper", WRAPPER, wrapper)]
                if stamp in tokens:
                    uploads.append(("the pilot token", token_file(stamp), tokens[stamp].encode()))
                try:
                    for what, name, data in uploads:
                        self._api(
                            "PUT",
                            f"/jobs/{quote(job_id)}/session/{name}",
                            f"upload {what} of {job_id}",
                            (200, 201, 204),
                            data=data,
                            headers={"Content-Type": "application/octet-stream"},
                        )
                except CEError as exc:
                    refused.append(str(exc))
                    self._discard([job_id])
                    continue
                refs.append(PilotRef(self.reference(job_id), stamp))
        if refused and not refs:
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            if all(_FULL.search(r) for r in refused):
                raise CEQueueFull(f"{self.endpoint}: no room for pilots: {refused[0]}{more}")
            raise CEError(f"{self.endpoint}: no pilot accepted: {refused[0]}{more}")
        if refused:
            log.warning(
                "%s: %d of %d pilots refused by %s: %s",
                self.queue.name,
                len(refused),
                len(stamps),
                self.endpoint,
                refused[0],
            )
        log.info(
            "%s: %d pilots submitted to %s in %d request(s)",
            self.queue.name,
            len(refs),
            self.endpoint,
            -(-len(stamps) // self.options.max_per_request),
        )
        return refs

    def _create(
        self, stamps: Sequence[str], delegation_id: str, refused: list[str], tokens: Iterable[str] = ()
    ) -> list[tuple[str, str]]:
        resp = self._api(
            "POST", "/jobs", f"submit {len(stamps)} pilots", (200, 201), params={"action": "new"},
            data=self.descriptions(stamps, delegation_id, tokens).encode(), headers={"Content-Type": "application/xml"},
        )  # fmt: skip
        items = _items(resp, "job")
        created = []
        for stamp, item in zip(stamps, items):  # answers come in the order of the descriptions
            if str(item.get("status-code")) == "201" and item.get("id"):
                created.append((stamp, str(item["id"])))
            else:
                refused.append(f"{item.get('status-code', '?')} {str(item.get('reason', '')).strip()}")
        if len(items) != len(stamps):
            refused.append(f"the CE answered {len(items)} results for {len(stamps)} pilots")
        return created

    def _discard(self, job_ids: Sequence[str]) -> None:
        """Best effort: kill and clean jobs that will never run (their wrapper could not be uploaded)."""
        for action in ("kill", "clean"):
            try:
                self._manage(action, job_ids)
            except CEError as exc:
                log.warning("%s: could not %s %s: %s", self.queue.name, action, ", ".join(job_ids), exc)

    def status(self, refs: Sequence[PilotRef]) -> dict[str, PilotStatus]:
        ids = {ref.reference: self.job_id(ref.reference) for ref in refs}
        ids = {r: i for r, i in ids.items() if i}
        if not ids:
            return {}
        answers = self._manage("status", list(ids.values()))
        out: dict[str, PilotStatus] = {}
        failed: list[PilotRef] = []
        for ref in refs:
            job_id = ids.get(ref.reference)
            if not job_id:
                continue
            item = answers.get(job_id)
            if item is None or str(item.get("status-code", "200")) == "404":
                out[ref.reference] = PilotStatus(UNKNOWN, "not known to the CE")
                continue
            out[ref.reference] = pilot_state(item.get("state"))
            if out[ref.reference].state == FAILED:
                failed.append(ref)
        if failed:
            for ref, reason in self._failure_reasons(failed).items():
                out[ref] = PilotStatus(FAILED, reason)
        if self._delegation_id:  # keep running pilots' proxies fresh even while nothing is submitted
            try:
                self.delegation()
            except CEError as exc:
                log.warning("%s: delegation renewal failed: %s", self.queue.name, exc)
        return out

    def _failure_reasons(self, refs: Sequence[PilotRef]) -> dict[str, str]:
        """Why failed pilots failed: A-REX's error, the exit code, the end of the pilot's stderr/stdout.

        The short form (PilotAgents keeps 255 characters) goes to the scheduler; the fetched files are kept in
        ``<work_dir>/failed/<stamp>/`` and their ends logged, for the operator.
        """
        todo = [r for r in refs if self.job_id(r.reference) not in self._failures]
        if todo:
            try:
                info = self._manage("info", [self.job_id(r.reference) for r in todo])
            except CEError as exc:
                log.warning("%s: cannot fetch why pilots failed: %s", self.queue.name, exc)
                info = {}
            for ref in todo:
                self._failures[self.job_id(ref.reference)] = self._explain(
                    ref, info.get(self.job_id(ref.reference), {})
                )
        return {r.reference: self._failures[self.job_id(r.reference)] for r in refs}

    def _explain(self, ref: PilotRef, info: dict[str, Any]) -> str:
        job_id = self.job_id(ref.reference)
        activity = (info.get("info_document") or {}).get("ComputingActivity") or {}
        errors = activity.get("Error") or []
        errors = [errors] if isinstance(errors, str) else [str(e) for e in errors]
        code = activity.get("ExitCode")
        files = {}
        for name in (STDERR, STDOUT):
            try:
                resp = self._api("GET", f"/jobs/{quote(job_id)}/session/{name}", f"fetch {name}", (200,))
                files[name] = resp.text
            except CEError:
                files[name] = ""
        parts = ["ARC: " + "; ".join(errors) if errors else "ARC: job failed"]
        if code not in (None, ""):
            parts.append(f"exit code {code}")
        for name in (STDERR, STDOUT):
            if files[name].strip():
                parts.append(f"{name}: {_tail(files[name], 3)}")
        reason = ", ".join(parts)
        log.warning("%s: pilot %s failed on %s: %s", self.queue.name, ref.stamp, self.endpoint, reason)
        if self.work_dir is not None:
            try:
                keep = self.work_dir / "failed" / ref.stamp
                keep.mkdir(parents=True, exist_ok=True)
                for name, text in files.items():
                    (keep / name).write_text(text)
                (keep / "reason").write_text(reason + "\n")
            except OSError as exc:
                log.warning("%s: cannot keep the outputs of pilot %s: %s", self.queue.name, ref.stamp, exc)
        return reason[:255]

    def kill(self, refs: Sequence[PilotRef]) -> None:
        ids = [i for i in (self.job_id(r.reference) for r in refs) if i]
        if not ids:
            return
        for job_id, item in self._manage("kill", ids).items():
            if str(item.get("status-code")) not in ("200", "201", "202", "404"):
                log.warning("%s: kill %s: %s %s", self.queue.name, job_id, item.get("status-code"), item.get("reason"))

    def list_jobs(self) -> list[str]:
        """Ids of every job this identity has on the CE (any queue)."""
        return [str(i["id"]) for i in _items(self._api("GET", "/jobs", "list jobs"), "job") if i.get("id")]

    def cleanup(self, refs: Optional[Sequence[PilotRef]] = None) -> list[PilotRef]:
        """Clean finished jobs of this queue that the director no longer tracks (outputs and session removed).

        Tracked pilots stay until the scheduler has their final state, so a pilot that ends between status and
        cleanup is never removed unseen; jobs of other queues sharing the identity are recognised by name.
        """
        tracked = {self.job_id(r.reference) for r in refs or ()}
        candidates = [i for i in self.list_jobs() if i not in tracked]
        if not candidates:
            return []
        finished = [i for i, item in self._manage("status", candidates).items() if item.get("state") in TERMINAL]
        if not finished:
            return []
        mine: dict[str, str] = {}
        for job_id, item in self._manage("info", finished).items():
            name = str(((item.get("info_document") or {}).get("ComputingActivity") or {}).get("Name", ""))
            if name.startswith(self.name_prefix):
                mine[job_id] = name[len(self.name_prefix) :]
        if not mine:
            return []
        cleaned = self._manage("clean", list(mine))
        removed = [
            PilotRef(self.reference(i), stamp)
            for i, stamp in mine.items()
            if str(cleaned.get(i, {}).get("status-code")) in ("200", "202", "404")
        ]
        for ref in removed:
            self._failures.pop(self.job_id(ref.reference), None)
        log.info("%s: cleaned %d finished pilots on %s", self.queue.name, len(removed), self.endpoint)
        return removed

    def close(self) -> None:
        with self._lock:
            self._drop_session()
