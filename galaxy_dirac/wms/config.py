"""Scheduler settings from defaults, a YAML config file, ``GALAXY_DIRAC_WMS_*`` environment variables and the CLI.

Later sources win: defaults < config file < environment < command line, as operators expect from daemons
(:func:`galaxy_dirac.configfile.overlay`, shared with the SiteDirector). All durations are in seconds so tests can
shrink DIRAC's hour-scale timers to seconds.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..configfile import ConfigError, Layer, env_layer, overlay, read_yaml

__all__ = ["ENV_PREFIX", "ConfigError", "Settings", "load_settings"]

ENV_PREFIX = "GALAXY_DIRAC_WMS_"


class Settings(BaseModel):
    """Every scheduler setting; assignment is validated too, so tests that tweak a setting get the same checks."""

    # Numbers are read as text for text settings (``vo: 2026``), as the dataclass this replaced did.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)

    home: str = "galaxy-dirac-wms"
    #: SQLAlchemy URL; default: the SQLite file ``<home>/wms.sqlite``.
    db: str = ""
    #: Default ``<home>/sandboxes``.
    sandbox_dir: str = ""
    #: Default ``<home>/secret`` unless ``secret`` is given.
    secret_file: str = ""
    secret: str = ""
    host: str = "127.0.0.1"
    port: int = Field(8686, ge=1, le=65535)
    workers: int = Field(1, ge=1)
    public_url: str = ""
    vo: str = "galaxy"
    #: Stalled after this long without a heartbeat (DIRAC: 75 min; our heartbeats come every ~30 s, not 30 min).
    stalled_after: float = Field(600.0, ge=0)
    #: A Stalled job is failed (or rescheduled) after this much more silence (DIRAC: 3 h 15 min).
    failed_after: float = Field(1800.0, ge=0)
    #: Stalled jobs are rescheduled (up to max_rescheduling) instead of failed: pilots die, payloads rarely do.
    reschedule_stalled: bool = True
    #: A job Matched but never Running for this long is rescheduled (the pilot died before starting it).
    matched_timeout: float = Field(900.0, ge=0)
    #: Completing for this long without news → Stalled path.
    completing_timeout: float = Field(3600.0, ge=0)
    #: Pilots with no news for this long are marked Unknown, later Aborted.
    pilot_unknown_after: float = Field(3600.0, ge=0)
    #: How far a worker node's clock may lag the server's before its status updates count as late arrivals.
    clock_skew: float = Field(300.0, ge=0)
    maintenance_interval: float = Field(60.0, ge=0)
    retention_days: float = Field(30.0, ge=0)
    max_rescheduling: int = Field(3, ge=0)
    max_sandbox_size: int = Field(100 * 1024 * 1024, ge=1)
    max_request_size: int = Field(16 * 1024 * 1024, ge=1)
    max_jdls_per_request: int = Field(1000, ge=1)
    token_lifetime: float = Field(86400.0, ge=0)
    job_token_lifetime: float = Field(14 * 86400.0, ge=0)
    #: Lifetime of the per-pilot tokens the SiteDirector asks for (one per pilot it submits).
    pilot_token_lifetime: float = Field(3 * 86400.0, ge=60, le=7 * 86400)
    ticket_lifetime: float = Field(3600.0, ge=0)
    #: Fair share per user group; groups not listed get 1.
    group_shares: dict[str, float] = Field(default_factory=dict)
    log_level: str = "INFO"

    @field_validator("group_shares", mode="before")
    @classmethod
    def _shares_from_text(cls, value: Any) -> Any:
        """An environment variable holds the mapping as YAML/JSON text (``{galaxy_user: 2}``)."""
        if isinstance(value, str):
            try:
                return yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ValueError(f"not a YAML mapping: {exc}") from None
        return value

    @model_validator(mode="after")
    def _derived_paths(self) -> Settings:
        """Paths left empty follow ``home``, so one ``--home`` moves the whole state."""
        home = Path(self.home)
        # Written to __dict__: assigning would run this validator again (validate_assignment).
        if not self.db:
            self.__dict__["db"] = f"sqlite:///{(home / 'wms.sqlite').absolute()}"
        if not self.sandbox_dir:
            self.__dict__["sandbox_dir"] = str(home / "sandboxes")
        if not self.secret_file and not self.secret:
            self.__dict__["secret_file"] = str(home / "secret")
        return self

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


def load_settings(
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge the sources; unknown keys are an error naming the key, so typos do not pass silently.

    ``overrides`` are the command-line values (``None``: flag not given); ``environ`` defaults to ``os.environ``.
    """
    environ = os.environ if environ is None else environ
    layers = []
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
    if config_file:
        data = {str(key).replace("-", "_"): value for key, value in read_yaml(config_file).items()}
        layers.append(Layer(f"config file {config_file}", data))
    layers.append(env_layer(environ, ENV_PREFIX, skip=[ENV_PREFIX + "CONFIG"]))
    layers.append(Layer("the command line", dict(overrides or {})))
    return overlay(Settings, layers)
