"""Config validation: every error names the key that is wrong."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from pydantic import ValidationError

from sitedirector import cli
from sitedirector.ce.base import CE_TYPES, CEError, ce_class
from sitedirector.ce.local import LocalComputingElement
from sitedirector.config import ConfigError, QueueConfig, load, parse

GOOD = {
    "scheduler": {"url": "http://127.0.0.1:8080", "token": "t"},
    "cycle_interval": 60,
    "credentials": {
        "tok": {"type": "scitoken", "file": "/etc/sd/token"},
        "cloud": {
            "type": "application_credential",
            "auth_url": "https://keystone:5000/v3",
            "application_credential_id": "id",
            "application_credential_secret": "s",
        },
    },
    "queues": [
        {"name": "local", "type": "local", "site": "LCG.Local.org"},
        {
            "name": "ce1-long",
            "type": "htcondorce",
            "site": "LCG.A.org",
            "endpoint": "ce1.a.org:9619",
            "queue": "long",
            "tags": "GPU, Docker",
            "processors": 8,
            "credentials": "tok",
        },
    ],
}


def with_change(path: str, value: object) -> dict:
    doc = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node: object = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]  # type: ignore[index]
    if value is KeyError:
        del node[last]  # type: ignore[union-attr]
    else:
        node[int(last) if isinstance(node, list) else last] = value  # type: ignore[index]
    return doc


def test_good_config_parses() -> None:
    cfg = parse(GOOD)
    assert [q.name for q in cfg.queues] == ["local", "ce1-long"]
    q = cfg.queue("ce1-long")
    assert q.tags == ["GPU", "Docker"] and q.credentials.type == "scitoken" and q.ce == "ce1.a.org:9619"
    assert q.ce_queue == "long" and cfg.queue("local").ce_queue == "local"
    assert cfg.cycle_interval == 60.0 and cfg.credentials["cloud"].get("application_credential_id") == "id"


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("scheduler", KeyError, "scheduler: Field required"),
        ("scheduler.url", "ftp://x", "scheduler.url: must start with http"),
        ("scheduler.token", KeyError, "scheduler.token: required"),
        ("scheduler.tokn", "x", "scheduler.tokn: Extra inputs are not permitted"),
        ("cycle_interval", "fast", "cycle_interval: Input should be a valid number"),
        ("cycle_interval", 0, "cycle_interval: Input should be greater than or equal to 0.1"),
        ("colour", "blue", "colour: Extra inputs are not permitted"),
        ("queues", [], "queues: List should have at least 1 item"),
        ("queues.0.name", "bad name!", "queues.0.name: 'bad name!' must be letters"),
        ("queues.0.type", "slurm", "queues.0.type: unknown CE type 'slurm'"),
        ("queues.0.site", KeyError, "queues.0.site: Field required"),
        ("queues.0.max_waiting", -1, "queues.0.max_waiting: Input should be greater than or equal to 0"),
        ("queues.0.processors", 0, "queues.0.processors: Input should be greater than or equal to 1"),
        ("queues.0.max_totl", 3, "queues.0.max_totl: Extra inputs are not permitted"),
        ("queues.1.endpoint", KeyError, "queues.1.endpoint: required for type htcondorce"),
        ("queues.1.credentials", "nope", "queues.1.credentials: no credential named 'nope'"),
        ("queues.1.tags", [1, 2], "queues.1.tags.0: Input should be a valid string"),
        ("queues.1.name", "local", "queues.1.name: duplicate queue name 'local'"),
        ("queues.0.queue", "long", None),
        ("queues.0.options", {"slots": 0}, "queues.0.options.slots: Input should be greater than or equal to 1"),
        ("queues.0.options", {"slot": 2}, "queues.0.options.slot: Extra inputs are not permitted"),
        ("queues.1.options", {"keep_finishd": 60}, "queues.1.options.keep_finishd: Extra inputs are not permitted"),
        ("queues.1.options", {"keep_finished": "soon"}, "queues.1.options.keep_finished: Input should be a valid int"),
        ("queues.1.options", {"mode": "local"}, "queues.1.options.mode: Input should be 'remote' or 'grid'"),
        ("credentials.tok.type", "kerberos", "credentials.tok.type: unknown credential type"),
        ("credentials.tok.file", KeyError, "credentials.tok.file: required"),
        ("credentials.cloud.auth_url", KeyError, "credentials.cloud.auth_url: required"),
        ("pilot", {"max_idle": "x"}, "pilot.max_idle: Input should be a valid integer"),
        ("pilot", {"heartbeat_interval": 0}, "pilot.heartbeat_interval: Input should be greater than or equal to 1"),
        ("pilot", {"max_idel": 5}, "pilot.max_idel: Extra inputs are not permitted"),
    ],
)
def test_errors_name_the_key(path: str, value: object, message: str) -> None:
    if message is None:  # same queue name on another CE is fine
        parse(with_change(path, value), environ={})
        return
    with pytest.raises(ConfigError) as info:
        parse(with_change(path, value), environ={})
    assert str(info.value).startswith(message)
    if path.startswith("credentials."):  # the queue using it does not add a second error
        assert "queues" not in str(info.value)


def test_two_queues_on_one_ce_queue_are_rejected() -> None:
    doc = copy.deepcopy(GOOD)
    doc["queues"].append({**doc["queues"][1], "name": "ce1-long-again"})
    with pytest.raises(ConfigError, match=r"queues\.2\.queue: another queue already uses"):
        parse(doc)


def test_token_file_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "pilot.token").write_text("from-file\n")
    (tmp_path / "sd.yml").write_text(
        "scheduler: {url: 'http://h:1', token_file: pilot.token}\nqueues: [{name: q, type: local, site: S}]\n"
    )
    assert load(tmp_path / "sd.yml").token == "from-file"
    (tmp_path / "bad.yml").write_text("scheduler: {url: 'http://h:1', token_file: missing}\nqueues: []\n")
    with pytest.raises(ConfigError, match="scheduler.token_file: cannot read"):
        load(tmp_path / "bad.yml")


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SITEDIRECTOR_TOKEN", "from-env")
    example = Path(__file__).resolve().parents[2] / "examples" / "sitedirector.yml"
    cfg = load(example)
    assert {q.type for q in cfg.queues} == {"local", "htcondorce", "openstack", "arc"}


def test_cli_check_reports_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "sd.yml").write_text("scheduler: {url: 'http://h:1', token: t}\nqueues: [{name: q, type: nope}]\n")
    assert cli.main(["check", "-c", str(tmp_path / "sd.yml")]) == 2
    assert "queues.0.type: unknown CE type 'nope'" in capsys.readouterr().err


def test_registry_is_import_paths() -> None:
    assert set(CE_TYPES) >= {"local", "htcondorce", "openstack"}
    assert ce_class("local").type_name == "local"
    with pytest.raises(CEError, match="unknown CE type"):
        ce_class("slurm")
    with pytest.raises(CEError, match="needs"):
        ce_class("x", {"x": "sitedirector.ce.no_such_module:Thing"})


# --- sources: defaults < file < environment < command line ---------------------------------------------------------
def test_precedence_defaults_file_env_cli(tmp_path: Path) -> None:
    (tmp_path / "pilot.token").write_text("from-token-file\n")
    (tmp_path / "sd.yml").write_text(
        "scheduler: {url: 'http://h:1', token_file: pilot.token}\ncycle_interval: 30\nbackoff_cycles: 5\n"
        "queues: [{name: q, type: local, site: S}]\n"
    )
    path = tmp_path / "sd.yml"
    only_file = load(path, environ={})
    assert (only_file.cycle_interval, only_file.backoff_cycles, only_file.boot_grace) == (30.0, 5, 600.0)
    assert only_file.token == "from-token-file" and only_file.work_dir == "/var/lib/sitedirector"
    env = {"SITEDIRECTOR_TOKEN": "from-env", "SITEDIRECTOR_CYCLE_INTERVAL": "45", "SITEDIRECTOR_WORK_DIR": "/srv/sd"}
    with_env = load(path, environ=env)
    assert (with_env.token, with_env.cycle_interval, with_env.work_dir) == ("from-env", 45.0, "/srv/sd")
    assert with_env.backoff_cycles == 5
    with_cli = load(path, environ=env, overrides={"cycle_interval": 10, "work_dir": None})
    assert (with_cli.cycle_interval, with_cli.work_dir, with_cli.token) == (10.0, "/srv/sd", "from-env")
    assert load(path, environ={"SITEDIRECTOR_UNRELATED": "x"}).token == "from-token-file"  # other variables: ignored


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse(GOOD, environ={"SITEDIRECTOR_BOOT_GRACE": "-5"})
    assert str(info.value).startswith("boot_grace: Input should be greater than or equal to 0")
    assert "environment variable SITEDIRECTOR_BOOT_GRACE" in str(info.value)


# --- backend options: each CE type declares its model -------------------------------------------------------------
def test_each_backend_declares_a_strict_options_model() -> None:
    for type_name in CE_TYPES:
        options = ce_class(type_name).Options
        assert options.model_config.get("extra") == "forbid" and "work_dir" in options.model_fields


def test_queue_options_validated_against_their_type() -> None:
    with pytest.raises(ValidationError, match="keep_finished"):
        QueueConfig(name="q", type="local", site="S", options={"keep_finished": 1})  # an htcondorce option
    q = QueueConfig(name="q", type="htcondorce", site="S", endpoint="ce:9619", options={"keep_finished": 60})
    assert q.ce == "ce:9619" and q.options == {"keep_finished": 60}  # kept as given: the director adds work_dir


def test_backend_reads_validated_options(tmp_path: Path) -> None:
    q = QueueConfig(name="q", type="local", site="S", options={"slots": 2, "work_dir": str(tmp_path)})
    ce = LocalComputingElement(q)
    assert (ce.slots, ce.work_dir, ce.python) == (2, tmp_path, "python3")
    q.options["slotz"] = 3  # what the config would have refused
    with pytest.raises(CEError, match=r"queue q: options\.slotz: Extra inputs are not permitted"):
        LocalComputingElement(q)


def test_example_options_reach_the_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "sitedirector.yml"
    cfg = load(example, environ={"SITEDIRECTOR_TOKEN": "t"})
    local = ce_class("local").read_options(cfg.queue("local"))
    condor = ce_class("htcondorce").read_options(cfg.queue("ce1-long"))
    cloud = ce_class("openstack").read_options(cfg.queue("fedcloud-medium"))
    arc = ce_class("arc").read_options(cfg.queue("arc1-grid"))
    assert local.slots == 4 and (condor.mode, condor.keep_finished, condor.keep_held) == ("remote", 3600, 86400)
    assert (cloud.flavor, cloud.network, cloud.max_concurrent_creates) == ("m1.medium", "private", 3)
    assert arc.delegation_lifetime == 86400 and arc.verify == "/etc/grid-security/certificates"
