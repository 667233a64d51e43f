"""Pure rules of the server model: default ports, copy names, host names, config events."""

from __future__ import annotations

import pytest

from services.config_api.email_server_service import copy_name
from shared.contracts import ConfigEvent
from shared.email_servers import ServerType, effective_port
from shared.hostnames import is_ip_literal, to_ascii


@pytest.mark.parametrize(
    ("server_type", "tls", "port"),
    [
        (ServerType.IMAP, True, 993),
        (ServerType.IMAP, False, 143),
        (ServerType.POP3, True, 995),
        (ServerType.POP3, False, 110),
        (ServerType.SMTP, True, 465),
        (ServerType.SMTP, False, 587),
    ],
)
def test_default_port_by_type_and_tls(server_type: ServerType, tls: bool, port: int) -> None:
    assert effective_port(server_type, tls, None) == port
    assert effective_port(server_type, tls, 2525) == 2525


def test_copy_name_marks_the_copy_and_keeps_the_limit() -> None:
    assert copy_name("Support") == "Support (copy)"
    long = copy_name("é" * 200)
    assert len(long) == 200 and long.endswith(" (copy)")


def test_internationalised_host_names_become_a_labels() -> None:
    assert to_ascii("mail.bücher.de") == "mail.xn--bcher-kva.de"
    assert to_ascii("[::1]") == "::1"
    assert is_ip_literal("10.0.0.5") and is_ip_literal("[2001:db8::1]")
    assert not is_ip_literal("mail.example.com")
    with pytest.raises(ValueError):
        to_ascii("bad host")


def test_config_event_round_trips_through_json() -> None:
    event = ConfigEvent(
        change="updated",
        tenant_id="acme",
        server_id="s1",
        server_type=ServerType.POP3,
        version=7,
        enabled=True,
        changed_fields=("host",),
    )
    again = ConfigEvent.model_validate_json(event.model_dump_json())
    assert again == event
    assert again.routing_key == "email_server.updated"
    assert event.schema_version == 1
