"""Galaxy's own container settings on a destination, made to work on a DIRAC worker node.

Galaxy resolves a tool's container and writes the container command into the job script from the destination's
``docker_enabled`` / ``docker_cmd`` / ``docker_volumes`` / … or ``singularity_enabled`` / ``singularity_cmd`` /
``singularity_volumes`` / … (Apptainer is ``singularity_cmd: apptainer``). Only two things differ from a cluster
with a shared file system, and this module adjusts the destination for them before Galaxy builds the command:

* Volumes: Galaxy's ``$defaults`` bind-mount Galaxy's root and its whole file store, which the node does not have;
  the node has one job directory (work, inputs, outputs, tool; :mod:`galaxy_dirac.staging`). So ``$defaults`` stands
  for that directory (:data:`NODE_VOLUMES`); ``$job_directory``, ``$working_directory``, ``$tool_directory`` … and
  the dataset paths in the command are rewritten to it like every other Galaxy path, so inside the container the
  tool sees the same paths as outside. Volumes that name the node's own paths (``/cvmfs/…``) pass as they are.
* The runner's ``container`` parameter (an image for tools that name none, as Pulsar deployments set it:
  ``docker://…``, a plain image name, or a Singularity image path on CVMFS) becomes Galaxy's ``container``
  description list, so Galaxy's own fallback order applies (the tool's container first).

The JDL then asks for a slot offering the runtime (:func:`runtime_tag`): ``docker``, ``podman``, ``singularity`` or
``apptainer``, the tags DIRAC sites advertise and our pilot detects (:mod:`galaxy_dirac.pilot.slot`). No Galaxy
import here: the runner calls :func:`prepare_destination` on the destination's params.
"""

from __future__ import annotations

import os
import shlex
from typing import Any, Dict, List, MutableMapping, Optional

from galaxy_dirac.payload import PLACEHOLDER

__all__ = ["NODE_VOLUMES", "RUNTIME_TAGS", "container_descriptions", "prepare_destination", "runtime_tag"]

#: The tags a slot offers for its container runtimes, as DIRAC sites spell them.
RUNTIME_TAGS = ("docker", "podman", "singularity", "apptainer")
#: What ``$defaults`` mounts on the node: the job's whole directory, read-write, at the same path inside.
NODE_VOLUMES = f"{PLACEHOLDER}:rw"
_SINGULARITY_SCHEMES = ("shub://", "library://", "oras://", "http://", "https://")


def _true(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes", "on")


def _command_tag(command: Any, default: str) -> str:
    """``podman --runtime runc`` → ``podman``; ``/usr/bin/apptainer`` → ``apptainer``; anything else → default."""
    try:
        words = shlex.split(str(command or ""))
    except ValueError:
        words = str(command or "").split()
    for word in words:
        name = os.path.basename(word)
        if name in RUNTIME_TAGS:
            return name
    return default


def _explicit_image(params: MutableMapping[str, Any]) -> Optional[str]:
    value = params.get("container")
    return value.strip() if isinstance(value, str) and value.strip() else None


def _singularity_only(image: str) -> bool:
    return image.startswith("/") or image.startswith(_SINGULARITY_SCHEMES) or image.endswith((".sif", ".simg"))


def enabled_type(params: MutableMapping[str, Any]) -> Optional[str]:
    """Galaxy's container type the destination enables (``docker`` or ``singularity``), or None.

    A destination naming only an explicit ``container`` image enables the type that can run it.
    """
    if _true(params.get("docker_enabled")):
        return "docker"
    if _true(params.get("singularity_enabled")):
        return "singularity"
    image = _explicit_image(params)
    if image:
        return "singularity" if _singularity_only(image) else "docker"
    return None


def runtime_tag(params: MutableMapping[str, Any]) -> Optional[str]:
    """The JDL tag for the runtime the destination's container command uses, or None without containers."""
    kind = enabled_type(params)
    if kind == "docker":
        return _command_tag(params.get("docker_cmd"), "docker")
    if kind == "singularity":
        return _command_tag(params.get("singularity_cmd"), "singularity")
    return None


def container_descriptions(image: str, kind: str) -> List[Dict[str, str]]:
    """Galaxy's ``container`` destination list for one explicit image run by container type ``kind``."""
    if kind == "docker":
        if _singularity_only(image):
            raise ValueError(
                f"container {image!r} is a Singularity/Apptainer image; Docker and Podman cannot run it "
                "(set singularity_enabled: true)"
            )
        return [{"type": "docker", "identifier": image[len("docker://") :] if image.startswith("docker://") else image}]
    if not _singularity_only(image) and not image.startswith("docker://"):
        image = f"docker://{image}"
    return [{"type": "singularity", "identifier": image}]


def prepare_destination(params: MutableMapping[str, Any]) -> None:
    """Adjust the destination's container settings in place for a node without Galaxy's file system (idempotent)."""
    kind = enabled_type(params)
    if kind is None:
        return
    params[f"{kind}_enabled"] = True
    image = _explicit_image(params)
    if image:
        params["container"] = container_descriptions(image, kind)
    key = f"{kind}_volumes"
    volumes = str(params.get(key) or "$defaults")
    params[key] = volumes.replace("$defaults", NODE_VOLUMES)
