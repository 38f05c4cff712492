"""Tools whose dependencies come in a container: Galaxy's own Docker machinery with real Podman on DIRAC pilots.

A real Galaxy runs the tools under ``tests/tools/containers/`` (their ``<container type="docker">`` names a local
image) on destinations with Galaxy's settings (``docker_enabled``, ``docker_cmd: podman --runtime runc``) through the
real scheduler and two real pilot processes: one at ``Local.podman`` whose node has Podman (it detects it and offers
the ``podman`` tag), one at ``Local.bare`` that offers no runtime. No registry: the image is built here from Debian's
``busybox-static`` with ``podman import``; a file in it (``/etc/galaxy-dirac-image``) shows a tool ran inside it.
Apptainer is not packaged here: a third pilot (``Local.apptainer``) has a named stand-in for it on its PATH
(``tests/tools/containers/apptainer_standin.py``) that checks Galaxy's Apptainer command against the node.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest
import yaml

from galaxy_dirac import jdl
from tests.galaxy_server import GalaxyServer
from tests.galaxy_stack import GalaxyStack, galaxy_stack

pytestmark = [pytest.mark.galaxy, pytest.mark.podman, pytest.mark.slow]

TOOLS = Path(__file__).resolve().parent.parent / "tools" / "containers"
IMAGE = "localhost/galaxy-dirac-test/busybox:1.0"
ABSENT_IMAGE = "localhost/galaxy-dirac-test/absent:1.0"
MARKER = "galaxy-dirac test image"
CONTAINERS_CONF = '[containers]\ndefault_ulimits = []\n\n[engine]\ncgroup_manager = "cgroupfs"\n'
PODMAN = {"docker_enabled": True, "docker_cmd": "podman --runtime runc", "docker_net": "none"}
#: Environment → params; tool id → environment. ``*_sandbox`` / ``*_bare`` tools are copies of the named tool.
ENVIRONMENTS: Dict[str, Dict[str, Any]] = {
    "podman_galaxy": {"runner": "dirac", "transport": "galaxy", "site": "Local.podman", **PODMAN},
    "podman_sandbox": {"runner": "dirac", "transport": "sandbox", "site": "Local.podman", **PODMAN},
    "podman_slots_galaxy": {"runner": "dirac", "transport": "galaxy", "site": "Local.podman", "processors": 2,
                            "memory": 1000, **PODMAN},
    "podman_slots_sandbox": {"runner": "dirac", "transport": "sandbox", "site": "Local.podman", "processors": 2,
                             "memory": 1000, **PODMAN},
    "podman_image": {"runner": "dirac", "transport": "galaxy", "site": "Local.podman", "container": f"docker://{IMAGE}",
                     **PODMAN},
    "podman_bare": {"runner": "dirac", "transport": "galaxy", "site": "Local.bare", **PODMAN},
    "bare": {"runner": "dirac", "transport": "galaxy", "site": "Local.bare"},
    # Galaxy's Singularity/Apptainer settings with an image on a CVMFS-like path the node has ({cvmfs}: the fixture's).
    "apptainer_cvmfs": {"runner": "dirac", "transport": "sandbox", "site": "Local.apptainer", "processors": 2,
                        "singularity_enabled": True, "singularity_cmd": "apptainer",
                        "container": "{cvmfs}/singularity.galaxyproject.org/all/busybox:1.36"},
}  # fmt: skip
TOOL_ENVIRONMENTS = {
    "ct_cat": "podman_galaxy",
    "ct_cat_sandbox": "podman_sandbox",
    "ct_slots": "podman_slots_galaxy",
    "ct_slots_sandbox": "podman_slots_sandbox",
    "ct_missing": "podman_galaxy",
    "ct_plain": "podman_image",
    "ct_cat_bare": "podman_bare",
    "ct_host": "bare",
    "ct_env": "apptainer_cvmfs",
}


def _podman(conf: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args], env={**os.environ, "CONTAINERS_CONF": str(conf)}, capture_output=True, **kwargs
    )


def _build_image(home: Path, conf: Path) -> None:
    """A busybox rootfs (Debian's busybox-static) imported as IMAGE, the name the tools' <container> uses."""
    busybox = shutil.which("busybox")
    assert busybox, "busybox-static is not installed (scripts/ensure-services.sh installs it)"
    rootfs = home / "rootfs"
    for sub in ("bin", "etc", "tmp"):
        (rootfs / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox, rootfs / "bin" / "busybox")
    for applet in ("sh", "cat", "echo", "ls", "mkdir", "rm", "cp", "mv", "env", "test", "[", "true", "false"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "galaxy-dirac-image").write_text(MARKER + "\n")
    archive = home / "rootfs.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(archive), "."], check=True)
    done = _podman(conf, "import", str(archive), IMAGE, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")


def _write_tools(tools_dir: Path) -> None:
    """The container tools plus renamed copies (``ct_cat_sandbox``, ``ct_slots_sandbox``, ``ct_cat_bare``)."""
    shutil.copytree(TOOLS, tools_dir)
    entries = []
    for tool_id in TOOL_ENVIRONMENTS:
        base = tool_id if (TOOLS / f"{tool_id}.xml").exists() else tool_id.rsplit("_", 1)[0]
        if base != tool_id:
            text = re.sub(r'<tool id="[^"]+"', f'<tool id="{tool_id}"', (TOOLS / f"{base}.xml").read_text(), count=1)
            (tools_dir / f"{tool_id}.xml").write_text(text)
        entries.append(f'    <tool file="{tool_id}.xml"/>\n')
    (tools_dir / "tool_conf.xml").write_text(
        f'<?xml version="1.0"?>\n<toolbox tool_path="{tools_dir}">\n  <section id="ct" name="containers">\n'
        f'{"".join(entries)}  </section>\n</toolbox>\n'
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GalaxyStack]:
    if not shutil.which("podman") or not shutil.which("runc"):
        pytest.fail("podman and runc are not installed (scripts/ensure-services.sh installs them)")
    home = tmp_path_factory.mktemp("containers")
    conf = home / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    _build_image(home, conf)
    tools_dir = home / "tools"
    _write_tools(tools_dir)
    cvmfs = home / "cvmfs"
    image = Path(str(ENVIRONMENTS["apptainer_cvmfs"]["container"]).format(cvmfs=cvmfs))
    image.parent.mkdir(parents=True)
    image.write_bytes(b"stand-in image\n")
    standin = home / "standin"
    standin.mkdir()
    (standin / "apptainer").write_text(f'#!/bin/sh\nexec {sys.executable} {TOOLS / "apptainer_standin.py"} "$@"\n')
    (standin / "apptainer").chmod(0o755)
    environments = {**ENVIRONMENTS, "apptainer_cvmfs": {**ENVIRONMENTS["apptainer_cvmfs"], "container": str(image)}}
    job_conf = home / "job_conf.yml"
    job_conf.write_text(
        yaml.safe_dump(
            {
                "runners": {
                    "local": {"load": "galaxy.jobs.runners.local:LocalJobRunner", "workers": 2},
                    "dirac": {"load": "galaxy_dirac.runner:DiracJobRunner", "workers": 2},
                },
                "execution": {"default": "local", "environments": {"local": {"runner": "local"}, **environments}},
                "tools": [{"id": t, "environment": e} for t, e in TOOL_ENVIRONMENTS.items()],
            },
            sort_keys=False,
        )
    )
    config = {"tool_config_file": str(tools_dir / "tool_conf.xml"), "job_config_file": str(job_conf)}
    with galaxy_stack(home, config=config) as stack:
        # The pilots detect their runtimes: Podman answers on the first node, the second is told it has none.
        stack.add_pilot("pilot-podman", site="Local.podman", env={"CONTAINERS_CONF": str(conf)})
        stack.add_pilot("pilot-bare", site="Local.bare", env={"GALAXY_DIRAC_PILOT_CONTAINER_RUNTIMES": "none"})
        # Galaxy's tree is on this machine, but counts as missing for the stand-in, as on a real node.
        standin_env = {"PATH": f"{standin}:{os.environ['PATH']}", "GALAXY_DIRAC_STANDIN_ABSENT": str(stack.galaxy.home)}
        stack.add_pilot("pilot-apptainer", site="Local.apptainer", env=standin_env)
        stack.extra.update(conf=conf, image=str(image))
        yield stack
    sys.stderr.write(f"\ncontainer stack logs: {home}\n")


INPUT = "alpha\nbeta\n"


@pytest.fixture(scope="module")
def submitted(stack: GalaxyStack) -> Dict[str, str]:
    """Every container tool submitted at once (Galaxy job id per tool), so their DIRAC jobs run side by side."""
    galaxy: GalaxyServer = stack.galaxy
    history = galaxy.new_history("containers")
    dataset = {"src": "hda", "id": galaxy.upload(history, INPUT)}
    jobs = {}
    for tool_id in TOOL_ENVIRONMENTS:
        if tool_id == "ct_host":
            continue  # the control of the pilot without a runtime: submitted by its test, after ct_cat_bare
        inputs = {"input1": dataset} if tool_id.startswith(("ct_cat", "ct_plain", "ct_env")) else {"label": "x"}
        jobs[tool_id] = galaxy.run_tool(history, tool_id, inputs)["jobs"][0]["id"]
    jobs["history"] = history
    return jobs


def _run(stack: GalaxyStack, submitted: Dict[str, str], tool_id: str) -> Dict[str, Any]:
    return stack.galaxy.wait_job(submitted[tool_id], timeout=300)


@pytest.mark.parametrize("tool_id", ["ct_cat", "ct_cat_sandbox"])
def test_tool_runs_in_its_container_on_a_pilot_with_podman(stack: Dict, submitted: Dict, tool_id: str) -> None:
    galaxy: GalaxyServer = stack.galaxy
    job = _run(stack, submitted, tool_id)
    assert job["state"] == "ok", f"{job}\n{galaxy.log_tail()}"
    # The image's marker and the input, read inside the container; the output written there reached Galaxy.
    assert galaxy.content(job["outputs"]["out_file1"]["id"]) == f"{MARKER}\n{INPUT}"
    assert jdl.lookup(stack.received_jdl(job["external_id"]), "Tags") in ("podman", ["podman"])


@pytest.mark.parametrize("tool_id", ["ct_slots", "ct_slots_sandbox"])
def test_galaxy_slots_and_memory_reach_the_tool_in_its_container(stack: Dict, submitted: Dict, tool_id: str) -> None:
    galaxy: GalaxyServer = stack.galaxy
    job = _run(stack, submitted, tool_id)
    assert job["state"] == "ok", f"{job}\n{galaxy.log_tail()}"
    assert galaxy.content(job["outputs"]["out_file1"]["id"]) == f"{MARKER}\nslots=2 memory=1000\n"
    received = stack.received_jdl(job["external_id"])
    assert jdl.lookup(received, "NumberOfProcessors") == 2
    tags = jdl.lookup(received, "Tags")
    assert "podman" in ([tags] if isinstance(tags, str) else tags)


def test_destination_image_runs_a_tool_without_a_container(stack: Dict, submitted: Dict) -> None:
    """``container: docker://…`` on the destination: Galaxy's fallback image for a tool naming none."""
    galaxy: GalaxyServer = stack.galaxy
    job = _run(stack, submitted, "ct_plain")
    assert job["state"] == "ok", f"{job}\n{galaxy.log_tail()}"
    assert galaxy.content(job["outputs"]["out_file1"]["id"]) == f"{MARKER}\n{INPUT}"


def test_missing_image_fails_with_the_runtime_error(stack: Dict, submitted: Dict) -> None:
    assert _podman(stack.extra["conf"], "image", "exists", ABSENT_IMAGE).returncode != 0
    galaxy: GalaxyServer = stack.galaxy
    job = _run(stack, submitted, "ct_missing")
    assert job["state"] == "error", job
    # Podman's own message, naming the image, is in what Galaxy shows the user.
    shown = "\n".join(str(job.get(k) or "") for k in ("stderr", "tool_stderr", "job_stderr", "info"))
    assert ABSENT_IMAGE in shown and "Error" in shown, shown
    assert galaxy.content(job["outputs"]["out_file1"]["id"]) == ""


def test_no_slot_without_the_runtime_takes_a_container_job(stack: Dict, submitted: Dict) -> None:
    galaxy: GalaxyServer = stack.galaxy
    history, waiting = submitted["history"], submitted["ct_cat_bare"]
    # The pilot at Local.bare is matching: a job without a container runs there, after the container job was queued.
    control = galaxy.wait_job(galaxy.run_tool(history, "ct_host", {"label": "x"})["jobs"][0]["id"], timeout=300)
    assert control["state"] == "ok", f"{control}\n{galaxy.log_tail()}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # a few more match rounds of that pilot
        job = galaxy.job(waiting)
        assert job["state"] == "queued", job
        time.sleep(1)
    assert job["external_id"], job
    status = stack.scheduler("POST", "api/jobs/search", json={
        "parameters": ["JobID", "Status", "MinorStatus"],
        "search": [{"parameter": "JobID", "operator": "eq", "value": int(job["external_id"])}],
    })  # fmt: skip
    assert [row["Status"] for row in status] == ["Waiting"], status
    tags = jdl.lookup(stack.received_jdl(job["external_id"]), "Tags")
    assert "podman" in ([tags] if isinstance(tags, str) else tags)
    # What the user sees on the queued dataset: where the job stands in DIRAC and the slot it waits for.
    info = galaxy.api("GET", f"datasets/{job['outputs']['out_file1']['id']}")["misc_info"]
    assert info.startswith(f"DIRAC job {job['external_id']}: Waiting"), info
    assert "waiting for a pilot that offers" in info and "podman" in info, info
    galaxy.api("DELETE", f"jobs/{waiting}")


def test_apptainer_destination_with_a_cvmfs_image(stack: Dict, submitted: Dict) -> None:
    """Galaxy's own Apptainer command, through the named stand-in: image path, binds and GALAXY_SLOTS on the node."""
    galaxy: GalaxyServer = stack.galaxy
    job = _run(stack, submitted, "ct_env")
    assert job["state"] == "ok", f"{job}\n{galaxy.log_tail()}"
    assert galaxy.content(job["outputs"]["out_file1"]["id"]) == f"slots=2 image={stack.extra['image']}\n{INPUT}"
    tags = jdl.lookup(stack.received_jdl(job["external_id"]), "Tags")
    assert "apptainer" in ([tags] if isinstance(tags, str) else tags)
