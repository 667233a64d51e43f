"""Fetcher state: IMAP checkpoints, in-flight publish batches, POP3 UIDLs, fetched Message-IDs.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- Per IMAP mailbox: the folder generation and the highest UID already handed over.
        CREATE TABLE imap_checkpoints (
            server_id    uuid PRIMARY KEY REFERENCES email_servers (id) ON DELETE CASCADE,
            folder       text NOT NULL,
            uidvalidity  bigint NOT NULL,
            last_uid     bigint NOT NULL DEFAULT 0,
            updated_at   timestamptz NOT NULL DEFAULT now()
        );

        -- A batch of mails being published: written before the publish, marked committed when
        -- the broker committed it, removed once the mails are flagged or deleted on the server.
        -- After a crash, its state (and the broker's commit marker) tells whether to publish
        -- again or only to flag: nothing lost, nothing twice.
        CREATE TABLE fetch_batches (
            id           uuid PRIMARY KEY,
            server_id    uuid NOT NULL REFERENCES email_servers (id) ON DELETE CASCADE,
            uidvalidity  bigint,
            items        jsonb NOT NULL,  -- [{"uid"|"uidl", "message_id", "quarantined"}]
            state        text NOT NULL CHECK (state IN ('pending', 'committed')),
            created_at   timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX fetch_batches_server ON fetch_batches (server_id);

        -- POP3 has no flags: the UIDLs already handed over, so that a session that dropped
        -- before QUIT (and so before its DELEs took effect) does not publish them again.
        CREATE TABLE pop3_delivered (
            server_id     uuid NOT NULL REFERENCES email_servers (id) ON DELETE CASCADE,
            uidl          text NOT NULL,
            kept          boolean NOT NULL DEFAULT false,  -- quarantined: left on the server
            delivered_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (server_id, uidl)
        );

        -- Message-ID of each fetched mail -> the address it was sent to (the mailbox user), so
        -- that a reply without a From address leaves from that address (REQUIREMENTS).
        CREATE TABLE inbound_messages (
            tenant_id        text NOT NULL,
            message_id       text NOT NULL,
            server_id        uuid NOT NULL,
            mailbox          text NOT NULL,
            routing_plan_id  text NOT NULL,
            fetched_at       timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, message_id)
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE inbound_messages, pop3_delivered, fetch_batches, imap_checkpoints")
