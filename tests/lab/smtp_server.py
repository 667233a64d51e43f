"""A real SMTP server for tests and benchmarks: aiosmtpd in a separate process, on loopback.

``SmtpLab`` starts ``python -m tests.lab.smtp_server CONFIG`` and serves two ports of
127.0.0.1:

- ``port``: plain SMTP offering STARTTLS (AUTH only after STARTTLS);
- ``tls_port``: implicit TLS ("submissions").

Both use the lab certificate for ``localhost``/127.0.0.1 (``tests.lab.certs``), require AUTH
(PLAIN or LOGIN) against the lab's user table, and store every accepted mail in ``store/``:
``<n>.eml`` (the bytes as received) plus ``<n>.json`` (envelope, port, login user).

OAuth2: AUTH XOAUTH2 and OAUTHBEARER accept access tokens of the lab's authorization server
(``tests.lab.oauth_server``) once ``SmtpLab.trust_oauth(lab)`` has handed over its public keys
(before or after ``start()``: the server rereads the key file when it changes). A token is
checked as the lab's Dovecot checks it: RS256 signature by a trusted key (by ``kid``), ``exp``
in the future, ``nbf``/``iat`` not in the future, and ``sub`` equal to the user named in the
SASL string; the login recorded with each mail is then that ``sub``. Failures follow the
XOAUTH2/OAUTHBEARER protocol: ``334 <base64 JSON error>``, the client answers an empty line
(or ``AQ==``), then ``535 5.7.8``. Whatever the user table says, a token needs no password.
Commands may be up to 64 KiB long (aiosmtpd's 1001-byte stream limit cuts off
``AUTH XOAUTH2 <initial response>`` with a real token); DATA lines keep the 1001-byte limit.

With ``pipelining=True`` the server offers PIPELINING (RFC 2920) in its EHLO reply, as Postfix,
Exchange and Gmail do; aiosmtpd reads pipelined commands in order either way. Each stored mail
records whether more commands had arrived by the time its MAIL FROM was read (what a client
that pipelines does; ``ReceivedMail.pipelined``).

Replies can be scripted per recipient (``SmtpLab.script``): a list of replies used one per DATA,
the last one repeating, e.g. ``["451 4.3.0 try later", "451 4.3.0 try later", "250"]`` or
``["550 5.7.1 no"]``. A reply may carry a delay (``{"reply": "250", "delay": 3}``): the mail is
stored first, the answer comes after the delay (a worker killed "right after DATA").
``rcpt`` and ``mail`` script the replies to RCPT TO and MAIL FROM per address instead (e.g.
``{"gone@example.org": "550 5.1.1 no such user"}``): a refused address is not added to the
transaction, as a real server does. ``{"reply": ..., "hang_up": true}`` closes the connection
right after that reply, as Postfix does after too many refusals.

Facts this relies on: a rejected login gets no reply at all unless the authenticator returns
``AuthResult(success=False, handled=False)`` (then ``535 5.7.8``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email
import email.policy
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from tests.lab.certs import LabCertificates

if TYPE_CHECKING:
    from tests.lab.oauth_server import OAuthLab

HOST = "127.0.0.1"
# Longest AUTH line (and SASL continuation) the lab reads: a token in an initial response.
AUTH_LINE_LIMIT = 64 * 1024
# The RFC 5321 line limit aiosmtpd applies to DATA (its class default).
DATA_LINE_LIMIT = 1001


@dataclass(frozen=True)
class ReceivedMail:
    envelope_from: str
    recipients: list[str]
    raw: bytes
    login: str | None
    tls_port: bool
    path: Path
    pipelined: bool  # more commands had come by the time its MAIL FROM was read

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


class SmtpLab:
    """One aiosmtpd process; ``users`` maps login → password."""

    def __init__(
        self,
        certs: LabCertificates,
        users: dict[str, str],
        name: str = "smtp",
        base: Path | None = None,
        *,
        pipelining: bool = False,
    ) -> None:
        """``base``: where its directory (and every mail it stores) goes; the system's temporary
        directory unless told otherwise. ``pipelining``: offer PIPELINING."""
        self.certs = certs
        self.pipelining = pipelining
        self.users = dict(users)
        self.directory = Path(tempfile.mkdtemp(prefix=f"mailroom-{name}-lab-", dir=base))
        self.store = self.directory / "store"
        self.store.mkdir()
        self.script_file = self.directory / "script.json"
        self.oauth_keys_file = self.directory / "oauth-keys.json"
        self.port = 0
        self.tls_port = 0
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SmtpLab:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        config = {
            "cert": str(self.certs.localhost.cert),
            "key": str(self.certs.localhost.key),
            "users": self.users,
            "store": str(self.store),
            "script": str(self.script_file),
            "oauth_keys": str(self.oauth_keys_file),
            "ready": str(self.directory / "ready.json"),
            "pipelining": self.pipelining,
        }
        config_file = self.directory / "config.json"
        config_file.write_text(json.dumps(config), encoding="utf-8")
        config_file.chmod(0o600)
        log = (self.directory / "server.log").open("wb")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.lab.smtp_server", str(config_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
        ready = self.directory / "ready.json"
        deadline = time.monotonic() + 15
        while not ready.exists():
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "SMTP lab did not start: " + (self.directory / "server.log").read_text()
                )
            time.sleep(0.02)
        ports = json.loads(ready.read_text())
        self.port, self.tls_port = ports["port"], ports["tls_port"]

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)

    # --- OAuth2 ---------------------------------------------------------------------------------

    def trust_oauth(self, lab: OAuthLab) -> None:
        """Accept the access tokens of ``lab`` for AUTH XOAUTH2 and OAUTHBEARER.

        Writes its public keys (kid → PEM) to the file the server process rereads whenever it
        changes, so this works before ``start()`` and on a running lab alike.
        """
        keys = {kid: pem.decode("ascii") for kid, pem in lab.public_keys_pem().items()}
        temp = self.oauth_keys_file.with_suffix(".tmp")
        temp.write_text(json.dumps({"keys": keys, "version": time.time_ns()}))
        temp.replace(self.oauth_keys_file)

    # --- scripting and inspection ------------------------------------------------------------

    def script(
        self,
        rules: dict[str, list[Any]],
        *,
        rcpt: dict[str, Any] | None = None,
        mail: dict[str, Any] | None = None,
    ) -> None:
        """Replies to DATA per recipient address, and to RCPT TO and MAIL FROM per address;
        ``{}`` = accept everything (the default)."""
        temp = self.script_file.with_suffix(".tmp")
        temp.write_text(
            json.dumps(
                {"rules": rules, "rcpt": rcpt or {}, "mail": mail or {}, "version": time.time_ns()}
            )
        )
        temp.replace(self.script_file)

    def clear(self) -> None:
        self.script({})
        for path in self.store.iterdir():
            path.unlink()

    def mails(self) -> list[ReceivedMail]:
        found = []
        for meta_path in sorted(self.store.glob("*.json"), key=lambda p: int(p.stem)):
            meta = json.loads(meta_path.read_text())
            eml = meta_path.with_suffix(".eml")
            found.append(
                ReceivedMail(
                    envelope_from=meta["mail_from"],
                    recipients=meta["rcpt_tos"],
                    raw=eml.read_bytes(),
                    login=meta["login"],
                    tls_port=meta["tls_port"],
                    path=eml,
                    pipelined=meta["pipelined"],
                )
            )
        return found

    def count(self) -> int:
        return len(list(self.store.glob("*.json")))

    @property
    def pid(self) -> int:
        """The server process (the benchmark reads its CPU time)."""
        assert self._process is not None
        return self._process.pid

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[ReceivedMail]:
        deadline = time.monotonic() + timeout
        while self.count() < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.mails()


# --- the server process ------------------------------------------------------------------------


class _Script:
    """The scripted replies and the mail counter, shared by both ports."""

    def __init__(self, store: Path, script: Path) -> None:
        self.store = store
        self.script_path = script
        self.sequence = 0
        self.version: object = None
        self.rules: dict[str, list[Any]] = {}
        self.rcpt: dict[str, Any] = {}
        self.mail: dict[str, Any] = {}
        self.used: dict[str, int] = {}

    def _load(self) -> None:
        try:
            data = json.loads(self.script_path.read_text())
        except (OSError, ValueError):
            data = {"rules": {}, "version": None}
        if data.get("version") != self.version:
            self.version = data.get("version")
            self.rules = {k.lower(): v for k, v in data.get("rules", {}).items()}
            self.rcpt = {k.lower(): v for k, v in data.get("rcpt", {}).items()}
            self.mail = {k.lower(): v for k, v in data.get("mail", {}).items()}
            self.used = {}

    def envelope_reply(self, command: str, address: str) -> tuple[str, bool] | None:
        """The scripted reply to ``MAIL`` or ``RCPT`` for ``address``, and whether to hang up
        after it; ``None``: accepted."""
        self._load()
        entry = (self.mail if command == "MAIL" else self.rcpt).get(address.lower())
        if entry is None:
            return None
        if isinstance(entry, dict):
            return str(entry["reply"]), bool(entry.get("hang_up"))
        return str(entry), False

    def reply_for(self, recipients: list[str]) -> tuple[str, float]:
        self._load()
        for recipient in recipients:
            replies = self.rules.get(recipient.lower())
            if replies:
                index = self.used.get(recipient.lower(), 0)
                self.used[recipient.lower()] = index + 1
                entry = replies[min(index, len(replies) - 1)]
                if isinstance(entry, dict):
                    return str(entry["reply"]), float(entry.get("delay", 0))
                return str(entry), 0.0
        return "250 2.0.0 OK", 0.0


class _TrustedKeys:
    """The OAuth lab's public keys (kid → RSA key), reread when ``SmtpLab`` rewrites them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.version: object = None
        self.keys: dict[str, Any] = {}

    def current(self) -> dict[str, Any]:
        from joserfc.jwk import RSAKey

        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {"keys": {}, "version": None}
        if data.get("version") != self.version:
            self.version = data.get("version")
            self.keys = {
                kid: RSAKey.import_key(pem, {"kid": kid}) for kid, pem in data["keys"].items()
            }
        return self.keys


class TokenRefused(Exception):
    """Why an OAuth2 login fails (for the server's log; the client sees invalid_token)."""


def check_token(keys: dict[str, Any], token: str, user: str) -> str:
    """The ``sub`` of a valid access token for ``user``; ``TokenRefused`` otherwise.

    The same checks as Dovecot's local validation: RS256 by a trusted key, ``exp`` in the
    future, ``nbf`` and ``iat`` not in the future, and the login the client named must be the
    token's ``sub`` (a token for one mailbox must not open another).
    """
    from joserfc import jwt
    from joserfc.errors import JoseError
    from joserfc.jwk import KeySet

    if not keys:
        raise TokenRefused("no trusted OAuth keys: SmtpLab.trust_oauth() was not called")
    try:
        decoded = jwt.decode(token, KeySet(list(keys.values())), algorithms=["RS256"])
        jwt.JWTClaimsRegistry(
            exp={"essential": True}, sub={"essential": True, "value": user}
        ).validate(decoded.claims)
    except (JoseError, ValueError) as error:
        raise TokenRefused(f"{type(error).__name__}: {error}") from None
    return str(decoded.claims["sub"])


def parse_xoauth2(blob: bytes) -> tuple[str, str]:
    """``user=U^Aauth=Bearer T^A^A`` → (U, T)."""
    fields = dict(part.split("=", 1) for part in blob.decode("utf-8").split("\x01") if "=" in part)
    auth = fields.get("auth", "")
    if "user" not in fields or not auth.lower().startswith("bearer "):
        raise TokenRefused("malformed XOAUTH2 response")
    return fields["user"], auth[7:].strip()


def parse_oauthbearer(blob: bytes) -> tuple[str, str]:
    """RFC 7628: ``n,a=U,^Ahost=H^Aport=P^Aauth=Bearer T^A^A`` → (U, T)."""
    gs2, _, rest = blob.decode("utf-8").partition("\x01")
    user = ""
    for attribute in gs2.split(",")[1:]:
        if attribute.startswith("a="):
            user = attribute[2:].replace("=2C", ",").replace("=3D", "=")
    fields = dict(part.split("=", 1) for part in rest.split("\x01") if "=" in part)
    auth = fields.get("auth", "")
    if not user or not auth.lower().startswith("bearer "):
        raise TokenRefused("malformed OAUTHBEARER response (the lab needs a=<user>)")
    return user, auth[7:].strip()


def _refuse(server: Any, reply: str, hang_up: bool) -> str:
    """``reply`` for aiosmtpd to send. With ``hang_up`` it is written here and the connection
    closed at once (a transport sends what it holds first), before aiosmtpd answers any command
    the client sent after it (pipelined): those answers go nowhere."""
    if hang_up:
        server.transport.write(f"{reply}\r\n".encode())
        server.transport.close()
    return reply


class _Handler:
    def __init__(
        self, script: _Script, implicit_tls: bool, oauth_keys: _TrustedKeys, pipelining: bool
    ) -> None:
        self.script = script
        self.implicit_tls = implicit_tls
        self.oauth_keys = oauth_keys
        self.pipelining = pipelining

    # aiosmtpd's hooks: with ``handle_EHLO`` the handler names the client itself.
    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        refused = self.script.envelope_reply("MAIL", address)
        if refused:
            return _refuse(server, *refused)
        # What the client sent after MAIL FROM without waiting for its reply: already read.
        envelope.pipelined = bool(server._reader._buffer)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        refused = self.script.envelope_reply("RCPT", address)
        if refused:
            return _refuse(server, *refused)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    # aiosmtpd offers a handler's ``auth_<MECHANISM>(server, args)`` methods in EHLO and calls
    # them for AUTH; ``args`` is the AUTH line split (mechanism, initial response if any).
    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> Any:
        return await self._oauth(server, args, parse_xoauth2)

    async def auth_OAUTHBEARER(self, server: Any, args: list[str]) -> Any:
        return await self._oauth(server, args, parse_oauthbearer)

    async def _oauth(self, server: Any, args: list[str], parse: Any) -> Any:
        from aiosmtpd.smtp import MISSING, AuthResult

        if len(args) > 1:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        else:
            response = await server.challenge_auth("")
            if response is MISSING:  # aborted or undecodable; aiosmtpd has answered
                return AuthResult(success=False, handled=True)
            blob = response
        try:
            user, token = parse(blob)
            sub = check_token(self.oauth_keys.current(), token, user)
        except (TokenRefused, UnicodeDecodeError) as error:
            logging.getLogger(__name__).warning("OAuth2 login refused: %s", error)
            status = {"status": "invalid_token", "schemes": "Bearer", "scope": "mail"}
            answer = await server.challenge_auth(json.dumps(status))
            if answer is MISSING:
                return AuthResult(success=False, handled=True)
            return AuthResult(success=False, handled=False)  # 535 5.7.8
        return AuthResult(success=True, auth_data=sub)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply, delay = self.script.reply_for(list(envelope.rcpt_tos))
        if reply.startswith("250"):
            if reply.strip() == "250":
                reply = "250 2.0.0 OK"
            self.script.sequence += 1
            number = self.script.sequence
            store = self.script.store
            (store / f"{number}.eml").write_bytes(envelope.original_content)
            login = session.auth_data
            meta = {
                "mail_from": envelope.mail_from,
                "rcpt_tos": list(envelope.rcpt_tos),
                "login": login.decode() if isinstance(login, bytes) else login,
                "tls_port": self.implicit_tls,
                "pipelined": getattr(envelope, "pipelined", False),
            }
            temp = store / f"{number}.tmp"
            temp.write_text(json.dumps(meta))
            temp.replace(store / f"{number}.json")
        if delay:
            await asyncio.sleep(delay)
        return reply


def _serve(config: dict[str, Any]) -> None:
    from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

    users: dict[str, str] = config["users"]

    def authenticator(
        server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> Any:
        if isinstance(auth_data, LoginPassword):
            login = auth_data.login.decode("utf-8", "replace")
            password = auth_data.password.decode("utf-8", "replace")
            if users.get(login) == password:
                return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)

    class LabSMTP(SMTP):  # type: ignore[misc]
        """aiosmtpd with room for a token in ``AUTH XOAUTH2 <initial response>``.

        ``SMTP.__init__`` sizes its stream reader from the class's ``line_length_limit``; the
        instance then gets the RFC limit back for DATA (aiosmtpd checks each DATA line against
        it), and only AUTH may be longer than the usual 512-byte command.
        """

        line_length_limit = AUTH_LINE_LIMIT

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.line_length_limit = DATA_LINE_LIMIT
            self.command_size_limits["AUTH"] = AUTH_LINE_LIMIT

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config["cert"], config["key"])
    script = _Script(Path(config["store"]), Path(config["script"]))
    oauth_keys = _TrustedKeys(Path(config["oauth_keys"]))

    def factory(implicit: bool) -> Any:
        def make() -> Any:
            return LabSMTP(
                _Handler(script, implicit, oauth_keys, bool(config.get("pipelining"))),
                hostname="smtp.lab.test",
                tls_context=None if implicit else context,
                require_starttls=not implicit,
                authenticator=authenticator,
                auth_required=True,
                auth_require_tls=not implicit,
                data_size_limit=50 * 1024 * 1024,
                enable_SMTPUTF8=True,
            )

        return make

    async def main() -> None:
        loop = asyncio.get_running_loop()
        plain = await loop.create_server(factory(False), HOST, 0)
        secure = await loop.create_server(factory(True), HOST, 0, ssl=context)
        ports = {
            "port": plain.sockets[0].getsockname()[1],
            "tls_port": secure.sockets[0].getsockname()[1],
        }
        ready = Path(config["ready"])
        ready.with_suffix(".tmp").write_text(json.dumps(ports))
        ready.with_suffix(".tmp").replace(ready)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        plain.close()
        secure.close()

    asyncio.run(main())


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    config = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    with contextlib.suppress(KeyboardInterrupt):
        _serve(config)
    os._exit(0)


@contextlib.contextmanager
def running(certs: LabCertificates, users: dict[str, str], name: str = "smtp") -> Iterator[SmtpLab]:
    with SmtpLab(certs, users, name) as lab:
        yield lab


if __name__ == "__main__":
    main(sys.argv)
