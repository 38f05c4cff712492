"""Pilot options from the command line and from GALAXY_DIRAC_PILOT_* variables."""

from __future__ import annotations

import pytest

from galaxy_dirac.pilot.pilot import parse_args


def test_environment_supplies_every_option(tmp_path):
    environ = {
        "GALAXY_DIRAC_PILOT_URL": "https://wms:8686",
        "GALAXY_DIRAC_PILOT_TOKEN": "secret",
        "GALAXY_DIRAC_PILOT_SITE": "LCG.Test.org",
        "GALAXY_DIRAC_PILOT_PROCESSORS": "4",
        "GALAXY_DIRAC_PILOT_CPU_TIME": "7200",
        "GALAXY_DIRAC_PILOT_TAGS": "GPU, big ,",
        "GALAXY_DIRAC_PILOT_WORKDIR": str(tmp_path),
        "GALAXY_DIRAC_PILOT_HEARTBEAT_INTERVAL": "2.5",
        "GALAXY_DIRAC_PILOT_MAX_EMPTY_MATCHES": "3",
    }
    options = parse_args([], environ)
    assert (options.url, options.token, options.site) == ("https://wms:8686", "secret", "LCG.Test.org")
    assert options.processors == 4 and options.cpu_time == 7200.0 and options.heartbeat_interval == 2.5
    assert options.tags == ["GPU", "big"] and options.max_empty_matches == 3
    assert options.workdir == str(tmp_path) and len(options.stamp) == 32
    overridden = parse_args(["--processors", "2", "--stamp", "s1"], environ)
    assert overridden.processors == 2 and overridden.stamp == "s1"


def test_token_file_and_missing_options(tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("from-file\n")
    options = parse_args(["--url", "http://x", "--site", "S", "--token-file", str(token)], {})
    assert options.token == "from-file"
    with pytest.raises(SystemExit) as caught:
        parse_args(["--url", "http://x"], {})
    assert caught.value.code == 2
    assert "missing --token, --site" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([], {"GALAXY_DIRAC_PILOT_PROCESSORS": "many"})
