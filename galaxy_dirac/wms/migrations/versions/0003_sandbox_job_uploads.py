"""Which job's token uploaded a sandbox (commit 5e6d740, ``sb_JobUploads``): job tokens read and attach only
their own job's sandboxes. Created only when missing: before migrations ``create_schema`` made it on start.

Nothing is backfilled: sandboxes already mapped to a job stay readable through ``sb_EntityMapping``, and a job that
uploaded but had not yet attached its output re-registers it on its next upload (registration is idempotent).

Revision ID: 0003_sandbox_job_uploads
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_sandbox_job_uploads"
down_revision = "0002_monitoring"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("sb_JobUploads"):
        return
    op.create_table(
        "sb_JobUploads",
        sa.Column(
            "SBId",
            sa.Integer(),
            sa.ForeignKey("sb_SandBoxes.SBId", ondelete="CASCADE"),
            primary_key=True,
            nullable=False,
        ),
        sa.Column("JobID", sa.Integer(), primary_key=True, autoincrement=False, nullable=False),
    )
    op.create_index("sb_JobUploads_JobID", "sb_JobUploads", ["JobID"])


def downgrade() -> None:
    op.drop_table("sb_JobUploads")
