"""The mail lab's OAuth2 authorization server: ``node tests/lab/oauth/server.js`` on loopback.

``OAuthLab`` runs a real authorization server (the npm package ``oauth2-mock-server``, made to
behave like a mail provider by ``server.js``) so the product's consent flow, token refresh and
XOAUTH2/OAUTHBEARER logins can be tested end to end: the lab's Dovecot
(``DovecotLab.trust_oauth``) and SMTP server (``SmtpLab.trust_oauth``) accept its access tokens.

The provider, as the product sees it (``provider_json()`` is a ``MAILROOM_OAUTH_PROVIDERS``
entry):

- ``GET /authorize`` logs nobody in: it redirects at once to ``redirect_uri`` with ``code``
  and ``state``. The mailbox login is the ``login_hint`` query parameter (without one the
  grant is for ``johndoe``, and the server logs that). PKCE (S256 or plain) is optional, but a
  code issued with a ``code_challenge`` needs the right ``code_verifier``: a wrong or missing
  one gets ``400 invalid_grant``. Codes are single use.
- ``POST /token``: client authentication is required (client_id ``mailroom-lab`` and the
  per-run ``client_secret``, as client_secret_post or client_secret_basic), else
  ``401 invalid_client``. ``authorization_code`` and ``refresh_token`` grants answer
  ``{"access_token", "token_type": "Bearer", "expires_in", "scope", "id_token",
  "refresh_token"}``. Refresh tokens rotate like Microsoft's: each refresh answers a new one
  and the presented one stops working. An unknown, rotated-out or revoked refresh token gets
  ``400 {"error": "invalid_grant", "error_description": ...}`` naming the case.
- ``expires_in`` is the configured lifetime (``set_token_lifetime``, default 3600 s), and so
  is the access token's ``exp - iat``.

Claims seen in the tokens (oauth2-mock-server 8.2.3 plus ``server.js``), signed RS256 with
one RSA key per run (header ``{"typ": "JWT", "kid": <80 hex digits>, "alg": "RS256"}``):

- access token: ``iss`` (= ``issuer``), ``iat``, ``nbf`` (= iat - 10), ``exp``, ``sub`` (the
  login), ``amr`` (``["pwd"]``), ``scope`` (the scope asked for at /token, else at /authorize,
  else ``"dummy"``). No ``aud``, ``azp`` or ``client_id``: a resource server cannot tell which
  client a token was issued to, so Dovecot looks keys up under ``default``.
- id_token: the same without ``amr``, plus ``aud`` = the client id (and ``nonce`` if sent).
- refresh token: opaque (a UUID).

Control (a second, plain JSON HTTP server): ``set_token_lifetime``, ``revoke``, ``grants``,
``reset``, ``public_keys_pem``. The client secret carries the leak check's marker
(``tests.support.leaks.password``), so a logged secret fails the run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers

from tests.lab.dovecot import INSTALL_SCRIPT, LabError
from tests.support.leaks import password

HOST = "127.0.0.1"
CLIENT_ID = "mailroom-lab"
DEFAULT_LIFETIME = 3600
OAUTH_DIR = Path(__file__).resolve().parent / "oauth"
SERVER_JS = OAUTH_DIR / "server.js"
# token_for() needs a redirect target; nothing listens there (the redirect is not followed).
LAB_REDIRECT_URI = "http://127.0.0.1:9/oauth/callback"
NODE_MISSING = (
    "node and npm are needed for the OAuth lab (tests/lab/oauth): install Node.js 20.19 or "
    "newer (e.g. 'sudo apt-get install nodejs npm', or from https://nodejs.org), then run "
    "scripts/install-mail-lab"
)


def ensure_node_modules() -> None:
    """Run ``scripts/install-mail-lab`` (``npm ci``) when the server's packages are missing.

    Raises ``LabError`` when node is missing or the install fails: the OAuth tests fail, they
    never skip.
    """
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise LabError(NODE_MISSING)
    if _node_modules_current():
        return
    result = subprocess.run(
        [str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=600, check=False
    )
    if result.returncode != 0 or not _node_modules_current():
        raise LabError(
            f"{INSTALL_SCRIPT} could not install tests/lab/oauth's packages "
            f"(exit {result.returncode}):\n{result.stdout}{result.stderr}"
        )


def _node_modules_current() -> bool:
    modules = OAUTH_DIR / "node_modules"
    lock = OAUTH_DIR / "package-lock.json"
    return modules.is_dir() and modules.stat().st_mtime >= lock.stat().st_mtime


def pkce_pair() -> tuple[str, str]:
    """A PKCE ``code_verifier`` (64 URL-safe characters) and its S256 ``code_challenge``."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class OAuthLab:
    """One authorization server process; a context manager that starts and stops it."""

    def __init__(self, *, directory: Path | None = None) -> None:
        self.client_id = CLIENT_ID
        self.client_secret = password(secrets.token_hex(8))
        self._owns_directory = directory is None
        self.directory = (
            Path(directory)
            if directory is not None
            else Path(tempfile.mkdtemp(prefix="mailroom-oauth-lab-"))
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_path = self.directory / "server.log"
        self.port = 0
        self.control_port = 0
        self.issuer = ""
        self._lifetime = DEFAULT_LIFETIME
        self._process: subprocess.Popen[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def authorize_url(self) -> str:
        return self.issuer + "/authorize"

    @property
    def token_url(self) -> str:
        return self.issuer + "/token"

    @property
    def control_url(self) -> str:
        return f"http://{HOST}:{self.control_port}"

    def start(self, timeout: float = 15.0) -> None:
        """Start ``node server.js`` on free ports and wait until it writes ``ready.json``.

        The ports are chosen by the server (port 0), so two labs never race for one; its
        output goes to ``server.log``, never to a pipe of ours (nobody would drain it).
        """
        if self._process is not None and self._process.poll() is None:
            return
        ensure_node_modules()
        node = shutil.which("node")
        if node is None:
            raise LabError(NODE_MISSING)
        ready = self.directory / "ready.json"
        ready.unlink(missing_ok=True)
        env = {
            **os.environ,
            "OAUTH_LAB_CLIENT_ID": self.client_id,
            "OAUTH_LAB_CLIENT_SECRET": self.client_secret,
        }
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [node, str(SERVER_JS), "0", "0", str(self.directory)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=OAUTH_DIR,
                env=env,
                start_new_session=True,  # Ctrl-C in the terminal reaches the tests only
            )
        deadline = time.monotonic() + timeout
        while not ready.exists():
            code = self._process.poll()
            if code is not None:
                raise LabError(f"node {SERVER_JS} exited with {code}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise LabError(f"node {SERVER_JS} did not get ready\n{self.log_tail()}")
            time.sleep(0.02)
        info = json.loads(ready.read_text(encoding="utf-8"))
        self.port, self.control_port = int(info["port"]), int(info["control_port"])
        self.issuer = str(info["issuer"])
        self._lifetime = DEFAULT_LIFETIME

    def stop(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def close(self) -> None:
        """Stop the server and, if the lab created its directory, remove it."""
        try:
            self.stop()
        finally:
            if self._owns_directory:
                shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> OAuthLab:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no OAuth lab log)"
        return "OAuth lab log:\n" + "\n".join(text.splitlines()[-lines:])

    # -- what the product is configured with ---------------------------------------------------

    def provider_json(self, name: str = "lab") -> dict[str, object]:
        """This server as an entry of the product's ``MAILROOM_OAUTH_PROVIDERS``."""
        return {
            "name": name,
            "authorize_url": self.authorize_url,
            "token_url": self.token_url,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "scopes": ["mail"],
        }

    # -- control -------------------------------------------------------------------------------

    def set_token_lifetime(self, seconds: int) -> None:
        """Lifetime (``exp - iat`` and ``expires_in``) of access tokens issued from now on."""
        self._control("POST", "/lifetime", {"seconds": seconds})
        self._lifetime = seconds

    def revoke(self, sub: str) -> None:
        """Withdraw ``sub``'s consent: each of its refresh tokens now gets ``invalid_grant``.

        A new consent (authorize + code grant) afterwards gets fresh, working tokens. Access
        tokens already issued stay valid until they expire, as with real providers.
        """
        self._control("POST", "/revoke", {"sub": sub})

    def grants(self, sub: str) -> dict[str, int]:
        """Token requests for ``sub`` since ``reset()``: granted per grant type, and refused."""
        counts = self._control("GET", "/grants").get(sub, {})
        return {
            key: int(counts.get(key, 0))
            for key in ("authorization_code", "refresh_token", "refused")
        }

    def issue_refresh_tokens(self, issue: bool) -> None:
        """``False``: token answers carry no refresh token (no offline access granted), until
        ``reset()``."""
        self._control("POST", "/refresh-tokens", {"issue": issue})

    def issued_tokens(self) -> list[str]:
        """Every access, refresh and id token this server handed out since it started."""
        tokens = self._control("GET", "/issued")
        assert isinstance(tokens, list)
        return [str(t) for t in tokens]

    def reset(self) -> None:
        """Forget the counters and set the token lifetime back to the default (3600 s)."""
        self._control("POST", "/reset")
        self._lifetime = DEFAULT_LIFETIME

    def jwks(self) -> list[dict[str, Any]]:
        """The server's public signing keys as JWKs."""
        keys = self._control("GET", "/keys")
        assert isinstance(keys, list)
        return keys

    def public_keys_pem(self) -> dict[str, bytes]:
        """kid → PEM public key (SubjectPublicKeyInfo), what Dovecot and the SMTP lab load."""
        found: dict[str, bytes] = {}
        for jwk in self.jwks():
            if jwk.get("kty") != "RSA":
                continue
            numbers = RSAPublicNumbers(_b64_int(jwk["e"]), _b64_int(jwk["n"]))
            found[str(jwk["kid"])] = numbers.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return found

    def _control(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        if not self.control_port:
            raise LabError("the OAuth lab is not running")
        response = httpx2.request(
            method, self.control_url + path, json=body, timeout=10, trust_env=False
        )
        if response.status_code != 200:
            raise LabError(f"OAuth lab control {method} {path}: {response.text}")
        return response.json()

    # -- the code flow, for lab self-tests -----------------------------------------------------

    def authorize(self, sub: str, *, code_challenge: str | None = None, scope: str = "mail") -> str:
        """``GET /authorize`` with ``login_hint=sub`` as the product sends it; the code."""
        state = secrets.token_urlsafe(8)
        params = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": LAB_REDIRECT_URI,
            "scope": scope,
            "state": state,
            "login_hint": sub,
        }
        if code_challenge is not None:
            params.update(code_challenge=code_challenge, code_challenge_method="S256")
        response = httpx2.get(self.authorize_url, params=params, timeout=10, trust_env=False)
        if response.status_code not in {301, 302, 303, 307}:
            raise LabError(f"/authorize answered {response.status_code}: {response.text}")
        query = parse_qs(urlsplit(response.headers["location"]).query)
        if query.get("state") != [state] or "code" not in query:
            raise LabError(f"/authorize redirected to {response.headers['location']}")
        return query["code"][0]

    def exchange(self, code: str, code_verifier: str | None = None) -> httpx2.Response:
        """``POST /token`` (authorization_code grant, client_secret_post); the raw answer."""
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": LAB_REDIRECT_URI,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
        }
        if code_verifier is not None:
            data["code_verifier"] = code_verifier
        return httpx2.post(self.token_url, data=data, timeout=10, trust_env=False)

    def refresh(self, refresh_token: str) -> httpx2.Response:
        """``POST /token`` (refresh_token grant, client_secret_basic); the raw answer."""
        return httpx2.post(
            self.token_url,
            data={"grant_type": "refresh_token", "refresh_token": refresh_token},
            auth=(self.client_id, self.client_secret),
            timeout=10,
            trust_env=False,
        )

    def consent(self, sub: str, lifetime: int | None = None) -> dict[str, Any]:
        """The whole code flow with PKCE for ``sub``; the token endpoint's JSON answer.

        With ``lifetime``, the access token lives that long (the server's lifetime setting is
        restored afterwards).
        """
        previous = self._lifetime
        if lifetime is not None and lifetime != previous:
            self.set_token_lifetime(lifetime)
        try:
            verifier, challenge = pkce_pair()
            response = self.exchange(self.authorize(sub, code_challenge=challenge), verifier)
        finally:
            if lifetime is not None and lifetime != previous:
                self.set_token_lifetime(previous)
        if response.status_code != 200:
            raise LabError(f"/token answered {response.status_code}: {response.text}")
        answer: dict[str, Any] = response.json()
        return answer

    def token_for(self, sub: str, lifetime: int = 300) -> str:
        """An access token for ``sub`` from the real code flow (authorize, PKCE, /token)."""
        return str(self.consent(sub, lifetime)["access_token"])


def _b64_int(value: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A JWT's header and claims, unverified (for tests that look at what a token carries)."""
    header, payload, _ = token.split(".")
    return (
        json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))),
        json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))),
    )
