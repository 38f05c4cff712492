"""Request bodies: DiracX 0.7's job API models, and ours for the ``/api/x-embedded/`` routes.

Bounds sit on the fields (64-bit integers, column lengths, stamp syntax), so a value the database could not hold is
a 422 before any logic runs.
"""

from __future__ import annotations

from typing import Annotated, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..matcher import Slot

# --- DiracX 0.7 ----------------------------------------------------------------------------------
#: Integers the database can bind (64-bit); larger ones are refused with 422 instead of overflowing in the driver.
BigInt = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
#: A job id as it may appear in a path, a query or a body key.
JobId = Annotated[int, Field(ge=0, le=2**63 - 1)]
#: Search values are scalars, as in DiracX (lists and objects cannot be bound as query parameters).
SearchValue = Union[BigInt, float, str, bool, None]


class ScalarSearchSpec(BaseModel):
    """DiracX's scalar filter: a value-taking operator with ``value`` (``values`` here is a 422, as there)."""

    model_config = ConfigDict(extra="forbid")
    parameter: str
    operator: Literal["eq", "neq", "gt", "lt", "like", "not like", "regex"]
    value: SearchValue


class VectorSearchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parameter: str
    operator: Literal["in", "not in"]
    values: List[SearchValue]


SearchSpec = Union[ScalarSearchSpec, VectorSearchSpec]


class SortSpec(BaseModel):
    parameter: str
    direction: Literal["asc", "desc"] = "asc"


class JobSearchParams(BaseModel):
    parameters: Optional[list[str]] = None
    search: list[SearchSpec] = []
    sort: list[SortSpec] = []
    distinct: bool = False


class JobSummaryParams(BaseModel):
    grouping: list[str]
    search: list[SearchSpec] = []


class JobStatusUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    Status: Optional[str] = None
    MinorStatus: Optional[str] = None
    ApplicationStatus: Optional[str] = None
    Source: str = "Unknown"


class HeartbeatData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    LoadAverage: Optional[float] = None
    MemoryUsed: Optional[float] = None
    Vsize: Optional[float] = None
    AvailableDiskSpace: Optional[float] = None
    CPUConsumed: Optional[float] = None
    WallClockTime: Optional[float] = None
    StandardOutput: Optional[str] = None

    @field_validator("StandardOutput")
    @classmethod
    def _printable(cls, value: Optional[str]) -> Optional[str]:
        # A payload may print NUL bytes; PostgreSQL text cannot hold them, and the heartbeat must not fail for it.
        return value.replace("\x00", "\ufffd") if value else value


class SandboxInfo(BaseModel):
    checksum_algorithm: Literal["sha256"]
    checksum: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    size: int = Field(ge=1)
    format: Literal["tar.bz2", "tar.gz", "tar.xz", "tar", "zip"]


class RescheduleBody(BaseModel):
    job_ids: List[JobId] = Field(min_length=1)


class PilotsAdd(BaseModel):
    stamps: list[str]
    queue: str = ""
    site: str = ""
    ce: str = ""
    grid_type: str = ""
    references: dict[str, str] = {}


#: What a pilot stamp may be: the pilot wrapper takes it as a shell argument and it is a PilotAgents key.
PilotStamp = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")]


class PilotTokensRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stamps: list[PilotStamp] = Field(min_length=1, max_length=10000)
    site: str = Field("", max_length=100)
    #: Seconds; at most the scheduler's ``pilot_token_lifetime``.
    lifetime: Optional[float] = Field(None, gt=0)


class PilotRegistration(BaseModel):
    stamp: str
    site: str = ""
    ce: str = ""
    queue: str = ""
    platform: str = ""
    tags: list[str] = []
    processors: int = Field(1, ge=1, le=4096)  # as a slot may offer (SlotDescription)
    memory_mb: int = Field(0, ge=0, le=2**63 - 1)
    hostname: str = ""
    grid_type: str = ""


class PilotStatusUpdate(BaseModel):
    status: str
    matched_jobs: Optional[int] = None
    reason: str = ""


class SlotDescription(BaseModel):
    Site: str = Field(max_length=100)  # becomes the job's Site column
    GridCE: str = ""
    Queue: str = ""
    Platform: Union[List[str], str] = []
    Tags: list[str] = []
    NumberOfProcessors: int = Field(1, ge=1, le=4096)
    MaxRAM: int = Field(0, ge=0, le=2**63 - 1)
    CPUTime: int = Field(0, ge=0, le=2**63 - 1)
    PilotStamp: str = ""
    OwnerGroup: list[str] = []

    def to_slot(self, pilot_stamp: str) -> Slot:
        """The matcher's view of this slot, recorded under ``pilot_stamp`` (the policy's answer, not the body's)."""
        platforms = [self.Platform] if isinstance(self.Platform, str) else self.Platform
        return Slot(
            site=self.Site,
            grid_ce=self.GridCE,
            queue=self.Queue,
            platforms=[p for p in platforms if p],
            tags=self.Tags,
            processors=self.NumberOfProcessors,
            max_ram=self.MaxRAM,
            cpu_time=self.CPUTime,
            pilot_stamp=pilot_stamp,
            owner_groups=self.OwnerGroup,
        )
