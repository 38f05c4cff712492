"""Scheduler settings from defaults, a YAML config file, ``GALAXY_DIRAC_WMS_*`` environment variables and the CLI.

Later sources win: defaults < config file < environment < command line, as operators expect from daemons.
All durations are in seconds so tests can shrink DIRAC's hour-scale timers to seconds.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path
from typing import Any, Mapping

import yaml

ENV_PREFIX = "GALAXY_DIRAC_WMS_"


@dataclasses.dataclass
class Settings:
    home: str = "galaxy-dirac-wms"
    db: str = ""
    sandbox_dir: str = ""
    secret_file: str = ""
    secret: str = ""
    host: str = "127.0.0.1"
    port: int = 8686
    workers: int = 1
    public_url: str = ""
    vo: str = "galaxy"
    #: Stalled after this long without a heartbeat (DIRAC: 75 min; our heartbeats come every ~30 s, not 30 min).
    stalled_after: float = 600.0
    #: A Stalled job is failed (or rescheduled) after this much more silence (DIRAC: 3 h 15 min).
    failed_after: float = 1800.0
    #: Stalled jobs are rescheduled (up to max_rescheduling) instead of failed: pilots die, payloads rarely do.
    reschedule_stalled: bool = True
    #: A job Matched but never Running for this long is rescheduled (the pilot died before starting it).
    matched_timeout: float = 900.0
    #: Completing for this long without news → Stalled path.
    completing_timeout: float = 3600.0
    #: Pilots with no news for this long are marked Unknown, later Aborted.
    pilot_unknown_after: float = 3600.0
    #: How far a worker node's clock may lag the server's before its status updates count as late arrivals.
    clock_skew: float = 300.0
    maintenance_interval: float = 60.0
    retention_days: float = 30.0
    max_rescheduling: int = 3
    max_sandbox_size: int = 100 * 1024 * 1024
    max_request_size: int = 16 * 1024 * 1024
    max_jdls_per_request: int = 1000
    token_lifetime: float = 86400.0
    job_token_lifetime: float = 14 * 86400.0
    ticket_lifetime: float = 3600.0
    #: Fair share per user group; groups not listed get 1.
    group_shares: dict[str, float] = dataclasses.field(default_factory=dict)
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        home = Path(self.home)
        if not self.db:
            self.db = f"sqlite:///{(home / 'wms.sqlite').absolute()}"
        if not self.sandbox_dir:
            self.sandbox_dir = str(home / "sandboxes")
        if not self.secret_file and not self.secret:
            self.secret_file = str(home / "secret")

    def signing_key(self, *, create: bool = False) -> bytes:
        """The token signing secret; created (0600) on first serve so a fresh install needs no setup step."""
        if self.secret:
            return self.secret.encode()
        path = Path(self.secret_file)
        if not path.exists():
            if not create:
                raise ConfigError(f"no signing secret: {path} does not exist (start the server once, or set --secret)")
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(48))
        key = path.read_text().strip()
        if len(key) < 32:
            raise ConfigError(f"signing secret in {path} is shorter than 32 characters")
        return key.encode()


class ConfigError(ValueError):
    pass


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _coerce(name: str, value: Any) -> Any:
    field = FIELDS[name]
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    try:
        if kind == "bool" and isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind.startswith("dict"):
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return {str(k): float(v) for k, v in value.items()}
        if kind == "str":
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name!r}: cannot read {value!r} as {kind}") from exc
    return value


def load_settings(
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge the sources; unknown keys are an error naming the key, so typos do not pass silently."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
    if config_file:
        try:
            data = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {config_file} must hold a mapping of settings")
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in FIELDS:
                raise ConfigError(f"config file {config_file}: unknown setting {key!r}")
            values[name] = _coerce(name, value)
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX) and key != ENV_PREFIX + "CONFIG":
            name = key[len(ENV_PREFIX) :].lower()
            if name not in FIELDS:
                raise ConfigError(f"environment variable {key}: unknown setting {name!r}")
            values[name] = _coerce(name, value)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value)
    return Settings(**values)
