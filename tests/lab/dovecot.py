"""A private Dovecot instance for tests and benchmarks: IMAP and POP3 on loopback.

``DovecotLab`` writes its own configuration into a temporary directory and runs
``dovecot -F -c FILE`` (in the foreground, as a child of the test process) with its own
``instance_name``, ``base_dir``, ``state_dir`` and log, on free unprivileged ports of
127.0.0.1 only. It never touches the system's Dovecot (which ``scripts/install-mail-lab``
keeps stopped). As root, mail belongs to the system user ``mailroom-lab`` (Dovecot wants a
non-root uid, by default >= 500); as an ordinary user, every process runs as that user.

What it serves:

- IMAP on ``imap_port`` (plain, STARTTLS offered) and ``imaps_port`` (implicit TLS);
  POP3 on ``pop3_port`` (plain, STLS offered) and ``pop3s_port`` (implicit TLS).
  ``disable_plaintext_auth = no``, so the plain ports accept LOGIN/USER without TLS.
- TLS with the lab CA (``tests.lab.certs``): the default certificate is for ``localhost`` and
  ``127.0.0.1``; SNI ``mail.lab.test`` gets that name's certificate; SNI
  ``mismatch.lab.test`` gets the certificate for ``wrong.example`` (a certificate failure).
- IDLE, and COMPRESS=DEFLATE (``imap_zlib``) after login.
- Users from a passwd-file, Maildir under the lab's directory, each with a folder named
  ``Eingang Ü`` (``"Eingang &ANw-"`` in modified UTF-7 on the wire).

Admin helpers (``append``, ``count``, ``flags``, ...) run ``doveadm -c FILE``; they need the
instance running (doveadm asks its auth service for the user).

Failed logins: Dovecot's auth penalty delays further logins from the same source address
(2 s, doubling up to 15 s), even with ``auth_failure_delay = 0`` and
``login_trusted_networks``; a failed login itself is answered after up to 0.5 s (the auth
process flushes failures on a 0.5 s timer). The lab switches the penalty off by default
(``auth_penalty=False`` disables the ``anvil-auth-penalty`` socket with ``mode = 0``), so a
wrong-password test does not slow down the tests after it. With ``auth_penalty=True`` (a
test of the client's backoff against a real penalty), negative tests should connect from
their own source address, e.g. ``127.0.0.2`` (bind the client socket to
``(f"127.0.0.{n}", 0)``; any 127.0.0.x reaches 127.0.0.1 on Linux), or use a fresh lab.

Line ends: Dovecot stores mail with LF line ends (``mail_save_crlf = no``) and IMAP returns
CRLF, so a mail with CRLF line ends comes back byte-identical; one with bare LF comes back
with CRLF.
"""

from __future__ import annotations

import contextlib
import grp
import imaplib
import os
import pwd
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from tests.lab.certs import LabCertificates
from tests.support.leaks import password

if TYPE_CHECKING:
    from tests.lab.oauth_server import OAuthLab

HOST = "127.0.0.1"
NON_ASCII_FOLDER = "Eingang Ü"
NON_ASCII_FOLDER_WIRE = "Eingang &ANw-"
LAB_USER = "mailroom-lab"
INSTALL_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install-mail-lab"
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
# Processes that hold client connections (a login process proxies TLS sessions).
_SESSION_SERVICES = frozenset({"imap", "pop3", "imap-login", "pop3-login"})


class LabError(RuntimeError):
    """The lab could not be installed, started, stopped or administered."""


@dataclass(frozen=True)
class LabUser:
    name: str
    password: str


def find_program(name: str) -> str | None:
    """``name`` on PATH or in the sbin directories (often missing from a user's PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in _SBIN:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def ensure_installed() -> None:
    """Run ``scripts/install-mail-lab`` when Dovecot (or, as root, the lab user) is missing.

    Raises ``LabError`` when the lab still cannot run afterwards: a missing Dovecot fails the
    tests that need it, it never skips them.
    """
    if _installed():
        return
    result = subprocess.run(
        [str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=600, check=False
    )
    if result.returncode != 0 or not _installed():
        raise LabError(
            f"{INSTALL_SCRIPT} could not install the mail lab "
            f"(exit {result.returncode}):\n{result.stdout}{result.stderr}"
        )


def _installed() -> bool:
    programs = find_program("dovecot") and find_program("doveadm")
    if not programs:
        return False
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(LAB_USER)
        except KeyError:
            return False
    return Path("/usr/lib/dovecot/imap").exists() and Path("/usr/lib/dovecot/pop3").exists()


def free_ports(count: int) -> list[int]:
    """Distinct unprivileged ports on 127.0.0.1 that nothing listens on right now. All probes
    stay bound until each has its port: the kernel hands a port just released out again, and
    one at a time four calls once gave Dovecot the same port twice ("duplicate listener")."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind((HOST, 0))
        return [int(probe.getsockname()[1]) for probe in probes]


def free_port() -> int:
    """An unprivileged port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def port_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class DovecotLab:
    """A private Dovecot instance; a context manager that starts it and stops it.

    ``start()`` and ``stop()`` may be called again (a server going down and coming back on
    the same ports, with its mail kept). ``close()`` stops it and removes its directory.
    """

    def __init__(
        self,
        certs: LabCertificates,
        *,
        root: Path | None = None,
        keep_root: bool = False,
        auth_penalty: bool = False,
    ) -> None:
        self.certs = certs
        self.auth_penalty = auth_penalty
        self._owns_root = root is None and not keep_root
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="mail-lab-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # Dovecot's unprivileged processes walk through it.
        self.host = HOST
        self.imap_port, self.imaps_port, self.pop3_port, self.pop3s_port = free_ports(4)
        self.instance_name = f"mailroom-lab-{secrets.token_hex(4)}"
        self.config_path = self.root / "dovecot.conf"
        self.log_path = self.root / "dovecot.log"
        self.users_dir = self.root / "users"
        self.base_dir = self.root / "run"
        self.state_dir = self.root / "state"
        self.home_dir = self.root / "home"
        self.users: dict[str, LabUser] = {}
        self._uid, self._gid, self._os_user = _mail_owner()
        self._serial = 0
        self._master: subprocess.Popen[bytes] | None = None
        self.home_dir.mkdir(exist_ok=True)
        self.home_dir.chmod(0o755)
        self.users_dir.mkdir(exist_ok=True)
        self.users_dir.chmod(0o755)
        self.oauth_keys_dir = self.root / "oauth-keys"
        self.oauth_keys_dir.mkdir(exist_ok=True)
        self.oauth_keys_dir.chmod(0o755)
        self.oauth2_config_path = self.root / "oauth2.conf"
        self.oauth2_config_path.write_text(self._oauth2_config(), encoding="utf-8")
        self.oauth2_config_path.chmod(0o644)
        self.config_path.write_text(self._config(), encoding="utf-8")

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def ports(self) -> dict[str, int]:
        return {
            "imap": self.imap_port,
            "imaps": self.imaps_port,
            "pop3": self.pop3_port,
            "pop3s": self.pop3s_port,
        }

    @property
    def pid_path(self) -> Path:
        return self.base_dir / "master.pid"

    def pid(self) -> int | None:
        """The master process id while the instance runs, else ``None``."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    @property
    def running(self) -> bool:
        return self.pid() is not None

    def start(self, timeout: float = 10.0) -> None:
        """Start the instance and wait until all four ports accept connections."""
        if self.running:
            return
        dovecot = find_program("dovecot")
        if dovecot is None:
            raise LabError("dovecot is not installed: run scripts/install-mail-lab")
        # In the foreground (-F) the master is our child: we learn at once if it exits and
        # reap it after stop() (as a daemon it is orphaned, and an init that does not reap
        # leaves it a zombie). Its output goes to a file, never to a pipe of ours: every
        # process it starts would inherit the pipe and keep it open.
        startup_log = self.root / "startup.log"
        with startup_log.open("ab") as output:
            self._master = subprocess.Popen(
                [dovecot, "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,  # Ctrl-C in the terminal reaches the tests only
            )
        deadline = time.monotonic() + timeout
        while not self._ready():
            code = self._master.poll()
            if code is not None:
                raise LabError(
                    f"dovecot -F -c {self.config_path} exited with {code}:\n"
                    + startup_log.read_text(errors="replace")
                    + self._log_tail()
                )
            if time.monotonic() > deadline:
                raise LabError(f"dovecot did not open its ports {self.ports}\n{self._log_tail()}")
            time.sleep(0.01)

    def _ready(self) -> bool:
        """Listening on every port, auth answering, and the master has not given up."""
        master = self._master
        return (
            master is not None
            and master.poll() is None
            and self.pid() == master.pid
            and (self.base_dir / "auth-userdb").exists()
            and all(port_open(port) for port in self.ports.values())
            and master.poll() is None
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the instance, drop its client connections, wait until its ports refuse.

        Sent SIGTERM alone, Dovecot's master waits up to 5 s for login processes that still
        proxy sessions, then SIGQUITs what is left and sleeps 1 s. So the lab also sends
        SIGTERM, by pid, to the master's session processes (``imap``, ``pop3``,
        ``*-login``): clients see ``* BYE Server shutting down.`` or EOF, and the master
        exits after about 1 s, having reaped all its children. Mail on disk stays;
        ``start()`` serves it again on the same ports.
        """
        pid = self.pid()
        members: dict[int, str] = {}  # pid → start time: the processes to wait for
        if pid is not None:
            members = {
                child: started
                for child, started in _children(pid).items()
                if _service_name(child) in _SESSION_SERVICES
            }
            master_started = _start_time(pid)
            if master_started is not None:
                members[pid] = master_started
            for member in (pid, *members):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(_start_time(p) == t for p, t in members.items()) or any(
            port_open(port) for port in self.ports.values()
        ):
            if time.monotonic() > deadline:
                raise LabError(f"dovecot (pid {pid}) did not stop\n{self._log_tail()}")
            if self._master is not None:
                self._master.poll()  # reap the master as soon as it exits
            time.sleep(0.01)
        if self._master is not None:
            self._master.wait(timeout)
            self._master = None

    def close(self) -> None:
        """Stop the instance and, if the lab created its directory, remove it."""
        try:
            self.stop()
        finally:
            if self._owns_root:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> DovecotLab:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- users -----------------------------------------------------------------------------

    def add_user(self, name: str, password: str) -> LabUser:
        """Add a user (running or not); it can log in at once.

        Each user has its own passwd-file (``users/<name>``): Dovecot checks a passwd-file
        for changes at most once a second, but opens a file it has not seen yet on the
        first lookup. A changed password of an existing user may therefore take a second.
        """
        if (
            not name
            or name.startswith(".")
            or any(c in name for c in ":/%\n\t ")
            or any(c in password for c in ":\n")
        ):
            raise ValueError(f"unusable lab user name or password for {name!r}")
        home = self.home_dir / name
        home.mkdir(exist_ok=True)
        os.chown(home, self._uid, self._gid)
        home.chmod(0o700)
        user = LabUser(name, password)
        self.users[name] = user
        line = f"{name}:{{PLAIN}}{password}:{self._uid}:{self._gid}::{home}\n"
        staged = self.users_dir / f".{name}.new"
        staged.write_text(line, encoding="utf-8")
        staged.chmod(0o644)
        staged.replace(self.users_dir / name)  # atomic: a login never sees half a file
        return user

    def new_user(self, prefix: str = "user") -> LabUser:
        """A user with a name and password no other test uses.

        The password carries the suite's secret marker, so the leak check would catch it in
        any log, answer or event.
        """
        self._serial += 1
        name = f"{prefix}{self._serial}-{secrets.token_hex(3)}"
        return self.add_user(name, password(secrets.token_hex(4)))

    # -- OAuth2 ----------------------------------------------------------------------------

    def trust_oauth(self, lab: OAuthLab) -> None:
        """Accept the access tokens of ``lab`` (XOAUTH2 and OAUTHBEARER), running or not.

        Dovecot validates them locally (``introspection_mode = local``): RS256 signature with
        the key found at ``oauth-keys/<azp or default>/<alg>/<kid or default>``, ``exp`` in the
        future, and ``sub`` names the user (whom the passwd-file userdb must know, so tokens
        are for users of ``new_user()``). The lab's access tokens carry no ``azp``, so the
        keys go under ``default``; they also go under the client id, in case a later
        oauth2-mock-server adds ``azp``. Each key is written under its ``kid`` and as
        ``default`` (a token without ``kid``). Key files are read at each validation, so a
        running instance trusts the tokens at once.
        """
        keys = lab.public_keys_pem()
        if not keys:
            raise LabError("the OAuth lab has no RSA signing key")
        for owner in ("default", lab.client_id):
            directory = self.oauth_keys_dir / owner / "RS256"
            directory.mkdir(parents=True, exist_ok=True)
            for path in (self.oauth_keys_dir / owner, directory):
                path.chmod(0o755)
            names = {_escape_kid(kid): pem for kid, pem in keys.items()}
            names["default"] = next(iter(keys.values()))
            for name, pem in names.items():
                staged = directory / f".{name}.new"
                staged.write_bytes(pem)
                staged.chmod(0o644)
                staged.replace(directory / name)

    # -- mail ------------------------------------------------------------------------------

    def append(self, user: str, raw: bytes, folder: str = "INBOX") -> int:
        """Deliver ``raw`` into ``folder`` (``doveadm save``) and return its UID."""
        self.doveadm("save", "-u", user, "-m", folder, input=raw)
        return max(self.uids(user, folder))

    def count(self, user: str, folder: str = "INBOX") -> int:
        """Number of messages in ``folder``."""
        return int(self._status(user, folder, "messages"))

    def unseen(self, user: str, folder: str = "INBOX") -> int:
        """Number of messages without ``\\Seen``."""
        return int(self._status(user, folder, "unseen"))

    def uidvalidity(self, user: str, folder: str = "INBOX") -> int:
        return int(self._status(user, folder, "uidvalidity"))

    def uids(self, user: str, folder: str = "INBOX") -> list[int]:
        return sorted(self.flags(user, folder))

    def flags(self, user: str, folder: str = "INBOX") -> dict[int, frozenset[str]]:
        """UID → flags (``\\Seen``, ``\\Deleted``, keywords; never the session's ``\\Recent``)."""
        out = self.doveadm("-f", "tab", "fetch", "-u", user, "uid flags", "mailbox", folder, "all")
        result: dict[int, frozenset[str]] = {}
        for line in out.decode().splitlines()[1:]:  # the first line names the fields
            uid, _, flags = line.partition("\t")
            result[int(uid)] = frozenset(f for f in flags.split() if f != "\\Recent")
        return result

    def seen(self, user: str, folder: str = "INBOX") -> set[int]:
        """UIDs flagged ``\\Seen``."""
        return {uid for uid, flags in self.flags(user, folder).items() if "\\Seen" in flags}

    def set_uidvalidity(self, user: str, value: int, folder: str = "INBOX") -> None:
        """Give ``folder`` this UIDVALIDITY (another mailbox's, for a test that needs two
        mailboxes whose UIDs and UIDLs look alike)."""
        self.doveadm("mailbox", "update", "-u", user, "--uid-validity", str(value), folder)

    def served_by_imap(self, user: LabUser, folder: str = "INBOX") -> dict[int, bytes]:
        """UID → each mail as IMAP serves it (``BODY.PEEK[]``, plain imaplib, unbounded):
        what a fetched mail must be byte for byte."""
        client = imaplib.IMAP4(HOST, self.imap_port)
        try:
            client.login(user.name, user.password)
            client.select(_imap_quoted(folder), readonly=True)
            served: dict[int, bytes] = {}
            for uid in self.uids(user.name, folder):
                typ, data = client.uid("FETCH", str(uid), "(BODY.PEEK[])")
                literals = [part[1] for part in data if isinstance(part, tuple)]
                if typ != "OK" or len(literals) != 1:
                    raise LabError(f"UID FETCH {uid} answered {typ} {data!r:.200}")
                served[uid] = literals[0]
            return served
        finally:
            client.logout()

    def served_by_pop3(self, user: LabUser) -> list[bytes]:
        """Each mail as POP3 serves it (RETR read off a plain socket, dot-stuffing undone):
        what a fetched mail must be byte for byte. Nothing is deleted."""
        with socket.create_connection((HOST, self.pop3_port), timeout=30) as sock:
            lines = sock.makefile("rb")

            def command(line: str) -> bytes:
                sock.sendall(line.encode() + b"\r\n")
                answer = lines.readline()
                if not answer.startswith(b"+OK"):
                    raise LabError(f"POP3 {line.split(maxsplit=1)[0]} answered {answer!r:.200}")
                return answer

            lines.readline()  # greeting
            command(f"USER {user.name}")
            command(f"PASS {user.password}")
            count = int(command("STAT").split()[1])
            served = []
            for number in range(1, count + 1):
                command(f"RETR {number}")
                body = bytearray()
                while (line := lines.readline()) not in (b".\r\n", b""):
                    body += line[1:] if line.startswith(b".") else line
                served.append(bytes(body))
            command("QUIT")
            return served

    def expunge_all(self, user: str, folder: str = "INBOX") -> None:
        self.doveadm("expunge", "-u", user, "mailbox", folder, "all")

    def kick(self, user: str) -> None:
        """End ``user``'s sessions (the server dropped them); none open is fine too."""
        try:
            self.doveadm("kick", user)
        except LabError as exc:
            if "exit 68" not in str(exc):  # 68: no session of that user to kick
                raise

    def doveadm(self, *args: str, input: bytes | None = None) -> bytes:
        """Run ``doveadm -c FILE ARGS``; its stdout, or ``LabError`` with its stderr."""
        doveadm = find_program("doveadm")
        if doveadm is None:
            raise LabError("doveadm is not installed: run scripts/install-mail-lab")
        result = subprocess.run(
            [doveadm, "-c", str(self.config_path), *args],
            input=input,
            capture_output=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise LabError(
                f"doveadm {' '.join(args)} failed (exit {result.returncode}): "
                + result.stderr.decode(errors="replace").strip()
            )
        return result.stdout

    def _status(self, user: str, folder: str, field: str) -> str:
        out = self.doveadm("-f", "tab", "mailbox", "status", "-u", user, field, folder)
        rows = [line.split("\t") for line in out.decode().splitlines()]
        if len(rows) != 2 or field not in rows[0]:
            raise LabError(f"unexpected doveadm mailbox status output: {out!r}")
        return rows[1][rows[0].index(field)]

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no dovecot log)"
        return "dovecot log:\n" + "\n".join(text.splitlines()[-lines:])

    # -- configuration ---------------------------------------------------------------------

    def _oauth2_config(self) -> str:
        """The oauth2 passdb's settings: local JWT validation against ``oauth_keys_dir``."""
        return f"""# Generated by tests/lab/dovecot.py: the tokens of tests/lab/oauth_server.py.
introspection_mode = local
local_validation_key_dict = fs:posix:prefix={self.oauth_keys_dir}/
username_attribute = sub
"""

    def _config(self) -> str:
        c = self.certs
        unprivileged = os.geteuid() != 0
        if unprivileged:
            # One OS user for everything: no setuid, no chroot.
            privileges = f"""
default_internal_user = {self._os_user}
default_internal_group = {grp.getgrgid(self._gid).gr_name}
default_login_user = {self._os_user}
service auth-worker {{
  user = $default_internal_user
}}
"""
            login_chroot = "  chroot =\n"
        else:
            privileges = ""
            login_chroot = ""
        anvil = login_chroot
        if not self.auth_penalty:
            # mode 0: the socket is not created, so the auth process finds no penalty service.
            anvil += "  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n"
        penalty = f"service anvil {{\n{anvil}}}\n" if anvil else ""
        return f"""# Generated by tests/lab/dovecot.py: a private, loopback-only test instance.
instance_name = {self.instance_name}
base_dir = {self.base_dir}
state_dir = {self.state_dir}
log_path = {self.log_path}
protocols = imap pop3
listen = {HOST}
shutdown_clients = yes
{privileges}
auth_mechanisms = plain login xoauth2 oauthbearer
disable_plaintext_auth = no
auth_failure_delay = 0
auth_verbose = yes
{penalty}passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN username_format=%u {self.users_dir}/%u
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {self.oauth2_config_path}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.users_dir}/%u
}}
first_valid_uid = {min(self._uid, 500) or 1}
first_valid_gid = {min(self._gid, 500) or 1}

mail_location = maildir:~/Maildir
mail_max_userip_connections = 1000
namespace inbox {{
  inbox = yes
  separator = /
  mailbox "{NON_ASCII_FOLDER}" {{
    auto = subscribe
  }}
}}

ssl = yes
ssl_min_protocol = TLSv1.2
ssl_cert = <{c.localhost.cert}
ssl_key = <{c.localhost.key}
local_name {c.sni_name} {{
  ssl_cert = <{c.sni.cert}
  ssl_key = <{c.sni.key}
}}
local_name {c.mismatch_name} {{
  ssl_cert = <{c.wrong.cert}
  ssl_key = <{c.wrong.key}
}}

default_process_limit = 2000
default_client_limit = {_client_limit()}
protocol imap {{
  mail_plugins = $mail_plugins imap_zlib
}}
service imap-login {{
{login_chroot}  service_count = 0
  process_limit = 8
  inet_listener imap {{
    address = {HOST}
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = {HOST}
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service pop3-login {{
{login_chroot}  service_count = 0
  process_limit = 8
  inet_listener pop3 {{
    address = {HOST}
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    address = {HOST}
    port = {self.pop3s_port}
    ssl = yes
  }}
}}
"""


def _imap_quoted(folder: str) -> str:
    """A folder name as an IMAP quoted string (modified UTF-7 for the lab's folders)."""
    wire = NON_ASCII_FOLDER_WIRE if folder == NON_ASCII_FOLDER else folder
    return '"' + wire.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _escape_kid(kid: str) -> str:
    """A ``kid`` as a key file name.

    The lab's kids are hex digits, which Dovecot looks up unchanged. Dovecot escapes other
    characters (``/`` at least) in a way the lab does not reproduce: refuse them loudly.
    """
    if not kid or not all(c.isascii() and (c.isalnum() or c in "-_") for c in kid):
        raise LabError(f"unsupported key id for Dovecot's key files: {kid!r}")
    return kid


def _client_limit() -> int:
    """Connections per service: many (IDLE benchmarks), within this process's fd limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 8000
    return max(100, min(8000, soft - 64))


def _mail_owner() -> tuple[int, int, str]:
    """The uid, gid and name that own the lab's mail: ``mailroom-lab`` as root, else us."""
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam(LAB_USER)
        except KeyError:
            raise LabError(f"user {LAB_USER} is missing: run scripts/install-mail-lab") from None
    else:
        entry = pwd.getpwuid(os.geteuid())
    return entry.pw_uid, entry.pw_gid, entry.pw_name


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    return _start_time(pid) is not None


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rpartition(")")[2].split()


def _start_time(pid: int) -> str | None:
    """The start time of a live (not zombie) process: with the pid, its identity."""
    fields = _stat(pid)
    if fields is None or fields[0] in {"Z", "X"}:
        return None
    return fields[19]


def _service_name(pid: int) -> str | None:
    """The Dovecot service a process runs, from its title (``dovecot-INSTANCE/imap``)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (FileNotFoundError, ProcessLookupError, UnicodeDecodeError):
        return None
    return title.rpartition("/")[2].strip("[]")


def _children(parent: int) -> dict[int, str]:
    """The live children of ``parent`` (the processes Dovecot's master started)."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is not None and fields[1] == str(parent) and fields[0] not in {"Z", "X"}:
            found[int(entry.name)] = fields[19]
    return found
