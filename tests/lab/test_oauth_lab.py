"""The OAuth part of the mail lab works: real authorization server, Dovecot and SMTP lab.

Real processes only (``node`` running oauth2-mock-server, the session's Dovecot and aiosmtpd);
a missing Node.js fails these tests, it never skips them. Standard library and imapclient
clients: the product's own OAuth code is tested against this lab elsewhere.
"""

from __future__ import annotations

import base64
import poplib
import smtplib
import ssl
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from tests.lab.certs import LabCertificates
from tests.lab.clients import LabPOP3_SSL, tls_context
from tests.lab.dovecot import HOST, DovecotLab
from tests.lab.oauth_server import OAuthLab, jwt_parts, pkce_pair
from tests.lab.smtp_server import SmtpLab


@pytest.fixture
def ctx(mail_lab_certs: LabCertificates) -> ssl.SSLContext:
    return tls_context(str(mail_lab_certs.ca))


@pytest.fixture
def oauth(oauth_lab: OAuthLab) -> Iterator[OAuthLab]:
    """The session's OAuth lab, its lifetime and counters reset after the test."""
    yield oauth_lab
    oauth_lab.reset()


@pytest.fixture
def smtp(smtp_lab: SmtpLab) -> Iterator[SmtpLab]:
    """The session's SMTP lab, emptied afterwards (other tests expect an empty store)."""
    smtp_lab.clear()
    yield smtp_lab
    smtp_lab.clear()


def xoauth2(user: str, token: str) -> str:
    return f"user={user}\x01auth=Bearer {token}\x01\x01"


def expired_token(oauth: OAuthLab, sub: str) -> str:
    """A token for ``sub`` that lived one second and is now past its ``exp``."""
    token = oauth.token_for(sub, lifetime=1)
    exp = jwt_parts(token)[1]["exp"]
    # Dovecot compares whole seconds and accepts a token in the second of its exp.
    time.sleep(max(0.0, exp + 1 - time.time()) + 0.1)
    return token


def pop_command(pop: poplib.POP3, line: str) -> bytes:
    """Send ``line`` and read one response line with poplib's low-level helpers.

    ``_putcmd``/``_getresp`` are poplib's own (typeshed omits them); ``_getresp`` raises
    ``poplib.error_proto`` for a ``-ERR`` and returns ``+OK`` and ``+ <challenge>`` lines.
    """
    getattr(pop, "_putcmd")(line)  # noqa: B009 - private, not in the stubs
    response: bytes = getattr(pop, "_getresp")()  # noqa: B009
    return response


def imap_login(
    dovecot: DovecotLab, ctx: ssl.SSLContext, method: str, user: str, token: str
) -> None:
    with IMAPClient(HOST, port=dovecot.imaps_port, ssl=True, ssl_context=ctx, timeout=10) as im:
        getattr(im, method)(user, token)
        assert im.select_folder("INBOX")[b"EXISTS"] == 0


# --- the authorization server ------------------------------------------------------------------


def test_code_flow_with_pkce_gives_a_token_for_the_login_hint(oauth: OAuthLab) -> None:
    sub = f"hint-{uuid.uuid4().hex[:8]}@lab.test"
    oauth.set_token_lifetime(1234)
    answer = oauth.consent(sub)
    header, claims = jwt_parts(answer["access_token"])
    assert header["alg"] == "RS256" and header["kid"] in oauth.public_keys_pem()
    assert claims["sub"] == sub
    assert claims["iss"] == oauth.issuer
    assert claims["scope"] == "mail"
    assert claims["exp"] - claims["iat"] == answer["expires_in"] == 1234
    assert answer["token_type"] == "Bearer" and answer["refresh_token"]
    assert oauth.grants(sub) == {"authorization_code": 1, "refresh_token": 0, "refused": 0}


def test_wrong_or_missing_code_verifier_and_reused_codes_are_refused(oauth: OAuthLab) -> None:
    sub = f"pkce-{uuid.uuid4().hex[:8]}"
    verifier, challenge = pkce_pair()
    code = oauth.authorize(sub, code_challenge=challenge)
    wrong = oauth.exchange(code, pkce_pair()[0])
    assert wrong.status_code == 400, wrong.text
    assert wrong.json()["error"] == "invalid_grant"
    burned = oauth.exchange(code, verifier)  # a code is single use, even a refused one
    assert burned.status_code == 400 and burned.json()["error"] == "invalid_grant"
    assert "already used" in burned.json()["error_description"]
    missing = oauth.exchange(oauth.authorize(sub, code_challenge=challenge))
    assert missing.status_code == 400 and missing.json()["error"] == "invalid_grant"
    good_code = oauth.authorize(sub, code_challenge=challenge)
    assert oauth.exchange(good_code, verifier).status_code == 200
    reused = oauth.exchange(good_code, verifier)
    assert reused.status_code == 400, reused.text
    assert reused.json()["error"] == "invalid_grant"
    assert oauth.grants(sub) == {"authorization_code": 1, "refresh_token": 0, "refused": 4}


def test_the_client_must_authenticate(oauth: OAuthLab) -> None:
    import httpx2

    def token_request(auth: tuple[str, str] | None, form: dict[str, str]) -> httpx2.Response:
        # A fresh code each time: the mock spends a code's PKCE challenge before the client
        # check (a real server checks the client first).
        verifier, challenge = pkce_pair()
        code = oauth.authorize("client-auth", code_challenge=challenge)
        data = {"grant_type": "authorization_code", "code": code, "code_verifier": verifier}
        return httpx2.post(oauth.token_url, data=data | form, auth=auth, trust_env=False)

    for auth in ((oauth.client_id, "wrong"), ("someone-else", oauth.client_secret)):
        refused = token_request(auth, {})
        assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"
        assert "basic" in refused.json()["error_description"]
    post = token_request(None, {"client_id": oauth.client_id, "client_secret": "wrong"})
    assert post.status_code == 401 and post.json()["error"] == "invalid_client"
    assert token_request(None, {}).status_code == 401
    # client_secret_basic and client_secret_post both work
    assert token_request((oauth.client_id, oauth.client_secret), {}).status_code == 200
    form = {"client_id": oauth.client_id, "client_secret": oauth.client_secret}
    assert token_request(None, form).status_code == 200


def test_refresh_rotates_the_token_and_revoke_ends_the_consent(oauth: OAuthLab) -> None:
    sub = f"rotate-{uuid.uuid4().hex[:8]}"
    first = oauth.consent(sub)["refresh_token"]
    renewed = oauth.refresh(first)
    assert renewed.status_code == 200, renewed.text
    second = renewed.json()["refresh_token"]
    assert second != first
    assert jwt_parts(renewed.json()["access_token"])[1]["sub"] == sub

    stale = oauth.refresh(first)
    assert stale.status_code == 400
    assert stale.json()["error"] == "invalid_grant"
    assert "rotated" in stale.json()["error_description"]

    third = oauth.refresh(second).json()["refresh_token"]
    oauth.revoke(sub)
    revoked = oauth.refresh(third)
    assert revoked.status_code == 400 and revoked.json()["error"] == "invalid_grant"
    assert "revoked" in revoked.json()["error_description"]
    unknown = oauth.refresh("not-a-token")
    assert unknown.status_code == 400 and "unknown" in unknown.json()["error_description"]

    fresh = oauth.consent(sub)["refresh_token"]  # a new consent works again
    assert oauth.refresh(fresh).status_code == 200
    assert oauth.grants(sub) == {"authorization_code": 2, "refresh_token": 3, "refused": 2}
    assert oauth.grants("nobody") == {"authorization_code": 0, "refresh_token": 0, "refused": 0}


# --- Dovecot --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["oauth2_login", "oauthbearer_login"])
def test_imap_accepts_a_token_for_the_user(
    oauth: OAuthLab, dovecot: DovecotLab, ctx: ssl.SSLContext, method: str
) -> None:
    user = dovecot.new_user()
    imap_login(dovecot, ctx, method, user.name, oauth.token_for(user.name))


def test_imap_refuses_an_expired_token_and_one_for_another_user(
    oauth: OAuthLab, dovecot: DovecotLab, ctx: ssl.SSLContext
) -> None:
    user, other = dovecot.new_user(), dovecot.new_user()
    with pytest.raises(LoginError):
        imap_login(dovecot, ctx, "oauth2_login", user.name, oauth.token_for(other.name))
    with pytest.raises(LoginError):
        imap_login(dovecot, ctx, "oauthbearer_login", user.name, oauth.token_for(other.name))
    expired = expired_token(oauth, user.name)
    with pytest.raises(LoginError):
        imap_login(dovecot, ctx, "oauth2_login", user.name, expired)
    # Basic auth still works beside OAuth2.
    with IMAPClient(HOST, port=dovecot.imaps_port, ssl=True, ssl_context=ctx, timeout=10) as im:
        im.login(user.name, user.password)


def test_pop3_accepts_xoauth2_and_refuses_a_bad_token(
    oauth: OAuthLab, dovecot: DovecotLab, ctx: ssl.SSLContext
) -> None:
    user = dovecot.new_user()
    dovecot.append(user.name, b"Subject: oauth\r\n\r\nhello\r\n")
    blob = base64.b64encode(xoauth2(user.name, oauth.token_for(user.name)).encode()).decode()
    pop = LabPOP3_SSL(HOST, dovecot.pop3s_port, ctx)
    try:
        assert pop_command(pop, f"AUTH XOAUTH2 {blob}").startswith(b"+OK")
        assert pop.stat()[0] == 1
    finally:
        pop.quit()

    bad = base64.b64encode(xoauth2(user.name, "not.a.token").encode()).decode()
    pop = LabPOP3_SSL(HOST, dovecot.pop3s_port, ctx, source="127.0.0.3")
    try:
        # "+ <base64 JSON error>": the client answers an empty line, then comes the -ERR
        challenge = pop_command(pop, f"AUTH XOAUTH2 {bad}")
        assert challenge.startswith(b"+ ")
        assert b'"status"' in base64.b64decode(challenge[2:])  # Dovecot: {"status":"401",...}
        with pytest.raises(poplib.error_proto, match="-ERR"):
            pop_command(pop, "")
    finally:
        pop.close()


# --- SMTP -----------------------------------------------------------------------------------------


def smtp_send(smtp_lab: SmtpLab, ctx: ssl.SSLContext, user: str, token: str, to: str) -> None:
    """STARTTLS, AUTH XOAUTH2 with an initial response, one mail to ``to``."""
    with smtplib.SMTP(HOST, smtp_lab.port, timeout=10) as smtp:
        smtp.starttls(context=ctx)
        smtp.ehlo()  # auth() does not send it, and AUTH needs the EHLO after STARTTLS
        # On failure the server's 334 carries an error; the client answers an empty line.
        smtp.auth(
            "XOAUTH2",
            lambda challenge=None: xoauth2(user, token) if challenge is None else "",
            initial_response_ok=True,
        )
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = user, to, "oauth"
        message.set_content("sent with a token")
        smtp.send_message(message)


def test_smtp_accepts_xoauth2_and_records_the_sub_as_the_login(
    oauth: OAuthLab, smtp: SmtpLab, ctx: ssl.SSLContext
) -> None:
    sub = f"oauth-{uuid.uuid4().hex[:8]}@lab.test"
    to = f"{uuid.uuid4().hex[:8]}@rcpt.test"
    smtp_send(smtp, ctx, sub, oauth.token_for(sub), to)
    mails = [m for m in smtp.wait_for(1) if m.recipients == [to]]
    assert len(mails) == 1 and mails[0].login == sub


def test_smtp_accepts_oauthbearer_without_an_initial_response(
    oauth: OAuthLab, smtp: SmtpLab, ctx: ssl.SSLContext
) -> None:
    sub = f"bearer-{uuid.uuid4().hex[:8]}@lab.test"
    token = oauth.token_for(sub)
    with smtplib.SMTP(HOST, smtp.port, timeout=10) as client:
        client.starttls(context=ctx)
        client.ehlo()
        assert "OAUTHBEARER" in client.esmtp_features["auth"]
        code, _ = client.auth(
            "OAUTHBEARER",
            lambda challenge=None: f"n,a={sub},\x01auth=Bearer {token}\x01\x01",
            initial_response_ok=False,
        )
        assert code == 235


@pytest.mark.parametrize("case", ["garbage", "other user", "expired"])
def test_smtp_refuses_a_bad_token_with_535(
    oauth: OAuthLab, smtp: SmtpLab, ctx: ssl.SSLContext, case: str
) -> None:
    sub = f"bad-{uuid.uuid4().hex[:8]}@lab.test"
    if case == "garbage":
        token = "not.a.token"
    elif case == "other user":
        token = oauth.token_for("someone-else@lab.test")
    else:
        token = expired_token(oauth, sub)
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        smtp_send(smtp, ctx, sub, token, "nobody@rcpt.test")
    assert refused.value.smtp_code == 535
    error = refused.value.smtp_error
    assert (error if isinstance(error, bytes) else error.encode()).startswith(b"5.7.8")
