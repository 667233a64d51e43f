"""A started OAuth2 consent remembers the mailbox it was started for.

The callback stores tokens only when the server still names that mailbox: a consent link
started before the admin changed the user must not put the old mailbox's tokens on it.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE oauth_consents ADD COLUMN username text NOT NULL DEFAULT ''")


def downgrade() -> None:
    op.execute("ALTER TABLE oauth_consents DROP COLUMN username")
