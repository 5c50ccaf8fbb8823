"""The keys API client against the fake OpenRouter API over real HTTP on loopback.

Paging, workspaces, hidden keys, de-duplication, retries (429 and 5xx, Retry-After honoured), the
concurrency bound, typed errors, and tolerant models.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.keysapi.client import KeysClient
from keyhygiene.keysapi.errors import (
    ApiError,
    AuthenticationFailed,
    BadRequest,
    ConnectionFailed,
    MalformedResponse,
    NotFound,
    OutcomeUnknown,
    RateLimited,
    ServerError,
)
from keyhygiene.keysapi.models import CurrentKey, Key
from keyhygiene.keysapi.paging import KeyStream
from tests.celery_support import wait_until
from tests.conftest import MANAGEMENT_KEY
from tests.http_fronts import Front, serving

NOW = datetime.now(UTC).replace(microsecond=0)


def add_keys(fake: FakeOpenRouter, count: int, *, workspace_id: str | None = None, prefix: str = "key") -> list[str]:
    """Add ``count`` keys, newest first in listing order; returns their hashes in that order."""
    return [
        fake.add_key(f"{prefix}-{index:04d}", workspace_id=workspace_id, created_at=NOW - timedelta(minutes=index))[
            "hash"
        ]
        for index in range(count)
    ]


@pytest.fixture
def make_client(fake_url: str) -> Iterator[Callable[..., KeysClient]]:
    opened: list[KeysClient] = []

    def make(concurrency: int = 4, retry_seconds: float = 2.0, key: str = MANAGEMENT_KEY) -> KeysClient:
        client = KeysClient(fake_url, key, concurrency=concurrency, retry_seconds=retry_seconds, timeout=5)
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()


def list_pages(fake: FakeOpenRouter) -> list[int]:
    """The offsets of the GET /keys requests the fake answered, in order."""
    return [int(call.query.get("offset", "0")) for call in fake.calls if call.method == "GET" and call.path == "/keys"]


# -- paging -------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 99, 100, 101, 200, 250])
def test_sequential_paging_returns_every_key_once_and_stops_at_the_short_page(
    fake: FakeOpenRouter, make_client, count: int
) -> None:
    hashes = add_keys(fake, count)

    listing = make_client(concurrency=1).list_all_keys([None])

    assert sorted(listing.keys) == sorted(hashes)
    assert listing.duplicates == 0
    # Like the cookbook: 100 per page, the first short page (possibly empty) is the last request.
    assert list_pages(fake) == list(range(0, (count // 100 + 1) * 100, 100))


@pytest.mark.parametrize("count", [0, 1, 99, 100, 101, 200, 250])
def test_concurrent_paging_returns_every_key_once(fake: FakeOpenRouter, make_client, count: int) -> None:
    hashes = add_keys(fake, count)

    listing = make_client(concurrency=4).list_all_keys([None])

    assert sorted(listing.keys) == sorted(hashes)
    assert listing.per_workspace == {"default": count}
    needed = count // 100 + 1
    # Offsets are asked for ahead of knowing where the list ends: at most concurrency-1 extra pages.
    assert needed <= len(list_pages(fake)) <= needed + 3
    assert set(range(0, needed * 100, 100)) <= set(list_pages(fake))


def test_every_workspace_is_listed(fake: FakeOpenRouter, make_client) -> None:
    research = fake.add_workspace("Research")["id"]
    empty = fake.add_workspace("Empty")["id"]
    default_keys = add_keys(fake, 130, prefix="default")
    research_keys = add_keys(fake, 230, workspace_id=research, prefix="research")
    client = make_client(concurrency=3)

    workspaces = [workspace.id for workspace in client.list_workspaces()]
    listing = client.list_all_keys(workspaces)

    assert set(workspaces) == {fake.default_workspace_id, research, empty}
    assert sorted(listing.keys) == sorted(default_keys + research_keys)
    assert listing.per_workspace == {fake.default_workspace_id: 130, research: 230, empty: 0}
    assert {key.workspace_id for key in listing.keys.values()} == {fake.default_workspace_id, research}


def test_the_inventory_is_every_listed_workspace_or_the_default_one_when_none_is_listed(
    fake: FakeOpenRouter, make_client
) -> None:
    research = fake.add_workspace("Research")["id"]
    default_keys = add_keys(fake, 130, prefix="default")
    research_keys = add_keys(fake, 30, workspace_id=research, prefix="research")
    client = make_client(concurrency=3)

    everything = client.stream_inventory(client.list_workspaces())
    listed = sorted(raw["hash"] for page in everything for raw in page)
    unlisted = client.stream_inventory([])  # an API that lists no workspace: GET /keys without one
    default_only = sorted(raw["hash"] for page in unlisted for raw in page)

    assert listed == sorted(default_keys + research_keys)
    assert default_only == sorted(default_keys)
    assert unlisted.per_workspace == {"default": 130}


def test_workspace_listing_pages_past_100_workspaces(fake: FakeOpenRouter, make_client) -> None:
    for index in range(120):
        fake.add_workspace(f"ws-{index}")

    workspaces = make_client().list_workspaces()

    assert len({workspace.id for workspace in workspaces}) == 121


def test_disabled_and_expired_keys_are_listed(fake: FakeOpenRouter, make_client) -> None:
    active = fake.add_key("active")["hash"]
    disabled = fake.add_key("disabled", disabled=True)["hash"]
    expired = fake.add_key("expired", expires_at=NOW - timedelta(days=1))["hash"]

    listing = make_client().list_all_keys([None])

    assert set(listing.keys) == {active, disabled, expired}
    assert listing.keys[disabled].disabled
    assert listing.keys[expired].expires_at == NOW - timedelta(days=1)
    for call in fake.calls:
        if call.path == "/keys":
            assert call.query["include_disabled"] == "true"
            assert call.query["include_expired"] == "true"


def test_a_key_shifted_onto_the_next_page_is_counted_once(fake: FakeOpenRouter, make_client) -> None:
    hashes = add_keys(fake, 150)

    def new_key_before_page_two(fake: FakeOpenRouter, workspace_id: str, offset: int) -> None:
        if offset == 100:  # a new (newest) key pushes the last key of page 1 onto page 2
            fake.add_key("brand-new", created_at=NOW + timedelta(minutes=1))

    fake.faults.on_list_page(new_key_before_page_two)
    listing = make_client(concurrency=1).list_all_keys([None])

    assert sorted(listing.keys) == sorted(hashes)
    assert listing.duplicates == 1


def test_a_key_listed_in_two_workspaces_is_counted_once(fake: FakeOpenRouter, make_client) -> None:
    other = fake.add_workspace("Other")["id"]
    add_keys(fake, 10)
    moving = fake.add_key("moving", created_at=NOW - timedelta(days=1))["hash"]

    def move_after_first_page(fake: FakeOpenRouter, workspace_id: str, offset: int) -> None:
        if workspace_id == other:  # the key moves after its old workspace was listed
            fake.update_key(moving, {"workspace_id": other})

    fake.faults.on_list_page(move_after_first_page)
    listing = make_client(concurrency=1).list_all_keys([fake.default_workspace_id, other])

    assert len(listing.keys) == 11
    assert listing.duplicates == 1


def test_pages_are_handed_over_while_later_pages_are_in_flight(fake: FakeOpenRouter, make_client) -> None:
    hashes = add_keys(fake, 2000)
    fake.faults.latency = 0.01
    stream = make_client(concurrency=2).stream_keys([None])
    pages = iter(stream)

    first = next(pages)
    asked_by_then = len(list_pages(fake))
    rest = [raw["hash"] for page in pages for raw in page]

    # The first page is there long before the listing ends, and a consumer that has not taken it
    # holds the listing back: never more than 4 x concurrency pages are fetched ahead of it.
    assert asked_by_then <= 4 * 2 + 1 < 21
    assert sorted([raw["hash"] for raw in first] + rest) == sorted(hashes)
    assert stream.per_workspace == {"default": 2000}
    assert stream.pages == len(list_pages(fake))


def test_pages_waiting_together_are_handed_over_together(fake: FakeOpenRouter, make_client) -> None:
    hashes = add_keys(fake, 1250)
    stream = make_client(concurrency=4).stream_keys([None])
    batches = stream.batched(3)
    first = next(batches)
    # While the first batch is being "written", the workers fetch ahead.
    wait_until(lambda: stream.waiting >= 3, timeout=30, what="pages waiting")

    second = next(batches)
    rest = list(batches)

    assert 100 <= len(first) <= 300
    assert len(second) == 300  # three pages that were waiting, in one batch
    assert all(0 < len(batch) <= 300 for batch in rest)
    assert sorted(raw["hash"] for batch in [first, second, *rest] for raw in batch) == sorted(hashes)


@pytest.mark.parametrize("status", [400, 404])
@pytest.mark.parametrize("concurrency", [1, 8])
def test_an_api_that_refuses_offsets_past_the_end_is_listed_whole(
    fake: FakeOpenRouter, make_client, status: int, concurrency: int
) -> None:
    # No document says what an offset past the end answers; the facts infer []. An API that
    # answered 400 or 404 instead failed every listing, whose offsets go ahead of the end.
    hashes = add_keys(fake, 100, prefix="default")  # an exact multiple: no short page ends it
    sized = {}
    for size in (0, 30, 250, 1000):
        workspace = sized[size] = str(fake.add_workspace(f"team-{size}")["id"])
        hashes += add_keys(fake, size, workspace_id=workspace, prefix=f"team-{size}")
    fake.faults.past_end_status = status
    client = make_client(concurrency=concurrency)

    stream = client.stream_keys([workspace.id for workspace in client.list_workspaces()])
    listed = [raw["hash"] for page in stream for raw in page]

    assert sorted(listed) == sorted(hashes)
    # Lists of a multiple of 100 keys end at a refusal; the others at their short page.
    assert sorted(stream.ends_by_refusal) == sorted([fake.default_workspace_id, sized[1000]])


def _pages_of(
    keys: int, refused: Callable[[int], Exception | None]
) -> Callable[[str | None, int], list[dict[str, Any]]]:
    """A GET /keys of one list of ``keys`` keys, where ``refused(offset)`` may refuse an offset."""

    def fetch(_: str | None, offset: int) -> list[dict[str, Any]]:
        error = refused(offset)
        if error is not None:
            raise error
        return [{"hash": f"k{index:05d}"} for index in range(offset, min(offset + 100, keys))]

    return fetch


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_refusal_in_the_middle_of_a_list_fails_the_listing(concurrency: int) -> None:
    # A 400 at offset 300 of 1,000 keys looks like an end until the next offset comes back with
    # keys: the listing fails, it does not end at 300 keys.
    refusal = BadRequest("GET /keys: 400 Invalid request parameters", status=400)
    fetch = _pages_of(1000, lambda offset: refusal if offset == 300 else None)

    with pytest.raises(BadRequest):
        list(KeyStream(fetch, [None], concurrency=concurrency))


@pytest.mark.parametrize("concurrency", [1, 4])
@pytest.mark.parametrize("keys", [250, 300])
def test_a_refusal_followed_by_a_page_that_is_not_refused_fails_the_listing(concurrency: int, keys: int) -> None:
    # One refused page (a gateway's 404 during a deploy) in a list of 250 keys: the next offset
    # answers an empty page, so the refusal was no end of the list. The listing fails; it does not
    # end at 200 keys, leaving 50 out of a snapshot taken for complete.
    refusal = NotFound("GET /keys: 404 Resource not found", status=404)
    fetch = _pages_of(keys, lambda offset: refusal if offset == 200 else None)

    with pytest.raises(NotFound):
        list(KeyStream(fetch, [None], concurrency=concurrency))


def test_a_refusal_that_comes_back_after_the_short_page_fails_the_listing() -> None:
    # The empty page at 300 is answered before the refusal of 200 (concurrent requests): the
    # list goes on to 300, so 200 was inside it.
    refusal = BadRequest("GET /keys: 400 Invalid request parameters", status=400)
    short_page_answered = threading.Event()
    pages = _pages_of(300, lambda offset: None)

    def fetch(workspace: str | None, offset: int) -> list[dict[str, Any]]:
        if offset == 200:
            assert short_page_answered.wait(10)
            raise refusal
        page = pages(workspace, offset)
        if offset == 300:
            short_page_answered.set()
        return page

    with pytest.raises(BadRequest):
        list(KeyStream(fetch, [None], concurrency=4))


def test_a_refusal_of_the_first_page_fails_the_listing() -> None:
    refusal = NotFound("GET /keys: 404 Resource not found", status=404)
    with pytest.raises(NotFound):
        list(KeyStream(_pages_of(1000, lambda offset: refusal), [None], concurrency=4))


def test_a_listing_left_early_sends_no_more_requests(fake: FakeOpenRouter, make_client) -> None:
    add_keys(fake, 2000)
    pages = iter(make_client(concurrency=3).stream_keys([None]))
    next(pages)

    pages.close()  # e.g. the database failed while storing the first page
    asked = len(fake.calls)

    assert asked < 21
    assert make_client().list_keys_page(workspace_id=None, offset=0)  # the fake still answers...
    assert len(fake.calls) == asked + 1  # ...and nothing but this one request reached it since


# -- retries ------------------------------------------------------------------------------------


def _recording(waits: list[float]) -> Callable[[float], None]:
    """time.sleep, noting each wait the client asks for."""

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    return sleep


def test_rate_limits_are_retried_after_the_time_the_api_asks(fake: FakeOpenRouter, fake_url: str) -> None:
    hashes = add_keys(fake, 120)
    fake.faults.rate_limit(2, retry_after=0.3, path="/keys")
    waits: list[float] = []

    with KeysClient(fake_url, MANAGEMENT_KEY, concurrency=1, retry_seconds=2, sleep=_recording(waits)) as client:
        listing = client.list_all_keys([None])

    assert sorted(listing.keys) == sorted(hashes)
    assert [call.status for call in fake.calls if call.path == "/keys"] == [429, 429, 200, 200]
    assert waits == [0.3, 0.3]  # two waits of Retry-After, one after the other, and no other


def test_retry_after_is_honoured_beyond_our_own_backoff(fake: FakeOpenRouter, fake_url: str) -> None:
    add_keys(fake, 5)
    # Our own first backoff is 0.25 s plus up to 1 s of jitter; an API asking for 1.5 s gets 1.5 s.
    fake.faults.rate_limit(1, retry_after=1.5, path="/keys")
    waits: list[float] = []

    with KeysClient(fake_url, MANAGEMENT_KEY, concurrency=1, retry_seconds=5, sleep=_recording(waits)) as client:
        client.list_all_keys([None])

    assert waits == [1.5]


def test_a_retry_after_of_zero_does_not_turn_retries_into_a_flood(fake: FakeOpenRouter, make_client) -> None:
    """``Retry-After: 0`` asks for no wait, but our own backoff still spaces the retries: within a
    budget of a second, a handful of tries, not thousands."""
    fake.faults.rate_limit(100_000, retry_after=0, path="/keys")

    with pytest.raises(RateLimited):
        make_client(concurrency=1, retry_seconds=1.0).list_keys_page(workspace_id=None, offset=0)

    assert len([call for call in fake.calls if call.path == "/keys"]) < 10


def test_a_retry_after_longer_than_the_retry_time_ends_the_request_without_trying_early(
    fake: FakeOpenRouter, make_client
) -> None:
    # Trying again when the retry time runs out would be before the time the API named: a 429 more.
    add_keys(fake, 5)
    fake.faults.rate_limit(1, retry_after=120, path="/keys")

    with pytest.raises(RateLimited):
        make_client(concurrency=1, retry_seconds=2.0).list_keys_page(workspace_id=None, offset=0)

    assert [call.status for call in fake.calls if call.path == "/keys"] == [429]


def test_a_retry_after_holds_back_every_thread_of_the_client(fake: FakeOpenRouter, make_client) -> None:
    # One request is told to wait two minutes; then a listing of ten workspaces on four threads
    # sends nothing (each request would get a 429 of its own) and ends rate limited at once.
    for index in range(10):
        workspace = str(fake.add_workspace(f"team-{index}")["id"])
        add_keys(fake, 150, workspace_id=workspace, prefix=f"team-{index}")
    fake.faults.rate_limit(1, retry_after=120, path="/keys")
    client = make_client(concurrency=4, retry_seconds=2.0)
    workspaces = [workspace.id for workspace in client.list_workspaces()]
    with pytest.raises(RateLimited):
        client.list_keys_page(workspace_id=workspaces[0], offset=0)
    fake.clear_calls()

    with pytest.raises(RateLimited, match="not sent"):
        client.list_all_keys(workspaces)

    assert fake.calls == []


def test_a_change_refused_with_429_after_a_503_may_have_been_made(fake: FakeOpenRouter, make_client) -> None:
    # The first PATCH is answered 503 by a gateway after the API made it; the one sent again is
    # refused with a Retry-After past the retry time. The change is in doubt, not surely unmade.
    (key,) = add_keys(fake, 1)
    fake.faults.server_error(1, 503, method="PATCH", after_processing=True)
    fake.faults.rate_limit(1, retry_after=120, method="PATCH")

    with pytest.raises(OutcomeUnknown, match="a try was answered 503"):
        make_client(retry_seconds=5.0).update_key(key, disabled=True)

    assert fake.get(key)["disabled"] is True  # type: ignore[index]


@pytest.mark.parametrize("method", ["PATCH", "DELETE"])
def test_a_change_answered_503_until_the_retry_time_ran_out_may_have_been_made(
    fake: FakeOpenRouter, make_client, method: str
) -> None:
    """Every try of the change is answered 503, the first by a gateway after the API acted: it was
    recorded failed (a plain server error), though it was made; it is in doubt, settled by a read."""
    (key,) = add_keys(fake, 1)
    fake.faults.server_error(1, 503, method=method, after_processing=True)
    fake.faults.server_error(1000, 503, retry_after=0.05, method=method)
    client = make_client(retry_seconds=0.4)

    with pytest.raises(OutcomeUnknown, match="a try was answered 503"):
        if method == "PATCH":
            client.update_key(key, disabled=True)
        else:
            client.delete_key(key)

    assert len([call for call in fake.calls if call.method == method]) > 1  # retried, then in doubt
    assert (fake.get(key) is None) if method == "DELETE" else (fake.get(key)["disabled"] is True)  # type: ignore[index]


def test_a_wait_asked_for_by_another_request_past_this_ones_retry_time_ends_it_unsent(
    fake: FakeOpenRouter, make_client
) -> None:
    # Another thread was told to wait 1.5 s; this request has 1 s of its retry time left (of 2 s):
    # it ends rate limited at once instead of sending when its time is up.
    add_keys(fake, 1)
    client = make_client(retry_seconds=2.0)
    client._asked_to_wait(1.5)
    fake.clear_calls()

    with pytest.raises(RateLimited, match="not sent"):
        client._send_once("GET", "/keys", deadline=time.monotonic() + 1.0)

    assert fake.calls == []


@pytest.mark.parametrize("header", ["nan", "inf", "-inf", "soon"])
def test_a_retry_after_that_is_no_number_of_seconds_falls_back_to_our_backoff(
    fake: FakeOpenRouter, make_client, header: str
) -> None:
    hashes = add_keys(fake, 5)
    fake.faults.rate_limit(2, retry_after=header, path="/keys")

    listing = make_client(concurrency=1).list_all_keys([None])

    assert sorted(listing.keys) == sorted(hashes)
    assert [call.status for call in fake.calls if call.path == "/keys"] == [429, 429, 200]


@pytest.mark.parametrize("status", [500, 502, 503, 504, 520, 522, 524])
def test_server_errors_are_retried(fake: FakeOpenRouter, make_client, status: int) -> None:
    hashes = add_keys(fake, 150)
    fake.faults.server_error(2, status=status, retry_after=0.05, path="/keys")

    listing = make_client().list_all_keys([None])

    assert sorted(listing.keys) == sorted(hashes)
    assert [call.status for call in fake.calls].count(status) == 2


def test_a_dropped_connection_is_retried(fake: FakeOpenRouter, make_client) -> None:
    hashes = add_keys(fake, 50)
    fake.faults.drop_connection(1, path="/keys")

    assert sorted(make_client().list_all_keys([None]).keys) == sorted(hashes)


LOST_ANSWERS: dict[str, Callable[[FakeOpenRouter], None]] = {
    "dropped before it was applied": lambda fake: fake.faults.drop_connection(1, method="PATCH"),
    "dropped after it was applied": lambda fake: fake.faults.drop_connection(1, after_processing=True, method="PATCH"),
    "cut mid-body": lambda fake: fake.faults.drop_mid_body(1, method="PATCH"),
    "500": lambda fake: fake.faults.server_error(1, 500, method="PATCH"),
    "502": lambda fake: fake.faults.server_error(1, 502, method="PATCH"),
    "504": lambda fake: fake.faults.server_error(1, 504, method="PATCH"),
    # A CDN in front of the API: the origin failed (520) or took too long (524), maybe after acting.
    "520": lambda fake: fake.faults.server_error(1, 520, method="PATCH", after_processing=True),
    "524": lambda fake: fake.faults.server_error(1, 524, method="PATCH", after_processing=True),
}


@pytest.mark.parametrize("lost", list(LOST_ANSWERS))
def test_a_change_whose_answer_was_lost_is_never_sent_again(fake: FakeOpenRouter, make_client, lost: str) -> None:
    key = add_keys(fake, 1)[0]
    LOST_ANSWERS[lost](fake)

    with pytest.raises(OutcomeUnknown):
        make_client().update_key(key, disabled=True)

    assert fake.change_counts()[("PATCH", key)] == 1


def test_a_server_error_no_retry_can_mend_is_not_retried(fake: FakeOpenRouter, make_client) -> None:
    add_keys(fake, 5)
    fake.faults.server_error(5, status=501, path="/keys")

    with pytest.raises(ApiError, match="501"):
        make_client().list_keys_page(workspace_id=None, offset=0)

    assert [call.status for call in fake.calls if call.path == "/keys"] == [501]


def test_a_key_created_whose_answer_was_lost_is_not_created_again(fake: FakeOpenRouter, make_client) -> None:
    # A POST sent again after a 502 that came once the key was made would make a second live key.
    fake.faults.server_error(1, 502, method="POST", after_processing=True)

    with pytest.raises(OutcomeUnknown):
        make_client().create_key("service-a")

    assert [key["name"] for key in fake.keys] == ["service-a"]


@pytest.mark.parametrize("refusal", [429, 503])
def test_a_change_the_api_refused_is_sent_again(fake: FakeOpenRouter, make_client, refusal: int) -> None:
    key = add_keys(fake, 1)[0]
    if refusal == 429:
        fake.faults.rate_limit(2, retry_after=0.05, method="DELETE")
    else:
        fake.faults.server_error(2, 503, retry_after=0.05, method="DELETE")

    make_client().delete_key(key)

    assert fake.get(key) is None
    assert [call.status for call in fake.calls if call.method == "DELETE"] == [refusal, refusal, 200]


@pytest.mark.parametrize("method", ["PATCH", "DELETE"])
def test_a_change_refused_on_a_later_try_after_a_503_may_have_been_made(
    fake: FakeOpenRouter, make_client, method: str
) -> None:
    """The first try is answered 503 by a gateway after the API acted; while the client waits, the
    credential is revoked, and the try sent again is refused (401). That refusal says nothing of
    the first try: the change is in doubt, not failed."""
    (key,) = add_keys(fake, 1)
    fake.faults.server_error(1, 503, retry_after=0.05, method=method, after_processing=True)
    client = make_client()

    with pytest.raises(OutcomeUnknown, match=r"401.*a try was answered 503"):
        if method == "PATCH":
            client.update_key(key, disabled=True, before_resend=lambda _: fake.revoke(MANAGEMENT_KEY))
        else:
            client.delete_key(key, before_resend=lambda _: fake.revoke(MANAGEMENT_KEY))

    fake.restore(MANAGEMENT_KEY)
    assert (fake.get(key) is None) if method == "DELETE" else (fake.get(key)["disabled"] is True)  # type: ignore[index]


@pytest.mark.parametrize(("refusal", "maybe_made"), [(429, False), (503, True)])
def test_a_change_is_sent_again_only_after_its_caller_looked_at_the_key_again(
    fake: FakeOpenRouter, make_client, refusal: int, maybe_made: bool
) -> None:
    (key,) = add_keys(fake, 1)
    if refusal == 429:
        fake.faults.rate_limit(2, retry_after=0.05, method="PATCH")
    else:
        fake.faults.server_error(2, 503, retry_after=0.05, method="PATCH")
    looked: list[tuple[bool, int]] = []

    def before_resend(may_have_been_made: bool) -> None:
        looked.append((may_have_been_made, len([call for call in fake.calls if call.method == "PATCH"])))

    make_client().update_key(key, disabled=True, before_resend=before_resend)

    # Called once before each try sent again, after the wait: never before the first.
    assert looked == [(maybe_made, 1), (maybe_made, 2)]
    assert [call.status for call in fake.calls if call.method == "PATCH"] == [refusal, refusal, 200]


def test_a_change_its_caller_withdraws_before_it_is_sent_again_is_not_sent(fake: FakeOpenRouter, make_client) -> None:
    class Withdrawn(Exception):
        pass

    (key,) = add_keys(fake, 1)
    fake.faults.rate_limit(1, retry_after=0.05, method="DELETE")

    def before_resend(_: bool) -> None:
        raise Withdrawn("the key was renamed into a protected name meanwhile")

    with pytest.raises(Withdrawn):
        make_client().delete_key(key, before_resend=before_resend)

    assert fake.get(key) is not None
    assert [call.status for call in fake.calls if call.method == "DELETE"] == [429]


@pytest.mark.parametrize(("refusal", "raised"), [(503, OutcomeUnknown), (429, NotFound)])
def test_a_delete_gone_after_a_refusal_is_in_doubt_only_after_a_503(
    fake: FakeOpenRouter, make_client, refusal: int, raised: type[Exception]
) -> None:
    """The key is gone when the DELETE is sent again. After a 429 that is someone else's doing; after
    a 503 it may be ours (a gateway answering 503 once the API acted): in doubt, settled by a GET."""
    key = add_keys(fake, 1)[0]
    if refusal == 429:
        fake.faults.rate_limit(1, retry_after=0.05, method="DELETE")
    else:
        fake.faults.server_error(1, 503, retry_after=0.05, method="DELETE")
    fake.delete_key(key)  # gone before the DELETE is sent again

    with pytest.raises(raised):
        make_client().delete_key(key)

    assert [call.status for call in fake.calls if call.method == "DELETE"] == [refusal, 404]


def test_retries_stop_when_the_budget_runs_out(fake: FakeOpenRouter, make_client) -> None:
    add_keys(fake, 10)
    fake.faults.server_error(1000, status=503, retry_after=0.05, path="/keys")

    with pytest.raises(ServerError) as caught:
        make_client(concurrency=1, retry_seconds=0.4).list_all_keys([None])

    # Stopped by the budget, not by the fault running out: 0.4 s of 0.05 s waits is a handful of tries.
    assert len([call for call in fake.calls if call.path == "/keys"]) < 20
    assert caught.value.status == 503
    assert "503" in str(caught.value)


def test_rate_limit_that_never_ends_raises_rate_limited(fake: FakeOpenRouter, make_client) -> None:
    fake.faults.rate_limit(1000, retry_after=0.05, path="/keys")

    with pytest.raises(RateLimited):
        make_client(retry_seconds=0.3).list_keys_page(workspace_id=None, offset=0)


def test_client_errors_are_not_retried(fake: FakeOpenRouter, make_client) -> None:
    with pytest.raises(NotFound):
        make_client().get_key("0" * 64)

    assert len(fake.calls) == 1


@pytest.mark.parametrize("kind", ["malformed", "truncated"])
def test_a_broken_page_is_a_malformed_response(fake: FakeOpenRouter, make_client, kind: str) -> None:
    add_keys(fake, 20)
    getattr(fake.faults, kind)(1)

    # One request at a time, so that the broken answer is the first page's: with more, an offset
    # asked for ahead (past the end of the list) may take it, and is rightly dropped unread.
    with pytest.raises(MalformedResponse):
        make_client(concurrency=1).list_all_keys([None])


def test_an_unreachable_api_is_a_connection_failure_naming_no_secret() -> None:
    client = KeysClient("http://127.0.0.1:9/api/v1", MANAGEMENT_KEY, retry_seconds=0.3)
    with client, pytest.raises(ConnectionFailed) as caught:
        client.current_key()

    assert "cannot reach the API at http://127.0.0.1:9/api/v1 (ConnectError: Connection refused)" in str(caught.value)
    assert MANAGEMENT_KEY not in str(caught.value) + repr(client)


def test_an_unknown_key_is_rejected_with_a_typed_error(fake: FakeOpenRouter, make_client) -> None:
    with pytest.raises(AuthenticationFailed) as caught:
        make_client(key="sk-or-v1-" + "0" * 64).current_key()

    assert caught.value.status == 401


# -- the concurrency bound ------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 2, 5])
def test_never_more_requests_in_flight_than_the_concurrency(
    fake: FakeOpenRouter, make_client, concurrency: int
) -> None:
    for name in ("A", "B"):
        add_keys(fake, 230, workspace_id=fake.add_workspace(name)["id"], prefix=name)
    add_keys(fake, 120)
    fake.faults.latency = 0.02
    fake.faults.rate_limit(3, retry_after=0.05, path="/keys")  # retries must not exceed it either
    client = make_client(concurrency=concurrency)

    listing = client.list_all_keys([workspace.id for workspace in client.list_workspaces()])

    assert len(listing.keys) == 580
    assert fake.max_in_flight <= concurrency
    if concurrency > 1:
        assert fake.max_in_flight >= 2  # and it does fetch concurrently


# -- models -------------------------------------------------------------------------------------


def test_unknown_fields_are_kept_in_the_raw_json(fake: FakeOpenRouter, make_client) -> None:
    add_keys(fake, 3)
    fake.extra_fields = {"brand_new_field": {"nested": [1, 2]}, "is_free_tier": False}

    keys = make_client().list_all_keys([None]).keys.values()

    assert all(key.raw["brand_new_field"] == {"nested": [1, 2]} for key in keys)


def test_json_that_only_the_standard_library_reads_is_still_read(fake: FakeOpenRouter, make_client) -> None:
    # The fast decoder refuses a lone surrogate escape ("\ud800", which JSON allows) and integers
    # beyond 64 bits; such a page is read as it always was, not refused.
    hashes = add_keys(fake, 3)
    odd = fake.add_key("half a pair \ud800", created_at=NOW)["hash"]
    fake.extra_fields = {"quota_tokens": 2**70}

    keys = make_client().list_all_keys([None]).keys

    assert set(keys) == {*hashes, odd}
    assert keys[odd].name == "half a pair \ud800"
    assert all(key.raw["quota_tokens"] == 2**70 for key in keys.values())


def test_missing_newer_fields_are_tolerated(fake: FakeOpenRouter, make_client) -> None:
    hashes = add_keys(fake, 3)
    fake.omit_fields = {"expires_at", "last_used_at", "workspace_id", "external_user", "creator_user_id"}

    keys = make_client().list_all_keys([None]).keys

    assert sorted(keys) == sorted(hashes)
    for key in keys.values():
        assert (key.expires_at, key.last_used_at, key.workspace_id, key.external_user) == (None, None, None, None)
        assert not key.reports_last_used


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-08-24T10:30:00Z", datetime(2025, 8, 24, 10, 30, tzinfo=UTC)),
        ("2025-02-19T20:52:27.363244+00:00", datetime(2025, 2, 19, 20, 52, 27, 363244, tzinfo=UTC)),
    ],
)
def test_both_timestamp_styles_are_read(text: str, expected: datetime) -> None:
    key = Key.from_api({"hash": "a" * 64, "name": "k", "created_at": text, "last_used_at": text})

    assert key.created_at == expected
    assert key.last_used_at == expected


def test_both_timestamp_styles_from_the_fake(fake: FakeOpenRouter, make_client) -> None:
    created = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    for index in range(40):  # hashes starting 0-4 come in the microsecond "+00:00" style
        fake.add_key(f"k{index}", created_at=created)

    keys = make_client().list_all_keys([None]).keys.values()
    styles = {key.raw["created_at"].endswith("Z") for key in keys}

    assert styles == {True, False}
    for key in keys:  # the "Z" style carries whole seconds only
        expected = created.replace(microsecond=0) if key.raw["created_at"].endswith("Z") else created
        assert key.created_at == expected


@pytest.mark.parametrize("field", ["disabled", "usage"])
def test_a_key_without_its_state_or_its_use_is_malformed(fake: FakeOpenRouter, make_client, field: str) -> None:
    # Read as a default, a key missing 'disabled' would be enabled, and one missing 'usage' would
    # show no use in any snapshot: an 'unused' rule would disable a key in use. Newer fields may be
    # missing (an older API), these two never are.
    (key,) = add_keys(fake, 1)
    fake.omit_fields = {field}
    client = make_client()

    with pytest.raises(MalformedResponse, match=f"without '{field}'"):
        client.list_all_keys([None])
    with pytest.raises(MalformedResponse, match=f"without '{field}'"):
        client.get_key(key)


def test_an_answer_about_another_key_is_malformed(fake: FakeOpenRouter, fake_url: str) -> None:
    """A cache or proxy that mixed up its answers: the fresh check before a change must be of the
    key to be changed (before, the other key's state was taken for it), and so must a PATCH's answer."""
    asked, other = add_keys(fake, 2)
    with (
        serving(Front(upstream=fake_url.split("/api/")[0], rewrite={asked: other})) as front,
        KeysClient(f"{front.url}/api/v1", MANAGEMENT_KEY, retry_seconds=0) as client,
    ):
        with pytest.raises(MalformedResponse, match=f"asked about key {asked[:12]}, answered about key {other[:12]}"):
            client.get_key(asked)
        with pytest.raises(MalformedResponse, match=re.escape("PATCH /keys/{hash}: asked about key")):
            client.update_key(asked, name="renamed")  # (the front sent it to the other key)


@pytest.mark.parametrize(
    "broken",
    [{"usage": "12"}, {"disabled": "yes"}, {"created_at": "yesterday"}, {"hash": None}, {"name": 5}],
)
def test_a_field_of_the_wrong_type_is_malformed(broken: dict[str, object]) -> None:
    data = {"hash": "a" * 64, "name": "k", "created_at": "2025-08-24T10:30:00Z", **broken}

    with pytest.raises(MalformedResponse):
        Key.from_api(data)


def test_the_deprecated_provisioning_flag_still_means_management() -> None:
    assert CurrentKey.from_api({"label": "x", "is_provisioning_key": True}).is_management_key
    assert not CurrentKey.from_api({"label": "x"}).is_management_key


def test_an_answer_slower_than_the_timeout_is_retried_for_a_read_and_in_doubt_for_a_change(
    fake: FakeOpenRouter, fake_url: str
) -> None:
    key = add_keys(fake, 1)[0]
    fake.faults.slow_answer(1, 2.0, method="GET", path="/key")
    fake.faults.slow_answer(1, 2.0, method="PATCH")
    with KeysClient(fake_url, MANAGEMENT_KEY, timeout=0.5, retry_seconds=5) as client:
        assert client.current_key().is_management_key  # the second try is answered in time
        with pytest.raises(OutcomeUnknown, match="did not answer in time"):
            client.update_key(key, disabled=True)
    assert fake.change_counts()[("PATCH", key)] == 1


def test_compressed_answers_are_read(fake: FakeOpenRouter, fake_url: str) -> None:
    """Behind a CDN that gzips what it answers."""
    hashes = add_keys(fake, 150)
    with (
        serving(Front(upstream=fake_url.split("/api/")[0], compress=True)) as front,
        KeysClient(f"{front.url}/api/v1", MANAGEMENT_KEY, retry_seconds=0) as client,
    ):
        assert sorted(client.list_all_keys([None]).keys) == sorted(hashes)
    assert any(target.startswith("/api/v1/keys?") for target in front.compressed)


def test_a_garbled_compressed_answer_is_retried_for_a_read_and_in_doubt_for_a_change(
    fake: FakeOpenRouter, fake_url: str
) -> None:
    """A proxy that says gzip and sends something else: the read is asked again; the change may
    have been made, so it is not sent again."""
    first, second = add_keys(fake, 2)
    with (
        serving(Front(upstream=fake_url.split("/api/")[0], corrupt=1)) as front,
        KeysClient(f"{front.url}/api/v1", MANAGEMENT_KEY, retry_seconds=5) as client,
    ):
        assert client.get_key(first).hash == first
        assert front.targets == [f"/api/v1/keys/{first}"] * 2

        front.corrupt = 1
        with pytest.raises(OutcomeUnknown, match="could not be decoded"):
            client.update_key(second, disabled=True)
    assert fake.change_counts()[("PATCH", second)] == 1
    assert fake.get(second)["disabled"] is True  # type: ignore[index]


def test_a_proxy_that_cannot_be_reached_is_named_in_the_error_without_its_password(
    fake_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It said "cannot reach the API at ..." alone: an operator looked for the API's trouble, not the proxy's."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://ops:Pr0xyPw@127.0.0.1:9")  # nothing listens there

    with KeysClient(fake_url, MANAGEMENT_KEY, retry_seconds=0) as client, pytest.raises(ConnectionFailed) as failed:
        client.list_keys_page(workspace_id=None, offset=0)

    assert f"cannot reach the API at {fake_url} through the proxy 127.0.0.1:9 (" in str(failed.value)
    assert "Pr0xyPw" not in str(failed.value)


@pytest.mark.parametrize("written", ["as a URL", "without its scheme"])
def test_the_proxy_the_environment_names_is_used_unless_no_proxy_exempts_the_host(
    fake: FakeOpenRouter, fake_url: str, monkeypatch: pytest.MonkeyPatch, written: str
) -> None:
    """Behind an outbound proxy, operators set HTTP(S)_PROXY as for curl (which, like httpx's own
    client, takes host:port as http://host:port; it failed every request); NO_PROXY exempts hosts."""
    first = add_keys(fake, 3)[0]
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with serving(Front()) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url if written == "as a URL" else proxy.url.removeprefix("http://"))
        with KeysClient(fake_url, MANAGEMENT_KEY, retry_seconds=0) as client:
            assert client.list_keys_page(workspace_id=None, offset=0)[0].hash == first
        assert proxy.targets == [f"{fake_url}/keys?include_disabled=true&include_expired=true&offset=0"]

        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        with KeysClient(fake_url, MANAGEMENT_KEY, retry_seconds=0) as client:
            assert client.list_keys_page(workspace_id=None, offset=0)[0].hash == first
        assert len(proxy.targets) == 1  # not through the proxy
