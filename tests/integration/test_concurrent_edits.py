"""Two admins editing one server: If-Match protects a stale form; versions always go up."""

from __future__ import annotations

from tests.support.api import ApiClient


def test_stale_if_match_answers_412_and_changes_nothing(api: ApiClient) -> None:
    server = api.create(type="imap", name="v1", host="imap.example.com")
    path = f"/email-servers/{server['id']}"
    first = api.patch(path, {"name": "v2"}, headers={"If-Match": '"1"'})
    assert first.status_code == 200
    assert first.headers["ETag"] == '"2"'
    stale = api.patch(path, {"name": "lost update"}, headers={"If-Match": '"1"'})
    assert stale.status_code == 412
    assert stale.json()["current_version"] == 2
    assert api.get(path).json()["name"] == "v2"


def test_without_if_match_last_write_wins_and_version_increases(api: ApiClient) -> None:
    server = api.create(type="imap", name="v1", host="imap.example.com")
    path = f"/email-servers/{server['id']}"
    versions = [api.patch(path, {"name": f"n{i}"}).json()["version"] for i in range(3)]
    assert versions == [2, 3, 4]
    assert api.patch(path, {}).json()["version"] == 5
    assert api.get(path).json()["name"] == "n2"


def test_weak_and_bare_version_tags_are_understood(api: ApiClient) -> None:
    server = api.create(type="imap", name="v1", host="imap.example.com")
    path = f"/email-servers/{server['id']}"
    assert api.patch(path, {"name": "a"}, headers={"If-Match": 'W/"1"'}).status_code == 200
    assert api.patch(path, {"name": "b"}, headers={"If-Match": "2"}).status_code == 200
    assert api.patch(path, {"name": "c"}, headers={"If-Match": "banana"}).status_code == 400
