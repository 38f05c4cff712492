"""Queue events (``gd_QueueEvents``): a row per transaction that queues jobs, so waiting pilots on every host wake
from one probe per API worker instead of each re-reading the task queues on a timer.

Revision ID: 0005_queue_events
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_queue_events"
down_revision = "0004_leases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gd_QueueEvents",
        sa.Column("ID", sa.Integer(), primary_key=True, autoincrement=True, nullable=False),
        sa.Column("At", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("gd_QueueEvents")
