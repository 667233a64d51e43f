"""A fetch batch remembers the IMAP folder its UIDs belong to.

Recovery after a crash must not flag, or move the checkpoint of, another folder that happens
to have the same UIDVALIDITY (the admin changed the inbox folder meanwhile).

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE fetch_batches ADD COLUMN folder text")


def downgrade() -> None:
    op.execute("ALTER TABLE fetch_batches DROP COLUMN folder")
