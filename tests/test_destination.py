"""A destination's DIRAC parameters: one validated model, one table to the JDL; no Galaxy needed."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from galaxy_dirac import jdl
from galaxy_dirac.destination import JDL_ATTRIBUTES, DiracDestination, warn_unknown
from galaxy_dirac.staging import BundleError


def test_every_parameter_becomes_its_jdl_attribute() -> None:
    dest = DiracDestination.parse(
        {
            "site": "LCG.A.fr, LCG.B.it",
            "banned_sites": ["LCG.C.uk"],
            "tags": "GPU",
            "platform": "EL9",
            "processors": "4.0",  # TPV computes figures as float text
            "memory": 8000.0,
            "cpu_time": "3600",
            "priority": "-2",
            "job_group": "x" * 80,
        }
    )
    attrs = dest.jdl_attributes(default_group="galaxy-cat1")
    assert attrs == {
        "JobGroup": "x" * 64,
        "Site": ["LCG.A.fr", "LCG.B.it"],
        "BannedSites": ["LCG.C.uk"],
        "Tags": ["GPU"],
        "Platform": "EL9",
        "NumberOfProcessors": 4,
        "CPUTime": 3600,
        "Priority": -2,
        "MinRAM": 8000,
        "MaxRAM": 8000,
    }
    assert set(JDL_ATTRIBUTES.values()) <= set(attrs)
    rendered = jdl.parse(jdl.render({"Executable": "x", **attrs}))
    assert jdl.lookup(rendered, "NumberOfProcessors") == 4


def test_unset_and_empty_parameters_ask_for_nothing() -> None:
    dest = DiracDestination.parse({"site": "", "processors": None, "memory": 0, "priority": "", "transport": ""})
    assert dest.jdl_attributes(default_group="galaxy-cat1") == {"JobGroup": "galaxy-cat1"}
    assert dest.transport is None


@pytest.mark.parametrize(
    "params, named",
    [
        ({"processors": "two"}, "processors"),
        ({"processors": "2.5"}, "processors"),
        ({"memory": -1}, "memory"),
        ({"transport": "ftp"}, "transport"),
        ({"reference_data": "cvmfs"}, "reference_data"),
        ({"input_sandbox_limit": "-5"}, "input_sandbox_limit"),
    ],
)
def test_a_bad_value_names_the_parameter(params: dict, named: str) -> None:
    with pytest.raises(BundleError, match=named):
        DiracDestination.parse(params)


def test_a_typo_is_logged_once_with_the_name_it_probably_meant(caplog: pytest.LogCaptureFixture) -> None:
    params = {"proccessors": 4, "docker_enabled": True, "env": [], "tmp_dir": "$(mktemp -d)", "runner": "dirac"}
    dest = DiracDestination.parse(params)
    assert dest.unknown() == ["proccessors"]
    with caplog.at_level(logging.WARNING, logger="galaxy_dirac.destination"):
        warn_unknown("dirac_typo_test", dest)
        warn_unknown("dirac_typo_test", dest)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "did you mean 'processors'?" in messages[0]


def test_the_readme_lists_every_parameter() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("| parameter | JDL / effect |") :].split("\n\n")[0]
    assert all(f"`{name}`" in table for name in DiracDestination.model_fields), table
