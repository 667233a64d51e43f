"""Sender: one row per send request, the idempotency record of its delivery.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- One row per (tenant, request_id): the command, where its delivery stands, and which
        -- internal (dramatiq) message owns it. States: received -> sending -> sent | failed,
        -- with retry_wait between attempts. data_started_at is written (and committed) just
        -- before the SMTP DATA command: after a crash, a 'sending' row without it was never
        -- handed over (safe to try again); with it, the outcome is unknown and the mail is
        -- never sent again (at most once, CONTRACT).
        CREATE TABLE send_requests (
            tenant_id         text NOT NULL,
            request_id        text NOT NULL,
            state             text NOT NULL
                CHECK (state IN ('received', 'sending', 'retry_wait', 'sent', 'failed')),
            command           jsonb NOT NULL,
            owner_message_id  text NOT NULL,
            attempts          integer NOT NULL DEFAULT 0,
            server_id         text,
            message_id        text,
            smtp_code         integer,
            smtp_response     text,
            reason            text,
            uncertain         boolean NOT NULL DEFAULT false,
            data_started_at   timestamptz,
            received_at       timestamptz NOT NULL DEFAULT now(),
            deadline_at       timestamptz NOT NULL,
            updated_at        timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, request_id)
        );
        CREATE INDEX send_requests_open ON send_requests (state)
            WHERE state NOT IN ('sent', 'failed');
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE send_requests")
