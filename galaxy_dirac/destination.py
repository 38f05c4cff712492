"""A Galaxy destination's DIRAC parameters, validated once, and the JDL attributes they become.

Galaxy hands a runner every parameter of the destination as text or YAML values, its own (``docker_enabled``,
``env``, ``tmp_dir`` …) and TPV's computed ones (``processors: "2.0"``) mixed with ours. This model is the one list of
what ours mean: a bad value fails the job with the parameter named, and a key nobody knows (a typo such as
``proccessors``) is logged once per destination with the nearest known name instead of being dropped in silence.
"""

from __future__ import annotations

import difflib
import logging
import threading
from typing import Any, Dict, List, Literal, Optional, Set

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from galaxy_dirac.staging import TRANSPORTS, BundleError

log = logging.getLogger(__name__)

#: Our parameter → JDL attribute, for the parameters that map one to one.
JDL_ATTRIBUTES: Dict[str, str] = {
    "site": "Site",
    "banned_sites": "BannedSites",
    "tags": "Tags",
    "platform": "Platform",
    "processors": "NumberOfProcessors",
    "cpu_time": "CPUTime",
    "priority": "Priority",
}

#: Destination parameters Galaxy itself (or TPV) reads: known, not ours, never warned about.
GALAXY_PARAMETERS = frozenset(
    {
        "env",
        "resubmit",
        "tmp_dir",
        "outputs_to_working_directory",
        "metadata_strategy",
        "require_container",
        "container",
        "container_monitor",
        "container_override",
        "container_resolvers",
        "container_resolvers_config_file",
        "embed_metadata_in_job",
        "galaxy_virtual_env",
        "job_name_template",
        "legacy_default_metadata_strategy",
        "local_slots",
        "max_metadata_value_size",
        "object_store_id",
        "remote_metadata",
        "runner",
        "scheduler",
        "tags_for_galaxy",
        "working_directory",
        "default_file_action",
        "dependency_resolution",
        "file_action_config",
        "rewrite_parameters",
        "submit_native_specification",
        "native_specification",
        "cores",
        "mem",
        "gpus",
        "accepted",
        "handler",
        "cleanup_job",
        "compute_version_path",
        "container_monitor_command",
        "container_monitor_get_ip_method",
        "container_monitor_result",
        "external_chown_script",
        "max_discovered_files",
        "real_system_username",
        "retry_metadata_internally",
        "retry_interactivetool_metadata_internally",
        "shared_home_dir",
        "tool_evaluation_strategy",
        "use_metadata_binary",
        "uses_tool_provided_metadata",
    }
)
GALAXY_PREFIXES = ("docker_", "singularity_", "apptainer_", "tpv_", "k8s_", "pulsar_", "galaxy_")


def split_list(value: Any) -> List[str]:
    """A list parameter as Galaxy gives it: a YAML list, or one comma-separated string (XML job_conf)."""
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


class DiracDestination(BaseModel):
    """Our parameters of one destination; ``None``/empty means "not set" (the runner's default applies)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    transport: Optional[str] = None
    site: List[str] = []
    banned_sites: List[str] = []
    tags: List[str] = []
    platform: Optional[str] = None
    processors: Optional[int] = None
    memory: Optional[int] = None  # MB; the slot must have it and the job must stay within it
    cpu_time: Optional[int] = None  # DIRAC's CPUTime (normalised seconds)
    priority: Optional[int] = None
    job_group: Optional[str] = None
    input_sandbox_limit: Optional[str] = None  # MB
    output_sandbox_limit: Optional[str] = None
    reference_data: Optional[Literal["stage", "node"]] = None
    reference_data_paths: List[str] = []

    @field_validator("site", "banned_sites", "tags", "reference_data_paths", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> List[str]:
        return split_list(value)

    @field_validator("processors", "memory", "cpu_time", mode="before")
    @classmethod
    def _positive(cls, value: Any) -> Optional[int]:
        """TPV writes computed figures as float text ("2.0"); 0 or empty means not set."""
        if value is None or str(value).strip() in ("", "0", "None"):
            return None
        number = float(value)
        if number != int(number) or number < 0:
            raise ValueError("must be a whole positive number")
        return int(number)

    @field_validator("priority", mode="before")
    @classmethod
    def _integer(cls, value: Any) -> Optional[int]:
        if value is None or str(value).strip() in ("", "None"):
            return None
        return int(float(value))

    @field_validator("transport", "platform", "job_group", "reference_data", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Optional[str]:
        return None if value is None or str(value).strip() == "" else str(value).strip()

    @field_validator("transport")
    @classmethod
    def _transport(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and value not in TRANSPORTS:
            raise ValueError(f"unknown transport {value!r}; expected one of {', '.join(TRANSPORTS)}")
        return value

    @field_validator("input_sandbox_limit", "output_sandbox_limit", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Optional[str]:
        if value is None or str(value).strip() == "":
            return None
        text = str(value).strip()
        if text.lower() not in ("none", "unlimited") and float(text) < 0:
            raise ValueError("must be a size in MB, 0 or 'none' for no limit")
        return text

    @classmethod
    def parse(cls, params: Dict[str, Any]) -> DiracDestination:
        """Validate a destination's parameters; a bad value is a :class:`BundleError` naming it and why."""
        try:
            return cls.model_validate(dict(params or {}))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise BundleError(f"bad DIRAC destination parameter ({problems})") from None

    def unknown(self) -> List[str]:
        """Keys that are neither ours nor Galaxy's: most likely typos."""
        extra = self.model_extra or {}
        return sorted(k for k in extra if k not in GALAXY_PARAMETERS and not k.startswith(GALAXY_PREFIXES))

    def jdl_attributes(self, default_group: str) -> Dict[str, Any]:
        """The JDL attributes this destination asks for (beside Executable, sandboxes and JobName)."""
        attrs: Dict[str, Any] = {"JobGroup": (self.job_group or default_group)[:64]}
        for name, attribute in JDL_ATTRIBUTES.items():
            value = getattr(self, name)
            if value not in (None, []):
                attrs[attribute] = value
        if self.memory:
            # The slot must have it (MinRAM: matching) and the job must stay within it (MaxRAM: the watchdog).
            attrs["MinRAM"] = attrs["MaxRAM"] = self.memory
        return attrs


_warned: Set[str] = set()
_warned_lock = threading.Lock()


def warn_unknown(destination_id: str, destination: DiracDestination) -> None:
    """Log once per destination the keys nobody reads, with the parameter each one probably meant."""
    unknown = destination.unknown()
    if not unknown:
        return
    with _warned_lock:
        if destination_id in _warned:
            return
        _warned.add(destination_id)
    known = list(DiracDestination.model_fields)
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    log.warning("destination %s: parameters no one reads, ignored: %s", destination_id, ", ".join(hints))
