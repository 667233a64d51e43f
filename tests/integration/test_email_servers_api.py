"""The admin manages mail servers: list, create, read, change, delete (CONTRACT.md, HTTP API)."""

from __future__ import annotations

from tests.support.api import ApiClient
from tests.support.leaks import password


def test_openapi_lists_every_contract_call(api: ApiClient) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    expected = {
        "/api/v1/email-servers": {"get", "post"},
        "/api/v1/email-servers/{server_id}": {"get", "patch", "delete"},
        "/api/v1/email-servers/{server_id}/duplicate": {"post"},
        "/api/v1/email-servers/test": {"post"},
        "/api/v1/template-server": {"get", "put"},
        "/api/v1/routing-plans": {"get", "post"},
    }
    for path, methods in expected.items():
        assert methods <= set(paths[path]), path


def test_created_server_is_returned_with_defaults_and_without_its_password(api: ApiClient) -> None:
    server = api.create(
        type="imap",
        name="Support Posteingang",
        host="imap.example.com",
        username="support@example.com",
        password=password("create"),
    )
    assert server["type"] == "imap"
    assert server["tls"] is True
    assert server["port"] is None and server["effective_port"] == 993
    assert server["inbox_folder"] == "INBOX"
    assert server["disable_compression"] is False
    assert server["enabled"] is False
    assert server["auth_type"] == "basic"
    assert server["has_password"] is True
    assert "password" not in server
    assert server["version"] == 1
    assert api.get(f"/email-servers/{server['id']}").json() == server


def test_effective_port_follows_type_and_tls(api: ApiClient) -> None:
    expected = {
        ("imap", True): 993,
        ("imap", False): 143,
        ("pop3", True): 995,
        ("pop3", False): 110,
        ("smtp", True): 465,
        ("smtp", False): 587,
    }
    for (kind, tls), port in expected.items():
        server = api.create(type=kind, name=f"{kind} {tls}", host="mail.example.com", tls=tls)
        assert server["effective_port"] == port, (kind, tls)
    explicit = api.create(type="smtp", name="explicit", host="mail.example.com", port=2525)
    assert explicit["port"] == explicit["effective_port"] == 2525


def test_a_port_written_as_a_whole_number_with_a_fraction_is_that_integer(api: ApiClient) -> None:
    """JSON Schema's integer includes 1176.0, so the OpenAPI document promises to accept it."""
    server = api.create(type="smtp", name="out", host="smtp.example.com", port=1176.0)
    assert server["port"] == server["effective_port"] == 1176
    for refused in (1176.5, "1176", True):
        answer = api.post(
            "/email-servers", {"type": "smtp", "name": "o", "host": "h.de", "port": refused}
        )
        assert answer.status_code == 422 and answer.json()["detail"][0]["field"] == "port"


def test_list_holds_the_tenants_servers_and_filters_by_type(api: ApiClient) -> None:
    imap = api.create(type="imap", name="in", host="imap.example.com")
    smtp = api.create(type="smtp", name="out", host="smtp.example.com")
    all_ids = [s["id"] for s in api.get("/email-servers").json()["items"]]
    assert all_ids == [imap["id"], smtp["id"]]
    only_imap = api.get("/email-servers", params={"type": "imap"}).json()["items"]
    assert [s["id"] for s in only_imap] == [imap["id"]]
    assert api.get("/email-servers", params={"type": "fax"}).status_code == 422


def test_patch_changes_only_the_fields_sent_and_keeps_the_password(api: ApiClient) -> None:
    server = api.create(
        type="smtp",
        name="Ausgang",
        host="smtp.example.com",
        username="agent@example.com",
        password=password("keep"),
        sender_addresses=["noreply@example.com"],
    )
    changed = api.patch(f"/email-servers/{server['id']}", {"description": "Für Antworten"})
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert body["description"] == "Für Antworten"
    assert body["name"] == "Ausgang"
    assert body["sender_addresses"] == ["noreply@example.com"]
    assert body["has_password"] is True
    assert body["version"] == server["version"] + 1


def test_patch_with_null_password_removes_it(api: ApiClient) -> None:
    server = api.create(type="pop3", name="p", host="pop.example.com", password=password("rm"))
    body = api.patch(f"/email-servers/{server['id']}", {"password": None}).json()
    assert body["has_password"] is False


def test_deleted_server_is_gone(api: ApiClient) -> None:
    server = api.create(type="pop3", name="alt", host="pop.example.com")
    assert api.delete(f"/email-servers/{server['id']}").status_code == 204
    assert api.get(f"/email-servers/{server['id']}").status_code == 404
    assert api.delete(f"/email-servers/{server['id']}").status_code == 404


def test_unknown_or_malformed_ids_answer_404(api: ApiClient) -> None:
    assert api.get("/email-servers/00000000-0000-0000-0000-000000000000").status_code == 404
    assert api.get("/email-servers/not-a-uuid").status_code == 404
    assert api.patch("/email-servers/not-a-uuid", {"name": "x"}).status_code == 404


def test_routing_plans_are_listed_per_tenant(api: ApiClient) -> None:
    first = api.routing_plan("Vertrieb")
    second = api.routing_plan("Support")
    plans = api.get("/routing-plans").json()["items"]
    assert plans == [{"id": first, "name": "Vertrieb"}, {"id": second, "name": "Support"}]
