"""Mail servers, routing plans, the audit log and the event outbox.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE routing_plans (
            id          text PRIMARY KEY,
            tenant_id   text NOT NULL,
            name        text NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX routing_plans_tenant ON routing_plans (tenant_id);

        CREATE TABLE email_servers (
            id                      uuid PRIMARY KEY,
            tenant_id               text NOT NULL,
            type                    text NOT NULL CHECK (type IN ('pop3', 'imap', 'smtp')),
            name                    text NOT NULL,
            description             text,
            host                    text NOT NULL,
            port                    integer CHECK (port BETWEEN 1 AND 65535),
            tls                     boolean NOT NULL,
            auth_type               text NOT NULL CHECK (auth_type IN ('basic', 'oauth2')),
            username                text NOT NULL DEFAULT '',
            password_encrypted      bytea,
            reauthenticate_on_save  boolean NOT NULL DEFAULT false,
            inbox_folder            text,
            sni_hostname            text,
            disable_compression     boolean,
            routing_plan_id         text REFERENCES routing_plans (id),
            sender_addresses        text[] NOT NULL DEFAULT '{}',
            enabled                 boolean NOT NULL,
            role                    text CHECK (role IN ('agent', 'template')),
            is_template_server      boolean NOT NULL DEFAULT false,
            oauth_provider          text,
            last_connection         jsonb,
            version                 integer NOT NULL DEFAULT 1,
            created_at              timestamptz NOT NULL DEFAULT now(),
            updated_at              timestamptz NOT NULL DEFAULT now(),
            CHECK (NOT is_template_server OR type = 'smtp')
        );
        CREATE INDEX email_servers_tenant ON email_servers (tenant_id);
        -- At most one template server per tenant, enforced by the database itself.
        CREATE UNIQUE INDEX email_servers_one_template_per_tenant
            ON email_servers (tenant_id) WHERE is_template_server;

        CREATE TABLE audit_log (
            id           bigserial PRIMARY KEY,
            at           timestamptz NOT NULL DEFAULT now(),
            tenant_id    text NOT NULL,
            actor        text NOT NULL,
            action       text NOT NULL,
            object_type  text NOT NULL,
            object_id    text NOT NULL,
            fields       text[] NOT NULL DEFAULT '{}'
        );
        CREATE INDEX audit_log_tenant_at ON audit_log (tenant_id, at);

        CREATE TABLE outbox (
            id            bigserial PRIMARY KEY,
            routing_key   text NOT NULL,
            body          jsonb NOT NULL,
            created_at    timestamptz NOT NULL DEFAULT now(),
            published_at  timestamptz
        );
        CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE outbox, audit_log, email_servers, routing_plans")
