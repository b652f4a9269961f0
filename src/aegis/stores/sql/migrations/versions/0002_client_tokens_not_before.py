"""Per-client revocation mark: disabling one client ends its own earlier tokens only.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing clients get 0: nothing of theirs was refused by a client mark before (a disabled
    # client's tokens were ended through its agent's tokens_not_before, which stays as it is).
    with op.batch_alter_table("clients") as batch:
        batch.add_column(
            sa.Column("tokens_not_before", sa.Float, nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("clients") as batch:
        batch.drop_column("tokens_not_before")
