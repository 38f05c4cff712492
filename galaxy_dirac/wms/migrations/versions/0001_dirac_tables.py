"""Baseline: DIRAC's JobDB, JobLoggingDB, TaskQueueDB, SandboxMetadataDB and PilotAgentsDB tables as the first
release made them (commit a186b08). Written out here, not taken from the models, so it stays what it was.

Revision ID: 0001_dirac_tables
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_dirac_tables"
down_revision = None
branch_labels = None
depends_on = None

LONGTEXT = sa.Text().with_variant(sa.Text(length=2**32 - 1), "mysql", "mariadb")
TQ_VALUE_TABLES = (
    "tq_TQToSites",
    "tq_TQToGridCEs",
    "tq_TQToBannedSites",
    "tq_TQToPlatforms",
    "tq_TQToJobTypes",
    "tq_TQToTags",
)


def _str(name: str, length: int, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.String(length), nullable=nullable)


def _time(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(), nullable=nullable)


def _int(name: str) -> sa.Column:
    return sa.Column(name, sa.Integer(), nullable=False)


def _job_fk(name: str = "JobID", primary_key: bool = False) -> sa.Column:
    return sa.Column(
        name, sa.Integer(), sa.ForeignKey("Jobs.JobID", ondelete="CASCADE"), primary_key=primary_key, nullable=False
    )


def upgrade() -> None:
    # --- JobDB
    op.create_table(
        "Jobs",
        sa.Column("JobID", sa.Integer(), primary_key=True, autoincrement=True),
        _str("JobType", 32),
        _str("JobGroup", 128),
        _str("Site", 100),
        _str("JobName", 128),
        _str("Owner", 64),
        _str("OwnerGroup", 128),
        _str("VO", 32),
        _time("SubmissionTime"),
        _time("RescheduleTime"),
        _time("LastUpdateTime"),
        _time("StartExecTime"),
        _time("HeartBeatTime"),
        _time("EndExecTime"),
        _str("Status", 32),
        _str("MinorStatus", 128),
        _str("ApplicationStatus", 255),
        _int("UserPriority"),
        _int("RescheduleCounter"),
        sa.Column("VerifiedFlag", sa.Boolean(), nullable=False),
        sa.Column("AccountedFlag", sa.Boolean(), nullable=False),
    )
    for name, columns in (
        ("JobType", ["JobType"]),
        ("JobGroup", ["JobGroup"]),
        ("Site", ["Site"]),
        ("Owner", ["Owner"]),
        ("OwnerGroup", ["OwnerGroup"]),
        ("Status", ["Status"]),
        ("StatusSite", ["Status", "Site"]),
        ("LastUpdateTime", ["LastUpdateTime"]),
    ):
        op.create_index(name, "Jobs", columns)
    op.create_table(
        "JobJDLs",
        _job_fk(primary_key=True),
        sa.Column("JDL", LONGTEXT, nullable=False),
        sa.Column("JobRequirements", sa.Text(), nullable=False),
        sa.Column("OriginalJDL", LONGTEXT, nullable=False),
    )
    op.create_table(
        "JobParameters",
        _job_fk(primary_key=True),
        sa.Column("Name", sa.String(100), primary_key=True, nullable=False),
        sa.Column("Value", sa.Text(), nullable=False),
    )
    op.create_table(
        "HeartBeatLoggingInfo",
        sa.Column("ID", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        _job_fk(),
        _str("Name", 100),
        sa.Column("Value", sa.Text(), nullable=False),
        _time("HeartBeatTime", nullable=False),
    )
    op.create_index("HeartBeatLoggingInfo_JobID", "HeartBeatLoggingInfo", ["JobID"])
    op.create_table(
        "JobCommands",
        sa.Column("ID", sa.Integer(), primary_key=True, autoincrement=True),
        _job_fk(),
        _str("Command", 100),
        _str("Arguments", 100),
        _str("Status", 64),
        _time("ReceptionTime", nullable=False),
        _time("ExecutionTime"),
    )
    op.create_index("JobCommands_JobID_Status", "JobCommands", ["JobID", "Status"])

    # --- JobLoggingDB
    op.create_table(
        "LoggingInfo",
        _job_fk(primary_key=True),
        sa.Column("SeqNum", sa.Integer(), primary_key=True, autoincrement=False, nullable=False),
        _str("Status", 32),
        _str("MinorStatus", 128),
        _str("ApplicationStatus", 255),
        _time("StatusTime", nullable=False),
        sa.Column("StatusTimeOrder", sa.Float(), nullable=False),
        _str("StatusSource", 160),
    )
    op.create_index("LoggingInfo_StatusTime", "LoggingInfo", ["StatusTime"])

    # --- TaskQueueDB
    op.create_table(
        "tq_TaskQueues",
        sa.Column("TQId", sa.Integer(), primary_key=True, autoincrement=True),
        _str("Owner", 64),
        _str("OwnerGroup", 128),
        _str("VO", 32),
        sa.Column("CPUTime", sa.BigInteger(), nullable=False),
        sa.Column("Priority", sa.Float(), nullable=False),
        sa.Column("Enabled", sa.Boolean(), nullable=False),
        _int("MinRAM"),
        _int("MaxRAM"),
        sa.Column("KeyHash", sa.String(64), nullable=False, unique=True),
    )
    op.create_index("tq_CPUTime", "tq_TaskQueues", ["CPUTime"])
    tq_fk = sa.ForeignKey("tq_TaskQueues.TQId", ondelete="CASCADE")
    op.create_table(
        "tq_Jobs",
        sa.Column("TQId", sa.Integer(), tq_fk, primary_key=True, nullable=False),
        sa.Column("JobId", sa.Integer(), primary_key=True, autoincrement=False, nullable=False),
        _int("Priority"),
        sa.Column("RealPriority", sa.Float(), nullable=False),
    )
    op.create_index("tq_Jobs_pick", "tq_Jobs", ["TQId", "Priority", "JobId"])
    op.create_index("tq_Jobs_JobId", "tq_Jobs", ["JobId"])
    for name in TQ_VALUE_TABLES:
        op.create_table(
            name,
            sa.Column(
                "TQId",
                sa.Integer(),
                sa.ForeignKey("tq_TaskQueues.TQId", ondelete="CASCADE"),
                primary_key=True,
                nullable=False,
            ),
            sa.Column("Value", sa.String(128), primary_key=True, nullable=False),
        )
        op.create_index(f"{name}_Value", name, ["Value"])

    # --- SandboxMetadataDB
    op.create_table(
        "sb_Owners",
        sa.Column("OwnerID", sa.Integer(), primary_key=True, autoincrement=True),
        _str("Owner", 64),
        _str("OwnerGroup", 128),
        _str("VO", 64),
    )
    op.create_index("sb_Owners_unique", "sb_Owners", ["Owner", "OwnerGroup", "VO"], unique=True)
    op.create_table(
        "sb_SandBoxes",
        sa.Column("SBId", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("OwnerId", sa.Integer(), sa.ForeignKey("sb_Owners.OwnerID"), nullable=False),
        _str("SEName", 64),
        _str("SEPFN", 512),
        sa.Column("Bytes", sa.BigInteger(), nullable=False),
        _time("RegistrationTime", nullable=False),
        _time("LastAccessTime", nullable=False),
        sa.Column("Assigned", sa.Boolean(), nullable=False),
    )
    op.create_index("sb_SandBoxes_Location", "sb_SandBoxes", ["SEName", "SEPFN"], unique=True)
    op.create_table(
        "sb_EntityMapping",
        sa.Column(
            "SBId",
            sa.Integer(),
            sa.ForeignKey("sb_SandBoxes.SBId", ondelete="CASCADE"),
            primary_key=True,
            nullable=False,
        ),
        sa.Column("EntityId", sa.String(128), primary_key=True, nullable=False),
        sa.Column("Type", sa.String(64), primary_key=True, nullable=False),
    )
    op.create_index("sb_EntityMapping_EntityId", "sb_EntityMapping", ["EntityId"])

    # --- PilotAgentsDB
    op.create_table(
        "PilotAgents",
        sa.Column("PilotID", sa.Integer(), primary_key=True, autoincrement=True),
        _int("InitialJobID"),
        _int("CurrentJobID"),
        _str("PilotJobReference", 255),
        sa.Column("PilotStamp", sa.String(32), nullable=False, unique=True),
        _str("DestinationSite", 128),
        _str("Queue", 128),
        _str("GridSite", 128),
        _str("VO", 128),
        _str("GridType", 32),
        sa.Column("BenchMark", sa.Float(), nullable=False),
        _time("SubmissionTime"),
        _time("LastUpdateTime"),
        _str("Status", 32),
        _str("StatusReason", 255),
        sa.Column("AccountingSent", sa.Boolean(), nullable=False),
        _int("MatchedJobs"),
    )
    op.create_index("PilotAgents_Status", "PilotAgents", ["Status"])
    op.create_index("PilotAgents_Queue", "PilotAgents", ["Queue", "Status"])
    op.create_table(
        "JobToPilotMapping",
        sa.Column("PilotID", sa.Integer(), primary_key=True, autoincrement=False, nullable=False),
        sa.Column("JobID", sa.Integer(), primary_key=True, autoincrement=False, nullable=False),
        _time("StartTime", nullable=False),
    )
    op.create_index("JobToPilotMapping_JobID", "JobToPilotMapping", ["JobID"])


def downgrade() -> None:
    raise NotImplementedError("the baseline is not undone: drop the database instead")
