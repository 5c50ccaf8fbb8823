"""The management key never shows: not in logs (tracebacks included), errors, the database or output.

The ``cli`` fixture already fails any command whose output carries MANAGEMENT_KEY; these tests
push the key into the places it could slip through.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from db.models import Base
from keyhygiene import logging as khlog
from keyhygiene.context import Database
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.fakeapi.webhook import WebhookSink
from keyhygiene.jobs import execute
from keyhygiene.keysapi.client import KeysClient
from keyhygiene.keysapi.errors import ApiError
from keyhygiene.settings import Settings
from tests.conftest import MANAGEMENT_KEY

KEY_BODY = MANAGEMENT_KEY.removeprefix("sk-or-v1-")


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    yield stream
    khlog.clear()


def leaks(text: str) -> bool:
    return MANAGEMENT_KEY in text or KEY_BODY in text


def _raise_with_key() -> None:
    headers = {"Authorization": f"Bearer {MANAGEMENT_KEY}"}  # a local a traceback could show
    raise RuntimeError(f"the API refused {MANAGEMENT_KEY} ({len(headers)} headers)")


@pytest.mark.parametrize("log_format", ["json", "console"])
@pytest.mark.parametrize("source", ["structlog", "stdlib"])
def test_an_exception_carrying_the_key_is_logged_without_it(
    log_stream: io.StringIO, log_format: str, source: str
) -> None:
    khlog.configure_logging(log_format, stream=log_stream)
    khlog.bind(credential=MANAGEMENT_KEY)

    try:
        _raise_with_key()
    except RuntimeError:
        if source == "structlog":
            khlog.get_logger("test").exception("api_call_failed", key=MANAGEMENT_KEY, nested={"k": [MANAGEMENT_KEY]})
        else:
            logging.getLogger("some.library").exception("request with %s failed", MANAGEMENT_KEY)

    output = log_stream.getvalue()
    assert "the API refused" in output and "RuntimeError" in output  # the traceback is there...
    assert "[REDACTED]" in output
    assert not leaks(output)  # ...without the key
    if log_format == "json":
        assert all(json.loads(line)["level"] == "error" for line in output.splitlines())


def test_a_registered_secret_of_any_shape_is_redacted(log_stream: io.StringIO) -> None:
    secret = "corp-vault-token-7f3a9c"  # not shaped like an OpenRouter key
    khlog.register_secret(secret)
    khlog.configure_logging("json", stream=log_stream)

    khlog.get_logger("test").warning("retrying", url=f"https://proxy.example/?token={secret}")

    assert secret not in log_stream.getvalue()
    assert "[REDACTED]" in log_stream.getvalue()


@settings(max_examples=300, deadline=None)
@given(
    key=st.text(alphabet="ab9-_'\"\\", min_size=8, max_size=20),
    before=st.text(alphabet=" '\"x", max_size=3),
    after=st.text(alphabet=" '\"x", max_size=3),
)
def test_a_registered_secret_is_redacted_however_a_message_quotes_it(key: str, before: str, after: str) -> None:
    """Messages quote a refused value as Python's repr does: a key holding a quote or a backslash
    is printed escaped, and how depends on the quotes of the whole value it was pasted in."""
    known = khlog._secrets, khlog._ordered
    khlog._secrets, khlog._ordered = set(), []  # this key alone, as in a new process
    try:
        khlog.register_secret(key)
        for quoted in (repr(before + key + after), json.dumps(before + key + after)):
            shown = khlog.redact_text(quoted)
            assert key not in shown.encode().decode("unicode_escape"), shown
    finally:
        khlog._secrets, khlog._ordered = known


def test_tracebacks_in_json_logs_carry_no_local_variables(log_stream: io.StringIO) -> None:
    khlog.configure_logging("json", stream=log_stream)

    def connect() -> None:
        password = "hunter2-is-not-key-shaped"  # noqa: F841 - the local variable is the point
        raise ConnectionError("database refused the connection")

    try:
        connect()
    except ConnectionError:
        khlog.get_logger("test").exception("db_failed")

    assert "database refused the connection" in log_stream.getvalue()
    assert "hunter2" not in log_stream.getvalue()


def test_other_log_handlers_receive_the_event_already_redacted(
    log_stream: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    khlog.configure_logging("json", stream=log_stream)
    logging.getLogger().addHandler(caplog.handler)  # as pytest's own capture, or an operator's handler
    try:
        khlog.get_logger("test").info("using_key", key=MANAGEMENT_KEY)
    finally:
        logging.getLogger().removeHandler(caplog.handler)

    assert caplog.records
    assert not leaks(caplog.text + repr([record.msg for record in caplog.records]))


def test_errors_never_carry_the_key_even_when_the_api_echoes_it() -> None:
    # A proxy that echoes the credential into its error body: behaviour the fake API does not
    # have, so this one test answers at the transport (httpx.MockTransport).
    def echoing_proxy(request: httpx.Request) -> httpx.Response:
        message = f"upstream rejected credential {request.headers['Authorization']}"
        return httpx.Response(400, json={"error": {"code": 400, "message": message}})

    client = KeysClient("http://proxy.invalid/api/v1", MANAGEMENT_KEY, transport=httpx.MockTransport(echoing_proxy))
    with client, pytest.raises(ApiError) as caught:
        client.list_keys_page(workspace_id=None, offset=0)

    assert "upstream rejected credential Bearer [REDACTED]" in str(caught.value)
    assert not leaks(str(caught.value) + repr(caught.value) + repr(client))


def _every_stored_value(database: Database) -> str:
    parts: list[str] = []
    with database.engine.connect() as connection:
        for table in Base.metadata.sorted_tables:
            for row in connection.execute(select(table)):
                parts.extend(json.dumps(value, default=str) for value in row)
    return "\n".join(parts)


def test_the_database_never_holds_the_key(
    database: Database,
    fake: FakeOpenRouter,
    fake_url: str,
    env: dict[str, str],
    cli,
    rules_file,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYHYGIENE_HTTP_RETRY_SECONDS", "0.3")
    for index in range(120):
        fake.add_key(f"key-{index}", disabled=index % 7 == 0)
    fake.add_regular_key(hash=fake.keys[0]["hash"])
    rules_file(
        "[safety]\ndry_run = false\nmax_action_percent = 100\nmax_actions_per_run = 500\n\n"
        '[[rule]]\nname = "off"\nmatch = "unused"\nidle_for = "1d"\naction = "disable"\n'
    )
    assert cli("sync").exit_code == 0
    assert cli("run").exit_code in (0, 3)
    fake.faults.server_error(10_000, status=503, retry_after=0.01, path="/keys")
    failed = cli("sync")
    assert failed.exit_code == 1

    # A sync that failed on an API echoing the key stores its error too.
    def echoing_proxy(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/workspaces"):
            return httpx.Response(200, json={"data": [], "total_count": 0})
        return httpx.Response(400, json={"error": {"code": 400, "message": request.headers["Authorization"]}})

    settings = Settings(_env_file=None, OPENROUTER_MANAGEMENT_KEY=MANAGEMENT_KEY)  # type: ignore[call-arg]
    with KeysClient(fake_url, MANAGEMENT_KEY, transport=httpx.MockTransport(echoing_proxy)) as client:
        outcome = execute("sync", settings, database=database, client=client)
    assert outcome.exit_code == 1
    assert not leaks(outcome.message)

    stored = _every_stored_value(database)
    assert "key-119" in stored and "[REDACTED]" in stored  # the scan sees the rows and the error
    assert not leaks(stored)


def test_an_unexpected_error_carrying_the_key_is_not_stored(
    database: Database, fake: FakeOpenRouter, env: dict[str, str], cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any, **__: Any) -> None:  # a bug somewhere below the job, quoting the key
        raise RuntimeError(f"cannot use {MANAGEMENT_KEY}")

    monkeypatch.setattr(KeysClient, "stream_keys", broken)
    # A notice of the failure goes out too, with the run's message in it.
    Path(env["KEYHYGIENE_RULES_FILE"]).write_text(
        '[[notify]]\nname = "ops"\nurl_env = "KH_TEST_WEBHOOK"\nformat = "json"\non = ["failed"]\n'
    )
    with WebhookSink() as sink:
        monkeypatch.setenv("KH_TEST_WEBHOOK", sink.url)
        result = cli("sync")

    assert result.exit_code == 1
    stored = _every_stored_value(database)
    assert "cannot use [REDACTED]" in stored  # the scan sees the run's message and the notice
    assert not leaks(stored)
    assert [body["message"] for body in sink.bodies()] == ["unexpected error: RuntimeError: cannot use [REDACTED]"]


def test_an_audit_error_quoting_an_echoed_credential_is_stored_and_reported_without_it(
    database: Database, fake: FakeOpenRouter, env: dict[str, str], cli, rules_file
) -> None:
    """An upstream that echoes the request's Authorization header into a key object's field: the
    fresh check before the change refuses the object and quotes the field's value in its error,
    which the audit keeps and `report actions` prints."""
    fake.add_key("busy", last_used_at=None)
    idle = fake.add_key("idle", created_at="2025-01-01T00:00:00Z", last_used_at="2025-02-01T00:00:00Z")["hash"]
    rules_file(
        "[safety]\ndry_run = false\nmax_action_percent = 100\n\n"
        '[[rule]]\nname = "off"\nmatch = "unused"\nidle_for = "30d"\naction = "disable"\n'
    )
    assert cli("sync").exit_code == 0
    echoed = fake._keys[idle]
    echoed.disabled = "Bearer " + MANAGEMENT_KEY  # type: ignore[assignment]
    echoed.changed()

    enforced = cli("enforce")

    [row] = json.loads(cli("report", "actions", "--since", "1d", "--format", "json").stdout)
    assert (row["key_hash"], row["outcome"]) == (idle, "failed")
    assert "field 'disabled' is 'Bearer [REDACTED]'" in row["error"]
    assert not leaks(enforced.stdout + enforced.stderr)
    assert not leaks(_every_stored_value(database))


@pytest.mark.parametrize(
    "argument",
    [
        MANAGEMENT_KEY.removeprefix("sk-or-v1-"),  # pasted without its prefix: shaped like a key's hash
        "x" + MANAGEMENT_KEY,  # a stray character before it
        MANAGEMENT_KEY[:40],  # cut short
    ],
)
def test_enable_refuses_an_argument_holding_the_management_key_and_stores_nothing(
    database: Database, fake: FakeOpenRouter, env: dict[str, str], cli, argument: str
) -> None:
    assert cli("sync").exit_code == 0
    fake.clear_calls()

    result = cli("enable", argument)

    assert result.exit_code == 2
    assert "holds the management key" in result.stderr or "is an OpenRouter API key" in result.stderr
    assert fake.calls == []
    assert not leaks(result.stdout + result.stderr)
    assert MANAGEMENT_KEY.removeprefix("sk-or-v1-")[:16] not in _every_stored_value(database)


def test_rules_check_and_its_warnings_never_show_a_key_pasted_into_the_rules_file(
    env: dict[str, str], cli, tmp_path: Path
) -> None:
    # Named so that the session's secret scan takes it for what it is: an input holding the key.
    pasted = tmp_path / "management_key_pasted.toml"
    pasted.write_text(
        f'[safety]\nprotect_hashes = ["{MANAGEMENT_KEY}"]\n\n'
        '[[rule]]\nname = "x"\nmatch = "expired"\naction = "report"\n'
    )

    result = cli("rules", "check", str(pasted))

    assert result.exit_code == 0, result.stderr
    assert "[REDACTED]" in result.stdout
    [warning] = result.events_named("rules_warning")
    assert "protect_hashes" in warning["message"] and "[REDACTED]" in warning["message"]
    assert not leaks(result.stdout + result.stderr)


def test_a_bug_outside_a_job_prints_its_traceback_without_the_key(
    database: Database, env: dict[str, str], cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keyhygiene import status

    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError(f"cannot use {MANAGEMENT_KEY}")

    monkeypatch.setattr(status, "read_status", broken)

    result = cli("status")  # the logs are JSON here: the traceback is in the last event

    assert result.exit_code == 1
    [failed] = result.events_named("command_failed")
    assert failed["error"] == "unexpected error: RuntimeError('cannot use [REDACTED]')"
    [exception] = failed["exception"]
    assert (exception["exc_type"], exception["exc_value"]) == ("RuntimeError", "cannot use [REDACTED]")
    assert exception["frames"][-1]["name"] == "broken"
    assert not leaks(result.stdout + result.stderr)

    monkeypatch.setenv("KEYHYGIENE_LOG_FORMAT", "console")
    result = cli("status")

    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "RuntimeError: cannot use [REDACTED]" in result.stderr
    assert not leaks(result.stdout + result.stderr)


def test_a_secret_in_a_field_the_api_adds_is_not_stored(
    database: Database, fake: FakeOpenRouter, env: dict[str, str], cli
) -> None:
    """Fields keyhygiene does not know are kept as the API sent them: a key's secret among them (an
    upstream that sends it) was stored too."""
    fake.add_key("svc")
    fake.extra_fields = {"key": MANAGEMENT_KEY, "future_field": {"note": f"made with {MANAGEMENT_KEY}", "n": 2.5}}

    assert cli("sync").exit_code == 0

    stored = _every_stored_value(database)
    assert "future_field" in stored and "[REDACTED]" in stored and "2.5" in stored
    assert not leaks(stored)
