"""OAuth2 mail accounts end to end, against real processes: the lab's OAuth2 authorization
server (oauth2-mock-server, RS256 tokens that expire), Dovecot validating those tokens for
IMAP and POP3 logins, and the SMTP lab validating them for AUTH.

An admin saves an OAuth2 server, follows the authorization URL through the provider's
consent, and the callback stores the tokens and tests the connection; the fetcher and the
sender log in with XOAUTH2/OAUTHBEARER, refresh before expiry (the lab rotates refresh
tokens, so a refresh token that was not stored would fail the next refresh), stop at a
revoked consent with ``reauth_required`` and the provider's reason, and start again after a
re-authentication on save. No token ever appears in an answer, a log or a broker message
(the session's leak check, fed with every token these tests saw).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from shared.db import oauth as oauth_repo
from shared.db.pool import DictConnection
from shared.settings import Settings
from tests.lab.certs import LabCertificates
from tests.lab.dovecot import DovecotLab, LabUser
from tests.lab.oauth_server import OAuthLab
from tests.lab.smtp_server import SmtpLab
from tests.support.api import ApiClient
from tests.support.fetching import (
    fetcher_settings,
    reports_for,
    running_fetcher,
    take,
    wait_for_queue,
)
from tests.support.oauth import PROVIDER, give_consent, imap_server, oauth_env, stored_tokens
from tests.support.recording_server import RecordingServer
from tests.support.sender import (
    command,
    publish,
    results_for,
    results_tap,
    sender_env,
    start_sender,
    wait_known,
)
from tests.support.waiting import eventually

LIFETIME = 4  # seconds an access token of the lab lives in these tests


@pytest.fixture
def short_tokens(oauth_lab: OAuthLab) -> Iterator[None]:
    oauth_lab.set_token_lifetime(LIFETIME)
    yield
    oauth_lab.reset()


def reauth_report(amqp_url: str, server_id: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for report in reports_for(amqp_url, server_id, timeout=2, ok=False):
            if report["category"] == "reauth_required":
                return report
    raise AssertionError(f"no reauth_required report for {server_id} in {timeout} s")


def mail(subject: str) -> bytes:
    return (
        f"From: customer@example.com\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@example.com>\r\n\r\nHello\r\n"
    ).encode()


def test_saving_an_oauth2_server_answers_with_the_providers_authorization_url(
    oauth_admin: ApiClient,
    oauth_client: TestClient,
    dovecot: DovecotLab,
    lab_user: LabUser,
    oauth_lab: OAuthLab,
) -> None:
    server = imap_server(oauth_admin, dovecot, lab_user)
    url = server["authorization_url"]
    assert url.startswith(oauth_lab.authorize_url + "?")
    for part in ("code_challenge_method=S256", "code_challenge=", "state=", "login_hint="):
        assert part in url
    assert server["oauth"]["state"] == "consent_needed"
    assert server["connection"] is None  # nothing to test with before the consent
    # A callback with a made-up state changes nothing.
    forged = oauth_client.get(
        "/api/v1/oauth/callback",
        params={"state": "forged", "code": "x"},
        headers={"Accept": "application/json"},
    )
    assert forged.status_code == 400 and forged.json()["ok"] is False


def test_oauth2_imap_mailbox_is_fetched_refreshed_stopped_when_revoked_and_resumed(
    oauth_admin: ApiClient,
    oauth_client: TestClient,
    settings_with_lab: Settings,
    mail_lab_certs: LabCertificates,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    lab_user: LabUser,
    oauth_lab: OAuthLab,
    short_tokens: None,
) -> None:
    server = imap_server(oauth_admin, dovecot, lab_user)
    consent = give_consent(oauth_client, server["authorization_url"])
    assert consent["ok"] is True, consent
    assert consent["connection"]["ok"] is True
    first_access, first_refresh = stored_tokens(pool, settings_with_lab, server["id"])
    shown = oauth_admin.get(f"/email-servers/{server['id']}").json()
    assert shown["oauth"]["state"] == "ok" and shown["connection"]["ok"] is True
    hidden = first_access not in str(shown)  # (no token in a failure message either)
    assert hidden, "the access token is in the API answer"

    queue = f"mailroom.inbound.{server['routing_plan_id']}"
    wait_for_queue(settings_with_lab.amqp_url, queue)
    fetcher = fetcher_settings(settings_with_lab, mail_lab_certs)
    with running_fetcher(fetcher, pool):
        dovecot.append(lab_user.name, mail("first"))
        assert len(take(fetcher.amqp_url, queue, 1, timeout=15)) == 1

        # Twice: the token expires, the server drops the session, the fetcher logs in again
        # with a refreshed token. The lab rotates refresh tokens, so the second refresh works
        # only if the first one's new refresh token was stored.
        for round_ in (1, 2):
            time.sleep(LIFETIME + 0.5)
            dovecot.kick(lab_user.name)
            dovecot.append(lab_user.name, mail(f"after refresh {round_}"))
            assert len(take(fetcher.amqp_url, queue, 1, timeout=15)) == 1
        assert oauth_lab.grants(lab_user.name)["refresh_token"] >= 2
        access, refresh = stored_tokens(pool, settings_with_lab, server["id"])
        renewed = access != first_access and refresh != first_refresh
        assert renewed, "the refreshed tokens were not stored"

        # The admin (or the provider) withdraws the consent.
        oauth_lab.revoke(lab_user.name)
        time.sleep(LIFETIME + 0.5)
        dovecot.kick(lab_user.name)
        waiting = dovecot.append(lab_user.name, mail("while consent is revoked"))
        # (The kick itself may be reported first, as a dropped connection.)
        report = reauth_report(fetcher.amqp_url, server["id"])
        assert "invalid_grant" in report["reason"]
        shown = oauth_admin.get(f"/email-servers/{server['id']}").json()
        assert shown["oauth"]["state"] == "reauth_required"
        assert "invalid_grant" in shown["oauth"]["reason"]
        assert any("Consent needed again" in w for w in shown["warnings"])
        refused = oauth_lab.grants(lab_user.name)["refused"]
        time.sleep(2)  # the fetcher keeps trying, but not the provider: consent is over
        assert oauth_lab.grants(lab_user.name)["refused"] == refused
        assert waiting not in dovecot.seen(lab_user.name)

        # Re-authenticate on save: a new consent, and the waiting mail comes.
        saved = oauth_admin.patch(
            f"/email-servers/{server['id']}", {"reauthenticate_on_save": True}
        ).json()
        assert give_consent(oauth_client, saved["authorization_url"])["ok"] is True
        assert len(take(fetcher.amqp_url, queue, 1, timeout=15)) == 1
        eventually(lambda: waiting in dovecot.seen(lab_user.name), 10, "mail marked seen")
    stored_tokens(pool, settings_with_lab, server["id"])


def test_oauth2_pop3_mailbox_is_fetched_with_a_warning(
    oauth_admin: ApiClient,
    oauth_client: TestClient,
    settings_with_lab: Settings,
    mail_lab_certs: LabCertificates,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    lab_user: LabUser,
) -> None:
    server = imap_server(oauth_admin, dovecot, lab_user, type="pop3", port=dovecot.pop3s_port)
    assert any("not recommended" in w for w in server["warnings"])
    assert give_consent(oauth_client, server["authorization_url"])["ok"] is True
    stored_tokens(pool, settings_with_lab, server["id"])
    queue = f"mailroom.inbound.{server['routing_plan_id']}"
    wait_for_queue(settings_with_lab.amqp_url, queue)
    dovecot.append(lab_user.name, mail("pop3 with a token"))
    with running_fetcher(fetcher_settings(settings_with_lab, mail_lab_certs), pool):
        assert len(take(settings_with_lab.amqp_url, queue, 1, timeout=15)) == 1
        eventually(lambda: dovecot.count(lab_user.name) == 0, 10, "POP3 mailbox emptied")


def test_oauth2_smtp_server_sends_refreshes_and_waits_for_a_new_consent(
    oauth_admin: ApiClient,
    oauth_tenant: str,
    oauth_client: TestClient,
    settings_with_lab: Settings,
    mail_lab_certs: LabCertificates,
    pool: ConnectionPool[DictConnection],
    smtp_lab: SmtpLab,
    smtp_default_lab: SmtpLab,
    oauth_lab: OAuthLab,
    short_tokens: None,
) -> None:
    user = f"oauth-{uuid.uuid4().hex[:6]}@example.com"
    tenant = oauth_tenant
    server = oauth_admin.create(
        type="smtp",
        name="agent mail via OAuth2",
        host="127.0.0.1",
        port=smtp_lab.port,
        tls=False,
        auth_type="oauth2",
        oauth_provider=PROVIDER,
        username=user,
        enabled=True,
        role="agent",
    )
    consent = give_consent(oauth_client, server["authorization_url"])
    assert consent["ok"] is True and consent["connection"]["ok"] is True, consent
    stored_tokens(pool, settings_with_lab, server["id"])
    smtp_lab.clear()
    env = sender_env(
        mail_lab_certs,
        smtp_default_lab,
        MAILROOM_SENDER_IDLE_CLOSE_SECONDS="1",
        **oauth_env(settings_with_lab),
    )
    sender = start_sender(env)
    try:
        current = oauth_admin.get(f"/email-servers/{server['id']}").json()
        wait_known(sender, current)
        with results_tap(settings_with_lab.amqp_url) as results:
            first = command(tenant, **{"from": user, "subject": "sent with a token"})
            publish(settings_with_lab.amqp_url, first)
            assert results_for(results, first["request_id"], final=True)[-1]["status"] == "sent"

            time.sleep(LIFETIME + 1.5)  # token expired, idle connection closed
            second = command(tenant, **{"from": user, "subject": "after a refresh"})
            publish(settings_with_lab.amqp_url, second)
            assert results_for(results, second["request_id"], final=True)[-1]["status"] == "sent"
            assert oauth_lab.grants(user)["refresh_token"] >= 1
            logins = {m.login for m in smtp_lab.mails()}
            assert logins == {user}

            oauth_lab.revoke(user)
            time.sleep(LIFETIME + 1.5)
            third = command(tenant, **{"from": user, "subject": "waits for the admin"})
            publish(settings_with_lab.amqp_url, third)
            waiting = results_for(results, third["request_id"], final=False)
            assert waiting and waiting[0]["final"] is False
            assert waiting[0]["category"] == "reauth_required"
            assert "invalid_grant" in waiting[0]["reason"]

            saved = oauth_admin.patch(
                f"/email-servers/{server['id']}", {"reauthenticate_on_save": True}
            ).json()
            assert give_consent(oauth_client, saved["authorization_url"])["ok"] is True
            done = results_for(results, third["request_id"], final=True, timeout=30)
            assert done[-1]["status"] == "sent"
        assert len(smtp_lab.mails()) == 3
    finally:
        sender.terminate()
        smtp_lab.clear()
    stored_tokens(pool, settings_with_lab, server["id"])


def test_admins_see_which_providers_they_can_pick_without_secrets(
    oauth_admin: ApiClient, settings_with_lab: Settings
) -> None:
    answer = oauth_admin.get("/oauth/providers")
    assert answer.status_code == 200
    providers = {p["name"]: p for p in answer.json()["items"]}
    assert providers[PROVIDER]["configured"] is True
    assert providers["microsoft365"]["configured"] is False  # preset, no client registered
    assert "client_secret" not in answer.text and "Sesam" not in answer.text


def test_tokens_belong_to_one_mailbox_a_new_user_needs_a_new_consent(
    oauth_admin: ApiClient,
    oauth_client: TestClient,
    dovecot: DovecotLab,
    lab_user: LabUser,
) -> None:
    server = imap_server(oauth_admin, dovecot, lab_user, enabled=False)
    old_link = server["authorization_url"]
    other = dovecot.new_user("other")
    moved = oauth_admin.patch(f"/email-servers/{server['id']}", {"username": other.name}).json()
    assert moved["oauth"]["state"] == "consent_needed" and moved["authorization_url"]
    # The link started for the old mailbox no longer stores anything.
    stale = give_consent(oauth_client, old_link)
    assert stale["ok"] is False and stale["status_code"] == 400
    assert give_consent(oauth_client, moved["authorization_url"])["ok"] is True
    again = oauth_admin.patch(f"/email-servers/{server['id']}", {"username": lab_user.name})
    assert again.json()["oauth"]["state"] == "consent_needed"


def test_a_new_host_needs_a_new_consent_and_gets_no_token(
    oauth_admin: ApiClient,
    oauth_client: TestClient,
    dovecot: DovecotLab,
    lab_user: LabUser,
    pool: ConnectionPool[DictConnection],
    settings_with_lab: Settings,
) -> None:
    """Tokens are a password for as long as they live: another host gets none of them, and
    the answer asks for the consent again, as for a new user."""
    server = imap_server(oauth_admin, dovecot, lab_user)
    assert give_consent(oauth_client, server["authorization_url"])["ok"] is True
    tokens = [t for t in stored_tokens(pool, settings_with_lab, server["id"]) if t]
    with RecordingServer("imap") as elsewhere:
        moved = oauth_admin.patch(
            f"/email-servers/{server['id']}",
            {
                "host": "127.0.0.1",
                "sni_hostname": "localhost",
                "port": elsewhere.port,
                "tls": False,
            },
        )
        assert moved.status_code == 200, moved.text
        assert moved.json()["oauth"]["state"] == "consent_needed"
        assert moved.json()["authorization_url"]
        assert elsewhere.connections == 0
        assert not any(elsewhere.saw(token) for token in tokens)
    with pool.connection() as conn:
        assert oauth_repo.get(conn, server["id"]) is None  # dropped with the move


def test_reauthenticate_on_save_still_tests_a_change_with_the_current_tokens(
    oauth_admin: ApiClient,
    oauth_client: TestClient,
    dovecot: DovecotLab,
    lab_user: LabUser,
) -> None:
    server = imap_server(oauth_admin, dovecot, lab_user, reauthenticate_on_save=True)
    assert give_consent(oauth_client, server["authorization_url"])["ok"] is True
    wrong_port = oauth_admin.patch(
        f"/email-servers/{server['id']}", {"port": dovecot.pop3s_port, "name": "moved"}
    )
    assert wrong_port.status_code == 422, wrong_port.text  # tested, refused, nothing saved
    renamed = oauth_admin.patch(f"/email-servers/{server['id']}", {"name": "renamed"}).json()
    assert renamed["authorization_url"]  # the box is ticked: every save asks again
    assert renamed["oauth"]["state"] == "ok"  # and the current tokens keep working meanwhile


def test_a_consent_without_a_refresh_token_tells_the_admin_at_once(
    oauth_admin: ApiClient,
    oauth_client: TestClient,
    dovecot: DovecotLab,
    lab_user: LabUser,
    oauth_lab: OAuthLab,
) -> None:
    oauth_lab.issue_refresh_tokens(False)
    try:
        server = imap_server(oauth_admin, dovecot, lab_user)
        answer = give_consent(oauth_client, server["authorization_url"])
    finally:
        oauth_lab.reset()
    assert answer["ok"] is True  # it works, for now
    assert "gave no refresh token" in answer["message"]
    assert "offline access" in answer["message"]


def test_signing_in_as_another_account_stores_nothing(
    oauth_admin: ApiClient,
    oauth_client: TestClient,
    dovecot: DovecotLab,
    lab_user: LabUser,
) -> None:
    server = imap_server(oauth_admin, dovecot, lab_user)
    # The admin signs in at the provider with their own account, not the mailbox's.
    as_admin = server["authorization_url"].replace(
        f"login_hint={quote(lab_user.name, safe='')}", "login_hint=admin%40example.com"
    )
    assert as_admin != server["authorization_url"]
    answer = give_consent(oauth_client, as_admin)
    assert answer["ok"] is False and answer["status_code"] == 400
    assert "as admin@example.com" in answer["message"] and lab_user.name in answer["message"]
    shown = oauth_admin.get(f"/email-servers/{server['id']}").json()
    assert shown["oauth"]["state"] == "consent_needed"
