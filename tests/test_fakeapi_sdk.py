"""The official ``openrouter`` SDK (1.3.84) against the fake: proof that the fake speaks the wire format.

Every call below goes over real HTTP; the SDK's generated pydantic models parse each response, so
a field missing, mistyped or misplaced in the fake fails here.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

openrouter = pytest.importorskip("openrouter")
from openrouter import errors  # noqa: E402
from openrouter.utils import BackoffStrategy, RetryConfig  # noqa: E402

from keyhygiene.fakeapi import FakeOpenRouter, load_scenario, serve  # noqa: E402

MANAGEMENT_KEY = "sk-or-v1-mgmt-" + "7" * 50
NOW = datetime(2026, 10, 15, 12, 0, tzinfo=UTC)
NO_RETRIES = RetryConfig("none", BackoffStrategy(1, 1, 1.0, 1), False)


@pytest.fixture
def fake() -> FakeOpenRouter:
    fake = FakeOpenRouter(MANAGEMENT_KEY)
    load_scenario(fake, "small")
    return fake


@pytest.fixture
def sdk(fake: FakeOpenRouter) -> Iterator[Any]:
    with serve(fake) as base_url, openrouter.OpenRouter(api_key=MANAGEMENT_KEY, server_url=base_url) as client:
        yield client


# The SDK warns when it parses the deprecated ``is_provisioning_key`` and ``rate_limit`` fields,
# which the real API still sends; pytest turns warnings into errors here, so let this one pass.
SDK_DEPRECATION = pytest.mark.filterwarnings("ignore:.*DEPRECATED.*:DeprecationWarning")


@SDK_DEPRECATION
def test_current_key_metadata(sdk: Any, fake: FakeOpenRouter) -> None:
    data = sdk.api_keys.get_current_key_metadata().data
    assert data.is_management_key is True
    assert data.limit is None
    assert data.label.startswith("sk-or-v1-")


@SDK_DEPRECATION
def test_current_key_metadata_of_a_regular_key(fake: FakeOpenRouter) -> None:
    key_hash = next(key["hash"] for key in fake.keys if key["name"] == "customer-globex-007")
    secret = fake.add_regular_key(hash=key_hash)
    with serve(fake) as base_url, openrouter.OpenRouter(api_key=secret, server_url=base_url) as client:
        data = client.api_keys.get_current_key_metadata().data
        with pytest.raises(errors.ForbiddenResponseError):
            client.api_keys.create(name="not allowed", retries=NO_RETRIES)
    assert data.is_management_key is False
    assert (data.limit, data.limit_remaining, data.limit_reset) == (20, 15.8, "daily")
    assert data.budgets[0].scope == "key_limit"


def test_list_with_every_parameter(sdk: Any, fake: FakeOpenRouter) -> None:
    production = fake.workspaces[1]["id"]
    api_keys = sdk.api_keys

    default_visible = api_keys.list().data
    production_all = api_keys.list(include_disabled=True, include_expired=True, offset=0, workspace_id=production).data
    default_all = api_keys.list(include_disabled=True, include_expired=True).data
    skipped = api_keys.list(include_disabled=True, include_expired=True, offset=3).data

    assert {key.name for key in default_visible} == {
        "customer-globex-007",
        "svc-search-staging",
        "dev-alice-laptop",
        "customer-acme-042",
        "dev-carol-desktop",
    }
    assert {key.workspace_id for key in production_all} == {production}
    assert len(production_all) == 4
    assert len(default_all) == 8
    assert [key.hash for key in skipped] == [key.hash for key in default_all[3:]]
    by_name = {key.name: key for key in default_all + production_all}
    assert by_name["ci-runner-17"].expires_at == datetime(2026, 9, 30, tzinfo=UTC)
    assert by_name["dev-carol-desktop"].last_used_at is None
    assert by_name["svc-recs-prod"].limit_remaining == pytest.approx(-2.3)
    # Both timestamp styles parse: "+00:00" microseconds (hash 0-4) and "Z".
    assert by_name["prod-chat-1"].last_used_at == datetime(2026, 10, 15, 11, 58, 41, tzinfo=UTC)
    assert by_name["svc-billing-prod"].last_used_at == datetime(2026, 10, 15, 11, 20, 5, tzinfo=UTC)


def test_list_of_an_unknown_workspace_is_not_found(sdk: Any) -> None:
    with pytest.raises(errors.NotFoundResponseError):
        sdk.api_keys.list(workspace_id="00000000-0000-4000-8000-00000000dead")


def test_create_get_update_delete_round_trip(sdk: Any, fake: FakeOpenRouter) -> None:
    api_keys = sdk.api_keys
    production = fake.workspaces[1]["id"]

    created = api_keys.create(
        name="sdk-made",
        limit=12.5,
        limit_reset="weekly",
        include_byok_in_limit=True,
        expires_at=NOW + timedelta(days=30),
        creator_user_id="user_sdk",
        external={"user": "partner-user-1", "api_key": "p" * 40},
    )
    fetched = api_keys.get(hash=created.data.hash).data
    fake.advance(timedelta(minutes=5))
    updated = api_keys.update(hash=created.data.hash, name="sdk-renamed", disabled=True, limit=None).data
    moved = api_keys.update(hash=created.data.hash, workspace_id=production).data
    deleted = api_keys.delete(hash=created.data.hash)

    assert created.key.startswith("sk-or-v1-") and created.key not in created.data.model_dump_json()
    assert created.data.updated_at is None
    assert created.data.expires_at == NOW + timedelta(days=30)
    assert created.data.external_user == "partner-user-1"
    assert fetched.model_dump() == created.data.model_dump()
    assert (updated.name, updated.disabled, updated.limit, updated.limit_remaining) == (
        "sdk-renamed",
        True,
        None,
        None,
    )
    assert datetime.fromisoformat(updated.updated_at) == NOW + timedelta(minutes=5)
    assert moved.workspace_id == production
    assert deleted.DELETED is True
    assert fake.get(created.data.hash) is None
    with pytest.raises(errors.NotFoundResponseError):
        api_keys.get(hash=created.data.hash)


def test_update_errors(sdk: Any, fake: FakeOpenRouter) -> None:
    api_keys = sdk.api_keys
    key_hash = fake.keys[0]["hash"]
    with pytest.raises(errors.BadRequestResponseError, match="No update fields provided"):
        api_keys.update(hash=key_hash)
    with pytest.raises(errors.NotFoundResponseError):
        api_keys.update(hash="e" * 64, disabled=True)
    with pytest.raises(errors.NotFoundResponseError):
        api_keys.delete(hash="e" * 64)


def test_create_with_a_past_expiry_is_rejected(sdk: Any) -> None:
    with pytest.raises(errors.BadRequestResponseError):
        sdk.api_keys.create(name="x", expires_at=NOW - timedelta(days=1))


def test_workspaces_list_pages_with_next(sdk: Any) -> None:
    first = sdk.workspaces.list(limit=1)
    second = first.next()
    assert first.result.total_count == 2
    assert [w.name for w in first.result.data] == ["Default"]
    assert second is not None and [w.name for w in second.result.data] == ["Production"]
    # The SDK stops only after a short page, so a full last page costs one more (empty) request.
    third = second.next()
    assert third is not None and third.result.data == []
    assert third.next() is None


def test_sdk_tolerates_unknown_fields(sdk: Any, fake: FakeOpenRouter) -> None:
    fake.extra_fields = {"shiny_new_field": [1, 2, 3]}
    keys = sdk.api_keys.list(include_disabled=True, include_expired=True).data
    assert len(keys) == 8


def test_sdk_retries_a_503_and_surfaces_a_429(sdk: Any, fake: FakeOpenRouter) -> None:
    api_keys = sdk.api_keys
    quick = RetryConfig("backoff", BackoffStrategy(10, 50, 1.5, 2000), True)
    fake.faults.server_error(1, status=503, path="/keys")
    assert len(api_keys.list(retries=quick).data) == 5

    fake.faults.rate_limit(1, retry_after=0, path="/keys")
    with pytest.raises(errors.TooManyRequestsResponseError) as raised:
        api_keys.list(retries=quick)

    assert raised.value.data.error.code == 429
    assert [call.status for call in fake.calls] == [503, 200, 429]
