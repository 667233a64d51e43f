"""OAuth2 pieces that need no network: provider settings, SASL messages, refresh timing."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.email_servers import ServerType
from shared.mail.sasl import OAUTHBEARER, XOAUTH2, choose_mechanism, initial_response
from shared.oauth.providers import PRESETS, ProviderConfigError, parse_providers
from shared.oauth.tokens import refresh_due


def test_presets_exist_without_configuration_but_cannot_start_a_consent() -> None:
    providers = parse_providers("")
    assert set(providers) == {"microsoft365", "google"}
    assert not providers["microsoft365"].configured
    assert "offline_access" in providers["microsoft365"].scope(ServerType.IMAP)
    assert "IMAP.AccessAsUser.All" in providers["microsoft365"].scope(ServerType.IMAP)
    assert "SMTP.Send" in providers["microsoft365"].scope(ServerType.SMTP)
    assert providers["google"].scope(ServerType.POP3) == "https://mail.google.com/ openid email"
    assert "openid email" in providers["microsoft365"].scope(ServerType.SMTP)


def test_a_preset_entry_needs_only_the_client_and_may_override_endpoints() -> None:
    raw = json.dumps(
        [
            {
                "name": "microsoft365",
                "client_id": "app-1",
                "client_secret": "s",
                "token_url": "https://login.microsoftonline.com/contoso/oauth2/v2.0/token",
            }
        ]
    )
    provider = parse_providers(raw)["microsoft365"]
    assert provider.configured and provider.client_id == "app-1"
    assert "contoso" in provider.token_url
    assert provider.authorize_url == PRESETS["microsoft365"].authorize_url


def test_a_generic_provider_from_a_file_with_scopes_per_server_type(tmp_path: Path) -> None:
    entry = {
        "name": "corp",
        "authorize_url": "https://id.corp.example/authorize",
        "token_url": "https://id.corp.example/token",
        "client_id": "mailroom",
        "client_secret_encrypted": "gAAAA...",
        "scopes": {"imap": ["mail.read"], "smtp": ["mail.send"]},
        "client_secret_expires_at": "2027-01-31",
    }
    path = tmp_path / "providers.json"
    path.write_text(json.dumps([entry]))
    provider = parse_providers(str(path))["corp"]
    assert provider.scope(ServerType.IMAP) == "mail.read"
    assert provider.scope(ServerType.SMTP) == "mail.send"
    assert provider.client_secret_expires_at == datetime(2027, 1, 31, tzinfo=UTC)
    assert "gAAAA" not in repr(provider)  # secrets stay out of logs


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ('{"name": "x"}', "JSON list"),
        ('[{"name": "corp", "token_url": "t"}]', "missing authorize_url"),
        ('[{"name": "corp", "scopes": {"nntp": []}}]', "'nntp'"),
        ('[{"name": "google", "client_secret_expires_at": "soon"}]', "ISO 8601"),
        ("[{}]", "'name'"),
    ],
)
def test_bad_provider_settings_are_refused_naming_the_field(raw: str, named: str) -> None:
    with pytest.raises(ProviderConfigError, match=named):
        parse_providers(raw)


def test_oauthbearer_is_used_where_offered_else_xoauth2() -> None:
    assert choose_mechanism(["PLAIN", "XOAUTH2", "OAUTHBEARER"]) == OAUTHBEARER
    assert choose_mechanism(["PLAIN", "XOAUTH2"]) == XOAUTH2  # Microsoft 365
    assert choose_mechanism([]) == XOAUTH2


def test_sasl_messages_carry_the_user_and_the_bearer_token() -> None:
    assert initial_response(XOAUTH2, "a@b.example", "tok") == (
        "user=a@b.example\x01auth=Bearer tok\x01\x01"
    )
    # RFC 7628: the authzid is a saslname, "," and "=" escaped.
    bearer = initial_response(OAUTHBEARER, "a,b=c@x.example", "tok")
    assert bearer == "n,a=a=2Cb=3Dc@x.example,\x01auth=Bearer tok\x01\x01"
    assert base64.b64decode(base64.b64encode(bearer.encode())) == bearer.encode()


def test_tokens_are_refreshed_before_expiry_but_not_before_half_their_life() -> None:
    granted = datetime(2026, 1, 1, tzinfo=UTC)
    assert refresh_due(granted, 3600, 300) == granted + timedelta(seconds=3300)
    assert refresh_due(granted, 10, 300) == granted + timedelta(seconds=5)


def test_the_oauth_callbacks_query_never_reaches_the_access_log() -> None:
    import logging

    from shared.logging_setup import PrivateQueryFilter

    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/api/v1/oauth/callback?code=abc&state=xyz", "1.1", 200),
        None,
    )
    assert PrivateQueryFilter().filter(record)
    assert (
        "code=abc" not in record.getMessage() and "/api/v1/oauth/callback?" in record.getMessage()
    )
    other = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, "%s %s %s", ("a", "GET", "/x?y=1"), None
    )
    PrivateQueryFilter().filter(other)
    assert "/x?y=1" in other.getMessage()


def test_the_default_callback_is_an_address_a_browser_can_open() -> None:
    from shared.settings import Settings

    assert Settings(api_host="0.0.0.0", api_port=8000).oauth_callback_url == (
        "http://127.0.0.1:8000/api/v1/oauth/callback"
    )
    configured = Settings(oauth_redirect_url="https://mail.example.com/api/v1/oauth/callback")
    assert configured.oauth_callback_url.startswith("https://mail.example.com/")


def test_who_signed_in_is_read_from_the_id_token_claims() -> None:
    from shared.oauth.provider_client import signed_in_as

    def id_token(claims: dict[str, str]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        return f"eyJhbGciOiJSUzI1NiJ9.{body}.c2ln"

    assert signed_in_as(id_token({"sub": "x", "email": "a@b.example"})) == "a@b.example"
    assert signed_in_as(id_token({"preferred_username": "m@contoso.example"})) == (
        "m@contoso.example"
    )
    assert signed_in_as(id_token({"sub": "opaque"})) is None
    assert signed_in_as("not a token") is None and signed_in_as(None) is None
    assert signed_in_as("a.%%%.c") is None
