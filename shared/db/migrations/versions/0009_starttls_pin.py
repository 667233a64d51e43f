"""Where a server's STARTTLS was seen: credentials never go there without TLS again.

A server saved without the TLS box may still upgrade with STARTTLS (REQUIREMENTS). Once a
connection test saw it do so at ``host:port``, a later connection to that place that is not
offered STARTTLS (a man in the middle stripping it, a misconfigured server) fails with that
reason instead of logging in in plain text. Another host or port is another place: the pin
does not follow it.

Revision ID: 0009
Revises: 0008
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE email_servers ADD COLUMN starttls_seen_at text")


def downgrade() -> None:
    op.execute("ALTER TABLE email_servers DROP COLUMN starttls_seen_at")
