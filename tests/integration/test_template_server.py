"""Which SMTP server delivers template mail: one per tenant, SMTP only, default when none."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.support.api import ApiClient


def test_no_template_server_means_the_system_default(api: ApiClient) -> None:
    assert api.get("/template-server").json() == {"server_id": None}


def test_designating_a_server_moves_the_checkbox(api: ApiClient) -> None:
    first = api.create(type="smtp", name="a", host="smtp.example.com")
    second = api.create(type="smtp", name="b", host="smtp.example.com")
    assert api.put("/template-server", {"server_id": first["id"]}).json() == {
        "server_id": first["id"]
    }
    assert api.put("/template-server", {"server_id": second["id"]}).status_code == 200
    flags = {s["id"]: s["is_template_server"] for s in api.get("/email-servers").json()["items"]}
    assert flags == {first["id"]: False, second["id"]: True}
    assert api.get("/template-server").json() == {"server_id": second["id"]}


def test_is_template_server_on_create_or_patch_also_keeps_one(api: ApiClient) -> None:
    first = api.create(type="smtp", name="a", host="smtp.example.com", is_template_server=True)
    second = api.create(type="smtp", name="b", host="smtp.example.com")
    api.patch(f"/email-servers/{second['id']}", {"is_template_server": True})
    assert api.get(f"/email-servers/{first['id']}").json()["is_template_server"] is False
    assert api.get("/template-server").json() == {"server_id": second["id"]}


def test_only_an_smtp_server_can_deliver_template_mail(api: ApiClient) -> None:
    imap = api.create(type="imap", name="in", host="imap.example.com")
    response = api.put("/template-server", {"server_id": imap["id"]})
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "server_id"


def test_another_tenants_server_cannot_be_designated(api: ApiClient, other_api: ApiClient) -> None:
    theirs = other_api.create(type="smtp", name="theirs", host="smtp.example.com")
    response = api.put("/template-server", {"server_id": theirs["id"]})
    assert response.status_code == 404  # never reveal that it exists
    assert other_api.get(f"/email-servers/{theirs['id']}").json()["is_template_server"] is False


def test_deleting_the_template_server_falls_back_to_the_default(api: ApiClient) -> None:
    server = api.create(type="smtp", name="a", host="smtp.example.com", is_template_server=True)
    api.delete(f"/email-servers/{server['id']}")
    assert api.get("/template-server").json() == {"server_id": None}


def test_clearing_the_designation(api: ApiClient) -> None:
    server = api.create(type="smtp", name="a", host="smtp.example.com", is_template_server=True)
    assert api.put("/template-server", {"server_id": None}).json() == {"server_id": None}
    assert api.get(f"/email-servers/{server['id']}").json()["is_template_server"] is False


def test_concurrent_designations_leave_exactly_one_template_server(api: ApiClient) -> None:
    servers = [api.create(type="smtp", name=f"s{i}", host="smtp.example.com") for i in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(
            pool.map(lambda s: api.put("/template-server", {"server_id": s["id"]}), servers)
        )
    assert [a.status_code for a in answers] == [200] * 6
    flagged = [s for s in api.get("/email-servers").json()["items"] if s["is_template_server"]]
    assert len(flagged) == 1
    assert api.get("/template-server").json() == {"server_id": flagged[0]["id"]}
