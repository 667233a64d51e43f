"""Retries that are due, so a lost one is found: a request never waits forever.

A request waiting for a retry (``retry_wait``) is moved on only by its dramatiq message. If that
message is lost (an operator purged the queue; dramatiq acked a message whose re-enqueue
failed), nothing would ever finish the request, and no final result would be published. Each
retry scheduled writes here when it is due; the sender's sweeper takes over the requests whose
retry is long overdue with a new message (:meth:`services.sender.delivery.Sender.
sweep_overdue_retries`), and removes what is no longer waiting.

A table of its own, not an index on ``send_requests``: a first attempt, nearly every mail,
never touches it, and its row's two updates stay HOT (migration 0007).

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE send_retries (
            tenant_id   text NOT NULL,
            request_id  text NOT NULL,
            due_at      timestamptz NOT NULL,
            PRIMARY KEY (tenant_id, request_id)
        );
        CREATE INDEX send_retries_due ON send_retries (due_at);
        -- Requests already waiting when this version arrives: due now, checked at once.
        INSERT INTO send_retries (tenant_id, request_id, due_at)
            SELECT tenant_id, request_id, now() FROM send_requests WHERE state = 'retry_wait';
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE send_retries")
