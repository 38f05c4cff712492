"""Leases (``gd_Leases``): the maintenance loop's leader is elected through the database, so several scheduler
hosts on one database run it once between them (it was a lock file in the sandbox directory: one per host).

Revision ID: 0004_leases
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_leases"
down_revision = "0003_sandbox_job_uploads"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gd_Leases",
        sa.Column("Name", sa.String(64), primary_key=True, nullable=False),
        sa.Column("Holder", sa.String(255), nullable=False),
        sa.Column("Renewals", sa.Integer(), nullable=False),
        sa.Column("AcquiredTime", sa.DateTime(), nullable=True),
        sa.Column("RenewedTime", sa.DateTime(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("gd_Leases")
