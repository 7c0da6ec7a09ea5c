"""Outbox payloads unbounded; an index for the escalation timer.

- ``outbox_event.payload`` was VARCHAR(8000) and ``outbox.enqueue`` cut longer JSON at
  8,000 characters, which made a long coverage report invalid JSON. Now unbounded.
- ``escalation_step (status, due_at)``: the open-and-due steps are queried once per
  reconcile pass.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox_event") as batch:
        batch.alter_column(
            "payload",
            existing_type=sa.String(length=8000),
            type_=sa.String(),
            existing_nullable=False,
        )
    op.create_index("ix_escalation_step_status_due", "escalation_step", ["status", "due_at"])


def downgrade() -> None:
    op.drop_index("ix_escalation_step_status_due", table_name="escalation_step")
    with op.batch_alter_table("outbox_event") as batch:
        batch.alter_column(
            "payload",
            existing_type=sa.String(),
            type_=sa.String(length=8000),
            existing_nullable=False,
        )
