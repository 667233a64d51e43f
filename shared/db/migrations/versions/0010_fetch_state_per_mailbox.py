"""Fetch state belongs to a mailbox (host, user, folder), not only to a server's row.

An admin who points a server at another host, user or folder gets a fresh checkpoint and
fresh UIDLs for it: the old mailbox's UIDs and UIDLs name other mails there (see
``shared/db/fetch_state.py``). Rows written before are the state of the mailbox the server
names now; the identity is the same digest ``fetch_state.mailbox_identity`` computes.

Revision ID: 0010
Revises: 0009
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        r"""
        -- The SQL form of fetch_state.mailbox_identity, for this migration only.
        CREATE FUNCTION pg_temp.mailbox_identity(host text, username text, folder text)
          RETURNS text LANGUAGE sql IMMUTABLE
          AS $$ SELECT encode(sha256(convert_to(host || E'\n' || username || E'\n' || folder,
                                                'UTF8')), 'hex') $$;

        ALTER TABLE imap_checkpoints ADD COLUMN mailbox_identity text;
        UPDATE imap_checkpoints c
          SET mailbox_identity = pg_temp.mailbox_identity(s.host, s.username, c.folder)
          FROM email_servers s WHERE s.id = c.server_id;
        ALTER TABLE imap_checkpoints ALTER COLUMN mailbox_identity SET NOT NULL,
          DROP CONSTRAINT imap_checkpoints_pkey, ADD PRIMARY KEY (server_id, mailbox_identity);

        ALTER TABLE pop3_delivered ADD COLUMN mailbox_identity text;
        UPDATE pop3_delivered d
          SET mailbox_identity = pg_temp.mailbox_identity(s.host, s.username, '')
          FROM email_servers s WHERE s.id = d.server_id;
        ALTER TABLE pop3_delivered ALTER COLUMN mailbox_identity SET NOT NULL,
          DROP CONSTRAINT pop3_delivered_pkey,
          ADD PRIMARY KEY (server_id, mailbox_identity, uidl);

        ALTER TABLE fetch_batches ADD COLUMN mailbox_identity text;
        UPDATE fetch_batches b
          SET mailbox_identity = pg_temp.mailbox_identity(s.host, s.username,
            CASE WHEN s.type = 'imap' THEN coalesce(b.folder, s.inbox_folder, 'INBOX') ELSE '' END)
          FROM email_servers s WHERE s.id = b.server_id;
        ALTER TABLE fetch_batches ALTER COLUMN mailbox_identity SET NOT NULL;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DELETE FROM imap_checkpoints c WHERE EXISTS (
          SELECT 1 FROM imap_checkpoints n WHERE n.server_id = c.server_id
            AND (n.updated_at, n.mailbox_identity) > (c.updated_at, c.mailbox_identity));
        ALTER TABLE imap_checkpoints DROP CONSTRAINT imap_checkpoints_pkey,
          DROP COLUMN mailbox_identity, ADD PRIMARY KEY (server_id);

        DELETE FROM pop3_delivered d WHERE EXISTS (
          SELECT 1 FROM pop3_delivered n WHERE (n.server_id, n.uidl) = (d.server_id, d.uidl)
            AND n.mailbox_identity > d.mailbox_identity);
        ALTER TABLE pop3_delivered DROP CONSTRAINT pop3_delivered_pkey,
          DROP COLUMN mailbox_identity, ADD PRIMARY KEY (server_id, uidl);

        ALTER TABLE fetch_batches DROP COLUMN mailbox_identity;
        """
    )
