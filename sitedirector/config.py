"""The SiteDirector's YAML configuration, validated once at start.

Every error names the offending key (``queues[2].max_waiting: must be an integer >= 0``) because the
daemon is configured by hand and a vague error at 3 a.m. costs more than the validation code.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .ce.base import CE_TYPES


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


CREDENTIAL_TYPES = {
    # HTCondorCE and ARC (scitoken: a file holding any WLCG/SciToken JWT)
    "scitoken": ("file",),
    "proxy": ("file",),
    # OpenStack (keystoneauth1 plugin names in the comments)
    "keystone_password": ("auth_url", "username", "password"),  # v3password
    "application_credential": ("auth_url", "application_credential_id", "application_credential_secret"),
    "oidc_access_token": ("auth_url", "identity_provider", "protocol"),  # v3oidcaccesstoken
}


@dataclass
class Credential:
    """A named credential; ``values`` keeps every key from the YAML (backends read what they need)."""

    name: str
    type: str
    values: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """A credential field (backends ask for what they need, e.g. ``file`` or ``auth_url``)."""
        return self.values.get(key, default)


@dataclass
class QueueConfig:
    """One SiteDirector queue: where pilots go and how many.

    ``options`` holds backend-specific keys untouched (flavor/image/network for OpenStack,
    ``grid_resource``/``pool`` for HTCondorCE, ``slots`` for local).
    """

    name: str
    type: str
    site: str
    ce: str
    endpoint: str = ""
    queue: str = ""
    platform: str = ""
    tags: list[str] = field(default_factory=list)
    processors: int = 1
    memory: int = 0  # MB offered per pilot; 0 = unlimited
    cpu_time: int = 0  # seconds; 0 = unlimited
    max_total: int = 10
    max_waiting: int = 5
    per_cycle: int = 10
    credentials: Optional[Credential] = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def ce_queue(self) -> str:
        """Queue name as the scheduler sees it (PilotAgents.Queue)."""
        return self.queue or self.name


@dataclass
class PilotSettings:
    """How the pilots a bundle launches behave."""

    python: str = "python3"
    heartbeat_interval: int = 60
    max_idle: int = 120
    max_empty_matches: int = 3
    extra_args: list[str] = field(default_factory=list)


@dataclass
class Config:
    """The whole, validated configuration."""

    url: str
    token: str
    queues: list[QueueConfig]
    cycle_interval: float = 120.0
    backoff_cycles: int = 3
    unknown_timeout: float = 3600.0
    boot_grace: float = 600.0
    work_dir: str = "/var/lib/sitedirector"
    pilot: PilotSettings = field(default_factory=PilotSettings)
    credentials: dict[str, Credential] = field(default_factory=dict)

    def queue(self, name: str) -> QueueConfig:
        """The queue called ``name`` (KeyError if none)."""
        for q in self.queues:
            if q.name == name:
                return q
        raise KeyError(name)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _req(data: dict, key: str, where: str) -> Any:
    if key not in data or data[key] in (None, ""):
        raise ConfigError(f"{where}{key}: required")
    return data[key]


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a string, got {type(value).__name__}")
    return value


def _int(value: Any, key: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: must be an integer >= {minimum}, got {value!r}")
    return value


def _num(value: Any, key: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ConfigError(f"{key}: must be a number >= {minimum:g}, got {value!r}")
    return float(value)


def _strlist(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        value = [v for v in re.split(r"[,\s]+", value) if v]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: must be a list of strings")
    return list(value)


def _unknown(data: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise ConfigError(f"{where}{extra[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _credential(name: str, data: Any) -> Credential:
    where = f"credentials.{name}."
    if not isinstance(data, dict):
        raise ConfigError(f"credentials.{name}: must be a mapping")
    ctype = _str(_req(data, "type", where), f"{where}type")
    if ctype not in CREDENTIAL_TYPES:
        raise ConfigError(f"{where}type: unknown credential type {ctype!r} (known: {', '.join(CREDENTIAL_TYPES)})")
    for key in CREDENTIAL_TYPES[ctype]:
        _req(data, key, where)
    if ctype == "oidc_access_token" and not (data.get("access_token") or data.get("access_token_file")):
        raise ConfigError(f"{where}access_token: required (or access_token_file)")
    values = {k: v for k, v in data.items() if k != "type"}
    return Credential(name=name, type=ctype, values=values)


_QUEUE_KEYS = {
    "name", "type", "site", "ce", "endpoint", "queue", "platform", "tags", "processors", "memory", "cpu_time",
    "max_total", "max_waiting", "per_cycle", "credentials", "options",
}  # fmt: skip


def _queue(i: int, data: Any, creds: dict[str, Credential]) -> QueueConfig:
    where = f"queues[{i}]."
    if not isinstance(data, dict):
        raise ConfigError(f"queues[{i}]: must be a mapping")
    _unknown(data, _QUEUE_KEYS, where)
    name = _str(_req(data, "name", where), f"{where}name")
    if not _NAME.match(name):
        raise ConfigError(f"{where}name: {name!r} must be letters, digits, '_', '.', '-' (max 64)")
    where = f"queues[{i}] ({name})."
    ctype = _str(_req(data, "type", where), f"{where}type")
    if ctype not in CE_TYPES:
        raise ConfigError(f"{where}type: unknown CE type {ctype!r} (known: {', '.join(CE_TYPES)})")
    q = QueueConfig(
        name=name,
        type=ctype,
        site=_str(_req(data, "site", where), f"{where}site"),
        ce=_str(data.get("ce") or data.get("endpoint") or "localhost", f"{where}ce"),
        endpoint=_str(data.get("endpoint", ""), f"{where}endpoint"),
        queue=_str(data.get("queue", ""), f"{where}queue"),
        platform=_str(data.get("platform", ""), f"{where}platform"),
        tags=_strlist(data.get("tags", []), f"{where}tags"),
        processors=_int(data.get("processors", 1), f"{where}processors", 1),
        memory=_int(data.get("memory", 0), f"{where}memory"),
        cpu_time=_int(data.get("cpu_time", 0), f"{where}cpu_time"),
        max_total=_int(data.get("max_total", 10), f"{where}max_total"),
        max_waiting=_int(data.get("max_waiting", 5), f"{where}max_waiting"),
        per_cycle=_int(data.get("per_cycle", 10), f"{where}per_cycle"),
        options=dict(data.get("options") or {}),
    )
    if not isinstance(data.get("options", {}) or {}, dict):
        raise ConfigError(f"{where}options: must be a mapping")
    cred = data.get("credentials")
    if cred is not None:
        cred = _str(cred, f"{where}credentials")
        if cred not in creds:
            raise ConfigError(f"{where}credentials: no credential named {cred!r} under credentials:")
        q.credentials = creds[cred]
    if ctype in ("htcondorce", "openstack") and not q.endpoint and not q.options.get("grid_resource"):
        raise ConfigError(f"{where}endpoint: required for type {ctype}")
    if ctype == "arc":
        _arc_queue(q, where)
    return q


def _arc_queue(q: QueueConfig, where: str) -> None:
    """An ARC queue needs the A-REX URL, the CE's queue, a proxy or token credential, and only known options."""
    from .ce.arc import ARC_CREDENTIALS, normalise_endpoint, parse_options

    if not q.endpoint:
        raise ConfigError(f"{where}endpoint: required for type arc (the A-REX URL, e.g. https://ce.example.org/arex)")
    try:
        normalise_endpoint(q.endpoint)
    except ValueError as exc:
        raise ConfigError(f"{where}endpoint: {exc}") from None
    if not q.queue:
        raise ConfigError(f"{where}queue: required for type arc (the CE's batch queue, e.g. the ComputingShare name)")
    if q.credentials is None:
        raise ConfigError(
            f"{where}credentials: required for type arc (a credential of type {' or '.join(ARC_CREDENTIALS)})"
        )
    if q.credentials.type not in ARC_CREDENTIALS:
        raise ConfigError(
            f"{where}credentials: {q.credentials.name!r} is of type {q.credentials.type!r}; "
            f"an ARC queue takes {' or '.join(ARC_CREDENTIALS)} (a proxy file or a token file)"
        )
    try:
        parse_options(q.options)
    except ValueError as exc:
        raise ConfigError(f"{where}{exc}") from None


_TOP_KEYS = {
    "scheduler", "queues", "credentials", "cycle_interval", "backoff_cycles", "unknown_timeout", "boot_grace",
    "work_dir", "pilot",
}  # fmt: skip


def parse(data: Any, base_dir: Union[str, Path, None] = None) -> Config:
    """Validate a loaded YAML document; relative file paths are read relative to ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError("top level: must be a mapping")
    _unknown(data, _TOP_KEYS, "")
    sched = _req(data, "scheduler", "")
    if not isinstance(sched, dict):
        raise ConfigError("scheduler: must be a mapping with url and token or token_file")
    _unknown(sched, {"url", "token", "token_file"}, "scheduler.")
    url = _str(_req(sched, "url", "scheduler."), "scheduler.url").rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"scheduler.url: must start with http:// or https://, got {url!r}")
    token = sched.get("token") or os.environ.get("SITEDIRECTOR_TOKEN", "")
    if sched.get("token_file"):
        path = Path(_str(sched["token_file"], "scheduler.token_file"))
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"scheduler.token_file: cannot read {path}: {exc.strerror}") from None
    if not token:
        raise ConfigError("scheduler.token: required (a pilot-role token, or token_file, or $SITEDIRECTOR_TOKEN)")
    raw_creds = data.get("credentials") or {}
    if not isinstance(raw_creds, dict):
        raise ConfigError("credentials: must be a mapping of name → credential")
    creds = {str(n): _credential(str(n), c) for n, c in raw_creds.items()}
    raw_queues = _req(data, "queues", "")
    if not isinstance(raw_queues, list) or not raw_queues:
        raise ConfigError("queues: must be a non-empty list")
    queues = [_queue(i, q, creds) for i, q in enumerate(raw_queues)]
    seen: set[str] = set()
    ce_queues: set[tuple[str, str]] = set()
    for i, q in enumerate(queues):
        if q.name in seen:
            raise ConfigError(f"queues[{i}].name: duplicate queue name {q.name!r}")
        seen.add(q.name)
        # Pilots are told apart by (CE, queue) in PilotAgents, so two queues must not share both.
        if (q.ce, q.ce_queue) in ce_queues:
            raise ConfigError(
                f"queues[{i}] ({q.name}).queue: another queue already uses CE {q.ce!r} queue {q.ce_queue!r}"
            )
        ce_queues.add((q.ce, q.ce_queue))
    pilot_data = data.get("pilot") or {}
    if not isinstance(pilot_data, dict):
        raise ConfigError("pilot: must be a mapping")
    _unknown(pilot_data, {"python", "heartbeat_interval", "max_idle", "max_empty_matches", "extra_args"}, "pilot.")
    pilot = PilotSettings(
        python=_str(pilot_data.get("python", "python3"), "pilot.python"),
        heartbeat_interval=_int(pilot_data.get("heartbeat_interval", 60), "pilot.heartbeat_interval", 1),
        max_idle=_int(pilot_data.get("max_idle", 120), "pilot.max_idle", 0),
        max_empty_matches=_int(pilot_data.get("max_empty_matches", 3), "pilot.max_empty_matches", 1),
        extra_args=_strlist(pilot_data.get("extra_args", []), "pilot.extra_args"),
    )
    return Config(
        url=url,
        token=str(token),
        queues=queues,
        cycle_interval=_num(data.get("cycle_interval", 120), "cycle_interval", 0.1),
        backoff_cycles=_int(data.get("backoff_cycles", 3), "backoff_cycles"),
        unknown_timeout=_num(data.get("unknown_timeout", 3600), "unknown_timeout", 1),
        boot_grace=_num(data.get("boot_grace", 600), "boot_grace", 0),
        work_dir=_str(data.get("work_dir", "/var/lib/sitedirector"), "work_dir"),
        pilot=pilot,
        credentials=creds,
    )


def load(path: Union[str, Path]) -> Config:
    """Read and validate a config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse(data, base_dir=path.parent)
