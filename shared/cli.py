"""``mailroom``: the operator's command line (CONTRACT.md, "Running it")."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from shared.settings import KeysMissing, Settings, get_settings

SERVICES: dict[str, str] = {
    "config-api": "services.config_api.main",
    "fetcher": "services.fetcher.main",
    "sender": "services.sender.main",
    "status": "services.status.main",
}


def _token(args: argparse.Namespace, settings: Settings) -> int:
    from shared.tokens import KNOWN_PERMISSIONS, mint_token

    unknown = set(args.permission) - KNOWN_PERMISSIONS
    if unknown:
        print(
            f"unknown permission(s): {', '.join(sorted(unknown))}; known: "
            f"{', '.join(sorted(KNOWN_PERMISSIONS))}",
            file=sys.stderr,
        )
        return 2
    print(
        mint_token(
            settings.token_key,
            tenant_id=args.tenant,
            permissions=args.permission,
            subject=args.subject,
            ttl_seconds=args.ttl or settings.default_token_ttl_seconds,
        )
    )
    return 0


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from shared.db.migrate import current_revision, migrate
    from shared.preflight import POSTGRES, DependencyUnavailable, problems

    found = problems(settings, (POSTGRES,))
    if found:
        raise DependencyUnavailable("\n".join(found))
    migrate(settings.database_url)
    print(f"database schema at revision {current_revision(settings.database_url)}")
    return 0


def _run(args: argparse.Namespace, settings: Settings) -> int:
    import importlib

    module = importlib.import_module(SERVICES[args.service])
    run: Callable[[Settings], None] = module.run
    run(settings)
    return 0


def _dev(args: argparse.Namespace, settings: Settings) -> int:
    from shared.dev_stack import run_stack

    return run_stack(settings.model_copy(update={"generate_dev_keys": True}), tenant=args.tenant)


def _rotate_keys(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg
    from psycopg.rows import dict_row

    from shared.db.key_rotation import rotate_all
    from shared.preflight import POSTGRES, require
    from shared.secrets import SecretBox

    require(settings, (POSTGRES,))
    with psycopg.connect(settings.database_url, row_factory=dict_row) as conn:
        count = rotate_all(conn, SecretBox.from_settings(settings))
    print(f"re-encrypted {count} secrets under the newest key")
    return 0


def _encrypt_secret(args: argparse.Namespace, settings: Settings) -> int:
    """For ``client_secret_encrypted`` in MAILROOM_OAUTH_PROVIDERS: the plaintext is read from
    standard input (never a command-line argument, which other users can see)."""
    from shared.secrets import SecretBox

    plaintext = sys.stdin.readline().rstrip("\r\n")
    if not plaintext:
        print("mailroom: give the secret on standard input", file=sys.stderr)
        return 2
    print(SecretBox.from_settings(settings).encrypt(plaintext).decode())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailroom", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    token = commands.add_parser("token", help="print a bearer token for a tenant")
    token.add_argument("--tenant", required=True)
    token.add_argument(
        "--permission",
        action="append",
        required=True,
        help="email_servers:manage or email_servers:read; repeatable",
    )
    token.add_argument("--subject", default="cli", help="who the token speaks for (audit log)")
    token.add_argument("--ttl", type=int, default=0, help="seconds until it expires")
    token.set_defaults(handler=_token)

    migrate = commands.add_parser("migrate", help="apply the database migrations")
    migrate.set_defaults(handler=_migrate)

    run = commands.add_parser("run", help="run one service in the foreground")
    run.add_argument("service", choices=sorted(SERVICES))
    run.set_defaults(handler=_run)

    dev = commands.add_parser("dev", help="migrate and run all services (make run)")
    dev.add_argument("--tenant", default="demo", help="tenant of the printed admin token")
    dev.set_defaults(handler=_dev)

    rotate = commands.add_parser("rotate-keys", help="re-encrypt secrets under the newest key")
    rotate.set_defaults(handler=_rotate_keys)

    encrypt = commands.add_parser(
        "encrypt-secret",
        help="encrypt a secret read from stdin with the installation's key (for an OAuth2 "
        "provider's client_secret_encrypted)",
    )
    encrypt.set_defaults(handler=_encrypt_secret)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from shared.logging_setup import configure_logging
    from shared.oauth.providers import ProviderConfigError
    from shared.preflight import DependencyUnavailable

    args = build_parser().parse_args(argv)
    settings = get_settings()
    if args.command not in ("token", "encrypt-secret"):
        configure_logging(settings.log_level)
    try:
        return int(args.handler(args, settings))
    except (DependencyUnavailable, KeysMissing, ProviderConfigError) as exc:
        print(f"mailroom: cannot start:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
