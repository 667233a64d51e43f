"""``make run`` / ``mailroom dev``: the whole system on one machine, stopped with Ctrl-C.

Each service runs as its own ``mailroom run SERVICE`` process, as it would in its container,
so what works here works there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import FrameType

from shared.db.migrate import current_revision, migrate
from shared.preflight import ALL, DependencyUnavailable, problems
from shared.settings import Settings
from shared.tokens import MANAGE, mint_token

SERVICE_NAMES = ("config-api", "fetcher", "sender", "status")
# On a developer's machine the mail servers are local ones (a Dovecot, a test SMTP sink):
# loopback is allowed unless the developer says otherwise. Production denies it.
DEV_ALLOWED_NETWORKS = "127.0.0.0/8,::1/128"
READY_TIMEOUT_SECONDS = 30.0


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - our own loopback URL
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(children: dict[str, subprocess.Popen[bytes]]) -> None:
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for child in children.values():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()


def run_stack(settings: Settings, tenant: str) -> int:
    found = problems(settings, ALL)
    if found:
        raise DependencyUnavailable("\n".join(found))
    settings.token_key  # noqa: B018 - creates the development keys before the services race to
    migrate(settings.database_url)
    print(f"database schema at revision {current_revision(settings.database_url)}", flush=True)

    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    environment = {"MAILROOM_ALLOWED_NETWORKS": DEV_ALLOWED_NETWORKS, **os.environ}
    children = {
        name: subprocess.Popen([sys.executable, "-m", "shared.cli", "run", name], env=environment)
        for name in SERVICE_NAMES
    }
    api = f"http://{settings.api_host}:{settings.api_port}"
    status = f"http://{settings.status_host}:{settings.status_port}"
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not (_healthy(f"{api}/healthz") and _healthy(f"{status}/healthz")):
        dead = [name for name, child in children.items() if child.poll() is not None]
        if dead or stopping or time.monotonic() > deadline:
            _stop(children)
            why = f"{', '.join(dead)} exited" if dead else "not healthy in time"
            print(
                f"mailroom: the system did not come up ({why}); see the log above", file=sys.stderr
            )
            return 1
        time.sleep(0.3)

    token = mint_token(
        settings.token_key,
        tenant_id=tenant,
        permissions=[MANAGE],
        subject="make-run",
        ttl_seconds=settings.default_token_ttl_seconds,
    )
    print(
        "\nMailroom is running. Ctrl-C stops it.\n"
        f"  config API      {api}/api/v1   (OpenAPI: {api}/docs, {api}/openapi.json)\n"
        f"  status service  {status}       (health: {status}/healthz)\n"
        f"  metrics         {api}/metrics  {status}/metrics\n"
        f"  admin token for tenant {tenant!r} (email_servers:manage, 24 h):\n\n{token}\n\n"
        f"  try: curl -H 'Authorization: Bearer <token>' {api}/api/v1/email-servers\n",
        flush=True,
    )
    while not stopping:
        dead = [name for name, child in children.items() if child.poll() is not None]
        if dead:
            print(
                f"mailroom: {', '.join(dead)} stopped unexpectedly; stopping the rest",
                file=sys.stderr,
            )
            _stop(children)
            return 1
        time.sleep(0.5)
    print("\nstopping…", flush=True)
    _stop(children)
    print("stopped.", flush=True)
    return 0
