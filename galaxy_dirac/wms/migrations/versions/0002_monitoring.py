"""Monitoring (commit 7d3c247): the SiteDirector's last decision per queue and the accounting queries' indexes.

Before migrations, ``monitoring.ensure_schema`` made these on the fly, so an unversioned database may have any of
them: each is created only when missing.

Revision ID: 0002_monitoring
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_monitoring"
down_revision = "0001_dirac_tables"
branch_labels = None
depends_on = None

INDEXES = (
    ("gd_Jobs_EndExecTime", "Jobs", ["EndExecTime"]),
    ("gd_Jobs_StartExecTime", "Jobs", ["StartExecTime"]),
    ("gd_PilotAgents_SubmissionTime", "PilotAgents", ["SubmissionTime"]),
    ("gd_HeartBeat_JobID_Name", "HeartBeatLoggingInfo", ["JobID", "Name"]),
)


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("gd_SiteDirectorDecisions"):
        op.create_table(
            "gd_SiteDirectorDecisions",
            sa.Column("Queue", sa.String(128), primary_key=True, nullable=False),
            sa.Column("Director", sa.String(128), nullable=True),
            sa.Column("DecisionTime", sa.DateTime(), nullable=True),
            sa.Column("Decision", sa.Text(), nullable=True),
        )
    for name, table, columns in INDEXES:
        if name not in {i["name"] for i in inspector.get_indexes(table)}:
            op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _ in INDEXES:
        op.drop_index(name, table_name=table)
    op.drop_table("gd_SiteDirectorDecisions")
