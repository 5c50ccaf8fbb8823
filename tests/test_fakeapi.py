"""The fake OpenRouter keys API, checked over real HTTP on loopback with httpx."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from keyhygiene.fakeapi import Call, FakeOpenRouter, FakeServer, generate_organisation, load_scenario, serve

NOW = datetime(2026, 10, 15, 12, 0, tzinfo=UTC)  # a Thursday
MANAGEMENT_KEY = "sk-or-v1-mgmt-" + "5" * 50
# One TLS context for every client: building httpx's default one costs ~60 ms per client.
TLS = ssl.create_default_context()
KEY_FIELDS = {
    "hash",
    "name",
    "label",
    "disabled",
    "limit",
    "limit_remaining",
    "limit_reset",
    "include_byok_in_limit",
    "usage",
    "usage_daily",
    "usage_weekly",
    "usage_monthly",
    "byok_usage",
    "byok_usage_daily",
    "byok_usage_weekly",
    "byok_usage_monthly",
    "created_at",
    "updated_at",
    "expires_at",
    "creator_user_id",
    "workspace_id",
    "external_user",
    "last_used_at",
}


@pytest.fixture
def fake() -> FakeOpenRouter:
    fake = FakeOpenRouter(MANAGEMENT_KEY)
    fake.set_clock(NOW)
    fake.add_workspace("Default", id="00000000-0000-4000-8000-000000000001")
    return fake


@pytest.fixture
def base_url(fake: FakeOpenRouter) -> Iterator[str]:
    with serve(fake) as url:
        yield url


@pytest.fixture
def api(base_url: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {MANAGEMENT_KEY}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=10, verify=TLS) as client:
        yield client


@pytest.fixture
def anonymous(base_url: str) -> Iterator[httpx.Client]:
    """A client that sends no credential unless a test passes one."""
    with httpx.Client(base_url=base_url, timeout=10, verify=TLS) as client:
        yield client


def add_keys(fake: FakeOpenRouter, count: int, **kwargs: Any) -> list[str]:
    """``count`` keys created one minute apart (the last one newest); returns their hashes."""
    return [
        fake.add_key(f"key-{i}", created_at=NOW - timedelta(days=30) + timedelta(minutes=i), **kwargs)["hash"]
        for i in range(count)
    ]


def pages(api: httpx.Client, **params: Any) -> list[list[dict[str, Any]]]:
    """Every page of GET /keys, stepping offset by 100 until a short page."""
    result, offset = [], 0
    while True:
        response = api.get("/keys", params={**params, "offset": offset})
        assert response.status_code == 200, response.text
        page = response.json()["data"]
        result.append(page)
        if len(page) < 100:
            return result
        offset += 100


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == response.status_code
    error: dict[str, Any] = body["error"]
    return error


# ------------------------------------------------------------------ GET /keys


@pytest.mark.parametrize(
    ("count", "sizes"),
    [
        (0, [0]),
        (1, [1]),
        (99, [99]),
        (100, [100, 0]),
        (101, [100, 1]),
        (200, [100, 100, 0]),
        (250, [100, 100, 50]),
    ],
)
def test_pages_hold_100_keys_and_end_with_a_short_or_empty_page(
    fake: FakeOpenRouter, api: httpx.Client, count: int, sizes: list[int]
) -> None:
    hashes = add_keys(fake, count)

    listed = pages(api)

    assert [len(page) for page in listed] == sizes
    assert [key["hash"] for page in listed for key in page] == list(reversed(hashes))  # newest first


def test_list_envelope_is_data_only_and_limit_param_is_ignored(fake: FakeOpenRouter, api: httpx.Client) -> None:
    add_keys(fake, 150)

    body = api.get("/keys", params={"limit": 10}).json()

    assert set(body) == {"data"}
    assert len(body["data"]) == 100


def test_offset_past_the_end_is_an_empty_page(fake: FakeOpenRouter, api: httpx.Client) -> None:
    add_keys(fake, 3)
    assert api.get("/keys", params={"offset": 500}).json() == {"data": []}


@pytest.mark.parametrize("offset", ["-1", "abc", "", "1.5"])
def test_invalid_offset_is_400(api: httpx.Client, offset: str) -> None:
    response = api.get(f"/keys?offset={offset}")
    assert response.status_code == 400
    assert error_of(response)["message"]


def test_keys_created_at_the_same_instant_are_ordered_by_hash(fake: FakeOpenRouter, api: httpx.Client) -> None:
    hashes = [fake.add_key(f"k{i}", created_at=NOW, hash=f"{i:x}" * 64)["hash"] for i in (9, 3, 12, 1)]
    assert [key["hash"] for key in api.get("/keys").json()["data"]] == sorted(hashes)


def test_only_the_default_workspace_is_listed_without_workspace_id(fake: FakeOpenRouter, api: httpx.Client) -> None:
    other = fake.add_workspace("Production")["id"]
    default_keys = add_keys(fake, 3)
    other_keys = add_keys(fake, 2, workspace_id=other)

    default_listed = {key["hash"] for key in api.get("/keys").json()["data"]}
    other_listed = api.get("/keys", params={"workspace_id": other}).json()["data"]
    unknown = api.get("/keys", params={"workspace_id": "00000000-0000-4000-8000-00000000dead"})

    assert default_listed == set(default_keys)
    assert {key["hash"] for key in other_listed} == set(other_keys)
    assert {key["workspace_id"] for key in other_listed} == {other}
    assert unknown.status_code == 404
    assert error_of(unknown)["message"]


def test_disabled_and_expired_keys_are_hidden_unless_asked_for(fake: FakeOpenRouter, api: httpx.Client) -> None:
    active = fake.add_key("active", expires_at=NOW + timedelta(days=1))["hash"]
    disabled = fake.add_key("disabled", disabled=True)["hash"]
    expired = fake.add_key("expired", expires_at=NOW - timedelta(days=1))["hash"]
    expiring_now = fake.add_key("expires-this-instant", expires_at=NOW)["hash"]

    def listed(**params: str) -> set[str]:
        return {key["hash"] for key in api.get("/keys", params=params).json()["data"]}

    assert listed() == {active}
    assert listed(include_disabled="true") == {active, disabled}
    assert listed(include_expired="true") == {active, expired, expiring_now}
    assert listed(include_disabled="true", include_expired="true") == {active, disabled, expired, expiring_now}
    assert listed(include_disabled="false", include_expired="false") == {active}

    fake.advance(timedelta(days=2))
    assert listed() == set()


@pytest.mark.parametrize("value", ["True", "1", "yes", ""])
def test_boolean_filters_accept_only_lowercase_true_or_false(api: httpx.Client, value: str) -> None:
    assert api.get("/keys", params={"include_disabled": value}).status_code == 400
    assert api.get("/keys", params={"include_expired": value}).status_code == 400


def test_hidden_filters_page_over_visible_keys_only(fake: FakeOpenRouter, api: httpx.Client) -> None:
    visible = add_keys(fake, 150)
    for i in range(60):
        fake.add_key(f"off-{i}", disabled=True, created_at=NOW - timedelta(hours=i))

    listed = pages(api)

    assert [len(page) for page in listed] == [100, 50]
    assert {key["hash"] for page in listed for key in page} == set(visible)


def test_management_keys_never_appear_in_the_list(fake: FakeOpenRouter, api: httpx.Client) -> None:
    add_keys(fake, 2)
    regular = fake.add_regular_key(label="standalone")
    listed = json.dumps(pages(api, include_disabled="true", include_expired="true"))
    assert MANAGEMENT_KEY not in listed
    assert regular not in listed
    assert len(fake.keys) == 2


# ------------------------------------------------------------------ key objects


def test_key_objects_carry_every_documented_field(fake: FakeOpenRouter, api: httpx.Client) -> None:
    fake.add_key(
        "svc-billing-prod",
        limit=100,
        limit_reset="monthly",
        usage=40,
        usage_daily=1,
        usage_weekly=5,
        usage_monthly=25.5,
        creator_user_id="user_1",
        external_user="acme-1",
        last_used_at=NOW - timedelta(hours=1),
        expires_at=NOW + timedelta(days=10),
    )

    key = api.get("/keys").json()["data"][0]

    assert set(key) == KEY_FIELDS
    assert re.fullmatch(r"[0-9a-f]{64}", key["hash"])
    assert re.fullmatch(r"sk-or-v1-[0-9a-f]{3}\.\.\.[0-9a-f]{3}", key["label"])
    assert key["limit_remaining"] == 74.5  # the spec's example: 100 - 25.5 this month
    assert key["workspace_id"] == fake.default_workspace_id
    assert key["updated_at"] is None
    for name in ("created_at", "expires_at", "last_used_at"):
        assert datetime.fromisoformat(key[name]).tzinfo is not None


def test_timestamps_come_in_both_documented_styles(fake: FakeOpenRouter, api: httpx.Client) -> None:
    created = datetime(2025, 2, 19, 20, 52, 27, 363244, tzinfo=UTC)
    fake.add_key("micro", hash="0" + "a" * 63, created_at=created)
    fake.add_key("zulu", hash="f" + "a" * 63, created_at=created)

    by_name = {key["name"]: key for key in api.get("/keys").json()["data"]}

    assert by_name["micro"]["created_at"] == "2025-02-19T20:52:27.363244+00:00"
    assert by_name["zulu"]["created_at"] == "2025-02-19T20:52:27Z"


def test_omitted_and_extra_fields_emulate_other_api_versions(fake: FakeOpenRouter, api: httpx.Client) -> None:
    key_hash = add_keys(fake, 1)[0]
    fake.omit_fields = {"last_used_at", "expires_at", "workspace_id", "external_user", "creator_user_id"}
    fake.extra_fields = {"brand_new_field": {"x": 1}}

    listed = api.get("/keys").json()["data"][0]
    single = api.get(f"/keys/{key_hash}").json()["data"]

    for key in (listed, single):
        assert "last_used_at" not in key and "workspace_id" not in key
        assert key["brand_new_field"] == {"x": 1}
    assert "last_used_at" in fake.get(key_hash)  # type: ignore[operator]


# ------------------------------------------------------------------ workspaces


def test_workspaces_page_with_limit_and_total_count(fake: FakeOpenRouter, api: httpx.Client) -> None:
    fake.add_workspace("Production")
    fake.add_workspace("Research Lab")

    first = api.get("/workspaces", params={"limit": 2}).json()
    rest = api.get("/workspaces", params={"limit": 2, "offset": 2}).json()
    default_page = api.get("/workspaces").json()

    assert first["total_count"] == rest["total_count"] == 3
    assert [w["name"] for w in first["data"]] == ["Default", "Production"]
    assert [w["slug"] for w in rest["data"]] == ["research-lab"]
    assert len(default_page["data"]) == 3
    assert {"id", "name", "slug", "created_at"} <= set(first["data"][0])
    assert api.get("/workspaces", params={"limit": 101}).status_code == 400
    assert api.get("/workspaces", params={"offset": -1}).status_code == 400


def test_a_later_workspace_can_be_the_default(api: httpx.Client, fake: FakeOpenRouter) -> None:
    production = fake.add_workspace("Production", default=True)["id"]
    fake.add_key("in-production", workspace_id=production)
    assert fake.default_workspace_id == production
    assert [key["name"] for key in api.get("/keys").json()["data"]] == ["in-production"]


# ------------------------------------------------------------------ POST /keys


def test_create_returns_201_with_the_secret_next_to_data(fake: FakeOpenRouter, api: httpx.Client) -> None:
    response = api.post(
        "/keys",
        json={
            "name": "ci-runner-17",
            "limit": 25,
            "limit_reset": "weekly",
            "include_byok_in_limit": True,
            "expires_at": "2027-01-31T00:00:00Z",
            "creator_user_id": "user_9",
            "external": {"user": "acme-7", "api_key": "k" * 40},
            "some_future_field": True,
        },
    )

    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"data", "key"}
    secret, key = body["key"], body["data"]
    assert re.fullmatch(r"sk-or-v1-[0-9a-f]{64}", secret)
    assert set(key) == KEY_FIELDS
    assert key["name"] == "ci-runner-17"
    assert key["limit"] == key["limit_remaining"] == 25
    assert key["limit_reset"] == "weekly"
    assert key["include_byok_in_limit"] is True
    assert datetime.fromisoformat(key["expires_at"]) == datetime(2027, 1, 31, tzinfo=UTC)
    assert datetime.fromisoformat(key["created_at"]) == NOW
    assert key["updated_at"] is None
    assert key["external_user"] == "acme-7"
    assert key["workspace_id"] == fake.default_workspace_id
    assert api.get(f"/keys/{key['hash']}").json()["data"] == key


def test_the_secret_never_appears_in_key_objects(fake: FakeOpenRouter, api: httpx.Client) -> None:
    body = api.post("/keys", json={"name": "fresh"}).json()
    secret, key_hash = body["key"], body["data"]["hash"]
    hex_part = secret.removeprefix("sk-or-v1-")

    seen = [
        json.dumps(body["data"]),
        api.get(f"/keys/{key_hash}").text,
        api.get("/keys").text,
        api.patch(f"/keys/{key_hash}", json={"name": "renamed"}).text,
        json.dumps(fake.keys),
    ]

    for text in seen:
        assert secret not in text and hex_part not in text


def test_created_key_goes_to_the_requested_workspace(fake: FakeOpenRouter, api: httpx.Client) -> None:
    other = fake.add_workspace("Production")["id"]
    key = api.post("/keys", json={"name": "p", "workspace_id": other}).json()["data"]
    assert key["workspace_id"] == other
    assert api.get("/keys").json()["data"] == []


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": ""},
        {"name": 7},
        {"name": "x", "limit": "10"},
        {"name": "x", "limit": True},
        {"name": "x", "limit_reset": "yearly"},
        {"name": "x", "include_byok_in_limit": "yes"},
        {"name": "x", "expires_at": "2027-01-31T00:00Z"},  # minute precision
        {"name": "x", "expires_at": "2027-01-31T00:00:00+02:00"},  # not UTC
        {"name": "x", "expires_at": "2027-01-31T00:00:00"},  # no zone
        {"name": "x", "expires_at": "2027-01-31"},
        {"name": "x", "expires_at": "2026-10-01T00:00:00Z"},  # already past
        {"name": "x", "external": {"api_key": "k" * 40}},
        {"name": "x", "external": {"user": "u", "api_key": "short"}},
        {"name": "x", "workspace_id": "00000000-0000-4000-8000-00000000dead"},
    ],
)
def test_create_rejects_bad_bodies_with_400(fake: FakeOpenRouter, api: httpx.Client, body: dict[str, Any]) -> None:
    response = api.post("/keys", json=body)
    assert response.status_code == 400
    assert error_of(response)["message"]
    assert fake.keys == []


def test_create_rejects_a_body_that_is_not_json(fake: FakeOpenRouter, api: httpx.Client) -> None:
    response = api.post("/keys", content=b"{name:", headers={"Content-Type": "application/json"})
    assert response.status_code == 400


@pytest.mark.parametrize("expires_at", ["2027-01-31T00:00:00.5Z", "2027-01-31T00:00:00.123456+00:00"])
def test_create_accepts_fractional_seconds_and_plus_zero_offset(api: httpx.Client, expires_at: str) -> None:
    response = api.post("/keys", json={"name": "x", "expires_at": expires_at})
    assert response.status_code == 201
    stored = datetime.fromisoformat(response.json()["data"]["expires_at"])
    # The "...Z" style shows whole seconds only.
    assert abs(stored - datetime.fromisoformat(expires_at)) < timedelta(seconds=1)


# ------------------------------------------------------------------ PATCH /keys/{hash}


def test_update_changes_fields_and_sets_updated_at(fake: FakeOpenRouter, api: httpx.Client) -> None:
    key_hash = fake.add_key("old", limit=10, usage=4)["hash"]
    fake.advance(timedelta(hours=1))

    response = api.patch(
        f"/keys/{key_hash}",
        json={"name": "new", "disabled": True, "limit": 20, "limit_reset": None, "include_byok_in_limit": True},
    )

    assert response.status_code == 200
    key = response.json()["data"]
    assert (key["name"], key["disabled"], key["limit"], key["limit_remaining"]) == ("new", True, 20, 16)
    assert key["include_byok_in_limit"] is True
    assert datetime.fromisoformat(key["updated_at"]) == NOW + timedelta(hours=1)
    assert fake.get(key_hash) == key


def test_update_with_null_limit_removes_the_cap(fake: FakeOpenRouter, api: httpx.Client) -> None:
    key_hash = fake.add_key("capped", limit=10)["hash"]
    key = api.patch(f"/keys/{key_hash}", json={"limit": None}).json()["data"]
    assert key["limit"] is None and key["limit_remaining"] is None


def test_update_ignores_unknown_fields_including_expires_at(fake: FakeOpenRouter, api: httpx.Client) -> None:
    expiry = NOW + timedelta(days=5)
    key_hash = fake.add_key("k", expires_at=expiry)["hash"]

    response = api.patch(
        f"/keys/{key_hash}", json={"disabled": True, "expires_at": "2030-01-01T00:00:00Z", "colour": "red"}
    )

    assert response.status_code == 200
    assert datetime.fromisoformat(response.json()["data"]["expires_at"]) == expiry
    assert "colour" not in response.json()["data"]


@pytest.mark.parametrize("body", [{}, {"expires_at": "2030-01-01T00:00:00Z"}, {"colour": "red"}])
def test_update_without_accepted_fields_is_400(fake: FakeOpenRouter, api: httpx.Client, body: Any) -> None:
    key_hash = fake.add_key("k")["hash"]
    response = api.patch(f"/keys/{key_hash}", json=body)
    assert response.status_code == 400
    assert error_of(response)["message"] == "No update fields provided"
    assert fake.get(key_hash)["updated_at"] is None  # type: ignore[index]


@pytest.mark.parametrize(
    "body", [{"disabled": "true"}, {"name": ""}, {"limit": "5"}, {"limit_reset": "hourly"}, {"workspace_id": 3}]
)
def test_update_rejects_wrong_types_with_400(fake: FakeOpenRouter, api: httpx.Client, body: Any) -> None:
    key_hash = fake.add_key("k")["hash"]
    assert api.patch(f"/keys/{key_hash}", json=body).status_code == 400


def test_update_of_an_unknown_key_is_404(api: httpx.Client) -> None:
    response = api.patch("/keys/" + "e" * 64, json={"disabled": True})
    assert response.status_code == 404
    assert error_of(response)["message"] == "Resource not found"


def test_update_moves_a_key_between_workspaces(fake: FakeOpenRouter, api: httpx.Client) -> None:
    other = fake.add_workspace("Production")["id"]
    key_hash = add_keys(fake, 1)[0]

    moved = api.patch(f"/keys/{key_hash}", json={"workspace_id": other})
    to_nowhere = api.patch(f"/keys/{key_hash}", json={"workspace_id": "00000000-0000-4000-8000-00000000dead"})

    assert moved.json()["data"]["workspace_id"] == other
    assert api.get("/keys").json()["data"] == []
    assert [k["hash"] for k in api.get("/keys", params={"workspace_id": other}).json()["data"]] == [key_hash]
    assert to_nowhere.status_code == 404


# ------------------------------------------------------------------ GET and DELETE /keys/{hash}


def test_get_one_key_and_404_for_unknown(fake: FakeOpenRouter, api: httpx.Client) -> None:
    key = fake.add_key("one")
    assert api.get(f"/keys/{key['hash']}").json() == {"data": key}
    missing = api.get("/keys/" + "e" * 64)
    assert missing.status_code == 404
    assert error_of(missing)["message"] == "Resource not found"


def test_delete_is_for_good(fake: FakeOpenRouter, api: httpx.Client) -> None:
    key_hash = add_keys(fake, 2)[0]

    response = api.delete(f"/keys/{key_hash}")

    assert response.status_code == 200
    assert response.json() == {"deleted": True}
    assert api.get(f"/keys/{key_hash}").status_code == 404
    assert key_hash not in {k["hash"] for k in api.get("/keys", params={"include_disabled": "true"}).json()["data"]}
    assert api.delete(f"/keys/{key_hash}").status_code == 404
    assert fake.get(key_hash) is None


def test_unknown_paths_and_methods(api: httpx.Client) -> None:
    assert api.get("/nothing-here").status_code == 404
    assert api.put("/keys", json={}).status_code == 405


# ------------------------------------------------------------------ authentication


def test_missing_or_unknown_credentials_are_401(anonymous: httpx.Client) -> None:
    missing = anonymous.get("/keys")
    unknown = anonymous.get("/keys", headers={"Authorization": "Bearer sk-or-v1-nope"})
    assert missing.status_code == 401
    assert error_of(missing)["message"] == "Missing Authentication header"
    assert unknown.status_code == 401
    assert MANAGEMENT_KEY not in missing.text + unknown.text


def test_a_regular_key_cannot_manage_keys(fake: FakeOpenRouter, anonymous: httpx.Client) -> None:
    key_hash = add_keys(fake, 1)[0]
    regular = {"Authorization": f"Bearer {fake.add_regular_key(label='app key')}"}

    answers = [
        anonymous.get("/keys", headers=regular),
        anonymous.post("/keys", headers=regular, json={"name": "x"}),
        anonymous.get(f"/keys/{key_hash}", headers=regular),
        anonymous.patch(f"/keys/{key_hash}", headers=regular, json={"disabled": True}),
        anonymous.delete(f"/keys/{key_hash}", headers=regular),
        anonymous.get("/workspaces", headers=regular),
    ]

    for response in answers:
        assert response.status_code == 403
        assert error_of(response)["message"] == "Only management keys can perform this operation"
    assert fake.get(key_hash)["disabled"] is False  # type: ignore[index]


def test_get_key_tells_management_from_regular_keys(
    fake: FakeOpenRouter, api: httpx.Client, anonymous: httpx.Client
) -> None:
    regular = fake.add_regular_key(label="app key")

    management = api.get("/key").json()["data"]
    plain = anonymous.get("/key", headers={"Authorization": f"Bearer {regular}"}).json()["data"]

    assert management["is_management_key"] is True and management["is_provisioning_key"] is True
    assert plain["is_management_key"] is False and plain["is_provisioning_key"] is False
    assert plain["label"] == "app key"
    for data in (management, plain):
        assert {"label", "limit", "limit_remaining", "usage", "usage_monthly", "byok_usage", "rate_limit"} <= set(data)
        assert "hash" not in data and "name" not in data and "created_at" not in data


def test_get_key_describes_a_created_key_until_it_is_deleted(fake: FakeOpenRouter, api: httpx.Client) -> None:
    created = api.post("/keys", json={"name": "app", "limit": 5, "limit_reset": "daily"}).json()
    fake.record_use(created["data"]["hash"], 2.0)
    as_app = {"Authorization": f"Bearer {created['key']}"}

    data = api.get("/key", headers=as_app).json()["data"]
    api.delete(f"/keys/{created['data']['hash']}")

    assert (data["limit"], data["limit_remaining"], data["usage_daily"]) == (5, 3, 2)
    assert data["label"] == created["data"]["label"]
    assert api.get("/key", headers=as_app).status_code == 401


# ------------------------------------------------------------------ usage, limits and windows


def test_limit_remaining_follows_the_reset_window_and_byok(fake: FakeOpenRouter) -> None:
    common = {"usage": 50, "usage_daily": 2, "usage_weekly": 8, "usage_monthly": 20, "byok_usage_monthly": 5}
    lifetime = fake.add_key("lifetime", limit=60, **common)
    daily = fake.add_key("daily", limit=75, limit_reset="daily", **common)
    monthly_byok = fake.add_key("byok", limit=30, limit_reset="monthly", include_byok_in_limit=True, **common)
    spent = fake.add_key("spent", limit=15, limit_reset="monthly", **common)
    uncapped = fake.add_key("uncapped", **common)

    assert lifetime["limit_remaining"] == 10
    assert daily["limit_remaining"] == 73
    assert monthly_byok["limit_remaining"] == 5
    assert spent["limit_remaining"] == -5
    assert uncapped["limit_remaining"] is None


def test_advancing_the_clock_resets_windows_at_utc_boundaries(fake: FakeOpenRouter, api: httpx.Client) -> None:
    key_hash = fake.add_key(
        "k",
        limit=10,
        limit_reset="daily",
        usage=100,
        usage_daily=4,
        usage_weekly=9,
        usage_monthly=30,
        byok_usage=7,
        byok_usage_daily=1,
        byok_usage_weekly=2,
        byok_usage_monthly=3,
    )["hash"]

    def windows() -> tuple[float, ...]:
        key = api.get(f"/keys/{key_hash}").json()["data"]
        names = ("usage", "usage_daily", "usage_weekly", "usage_monthly", "byok_usage_daily", "limit_remaining")
        return tuple(key[name] for name in names)

    assert windows() == (100, 4, 9, 30, 1, 6)
    fake.advance(timedelta(hours=11, minutes=59))  # Thursday 23:59
    assert windows() == (100, 4, 9, 30, 1, 6)
    fake.advance(timedelta(minutes=1))  # Friday 00:00: a new day
    assert windows() == (100, 0, 9, 30, 0, 10)
    fake.record_use(key_hash, 3)
    assert windows() == (103, 3, 12, 33, 0, 7)
    fake.set_clock(datetime(2026, 10, 19, tzinfo=UTC))  # Monday: a new week
    assert windows() == (103, 0, 0, 33, 0, 10)
    fake.set_clock(datetime(2026, 11, 1, tzinfo=UTC))  # a new month
    assert windows() == (103, 0, 0, 0, 0, 10)


def test_a_listing_shows_every_change_since_the_previous_one(fake: FakeOpenRouter, api: httpx.Client) -> None:
    # The fake re-uses a key's JSON while nothing about it changed: no change may be missed, and
    # what one caller does to its copy must not show in the next listing.
    key_hash = fake.add_key("k", limit=10)["hash"]

    def listed() -> dict[str, Any]:
        return next(key for key in fake.keys if key["hash"] == key_hash)

    listed()["name"] = "scribbled on by a caller"
    assert listed()["name"] == "k"
    fake.record_use(key_hash, 2.5)
    assert (listed()["usage"], listed()["usage_daily"], listed()["limit_remaining"]) == (2.5, 2.5, 7.5)
    fake.record_use(key_hash, 1.0, at=NOW - timedelta(days=40))  # lifetime only: no window moves
    assert (listed()["usage"], listed()["usage_daily"], listed()["limit_remaining"]) == (3.5, 2.5, 6.5)
    assert api.patch(f"/keys/{key_hash}", json={"name": "renamed", "disabled": True}).status_code == 200
    assert (listed()["name"], listed()["disabled"]) == ("renamed", True)
    fake.advance(timedelta(days=1))
    assert (listed()["usage"], listed()["usage_daily"], listed()["usage_monthly"]) == (3.5, 0.0, 2.5)


def test_shared_keys_stay_the_same_objects_until_a_key_changes(fake: FakeOpenRouter, api: httpx.Client) -> None:
    # The demo compares the past days' keys by identity first: an object handed out must never
    # change afterwards, and a key that changed must come as a new object.
    used, renamed, quiet = (fake.add_key(name, limit=10)["hash"] for name in ("used", "renamed", "quiet"))

    def shared() -> dict[str, dict[str, Any]]:
        return {key["hash"]: key for key in fake.shared_keys()}

    before = shared()
    assert list(before.values()) == fake.keys
    fake.record_use(used, 2.5)
    assert api.patch(f"/keys/{renamed}", json={"name": "new name"}).status_code == 200
    after = shared()
    assert after[quiet] is before[quiet]
    assert after[used] is not before[used] and (before[used]["usage"], after[used]["usage"]) == (0.0, 2.5)
    assert after[renamed] is not before[renamed] and before[renamed]["name"] == "renamed"
    assert list(after.values()) == fake.keys
    fake.advance(timedelta(days=1))  # the used key's daily figure goes back to zero
    assert shared()[used] is not after[used] and after[used]["usage_daily"] == 2.5


def test_a_page_of_keys_is_its_keys_in_compact_json_after_every_change(fake: FakeOpenRouter, api: httpx.Client) -> None:
    # The fake encodes a key's JSON once while nothing about it changed: a page must still be
    # byte for byte what encoding its keys gives, whatever happened since the previous one.
    hashes = [fake.add_key(f"k{index}", limit=10)["hash"] for index in range(3)]

    def page() -> bytes:
        response = api.get("/keys", params={"include_disabled": "true", "include_expired": "true"})
        assert response.status_code == 200
        return response.content

    def encoded() -> bytes:
        keys = fake.list_page(fake.default_workspace_id, 0, include_disabled=True, include_expired=True)
        return json.dumps({"data": keys}, separators=(",", ":"), allow_nan=False).encode()

    assert page() == encoded() and len(json.loads(page())["data"]) == 3
    fake.record_use(hashes[0], 2.5)
    assert page() == encoded() and b'"usage":2.5,' in page()
    assert api.patch(f"/keys/{hashes[1]}", json={"name": "renamed", "disabled": True}).status_code == 200
    assert page() == encoded() and b'"name":"renamed"' in page()
    fake.advance(timedelta(days=1))  # the day's window figures go back to zero
    assert page() == encoded() and b'"usage_daily":0.0' in page()
    fake.omit_fields.add("label")
    fake.extra_fields["new_field"] = 1
    assert page() == encoded() and b'"label"' not in page() and page().count(b'"new_field":1') == 3


def test_record_use_updates_usage_and_last_used(fake: FakeOpenRouter) -> None:
    key_hash = fake.add_key("k", limit=50, include_byok_in_limit=True)["hash"]

    fake.record_use(key_hash, 1.5, byok_usd=0.5)
    fake.record_use(key_hash, 2.0, at=NOW - timedelta(days=40))  # last month: lifetime only

    key = fake.get(key_hash)
    assert key is not None
    assert (key["usage"], key["usage_daily"], key["usage_monthly"], key["byok_usage_weekly"]) == (3.5, 1.5, 1.5, 0.5)
    assert key["limit_remaining"] == 46  # lifetime 3.5 + byok 0.5
    assert datetime.fromisoformat(key["last_used_at"]) == NOW


def test_spend_adds_up_as_a_decimal_backed_api_answers_it(fake: FakeOpenRouter, api: httpx.Client) -> None:
    key_hash = fake.add_key("k", limit=1, usage=0.1)["hash"]

    fake.record_use(key_hash, 0.2, byok_usd=0.1)
    fake.record_use(key_hash, 0.0778, byok_usd=0.2)

    body = api.get(f"/keys/{key_hash}").json()["data"]
    # Binary float sums would give 0.37779999999999997 (0.1 + 0.2 + 0.0778) and 0.30000000000000004.
    assert (body["usage"], body["byok_usage"], body["usage_daily"]) == (0.3778, 0.3, 0.2778)
    assert body["limit_remaining"] == 0.6222


# ------------------------------------------------------------------ faults


def test_rate_limit_sends_429_with_retry_after_then_recovers(fake: FakeOpenRouter, api: httpx.Client) -> None:
    fake.faults.rate_limit(2, retry_after=1)
    fake.faults.rate_limit(1, retry_after=None)

    answers = [api.get("/keys") for _ in range(4)]

    assert [r.status_code for r in answers] == [429, 429, 429, 200]
    assert answers[0].headers["Retry-After"] == "1"
    assert "Retry-After" not in answers[2].headers
    error = error_of(answers[0])
    assert error["metadata"]["error_type"] == "rate_limit_exceeded"


def test_faults_can_target_one_path_and_method(fake: FakeOpenRouter, api: httpx.Client) -> None:
    fake.faults.rate_limit(2, retry_after=0.1, path="/keys", method="GET")

    workspaces = api.get("/workspaces")
    created = api.post("/keys", json={"name": "x"})
    first, second, third = (api.get("/keys") for _ in range(3))

    assert (workspaces.status_code, created.status_code) == (200, 201)
    assert (first.status_code, second.status_code, third.status_code) == (429, 429, 200)
    assert first.headers["Retry-After"] == "0.1"


def test_server_errors_come_in_order_after_other_faults(api: httpx.Client, fake: FakeOpenRouter) -> None:
    fake.faults.rate_limit(1)
    fake.faults.server_error(2, status=502)

    statuses = [api.get("/keys").status_code for _ in range(4)]

    assert statuses == [429, 502, 502, 200]
    assert [call.status for call in fake.calls] == statuses
    assert fake.faults.pending == 0


def test_malformed_answers_an_html_page_with_status_200(fake: FakeOpenRouter, api: httpx.Client) -> None:
    fake.faults.malformed(1)

    response = api.get("/keys")

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    with pytest.raises(json.JSONDecodeError):
        response.json()
    assert api.get("/keys").json() == {"data": []}


def test_truncated_body_is_cut_in_half_with_a_matching_length(fake: FakeOpenRouter, api: httpx.Client) -> None:
    add_keys(fake, 5)
    whole = api.get("/keys").content
    fake.faults.truncated(1)

    response = api.get("/keys")

    assert int(response.headers["Content-Length"]) == len(response.content) == len(whole) // 2
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_dropped_connection_gives_no_response(fake: FakeOpenRouter, api: httpx.Client) -> None:
    key_hash = add_keys(fake, 1)[0]
    fake.faults.drop_connection(1)
    fake.faults.drop_connection(1, after_processing=True, method="PATCH")

    with pytest.raises(httpx.TransportError):
        api.get("/keys")
    with pytest.raises(httpx.TransportError):
        api.patch(f"/keys/{key_hash}", json={"disabled": True})

    assert fake.get(key_hash)["disabled"] is True  # type: ignore[index]  # the lost answer's change stuck
    assert api.get("/keys").status_code == 200


def test_latency_is_added_to_every_request(fake: FakeOpenRouter, api: httpx.Client) -> None:
    fake.faults.latency = 0.15
    response = api.get("/keys")
    assert response.elapsed >= timedelta(seconds=0.15)


def test_max_in_flight_counts_concurrent_requests(fake: FakeOpenRouter, base_url: str) -> None:
    fake.faults.latency = 0.3
    headers = {"Authorization": f"Bearer {MANAGEMENT_KEY}"}
    barrier = threading.Barrier(5)

    def call() -> None:
        with httpx.Client(headers=headers, timeout=10, verify=TLS) as client:
            barrier.wait()
            client.get(f"{base_url}/keys")

    threads = [threading.Thread(target=call) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert fake.max_in_flight == 5
    assert fake.request_count == 5


def test_sequential_requests_never_overlap(fake: FakeOpenRouter, api: httpx.Client) -> None:
    for _ in range(5):
        api.get("/keys")
    assert fake.max_in_flight == 1
    assert fake.request_count == 5


def test_list_page_callback_can_change_keys_between_pages(fake: FakeOpenRouter, api: httpx.Client) -> None:
    add_keys(fake, 150)
    seen: list[tuple[str, int]] = []

    def between_pages(fake: FakeOpenRouter, workspace_id: str, offset: int) -> None:
        seen.append((workspace_id, offset))
        if offset == 100:
            fake.add_key("born-mid-scan", created_at=NOW)

    fake.faults.on_list_page(between_pages)
    first, second = pages(api)

    assert seen == [(fake.default_workspace_id, 0), (fake.default_workspace_id, 100)]
    # The new newest key pushed everything down one place: the scan sees one key twice.
    assert second[0]["hash"] == first[-1]["hash"]
    assert "born-mid-scan" not in {key["name"] for key in first + second}


# ------------------------------------------------------------------ call record


def test_calls_record_what_the_client_did(fake: FakeOpenRouter, api: httpx.Client) -> None:
    key_hash = add_keys(fake, 1)[0]
    api.get("/keys", params={"include_disabled": "true"})
    api.patch(f"/keys/{key_hash}", json={"disabled": True})
    api.delete(f"/keys/{key_hash}")
    api.delete(f"/keys/{key_hash}")

    assert fake.calls[0] == Call("GET", "/keys", {"include_disabled": "true"}, None, 200)
    assert fake.mutating_calls() == [
        Call("PATCH", f"/keys/{key_hash}", {}, {"disabled": True}, 200),
        Call("DELETE", f"/keys/{key_hash}", {}, None, 200),
        Call("DELETE", f"/keys/{key_hash}", {}, None, 404),
    ]
    assert [call.succeeded for call in fake.mutating_calls()] == [True, True, False]
    fake.clear_calls()
    assert fake.calls == []


# ------------------------------------------------------------------ generator and scenarios


def test_generator_is_deterministic_for_a_seed() -> None:
    def organisation(seed: int) -> list[dict[str, Any]]:
        fake = FakeOpenRouter(MANAGEMENT_KEY)
        fake.set_clock(NOW)
        generate_organisation(fake, keys=200, workspaces=3, seed=seed, now=NOW)
        return fake.keys + fake.workspaces

    assert organisation(7) == organisation(7)
    assert organisation(7) != organisation(8)


def test_generated_organisation_is_realistic() -> None:
    fake = FakeOpenRouter(MANAGEMENT_KEY)
    fake.set_clock(NOW)
    generate_organisation(fake, keys=3000, workspaces=4, seed=3, now=NOW)
    keys = fake.keys
    n = len(keys)

    def share(predicate: Any) -> float:
        return sum(1 for key in keys if predicate(key)) / n

    def when(key: dict[str, Any], name: str) -> datetime | None:
        return None if key[name] is None else datetime.fromisoformat(key[name])

    assert n == 3000
    assert len(fake.workspaces) == 4
    assert len({key["workspace_id"] for key in keys}) == 4
    assert len({key["hash"] for key in keys}) == n
    assert 0.07 <= share(lambda k: when(k, "expires_at") and when(k, "expires_at") <= NOW) <= 0.13
    assert 0.11 <= share(lambda k: when(k, "expires_at") and when(k, "expires_at") > NOW) <= 0.19
    assert 0.05 <= share(lambda k: k["disabled"]) <= 0.11
    idle = share(
        lambda k: (
            (k["last_used_at"] is None and k["usage"] > 0)
            or (k["last_used_at"] is not None and NOW - when(k, "last_used_at") >= timedelta(days=30))
        )
    )
    assert 0.20 <= idle <= 0.30
    assert 0.01 <= share(lambda k: k["usage"] == 0 and k["last_used_at"] is None) <= 0.06
    assert 0.03 <= share(lambda k: k["limit_remaining"] is not None and k["limit_remaining"] <= 0) <= 0.08
    assert share(lambda k: k["usage_monthly"] > 100) > 0.005
    assert share(lambda k: k["include_byok_in_limit"] and k["byok_usage"] > 0) > 0.03
    names = " ".join(key["name"] for key in keys)
    for prefix in ("svc-", "dev-", "ci-runner-", "customer-", "prod-"):
        assert prefix in names
    oldest = min(when(key, "created_at") for key in keys)  # type: ignore[type-var]
    assert timedelta(days=450) < NOW - oldest <= timedelta(days=541)


def test_generated_usage_is_consistent_with_calendar_windows() -> None:
    # 2026-11-02 is a Monday in a new month; 2026-10-01 a Thursday (the week began in September).
    for now in (datetime(2026, 11, 2, 9, tzinfo=UTC), datetime(2026, 10, 1, 18, tzinfo=UTC), NOW):
        fake = FakeOpenRouter(MANAGEMENT_KEY)
        fake.set_clock(now)
        generate_organisation(fake, keys=1500, seed=5, now=now)
        weekly_above_monthly = 0
        for key in fake.keys:
            for prefix in ("usage", "byok_usage"):
                daily, weekly, monthly = (key[f"{prefix}_{w}"] for w in ("daily", "weekly", "monthly"))
                assert daily <= weekly and daily <= monthly
                assert weekly <= key[prefix] and monthly <= key[prefix]
                weekly_above_monthly += weekly > monthly
            last_used = key["last_used_at"] and datetime.fromisoformat(key["last_used_at"])
            if key["expires_at"] and last_used:
                assert last_used <= datetime.fromisoformat(key["expires_at"])
            if last_used:
                assert datetime.fromisoformat(key["created_at"]) <= last_used <= now
            if key["usage_daily"] > 0:
                assert last_used and last_used >= now.replace(hour=0)
        if now.day == 1 and now.weekday() != 0:
            assert weekly_above_monthly > 0  # the week began last month
        else:
            assert weekly_above_monthly == 0


def test_small_scenario_covers_the_cases_rules_care_about(fake: FakeOpenRouter) -> None:
    fresh = FakeOpenRouter(MANAGEMENT_KEY)
    load_scenario(fresh, "small")
    keys = {key["name"]: key for key in fresh.keys}
    now = fresh.now()

    assert now == datetime(2026, 10, 15, 12, tzinfo=UTC)
    assert len(keys) == 12 and len(fresh.workspaces) == 2
    assert any(k["expires_at"] and datetime.fromisoformat(k["expires_at"]) <= now for k in keys.values())
    assert any(k["disabled"] for k in keys.values())
    assert any(k["usage"] == 0 and k["last_used_at"] is None for k in keys.values())
    assert any(k["usage"] > 0 and k["last_used_at"] is None for k in keys.values())
    assert any(
        k["last_used_at"] and now - datetime.fromisoformat(k["last_used_at"]) >= timedelta(days=90)
        for k in keys.values()
    )
    assert any(k["limit_remaining"] is not None and k["limit_remaining"] <= 0 for k in keys.values())
    assert any(name.startswith("prod-") for name in keys)


def test_scenario_from_a_dict_with_generated_keys() -> None:
    fake = FakeOpenRouter(MANAGEMENT_KEY)
    load_scenario(
        fake,
        {
            "now": "2026-10-15T12:00:00Z",
            "workspaces": [{"id": "w-1", "name": "Main", "default": True}],
            "keys": [{"name": "hand", "created_at": "2026-01-01T00:00:00Z", "uses": [{"usd": 2.5}]}],
            "generate": {"keys": 50, "workspaces": 2, "seed": 1},
        },
    )
    hand = next(key for key in fake.keys if key["name"] == "hand")
    assert len(fake.keys) == 51 and len(fake.workspaces) == 2
    assert fake.default_workspace_id == "w-1"
    assert hand["usage_daily"] == 2.5 and hand["last_used_at"] is not None


# ------------------------------------------------------------------ server lifecycle and CLI


def test_fake_server_starts_and_stops_outside_a_with_block(fake: FakeOpenRouter) -> None:
    server = FakeServer(fake)
    base_url = server.start()
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/api/v1", base_url)
        with httpx.Client(headers={"Authorization": f"Bearer {MANAGEMENT_KEY}"}, verify=TLS) as client:
            assert client.get(f"{base_url}/keys").status_code == 200
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base_url}/keys", timeout=2, verify=TLS)


def test_command_line_serves_generated_keys_until_stopped() -> None:
    assert (
        "--scenario"
        in subprocess.run(
            [sys.executable, "-m", "keyhygiene.fakeapi", "--help"], capture_output=True, text=True, check=True
        ).stdout
    )
    with subprocess.Popen(
        [sys.executable, "-m", "keyhygiene.fakeapi", "--port", "0", "--keys", "20", "--seed", "2"],
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            url_line, key_line = process.stdout.readline(), process.stdout.readline()
            base_url = re.search(r"http://\S+/api/v1", url_line).group(0)  # type: ignore[union-attr]
            secret = key_line.split(": ", 1)[1].strip()
            keys = httpx.get(
                f"{base_url}/keys",
                params={"include_disabled": "true", "include_expired": "true"},
                headers={"Authorization": f"Bearer {secret}"},
                verify=TLS,
            )
            assert keys.status_code == 200 and 0 < len(keys.json()["data"]) <= 20
        finally:
            process.terminate()
            process.wait(timeout=10)
