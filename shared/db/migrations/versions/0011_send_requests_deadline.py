"""Requests still ``sending`` after their deadline are found by the sender's sweep.

A first attempt records its request before it talks to the server; if its command is then lost
(published without persistence, and the broker restarted), nothing brings it back, and the
request would stay ``sending`` with no final result. The sweep closes such a request once its
deadline has passed. ``deadline_at`` is written once, at insert: indexing it keeps the row's
later updates HOT (migration 0007).

Revision ID: 0011
Revises: 0010
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX send_requests_deadline ON send_requests (deadline_at)")


def downgrade() -> None:
    op.execute("DROP INDEX send_requests_deadline")
