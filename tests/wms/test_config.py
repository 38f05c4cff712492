"""Scheduler settings: one pydantic model, sources stacked defaults < file < environment < command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from galaxy_dirac.wms.config import ENV_PREFIX, ConfigError, Settings, load_settings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_defaults_and_paths_derived_from_home(tmp_path: Path) -> None:
    s = load_settings(overrides={"home": str(tmp_path)}, environ={})
    assert s.db == f"sqlite:///{tmp_path / 'wms.sqlite'}" and s.sandbox_dir == str(tmp_path / "sandboxes")
    assert s.secret_file == str(tmp_path / "secret") and s.port == 8686 and s.workers == 1
    assert s.pilot_token_lifetime == 3 * 86400.0 and s.group_shares == {}
    explicit = Settings(home=str(tmp_path), db="sqlite:///other.db", secret="x" * 40)
    assert explicit.db == "sqlite:///other.db" and explicit.secret_file == ""  # a given secret needs no file


def test_precedence_defaults_file_env_cli(tmp_path: Path) -> None:
    config = tmp_path / "wms.yaml"
    config.write_text("pilot_token_lifetime: 3600\nclock_skew: 10\nmax-rescheduling: 5\n")
    env = {ENV_PREFIX + "PILOT_TOKEN_LIFETIME": "7200", ENV_PREFIX + "MAX_RESCHEDULING": "6"}
    assert load_settings(environ={}).pilot_token_lifetime == 3 * 86400.0
    from_file = load_settings(str(config), environ={})
    assert (from_file.pilot_token_lifetime, from_file.clock_skew, from_file.max_rescheduling) == (3600.0, 10.0, 5)
    from_env = load_settings(str(config), environ=env)
    assert (from_env.pilot_token_lifetime, from_env.clock_skew, from_env.max_rescheduling) == (7200.0, 10.0, 6)
    from_cli = load_settings(str(config), {"pilot_token_lifetime": 600, "max_rescheduling": None}, environ=env)
    assert (from_cli.pilot_token_lifetime, from_cli.max_rescheduling) == (600.0, 6)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"stalled_after": "soon"}, "stalled_after: Input should be a valid number"),
        ({"port": 0}, "port: Input should be greater than or equal to 1"),
        ({"port": 65536}, "port: Input should be less than or equal to 65535"),
        ({"workers": 0}, "workers: Input should be greater than or equal to 1"),
        ({"max_sandbox_size": 0}, "max_sandbox_size: Input should be greater than or equal to 1"),
        ({"failed_after": -1}, "failed_after: Input should be greater than or equal to 0"),
        ({"pilot_token_lifetime": 59}, "pilot_token_lifetime: Input should be greater than or equal to 60"),
        ({"pilot_token_lifetime": 7 * 86400 + 1}, "pilot_token_lifetime: Input should be less than or equal to 604800"),
        ({"group_shares": {"a": "much"}}, "group_shares.a: Input should be a valid number"),
        ({"reschedule_stalled": "perhaps"}, "reschedule_stalled: Input should be a valid boolean"),
        ({"colour": "blue"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_errors_name_the_key_and_where_it_came_from(tmp_path: Path, values: dict, message: str) -> None:
    config = tmp_path / "wms.yaml"
    config.write_text(json.dumps(values))
    with pytest.raises(ConfigError) as from_file:
        load_settings(str(config), environ={})
    key = message.split(":")[0]
    assert str(from_file.value).startswith(message) and f"'{key}'" in str(from_file.value)
    assert f"config file {config}" in str(from_file.value)
    with pytest.raises(ConfigError) as from_cli:
        load_settings(overrides=values, environ={})
    assert str(from_cli.value).startswith(message) and "the command line" in str(from_cli.value)


def test_environment_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^workers: .* from environment variable GALAXY_DIRAC_WMS_WORKERS\)$"):
        load_settings(environ={ENV_PREFIX + "WORKERS": "many"})
    with pytest.raises(ConfigError, match="unknown setting 'stalled_aftr' from environment variable"):
        load_settings(environ={ENV_PREFIX + "STALLED_AFTR": "3"})
    shares = load_settings(environ={ENV_PREFIX + "GROUP_SHARES": '{"big": 3, "small": 1}'}).group_shares
    assert shares == {"big": 3.0, "small": 1.0}


def test_direct_construction_and_assignment_are_checked() -> None:
    with pytest.raises(ValidationError, match="colour"):
        Settings(colour="blue")
    s = Settings()
    s.reschedule_stalled = False
    assert s.reschedule_stalled is False
    with pytest.raises(ValidationError, match="port"):
        s.port = 0


def test_worker_processes_get_the_same_settings_through_the_environment(tmp_path: Path) -> None:
    """``serve --workers N`` hands the resolved settings to its workers as variables (see wms.cli.serve)."""
    s = load_settings(
        overrides={"home": str(tmp_path), "workers": 2, "port": 9999, "group_shares": {"a": 2}}, environ={}
    )
    s.reschedule_stalled = False
    env = {ENV_PREFIX + k.upper(): json.dumps(v) if isinstance(v, dict) else str(v) for k, v in s.__dict__.items()}
    assert load_settings(environ=env) == s


def test_signing_key_created_once_and_checked(tmp_path: Path) -> None:
    s = Settings(home=str(tmp_path / "home"))
    with pytest.raises(ConfigError, match="no signing secret"):
        s.signing_key()
    key = s.signing_key(create=True)
    assert s.signing_key() == key and len(key) >= 32 and (Path(s.secret_file).stat().st_mode & 0o777) == 0o600
    Path(s.secret_file).write_text("short")
    with pytest.raises(ConfigError, match="shorter than 32"):
        s.signing_key()


def test_example_systemd_environment_loads() -> None:
    unit = (EXAMPLES / "systemd" / "galaxy-dirac-wms.service").read_text()
    env = dict(re.findall(r"^Environment=(GALAXY_DIRAC_WMS_\w+)=(.*)$", unit, re.M))
    assert env.pop(ENV_PREFIX + "CONFIG")  # a file the operator writes; every other variable must be a setting
    s = load_settings(environ=env, overrides={"host": "0.0.0.0", "port": 8686, "workers": 2})
    assert s.home == env[ENV_PREFIX + "HOME"] and s.sandbox_dir.startswith(s.home)
