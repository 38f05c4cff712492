"""Galaxy's container settings on a DIRAC destination: node volumes, explicit images, the runtime tag."""

from __future__ import annotations

import pytest

from galaxy_dirac import containers
from galaxy_dirac.payload import PLACEHOLDER


def test_podman_destination_mounts_the_node_job_directory_and_asks_for_podman() -> None:
    params = {"docker_enabled": "true", "docker_cmd": "podman --runtime runc"}
    containers.prepare_destination(params)
    # Galaxy's $defaults would mount Galaxy's root and file store, which no node has.
    assert params["docker_volumes"] == f"{PLACEHOLDER}:rw"
    assert params["docker_enabled"] is True
    assert containers.runtime_tag(params) == "podman"
    containers.prepare_destination(params)  # a destination shared by many jobs: applying it again changes nothing
    assert params["docker_volumes"] == f"{PLACEHOLDER}:rw"


def test_admin_volumes_keep_their_extra_mounts_around_the_node_defaults() -> None:
    params = {"singularity_enabled": True, "singularity_volumes": "$defaults,/cvmfs/data.galaxyproject.org:ro"}
    containers.prepare_destination(params)
    assert params["singularity_volumes"] == f"{PLACEHOLDER}:rw,/cvmfs/data.galaxyproject.org:ro"
    explicit = {"docker_enabled": True, "docker_volumes": "$job_directory:rw"}
    containers.prepare_destination(explicit)
    assert explicit["docker_volumes"] == "$job_directory:rw"  # no $defaults: the admin's own list, as written


@pytest.mark.parametrize(
    ("params", "tag"),
    [
        ({"docker_enabled": True}, "docker"),
        ({"docker_enabled": True, "docker_cmd": "/usr/bin/podman"}, "podman"),
        ({"singularity_enabled": True}, "singularity"),
        ({"singularity_enabled": True, "singularity_cmd": "apptainer"}, "apptainer"),
        ({"singularity_enabled": "False", "docker_enabled": "no"}, None),
        ({}, None),
    ],
)
def test_runtime_tag_follows_galaxy_settings(params: dict, tag: str) -> None:
    assert containers.runtime_tag(params) == tag


def test_destination_image_becomes_galaxy_container_descriptions() -> None:
    docker = {"docker_enabled": True, "docker_cmd": "podman", "container": "docker://quay.io/biocontainers/bwa:0.7"}
    containers.prepare_destination(docker)
    assert docker["container"] == [{"type": "docker", "identifier": "quay.io/biocontainers/bwa:0.7"}]
    assert containers.runtime_tag(docker) == "podman"
    cvmfs = "/cvmfs/singularity.galaxyproject.org/all/bwa:0.7.17--h5bf99c6_8"
    only_image = {"container": cvmfs, "singularity_cmd": "apptainer"}  # enables the type that can run it
    containers.prepare_destination(only_image)
    assert only_image["singularity_enabled"] is True
    assert only_image["container"] == [{"type": "singularity", "identifier": cvmfs}]
    assert containers.runtime_tag(only_image) == "apptainer"
    named = {"singularity_enabled": True, "container": "busybox:1.36"}
    containers.prepare_destination(named)
    assert named["container"] == [{"type": "singularity", "identifier": "docker://busybox:1.36"}]


def test_docker_cannot_run_a_singularity_image() -> None:
    with pytest.raises(ValueError, match="singularity_enabled"):
        containers.prepare_destination({"docker_enabled": True, "container": "/cvmfs/x/tool.sif"})
