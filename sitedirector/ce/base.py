"""The one interface every computing-element backend implements.

The director only ever talks to a :class:`ComputingElement`; backends are picked by the queue's
``type`` in the config through :data:`CE_TYPES`, an import-path registry, so a new backend is one
module plus one registry line and the director never imports optional dependencies (htcondor,
keystoneauth1) unless a queue uses them.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping, Optional, Protocol, Sequence, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from galaxy_dirac import states
from galaxy_dirac.configfile import describe

#: DIRAC pilot states a backend may report (the contract lives in galaxy_dirac.states; these are its short names).
SUBMITTED = states.PILOT_SUBMITTED
WAITING = states.PILOT_WAITING
SCHEDULED = states.PILOT_SCHEDULED
RUNNING = states.PILOT_RUNNING
DONE = states.PILOT_DONE
FAILED = states.PILOT_FAILED
ABORTED = states.PILOT_ABORTED
DELETED = states.PILOT_DELETED
UNKNOWN = states.PILOT_UNKNOWN

PILOT_STATES = states.PILOT_STATES
#: States in which a pilot has not started yet (counted as "waiting" by the policy).
WAITING_STATES = states.PILOT_WAITING_STATES
#: States from which a pilot never moves again.
FINAL_STATES = states.PILOT_FINAL_STATES


class CEError(Exception):
    """The CE could not be reached or refused the request; the director backs the queue off."""


class CEQueueFull(CEError):
    """The CE accepted the credentials but has no room (quota, slots); not a fault, just no pilots now."""


@dataclass
class PilotRef:
    """One pilot as the CE knows it.

    ``reference`` is the CE's own id (``htcondorce://host:9619/123.4``, a Nova server UUID, a PID) and
    ``stamp`` the pilot stamp the scheduler knows it by; the director keeps the pair so that the
    scheduler's PilotAgents rows and the CE's jobs can be joined.
    """

    reference: str
    stamp: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PilotStatus:
    """A pilot's state on the CE (one of :data:`PILOT_STATES`) and a reason for failures."""

    state: str
    reason: str = ""


class PilotBundle(Protocol):
    """What a backend gets to build pilot payloads (implemented by :class:`sitedirector.bundle.Bundle`)."""

    def wrapper(self, stamp: Optional[str] = None) -> str:
        """Bash script that runs one pilot with this stamp on a bare node with python3 (no stamp: ``$1``)."""

    def cloud_init(self, stamp: str) -> Union[str, bytes]:
        """cloud-init user data for a VM that runs one pilot and powers off when it ends.

        The real bundle returns gzip-compressed bytes (cloud-init detects gzip) to fit Nova's 64 KiB limit;
        a backend base64-encodes whatever it gets, as is.
        """

    def pilot_args(self, stamp: str) -> list[str]:
        """Command-line arguments for the stdlib pilot (``python3 pilot.pyz <args>``)."""

    def token_files(self, stamps: Sequence[str]) -> dict[str, str]:
        """stamp → that pilot's own token, which a backend submitting :meth:`wrapper` ``(None)`` delivers as the
        file ``sitedirector.bundle.token_file(stamp)`` beside it (an input file, never an argument or a job ad
        attribute); empty when the pilots share the token the wrapper embeds."""


class CEOptions(BaseModel):
    """A queue's ``options`` for one backend; each backend subclasses this as its ``Options``.

    ``extra="forbid"``: a misspelt option is a config error naming it, not a setting that silently does nothing.
    """

    model_config = ConfigDict(extra="forbid")

    #: Where the backend keeps per-pilot files; the director sets it to ``<work_dir>/<queue name>``.
    work_dir: str = ""


class ComputingElement(abc.ABC):
    """A place pilots run. One instance per configured queue; methods are called from that queue's thread.

    ``queue`` is the validated :class:`sitedirector.config.QueueConfig` (name, site, ce, endpoint,
    processors, memory, cpu_time, options, credentials ...), ``bundle`` builds the pilot payload
    (wrapper script / cloud-init user data) for a list of stamps.
    """

    #: The value of ``type`` in the config that selects this backend.
    type_name: str = ""
    #: The model of this backend's queue ``options`` (the config validates them with it).
    Options: ClassVar[type[CEOptions]] = CEOptions

    def __init__(self, queue: Any, bundle: Optional[PilotBundle] = None) -> None:
        self.queue = queue
        self.bundle = bundle

    @abc.abstractmethod
    def submit(self, stamps: Sequence[str]) -> list[PilotRef]:
        """Start ``len(stamps)`` pilots, one per stamp; return a reference per started pilot.

        May return fewer references than stamps (partial success). Raises :class:`CEQueueFull` when
        nothing could be started for lack of room, :class:`CEError` for any other failure.
        """

    @abc.abstractmethod
    def status(self, refs: Sequence[PilotRef]) -> dict[str, PilotStatus]:
        """Map ``ref.reference`` → :class:`PilotStatus` for the given pilots.

        Pilots the CE no longer knows are reported as ``Unknown`` (the policy turns long-Unknown into
        Aborted). Raises :class:`CEError` if the CE cannot be asked at all.
        """

    @abc.abstractmethod
    def kill(self, refs: Sequence[PilotRef]) -> None:
        """Stop these pilots (remove the job / delete the VM / terminate the process)."""

    @abc.abstractmethod
    def cleanup(self, refs: Optional[Sequence[PilotRef]] = None) -> list[PilotRef]:
        """Release CE resources of finished pilots and reap orphans; return the refs removed.

        ``refs`` are the pilots the director still tracks (None: the backend decides from its own
        listing, e.g. after a director restart).
        """

    @classmethod
    def read_options(cls, queue: Any) -> Any:
        """``queue.options`` as a validated :attr:`Options` (a mapping from the config, or already a model)."""
        options = getattr(queue, "options", None) or {}
        if isinstance(options, cls.Options):
            return options
        try:
            return cls.Options.model_validate(options)
        except ValidationError as exc:
            raise CEError(f"queue {getattr(queue, 'name', '?')}: {describe(exc, prefix=('options',))}") from None

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing to release
        """Release connections; called once at shutdown."""


#: config ``type`` → "module:Class". Add a line here for a new backend; nothing else changes.
CE_TYPES: dict[str, str] = {
    "local": "sitedirector.ce.local:LocalComputingElement",
    "htcondorce": "sitedirector.ce.htcondorce:HTCondorCEComputingElement",
    "openstack": "sitedirector.ce.openstack:OpenStackComputingElement",
    "arc": "sitedirector.ce.arc:ArcComputingElement",
}


def ce_class(type_name: str, registry: Optional[Mapping[str, str]] = None) -> type[ComputingElement]:
    """Import the backend for ``type_name`` lazily, so optional deps load only when a queue uses them."""
    reg = CE_TYPES if registry is None else registry
    try:
        path = reg[type_name]
    except KeyError:
        raise CEError(f"unknown CE type {type_name!r} (known: {', '.join(sorted(reg))})") from None
    module_name, _, cls_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CEError(f"CE type {type_name!r} needs {module_name}: {exc}") from exc
    cls = getattr(module, cls_name)
    if not (isinstance(cls, type) and issubclass(cls, ComputingElement)):
        raise CEError(f"{path} is not a ComputingElement")
    return cls


def make_ce(queue: Any, bundle: Any = None) -> ComputingElement:
    """Build the backend for a configured queue (``queue.type``)."""
    return ce_class(queue.type)(queue, bundle)


def known_types() -> Iterable[str]:
    """The config ``type`` values the registry knows."""
    return CE_TYPES.keys()
