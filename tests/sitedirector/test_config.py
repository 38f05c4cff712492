"""Config validation: every error names the key that is wrong."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from sitedirector import cli
from sitedirector.ce.base import CE_TYPES, CEError, ce_class
from sitedirector.config import ConfigError, load, parse

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
        ("scheduler", KeyError, "scheduler: required"),
        ("scheduler.url", "ftp://x", "scheduler.url: must start with http"),
        ("scheduler.token", KeyError, "scheduler.token: required"),
        ("scheduler.tokn", "x", "scheduler.tokn: unknown key"),
        ("cycle_interval", "fast", "cycle_interval: must be a number"),
        ("queues", [], "queues: must be a non-empty list"),
        ("queues.0.name", "bad name!", "queues[0].name:"),
        ("queues.0.type", "slurm", "queues[0] (local).type: unknown CE type 'slurm'"),
        ("queues.0.site", KeyError, "queues[0] (local).site: required"),
        ("queues.0.max_waiting", -1, "queues[0] (local).max_waiting: must be an integer >= 0"),
        ("queues.0.processors", 0, "queues[0] (local).processors: must be an integer >= 1"),
        ("queues.0.max_totl", 3, "queues[0].max_totl: unknown key"),
        ("queues.1.endpoint", KeyError, "queues[1] (ce1-long).endpoint: required for type htcondorce"),
        ("queues.1.credentials", "nope", "queues[1] (ce1-long).credentials: no credential named 'nope'"),
        ("queues.1.tags", [1, 2], "queues[1] (ce1-long).tags: must be a list of strings"),
        ("queues.1.name", "local", "queues[1].name: duplicate queue name 'local'"),
        ("queues.0.queue", "long", None),
        ("credentials.tok.type", "kerberos", "credentials.tok.type: unknown credential type"),
        ("credentials.tok.file", KeyError, "credentials.tok.file: required"),
        ("credentials.cloud.auth_url", KeyError, "credentials.cloud.auth_url: required"),
        ("pilot", {"max_idle": "x"}, "pilot.max_idle: must be an integer"),
    ],
)
def test_errors_name_the_key(path: str, value: object, message: str) -> None:
    if message is None:  # same queue name on another CE is fine
        parse(with_change(path, value))
        return
    with pytest.raises(ConfigError) as info:
        parse(with_change(path, value))
    assert message in str(info.value)


def test_two_queues_on_one_ce_queue_are_rejected() -> None:
    doc = copy.deepcopy(GOOD)
    doc["queues"].append({**doc["queues"][1], "name": "ce1-long-again"})
    with pytest.raises(ConfigError, match=r"queues\[2\] \(ce1-long-again\).queue: another queue already uses"):
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
    assert "queues[0] (q).type: unknown CE type 'nope'" in capsys.readouterr().err


def test_registry_is_import_paths() -> None:
    assert set(CE_TYPES) >= {"local", "htcondorce", "openstack"}
    assert ce_class("local").type_name == "local"
    with pytest.raises(CEError, match="unknown CE type"):
        ce_class("slurm")
    with pytest.raises(CEError, match="needs"):
        ce_class("x", {"x": "sitedirector.ce.no_such_module:Thing"})
