"""Rules that relate several fields of a mail server (REQUIREMENTS.md, "Fields").

A PATCH sends only some fields, so the rules are checked on the server as it would be after
the change: :func:`merge` applies a request to the stored server (or to the defaults of a new
one) and either returns the column values to store or raises :class:`ServerRulesError` that
lists every offending field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr

from services.config_api import field_rules
from services.config_api.schemas import ServerFields
from shared.email_servers import (
    DEFAULT_INBOX_FOLDER,
    AuthType,
    EmailServer,
    Role,
    ServerType,
    effective_port,
)
from shared.hostnames import is_ip_literal
from shared.secrets import SecretBox

# Which server types each type-specific field belongs to.
_OWNER_TYPES: dict[str, frozenset[ServerType]] = {
    "inbox_folder": frozenset({ServerType.IMAP}),
    "sni_hostname": frozenset({ServerType.IMAP}),
    "disable_compression": frozenset({ServerType.IMAP}),
    "routing_plan_id": frozenset({ServerType.IMAP, ServerType.POP3}),
    "sender_addresses": frozenset({ServerType.SMTP}),
    "role": frozenset({ServerType.SMTP}),
    "is_template_server": frozenset({ServerType.SMTP}),
}
_TYPE_LABEL = {
    frozenset({ServerType.IMAP}): "IMAP servers",
    frozenset({ServerType.IMAP, ServerType.POP3}): "POP3 and IMAP servers",
    frozenset({ServerType.SMTP}): "SMTP servers",
}
_NOT_NULLABLE = ("name", "host", "tls", "auth_type")
# Where a stored password was typed for: it is sent to that host and port, with that TLS
# setting, as that user, and nowhere else.
PASSWORD_PLACE = ("host", "port", "tls", "username")


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str


@dataclass
class ServerRulesError(Exception):
    errors: list[FieldError]


@dataclass
class MergedServer:
    """The server's columns after the request, and what differs from before."""

    columns: dict[str, Any]
    changes: dict[str, Any] = field(default_factory=dict)
    changed_fields: set[str] = field(default_factory=set)  # API names: never a value
    new_password: str | None = field(default=None, repr=False)  # plaintext, for the test only


def defaults_for(server_type: ServerType) -> dict[str, Any]:
    imap = server_type is ServerType.IMAP
    smtp = server_type is ServerType.SMTP
    return {
        "type": server_type,
        "description": None,
        "port": None,
        "tls": True,
        "auth_type": AuthType.BASIC,
        "username": "",
        "password_encrypted": None,
        "reauthenticate_on_save": False,
        "inbox_folder": DEFAULT_INBOX_FOLDER if imap else None,
        "sni_hostname": None,
        "disable_compression": False if imap else None,
        "routing_plan_id": None,
        "sender_addresses": [],
        "enabled": False,
        "role": Role.AGENT if smtp else None,
        "is_template_server": False,
        "oauth_provider": None,
        "starttls_seen_at": None,
    }


def columns_of(server: EmailServer) -> dict[str, Any]:
    return {
        "type": server.type,
        "name": server.name,
        "description": server.description,
        "host": server.host,
        "port": server.port,
        "tls": server.tls,
        "auth_type": server.auth_type,
        "username": server.username,
        "password_encrypted": server.password_encrypted,
        "reauthenticate_on_save": server.reauthenticate_on_save,
        "inbox_folder": server.inbox_folder,
        "sni_hostname": server.sni_hostname,
        "disable_compression": server.disable_compression,
        "routing_plan_id": server.routing_plan_id,
        "sender_addresses": list(server.sender_addresses),
        "enabled": server.enabled,
        "role": server.role,
        "is_template_server": server.is_template_server,
        "oauth_provider": server.oauth_provider,
        "starttls_seen_at": server.starttls_seen_at,
    }


def _is_unset(value: Any) -> bool:
    """Values a generic form sends for a field it does not show: not a setting."""
    return value is None or value is False or value in ([], "")


def merge(
    current: EmailServer | None,
    request: ServerFields,
    *,
    server_type: ServerType,
    secret_box: SecretBox,
    oauth_provider_names: set[str],
) -> MergedServer:
    errors: list[FieldError] = []
    given = request.given()
    before = columns_of(current) if current else defaults_for(server_type)
    columns = dict(before)

    if current is not None and given.get("type") not in (None, current.type):
        errors.append(FieldError("type", "cannot be changed; create a new server instead"))
    given.pop("type", None)
    _drop_misplaced(given, server_type, errors)
    password_given = "password" in given
    new_password = _take_password(given, errors)

    defaults = defaults_for(server_type)
    for name, value in given.items():
        columns[name] = defaults[name] if value is None and name in defaults else value

    if columns["auth_type"] is AuthType.OAUTH2:
        _check_oauth2(columns, new_password, oauth_provider_names, errors)
    else:
        _check_basic(given, columns, errors)
        if password_given:
            columns["password_encrypted"] = (
                secret_box.encrypt(new_password) if new_password is not None else None
            )
        else:
            _check_password_place(before, columns, errors)
    _check_whole_server(columns, server_type, errors)
    if errors:
        raise ServerRulesError(errors)

    changes = {name: value for name, value in columns.items() if value != before.get(name)}
    changed_fields = set(changes) - {"password_encrypted"}
    if password_given or "password_encrypted" in changes:
        changed_fields.add("password")
    return MergedServer(
        columns=columns, changes=changes, changed_fields=changed_fields, new_password=new_password
    )


def _drop_misplaced(
    given: dict[str, Any], server_type: ServerType, errors: list[FieldError]
) -> None:
    """Refuse nulls for mandatory fields and values for fields of another server type."""
    for name in _NOT_NULLABLE:
        if name in given and given[name] is None:
            errors.append(FieldError(name, "must not be null"))
            given.pop(name)
    for name, owners in _OWNER_TYPES.items():
        if name not in given or server_type in owners:
            continue
        value = given.pop(name)  # never stored, not even an empty value
        if not _is_unset(value):
            errors.append(FieldError(name, f"applies to {_TYPE_LABEL[owners]} only"))


def _take_password(given: dict[str, Any], errors: list[FieldError]) -> str | None:
    password = given.pop("password", None)
    if not isinstance(password, SecretStr):
        return None
    plaintext = password.get_secret_value()
    if not field_rules.no_line_breaks(plaintext):
        errors.append(FieldError("password", "must not contain line breaks or NUL"))
        return None
    return plaintext


def _check_oauth2(
    columns: dict[str, Any],
    new_password: str | None,
    provider_names: set[str],
    errors: list[FieldError],
) -> None:
    if new_password is not None:
        errors.append(FieldError("password", "is used with basic authentication only"))
    columns["password_encrypted"] = None  # a server that moved to OAuth2 keeps no password
    provider = columns["oauth_provider"]
    if not provider:
        errors.append(FieldError("oauth_provider", "is required for OAuth2 authentication"))
    elif provider not in provider_names:
        known = ", ".join(sorted(provider_names))
        errors.append(
            FieldError("oauth_provider", f"{provider!r} is not a configured provider ({known})")
        )


def _check_basic(given: dict[str, Any], columns: dict[str, Any], errors: list[FieldError]) -> None:
    if given.get("reauthenticate_on_save"):
        errors.append(FieldError("reauthenticate_on_save", "applies to OAuth2 only"))
    if given.get("oauth_provider"):
        errors.append(FieldError("oauth_provider", "applies to OAuth2 only"))
    columns["reauthenticate_on_save"] = False
    columns["oauth_provider"] = None


def _place_of_password(columns: dict[str, Any]) -> dict[str, Any]:
    place = {name: columns[name] for name in PASSWORD_PLACE}
    place["port"] = effective_port(columns["type"], columns["tls"], columns["port"])
    return place


def _check_password_place(
    before: dict[str, Any], columns: dict[str, Any], errors: list[FieldError]
) -> None:
    """A stored password follows only the settings it was typed for.

    Changing the host, port, TLS or user without typing the password again would send the
    stored password to a place its owner never typed it for: whoever may edit the server could
    point it at a host of their own and read the password there. Such a change is refused and
    the stored password stays as it is; the admin types it again (or removes it) to save.
    """
    if before["password_encrypted"] is None or before["auth_type"] is not AuthType.BASIC:
        return
    old, new = _place_of_password(before), _place_of_password(columns)
    moved = [name for name in PASSWORD_PLACE if old[name] != new[name]]
    if moved:
        errors.append(
            FieldError(
                "password",
                f"is needed again: the {_words(moved)} changed, and a stored password is sent "
                "only to the host, port, TLS setting and user it was entered for; enter the "
                "password again (or remove it) to save this change",
            )
        )


def _words(names: list[str]) -> str:
    labels = {"host": "host", "port": "port", "tls": "TLS setting", "username": "user"}
    words = [labels[name] for name in names]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _check_whole_server(
    columns: dict[str, Any], server_type: ServerType, errors: list[FieldError]
) -> None:
    if (
        server_type is ServerType.IMAP
        and is_ip_literal(columns["host"])
        and not columns["sni_hostname"]
    ):
        errors.append(
            FieldError("sni_hostname", "is required when the host is an IP address (IMAP)")
        )
    if server_type.inbound and columns["enabled"] and not columns["routing_plan_id"]:
        errors.append(
            FieldError("routing_plan_id", "an enabled POP3/IMAP server needs a routing plan")
        )


def warnings_for(server: EmailServer) -> list[str]:
    """Advice from the source document's tips, shown with the server; never a refusal."""
    warnings = []
    if server.type is ServerType.POP3 and server.auth_type is AuthType.OAUTH2:
        warnings.append("OAuth2 is not recommended for POP3; if the provider allows, use IMAP.")
    if (
        server.type is ServerType.SMTP
        and not server.sender_addresses
        and not field_rules.looks_like_email_address(server.username)
    ):
        warnings.append(
            "The user is not an email address: add a sender address to send from this server."
        )
    return warnings
