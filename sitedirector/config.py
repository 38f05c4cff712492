"""The SiteDirector's YAML configuration, validated once at start.

Every error names the offending key by its path (``queues.2.options.keep_finished: Extra inputs are not
permitted``) because the daemon is configured by hand and a vague error at 3 a.m. costs more than the validation
code. Each backend declares its own ``Options`` model (:mod:`sitedirector.ce`), so a queue's ``options`` are
checked against the model of its ``type``.

Sources stack as for the scheduler (:func:`galaxy_dirac.configfile.overlay`): defaults < the YAML file <
``SITEDIRECTOR_*`` variables (``SITEDIRECTOR_TOKEN`` is ``scheduler.token``; ``SITEDIRECTOR_CYCLE_INTERVAL``,
``SITEDIRECTOR_WORK_DIR`` ... the top-level settings) < command-line overrides.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from galaxy_dirac.configfile import ConfigError, Layer, NestedError, env_layer, overlay, read_yaml

from .ce.base import CEError, ce_class

__all__ = ["ConfigError", "Config", "Credential", "PilotSettings", "QueueConfig", "load", "parse"]

ENV_PREFIX = "SITEDIRECTOR_"

CREDENTIAL_TYPES = {
    # HTCondorCE and ARC (scitoken: a file holding any WLCG/SciToken JWT)
    "scitoken": ("file",),
    "proxy": ("file",),
    # OpenStack (keystoneauth1 plugin names in the comments)
    "keystone_password": ("auth_url", "username", "password"),  # v3password
    "application_credential": ("auth_url", "application_credential_id", "application_credential_secret"),
    "oidc_access_token": ("auth_url", "identity_provider", "protocol"),  # v3oidcaccesstoken
}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Credential:
    """A named credential; ``values`` keeps every key from the YAML (backends read what they need).

    Not a model: tests and backends build partial ones to exercise their own error paths; the config checks the
    keys each type needs when it reads them (:func:`_credential`).
    """

    name: str
    type: str
    values: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """A credential field (backends ask for what they need, e.g. ``file`` or ``auth_url``)."""
        return self.values.get(key, default)


def _credential(name: str, data: Any) -> Credential:
    if isinstance(data, Credential):
        return data
    if not isinstance(data, dict):
        raise NestedError([((name,), "must be a mapping")])
    ctype = data.get("type")
    if not ctype:
        raise NestedError([((name, "type"), "required")])
    if ctype not in CREDENTIAL_TYPES:
        raise NestedError(
            [((name, "type"), f"unknown credential type {ctype!r} (known: {', '.join(CREDENTIAL_TYPES)})")]
        )
    missing = [key for key in CREDENTIAL_TYPES[ctype] if data.get(key) in (None, "")]
    if ctype == "oidc_access_token" and not (data.get("access_token") or data.get("access_token_file")):
        missing.append("access_token")
    if missing:
        raise NestedError([((name, key), "required" + (" (or access_token_file)" if key == "access_token" else ""))
                           for key in missing])  # fmt: skip
    return Credential(name=name, type=str(ctype), values={k: v for k, v in data.items() if k != "type"})


def _words(value: Any) -> Any:
    """``"GPU, Docker"`` → ``["GPU", "Docker"]``: lists of words may be written as one string."""
    return [v for v in re.split(r"[,\s]+", value) if v] if isinstance(value, str) else value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QueueConfig(_Model):
    """One SiteDirector queue: where pilots go and how many.

    ``options`` are the backend's own keys (flavor/image/network for OpenStack, ``pool``/``mode`` for
    HTCondorCE, ``slots`` for local), checked against the backend's ``Options`` model and kept as the mapping
    given (the director adds ``work_dir``); the backend reads them through ``ComputingElement.read_options``.
    """

    name: str
    type: str
    site: str = Field(min_length=1)
    #: The CE host as PilotAgents records it; default the endpoint, else ``localhost``.
    ce: str = ""
    endpoint: str = ""
    queue: str = ""
    platform: str = ""
    tags: list[str] = Field(default_factory=list)
    processors: int = Field(1, ge=1)
    memory: int = Field(0, ge=0)  # MB offered per pilot; 0 = unlimited
    cpu_time: int = Field(0, ge=0)  # seconds; 0 = unlimited
    max_total: int = Field(10, ge=0)
    max_waiting: int = Field(5, ge=0)
    per_cycle: int = Field(10, ge=0)
    #: In the YAML the name of an entry under ``credentials:``.
    credentials: Optional[Credential] = None
    options: dict[str, Any] = Field(default_factory=dict)

    @property
    def ce_queue(self) -> str:
        """Queue name as the scheduler sees it (PilotAgents.Queue)."""
        return self.queue or self.name

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r} must be letters, digits, '_', '.', '-' (max 64)")
        return value

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        try:
            ce_class(value)
        except CEError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("tags", mode="before")
    @classmethod
    def _tags(cls, value: Any) -> Any:
        return _words(value)

    @field_validator("options", mode="before")
    @classmethod
    def _options(cls, value: Any, info: ValidationInfo) -> Any:
        """Checked against the ``Options`` of the queue's type (not at all if the type itself is wrong)."""
        value = {} if value is None else value
        if "type" not in info.data or not isinstance(value, dict):
            return value
        try:
            ce_class(info.data["type"]).Options.model_validate(value)
        except ValidationError as exc:
            raise NestedError.of(exc) from None
        return value

    @model_validator(mode="after")
    def _default_ce(self) -> QueueConfig:
        self.ce = self.ce or self.endpoint or "localhost"
        return self


def _queue_problem(q: QueueConfig) -> Optional[tuple[str, str]]:
    """(key, message) if the queue lacks what its type needs to reach a CE.

    Checked for a whole configuration only: tests build partial queues to drive one backend method.
    """
    if q.type in ("htcondorce", "openstack", "arc") and not q.endpoint:
        hint = " (the A-REX URL, e.g. https://ce.example.org/arex)" if q.type == "arc" else ""
        return "endpoint", f"required for type {q.type}{hint}"
    if q.type != "arc":
        return None
    from .ce.arc import ARC_CREDENTIALS, normalise_endpoint

    try:
        normalise_endpoint(q.endpoint)
    except ValueError as exc:
        return "endpoint", str(exc)
    if not q.queue:
        return "queue", "required for type arc (the CE's batch queue, e.g. the ComputingShare name)"
    kinds = " or ".join(ARC_CREDENTIALS)
    if q.credentials is None:
        return "credentials", f"required for type arc (a credential of type {kinds})"
    if q.credentials.type not in ARC_CREDENTIALS:
        return "credentials", (
            f"{q.credentials.name!r} is of type {q.credentials.type!r}; "
            f"an ARC queue takes {kinds} (a proxy file or a token file)"
        )
    return None


class PilotSettings(_Model):
    """How the pilots a bundle launches behave."""

    python: str = "python3"
    heartbeat_interval: int = Field(60, ge=1)
    max_idle: int = Field(120, ge=0)
    max_empty_matches: int = Field(3, ge=1)
    extra_args: list[str] = Field(default_factory=list)

    @field_validator("extra_args", mode="before")
    @classmethod
    def _args(cls, value: Any) -> Any:
        return _words(value)


class Scheduler(_Model):
    """Where the scheduler is and the director token to ask it with (``token`` beats ``token_file``)."""

    url: str
    token: str = ""
    token_file: str = ""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _token(self, info: ValidationInfo) -> Scheduler:
        """A relative ``token_file`` is read relative to the config file's directory."""
        if not self.token and self.token_file:
            path = Path(self.token_file)
            base_dir = (info.context or {}).get("base_dir")
            if base_dir is not None and not path.is_absolute():
                path = Path(base_dir) / path
            try:
                self.token = path.read_text().strip()
            except OSError as exc:
                raise NestedError([(("token_file",), f"cannot read {path}: {exc.strerror}")]) from None
        if not self.token:
            raise NestedError([(("token",), "required (a pilot-role token, or token_file, or $SITEDIRECTOR_TOKEN)")])
        return self


class Config(_Model):
    """The whole, validated configuration."""

    scheduler: Scheduler
    #: name → credential; queues refer to them by name (declared before ``queues``, which resolve them).
    credentials: dict[str, Credential] = Field(default_factory=dict)
    queues: list[QueueConfig] = Field(min_length=1)
    cycle_interval: float = Field(120.0, ge=0.1)
    backoff_cycles: int = Field(3, ge=0)
    unknown_timeout: float = Field(3600.0, ge=1)
    boot_grace: float = Field(600.0, ge=0)
    work_dir: str = "/var/lib/sitedirector"
    pilot: PilotSettings = Field(default_factory=PilotSettings)

    @property
    def url(self) -> str:
        """The scheduler's base URL, without a trailing slash."""
        return self.scheduler.url

    @property
    def token(self) -> str:
        """The pilot-role token for the scheduler."""
        return self.scheduler.token

    def queue(self, name: str) -> QueueConfig:
        """The queue called ``name`` (KeyError if none)."""
        for q in self.queues:
            if q.name == name:
                return q
        raise KeyError(name)

    @field_validator("credentials", mode="before")
    @classmethod
    def _credentials(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            return value  # pydantic says what it should be
        errors: list = []
        out = {}
        for name, data in value.items():
            try:
                out[str(name)] = _credential(str(name), data)
            except NestedError as exc:
                errors.extend(exc.errors)
        if errors:
            raise NestedError(errors)
        return out

    @field_validator("queues", mode="before")
    @classmethod
    def _queue_credentials(cls, value: Any, info: ValidationInfo) -> Any:
        """A queue's ``credentials`` name becomes the credential it names."""
        if not isinstance(value, list):
            return value
        if "credentials" not in info.data:  # already reported under credentials: no second error per queue
            return [{**q, "credentials": None} if isinstance(q, dict) else q for q in value]
        creds = info.data["credentials"]
        out = []
        for i, q in enumerate(value):
            name = q.get("credentials") if isinstance(q, dict) else None
            if isinstance(name, str):
                if name not in creds:
                    raise NestedError([((i, "credentials"), f"no credential named {name!r} under credentials:")])
                q = {**q, "credentials": creds[name]}
            out.append(q)
        return out

    @model_validator(mode="after")
    def _usable_queues(self) -> Config:
        problems = [(("queues", i, p[0]), p[1]) for i, q in enumerate(self.queues) if (p := _queue_problem(q))]
        if problems:
            raise NestedError(problems)
        seen: set[str] = set()
        ce_queues: set[tuple[str, str]] = set()
        for i, q in enumerate(self.queues):
            if q.name in seen:
                raise NestedError([(("queues", i, "name"), f"duplicate queue name {q.name!r}")])
            seen.add(q.name)
            # Pilots are told apart by (CE, queue) in PilotAgents, so two queues must not share both.
            if (q.ce, q.ce_queue) in ce_queues:
                raise NestedError(
                    [(("queues", i, "queue"), f"another queue already uses CE {q.ce!r} queue {q.ce_queue!r}")]
                )
            ce_queues.add((q.ce, q.ce_queue))
        return self


#: Top-level settings an environment variable ``SITEDIRECTOR_<NAME>`` may set.
ENV_SETTINGS = ("cycle_interval", "backoff_cycles", "unknown_timeout", "boot_grace", "work_dir")


def parse(
    data: Any,
    base_dir: Union[str, Path, None] = None,
    *,
    environ: Optional[Mapping[str, str]] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> Config:
    """Validate a loaded YAML document under the environment and command-line ``overrides``.

    Relative file paths are read relative to ``base_dir``; ``environ`` defaults to ``os.environ``.
    """
    if not isinstance(data, dict):
        raise ConfigError("top level: must be a mapping")
    environ = os.environ if environ is None else environ
    layers = [
        Layer("", data),
        env_layer(environ, ENV_PREFIX, {ENV_PREFIX + "TOKEN": ("scheduler", "token")}, names=ENV_SETTINGS),
        Layer("the command line", dict(overrides or {})),
    ]
    return overlay(Config, layers, context={"base_dir": base_dir})


def load(
    path: Union[str, Path],
    *,
    environ: Optional[Mapping[str, str]] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> Config:
    """Read and validate a config file (see :func:`parse`)."""
    return parse(read_yaml(path), base_dir=Path(path).parent, environ=environ, overrides=overrides)
