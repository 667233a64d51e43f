"""OAuth2 mail accounts: their tokens, and the consents an admin has started.

``oauth_tokens``: one row per OAuth2 server, the access and refresh token encrypted (Fernet,
like passwords). ``version`` grows with every refresh, so that a refresher that lost a race
does not overwrite a newer rotated refresh token. ``reauth_reason`` set means the provider
refused the refresh token: nobody uses the server until the admin gives consent again.

``oauth_consents``: a consent the admin started and has not finished; the ``state`` sent to
the provider is its key, single use, bound to the admin, the tenant and the server. The PKCE
verifier is kept encrypted.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE oauth_tokens (
            server_id                uuid PRIMARY KEY
                                     REFERENCES email_servers (id) ON DELETE CASCADE,
            provider                 text NOT NULL,
            access_token_encrypted   bytea NOT NULL,
            refresh_token_encrypted  bytea,
            expires_at               timestamptz NOT NULL,
            refresh_due_at           timestamptz NOT NULL,
            consented_at             timestamptz NOT NULL,
            refresh_token_issued_at  timestamptz NOT NULL,
            refreshed_at             timestamptz,
            reauth_reason            text,
            version                  bigint NOT NULL DEFAULT 1
        );
        CREATE TABLE oauth_consents (
            state                    text PRIMARY KEY,
            tenant_id                text NOT NULL,
            server_id                uuid NOT NULL REFERENCES email_servers (id) ON DELETE CASCADE,
            admin                    text NOT NULL,
            provider                 text NOT NULL,
            code_verifier_encrypted  bytea NOT NULL,
            created_at               timestamptz NOT NULL DEFAULT now(),
            expires_at               timestamptz NOT NULL
        );
        CREATE INDEX oauth_consents_expiry ON oauth_consents (expires_at);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE oauth_consents; DROP TABLE oauth_tokens")
