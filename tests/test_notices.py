"""Webhook notices as an operator and a key's owner receive them: a real HTTP receiver on 127.0.0.1,
the fake API over HTTP, the real command line, SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update
from structlog.testing import capture_logs

from db import notices as stored_notices
from db import runs
from db.models import Action, Notice
from keyhygiene.context import Database, session_scope
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.fakeapi.webhook import WebhookSink
from keyhygiene.jobs import JobOutcome
from keyhygiene.notices import UNREACHED, Sender, after_run
from keyhygiene.notices import payload as notice_body
from keyhygiene.rules import NotifyTarget, parse_rules
from keyhygiene.settings import Settings
from keyhygiene.timeutil import utcnow

from .celery_support import keyhygiene_executable, wait_until
from .conftest import CliResult

DAY = timedelta(days=1)
SIGNING_SECRET = "whsec-" + "9f" * 16


def _rules(*, on: str, dry_run: bool = False, max_actions: int = 50, fmt: str = "json", within: str = "7d") -> str:
    return f"""
[safety]
dry_run = {str(dry_run).lower()}
max_actions_per_run = {max_actions}
max_action_percent = 100

[[rule]]
name = "delete-expired"
match = "expired"
action = "delete"
grace = "0d"

[[rule]]
name = "disable-idle"
match = "unused"
idle_for = "30d"
action = "disable"

[[notify]]
name = "ops"
url_env = "KH_TEST_WEBHOOK"
format = "{fmt}"
secret_env = "KH_TEST_WEBHOOK_SECRET"
on = {on}
upcoming_within = "{within}"
"""


@pytest.fixture(autouse=True)
def migrated(database: Database) -> Database:
    return database


@pytest.fixture
def sink(monkeypatch: pytest.MonkeyPatch) -> Iterator[WebhookSink]:
    with WebhookSink() as receiver:
        monkeypatch.setenv("KH_TEST_WEBHOOK", receiver.url)
        monkeypatch.setenv("KH_TEST_WEBHOOK_SECRET", SIGNING_SECRET)
        yield receiver


def _stored_text(env: dict[str, str]) -> str:
    """Every value the database holds, as text (for the secret checks)."""
    database = Database.open(Settings(KEYHYGIENE_DATABASE_URL=env["KEYHYGIENE_DATABASE_URL"]), check=False)  # type: ignore[call-arg]
    try:
        with database.sessions() as session:
            parts = [repr(row) for row in session.execute(select(Notice.__table__))]
            parts += [repr(row) for row in session.execute(select(Action.__table__))]
        return "\n".join(parts)
    finally:
        database.close()


def _notices(env: dict[str, str]) -> list[dict[str, Any]]:
    database = Database.open(Settings(KEYHYGIENE_DATABASE_URL=env["KEYHYGIENE_DATABASE_URL"]), check=False)  # type: ignore[call-arg]
    try:
        with database.sessions() as session:
            return [dict(row._mapping) for row in session.execute(select(Notice.__table__).order_by(Notice.id))]
    finally:
        database.close()


def _assert_no_secret(sink: WebhookSink, env: dict[str, str], *results: CliResult) -> None:
    for result in results:
        for secret in (sink.token, SIGNING_SECRET):
            assert secret not in result.stdout + result.stderr, "a webhook secret leaked into output"
    stored = _stored_text(env)
    assert sink.token not in stored and SIGNING_SECRET not in stored, "a webhook secret was stored"


def _expired_keys(fake: FakeOpenRouter, count: int) -> list[str]:
    now = utcnow()
    return [
        fake.add_key(f"old-{n}", created_at=now - 90 * DAY, expires_at=now - DAY, creator_user_id=f"user_{n}")["hash"]
        for n in range(count)
    ]


def test_a_run_that_changed_keys_sends_one_notice_with_its_counts_and_keys(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    sink: WebhookSink,
) -> None:
    rules_file(_rules(on='["done", "failed", "refused"]'))
    expired = _expired_keys(fake, 3)
    fake.add_key("fresh", created_at=utcnow() - DAY)

    result = cli("run")

    assert result.exit_code == 0, result.stderr
    assert [call.method for call in fake.mutating_calls()].count("DELETE") == 3
    (body,) = sink.bodies()
    assert body["event"] == "run"
    assert body["outcome"] == "done"
    assert body["run_id"] == result.events_named("run_finished")[0]["run_id"]
    assert body["counts"]["done"] == 3
    assert body["counts"]["keys"] == 4
    assert sorted(key["key_hash"] for key in body["keys"]) == sorted(expired)
    assert {key["action"] for key in body["keys"]} == {"delete"}
    assert body["more"] == 0
    (stored,) = _notices(env)
    assert (stored["target"], stored["event"], stored["status"], stored["attempts"]) == ("ops", "run", "sent", 1)
    assert result.events_named("notice_sent")
    _assert_no_secret(sink, env, result)


def test_keys_given_back_by_undo_or_enable_send_a_done_notice(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    sink: WebhookSink,
) -> None:
    rules_file(_rules(on='["done", "failed", "refused"]'))
    now = utcnow()
    idle = [fake.add_key(f"idle-{n}", created_at=now - 90 * DAY, last_used_at=now - 60 * DAY)["hash"] for n in range(2)]
    disabling = cli("run")
    assert disabling.exit_code == 0, disabling.stderr
    assert len(sink.bodies()) == 1

    assert cli("undo", str(disabling.events_named("run_finished")[0]["run_id"]), "--dry-run").exit_code == 0
    assert len(sink.bodies()) == 1  # a dry run changes nothing: no notice
    undone = cli("undo", str(disabling.events_named("run_finished")[0]["run_id"]))

    assert undone.exit_code == 0, undone.stderr
    body = sink.bodies()[-1]
    assert (body["event"], body["outcome"], body["dry_run"]) == ("run", "done", False)
    assert body["run_id"] == undone.events_named("run_finished")[0]["run_id"]
    assert body["counts"]["done"] == 2
    assert sorted(key["key_hash"] for key in body["keys"]) == sorted(idle)
    assert {key["action"] for key in body["keys"]} == {"enable"}


def test_the_json_notice_is_signed_with_the_shared_secret(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    sink: WebhookSink,
) -> None:
    rules_file(_rules(on='["done"]'))
    _expired_keys(fake, 1)

    assert cli("run").exit_code == 0

    (received,) = sink.received
    expected = "sha256=" + hmac.new(SIGNING_SECRET.encode(), received.body, hashlib.sha256).hexdigest()
    assert received.headers["X-Keyhygiene-Signature"] == expected
    assert received.headers["Content-Type"] == "application/json"


def test_a_refused_run_lists_what_it_planned_and_no_notice_goes_where_on_excludes_it(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    sink: WebhookSink,
) -> None:
    expired = _expired_keys(fake, 60)

    rules_file(_rules(on='["done", "failed"]', max_actions=5))
    assert cli("run").exit_code == 3
    assert sink.received == [], "on excludes refused: nothing should be sent"

    rules_file(_rules(on='["refused"]', max_actions=5))
    result = cli("enforce")

    assert result.exit_code == 3
    (body,) = sink.bodies()
    assert (body["event"], body["outcome"]) == ("run", "refused")
    assert body["counts"]["planned_changes"] == 60
    assert len(body["keys"]) == 50 and body["more"] == 10
    assert {key["key_hash"] for key in body["keys"]} <= set(expired)
    assert fake.mutating_calls() == []


def test_slack_gets_a_summary_line_and_the_keys_as_a_list(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    sink: WebhookSink,
) -> None:
    rules_file(_rules(on='["done"]', fmt="slack"))
    _expired_keys(fake, 2)

    assert cli("run").exit_code == 0

    (body,) = sink.bodies()
    lines = body["text"].splitlines()
    assert lines[0].startswith("keyhygiene run ") and ": done" in lines[0]
    assert sorted(line.split("`")[1] for line in lines[1:]) == ["old-0", "old-1"]


def test_a_slack_target_with_a_secret_env_is_sent_unsigned_and_needs_no_secret(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    sink: WebhookSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``secret_env`` is for json targets only (the interface's example puts one on a slack target):
    with only the webhook's variable set, the slack target still gets its notice, and `rules check`
    says the setting does nothing. Before, every notice of that target failed."""
    rules_file(_rules(on='["done"]', fmt="slack"))
    monkeypatch.delenv("KH_TEST_WEBHOOK_SECRET")
    _expired_keys(fake, 1)

    checked = cli("rules", "check")
    assert checked.exit_code == 0, checked.stderr
    assert "secret_env: has no effect: only json targets are signed, and this one is slack" in checked.stderr
    assert "signed" not in checked.stdout
    assert cli("run").exit_code == 0

    (received,) = sink.received
    assert "X-Keyhygiene-Signature" not in received.headers
    assert json.loads(received.body)["text"].startswith("keyhygiene run ")


def test_upcoming_actions_are_announced_once_and_again_when_the_due_date_moves(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    sink: WebhookSink,
) -> None:
    now = utcnow()
    # Idle for 25 days: the 30-day rule disables it in about 5 days, inside the 7-day warning.
    soon = fake.add_key(
        "svc-soon", created_at=now - 60 * DAY, last_used_at=now - 25 * DAY, usage=3.0, creator_user_id="user_owner"
    )["hash"]
    fake.add_key("svc-later", created_at=now - 60 * DAY, last_used_at=now - 5 * DAY, usage=1.0)
    rules_file(_rules(on='["upcoming"]', within="7d"))

    first = cli("run")
    second = cli("run")

    assert first.exit_code == 0 and second.exit_code == 0
    (body,) = sink.bodies()  # once: the second run says nothing new
    assert body["event"] == "upcoming"
    (key,) = body["keys"]
    assert (key["key_hash"], key["rule"], key["action"], key["owner"]) == (
        soon,
        "disable-idle",
        "disable",
        "user_owner",
    )
    assert key["workspace"] == "Default"  # the workspace's name, not its id
    due = key["due"]
    assert (now + 4 * DAY).isoformat() < due < (now + 6 * DAY).isoformat()

    # Used again (a free model: no spend, a newer last_used_at): due a day later, and announced anew.
    fake.record_use(soon, 0.0, at=now - 24 * DAY)
    assert cli("run").exit_code == 0

    bodies = sink.bodies()
    assert len(bodies) == 2
    (again,) = bodies[1]["keys"]
    assert again["key_hash"] == soon and again["due"] > due


def _idle_soon(fake: FakeOpenRouter) -> str:
    """A key idle for 25 days: the 30-day rule disables it in about 5 days, inside a 7-day warning."""
    now = utcnow()
    return str(fake.add_key("svc-soon", created_at=now - 60 * DAY, last_used_at=now - 25 * DAY, usage=3.0)["hash"])


def _keyhygiene(*args: str) -> subprocess.Popen[str]:
    """``keyhygiene ARGS...`` as its own process, with this test's environment."""
    return subprocess.Popen([keyhygiene_executable(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_runs_at_once_announce_an_upcoming_action_once(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    sink: WebhookSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dry-run enforce from cron beside the worker's: the receiver takes 5 s to (not) answer the
    first one's notice, and the second one, started meanwhile, must not announce the key again."""
    soon = _idle_soon(fake)
    rules_file(_rules(on='["upcoming"]', dry_run=True))
    assert cli("sync").exit_code == 0
    monkeypatch.setenv("KEYHYGIENE_NOTIFY_TIMEOUT", "5")
    monkeypatch.setenv("KEYHYGIENE_NOTIFY_RETRY_SECONDS", "0")
    sink.hang = True

    beside = _keyhygiene("enforce")  # starts while the run below is sending
    first = cli("enforce")
    _, err = beside.communicate(timeout=120)

    assert first.exit_code == 0 and beside.returncode == 0, err
    assert [[key["key_hash"] for key in body["keys"]] for body in sink.bodies()] == [[soon]]
    (notice,) = _notices(env)
    assert (notice["event"], notice["status"], notice["last_error"]) == (
        "upcoming",
        "failed",
        "ReadTimeout (no answer)",
    )


def test_a_notice_cut_short_mid_send_is_on_record_and_sent_by_a_later_run(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    sink: WebhookSink,
) -> None:
    """The process dies (SIGKILL, the hard time limit) while its notice is being sent: the notice is
    on record as being sent, and once that is older than any send may take, the next run retries it."""
    soon = _idle_soon(fake)
    rules_file(_rules(on='["upcoming"]', dry_run=True))
    assert cli("sync").exit_code == 0
    sink.hang = True

    dying = _keyhygiene("enforce")
    wait_until(lambda: sink.received, timeout=60, what="the notice to reach the receiver")
    dying.kill()
    dying.communicate(timeout=30)
    (cut,) = _notices(env)
    assert (cut["event"], cut["status"]) == ("upcoming", "sending")

    database = Database.open(Settings(KEYHYGIENE_DATABASE_URL=env["KEYHYGIENE_DATABASE_URL"]), check=False)  # type: ignore[call-arg]
    try:  # two hours pass
        with database.sessions() as session, session.begin():
            session.execute(update(Notice).values(created_at=utcnow() - timedelta(hours=2)))
    finally:
        database.close()
    sink.hang = False
    later = cli("enforce")

    assert later.exit_code == 0, later.stderr
    bodies = sink.bodies()
    assert [[key["key_hash"] for key in body["keys"]] for body in bodies] == [[soon], [soon]]  # cut, then retried
    (sent,) = _notices(env)  # and not announced afresh beside the retry
    assert sent["status"] == "sent"
    assert later.events_named("notice_retry_sent")


def test_a_deadline_stops_the_retries_and_cuts_the_attempt_short() -> None:
    """A job past its soft time limit gives its notices what is left before the hard one."""
    with WebhookSink() as receiver, Sender(timeout=30, retry_seconds=60, deadline=time.monotonic() + 1) as sender:
        receiver.hang = True
        os.environ["KH_TEST_DEADLINE_HOOK"] = receiver.url
        try:
            target = NotifyTarget(name="ops", url_env="KH_TEST_DEADLINE_HOOK")
            delivered = sender.deliver(target, {"event": "run", "run_id": 1, "keys": [], "more": 0})
        finally:
            del os.environ["KH_TEST_DEADLINE_HOOK"]
    assert (delivered.ok, delivered.attempts, delivered.error) == (False, 1, "ReadTimeout (no answer)")
    assert len(receiver.received) == 1


def test_a_receiver_that_drips_its_answer_is_cut_off_once_the_timeout_is_spent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each byte of the answer's head comes well within the timeout, so no single read times out;
    the whole answer would take about 8 s. The attempt still ends after the timeout, told as the
    read timeout it is, and the receiver got the notice once."""
    with WebhookSink() as receiver, Sender(timeout=1, retry_seconds=0) as sender:
        receiver.drip = 0.2
        monkeypatch.setenv("KH_TEST_DRIP_HOOK", receiver.url)
        target = NotifyTarget(name="ops", url_env="KH_TEST_DRIP_HOOK")
        delivered = sender.deliver(target, {"event": "run", "run_id": 1, "keys": [], "more": 0})
    assert (delivered.ok, delivered.attempts, delivered.error) == (False, 1, "ReadTimeout (no answer)")
    assert len(receiver.received) == 1


def test_a_webhook_url_and_secret_may_come_from_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``NAME_FILE`` (a mounted secret) when ``NAME`` is not set; a file that cannot be read is named."""
    secrets = tmp_path / "secrets"  # where the session's secret scan expects secrets
    secrets.mkdir()
    with WebhookSink() as receiver, Sender(timeout=5, retry_seconds=0) as sender:
        (secrets / "url").write_text(receiver.url + "\n")
        (secrets / "signing").write_text(SIGNING_SECRET + "\n")
        monkeypatch.setenv("KH_FILE_HOOK_FILE", str(secrets / "url"))
        monkeypatch.setenv("KH_FILE_SECRET_FILE", str(secrets / "signing"))
        target = NotifyTarget(name="ops", url_env="KH_FILE_HOOK", secret_env="KH_FILE_SECRET")
        delivered = sender.deliver(target, {"event": "run", "run_id": 1, "keys": [], "more": 0})
        monkeypatch.setenv("KH_FILE_SECRET_FILE", str(secrets / "missing"))
        unread = sender.deliver(target, {"event": "run", "run_id": 2, "keys": [], "more": 0})
    assert delivered.ok
    (received,) = receiver.received
    expected = "sha256=" + hmac.new(SIGNING_SECRET.encode(), received.body, hashlib.sha256).hexdigest()
    assert received.headers["X-Keyhygiene-Signature"] == expected
    assert (unread.ok, unread.attempts) == (False, 0)
    assert unread.error == f"KH_FILE_SECRET_FILE names {secrets / 'missing'}, which cannot be read (FileNotFoundError)"


@pytest.fixture
def secrets_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory, where a .env is read: a folder named secrets, where the session's
    secret scan expects secrets."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    monkeypatch.chdir(secrets)
    return secrets


def test_a_run_reads_the_webhook_url_and_secret_from_the_dotenv_file(
    env: dict[str, str],
    secrets_dir: Path,
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    sink: WebhookSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the settings come from .env, so do the webhook's: they were read from the environment only."""
    (secrets_dir / ".env").write_text(f"KH_TEST_WEBHOOK={sink.url}\nKH_TEST_WEBHOOK_SECRET='{SIGNING_SECRET}'\n")
    monkeypatch.delenv("KH_TEST_WEBHOOK")
    monkeypatch.delenv("KH_TEST_WEBHOOK_SECRET")
    rules_file(_rules(on='["done"]'))
    _expired_keys(fake, 1)

    result = cli("run")

    assert result.exit_code == 0, result.stderr
    (received,) = sink.received
    expected = "sha256=" + hmac.new(SIGNING_SECRET.encode(), received.body, hashlib.sha256).hexdigest()
    assert received.headers["X-Keyhygiene-Signature"] == expected
    assert [notice["status"] for notice in _notices(env)] == ["sent"]
    _assert_no_secret(sink, env, result)


def test_the_environment_wins_over_the_dotenv_file_for_a_webhook(
    secrets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for settings: the environment's NAME, then its NAME_FILE, then the .env file's NAME and NAME_FILE."""
    secrets = secrets_dir
    body = {"event": "run", "run_id": 1, "keys": [], "more": 0}
    target = NotifyTarget(name="ops", url_env="KH_ENV_HOOK")
    with (
        WebhookSink() as in_env,
        WebhookSink() as in_file,
        WebhookSink() as in_dotenv,
        Sender(timeout=5, retry_seconds=0) as sender,
    ):
        (secrets / "url").write_text(in_file.url + "\n")
        (secrets / ".env").write_text(f"KH_ENV_HOOK={in_dotenv.url}\nKH_ENV_HOOK_FILE={secrets / 'missing'}\n")
        assert sender.deliver(target, body).ok  # .env's NAME before its NAME_FILE
        monkeypatch.setenv("KH_ENV_HOOK_FILE", str(secrets / "url"))
        assert sender.deliver(target, body).ok  # the environment's NAME_FILE before anything in .env
        monkeypatch.setenv("KH_ENV_HOOK", in_env.url)
        assert sender.deliver(target, body).ok
        (secrets / ".env").write_text(f"KH_ENV_HOOK_FILE={secrets / 'url'}\n")
        monkeypatch.delenv("KH_ENV_HOOK")
        monkeypatch.delenv("KH_ENV_HOOK_FILE")
        assert sender.deliver(target, body).ok  # .env's NAME_FILE
    assert (len(in_dotenv.received), len(in_file.received), len(in_env.received)) == (1, 2, 1)


def test_a_dotenv_file_that_cannot_be_parsed_fails_the_notice_naming_its_line(secrets_dir: Path) -> None:
    (secrets_dir / ".env").write_text('KH_BROKEN_HOOK="https://hooks.example/services/hook-' + "ab" * 16 + "\n")
    target = NotifyTarget(name="ops", url_env="KH_BROKEN_HOOK")
    with Sender(timeout=5, retry_seconds=0) as sender:
        delivered = sender.deliver(target, {"event": "run", "run_id": 1, "keys": [], "more": 0})

    assert (delivered.ok, delivered.attempts) == (False, 0)
    assert delivered.error == (
        f"KH_BROKEN_HOOK cannot be read from the settings file: {secrets_dir / '.env'}:1: not a NAME=value line "
        "(a quote left open, or a space in the name?)"
    )


def test_a_failing_receiver_never_stops_enforcement_and_is_retried_once_by_the_next_run(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    sink: WebhookSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYHYGIENE_NOTIFY_RETRY_SECONDS", "1")
    rules_file(_rules(on='["done"]'))
    _expired_keys(fake, 2)
    sink.status = 500

    result = cli("run")

    assert result.exit_code == 0, result.stderr
    assert [call.method for call in fake.mutating_calls()].count("DELETE") == 2
    (failed,) = _notices(env)
    assert failed["status"] == "failed" and failed["attempts"] >= 2
    assert failed["last_error"] == "HTTP 500"
    (event,) = result.events_named("notice_failed")
    assert event["error"] == "HTTP 500"
    tried = len(sink.received)

    # The next run (nothing left to change) retries the failed notice once: still failing, it gives up.
    second = cli("run")
    assert second.exit_code == 0
    assert len(sink.received) == tried + 1
    (given_up,) = _notices(env)
    assert given_up["status"] == "gave_up"
    assert second.events_named("notice_given_up")
    _assert_no_secret(sink, env, result, second)


def test_a_hanging_receiver_is_given_up_on_and_the_changes_are_made(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    sink: WebhookSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYHYGIENE_NOTIFY_TIMEOUT", "0.5")
    monkeypatch.setenv("KEYHYGIENE_NOTIFY_RETRY_SECONDS", "0")
    rules_file(_rules(on='["done"]'))
    expired = _expired_keys(fake, 2)
    sink.hang = True

    result = cli("run")

    assert result.exit_code == 0, result.stderr
    assert all(fake.get(key_hash) is None for key_hash in expired)
    (failed,) = _notices(env)
    assert failed["status"] == "failed"
    assert failed["last_error"] == "ReadTimeout (no answer)"
    _assert_no_secret(sink, env, result)


def test_a_target_whose_variable_is_unset_is_recorded_not_fatal(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KH_TEST_WEBHOOK", raising=False)
    rules_file(_rules(on='["done"]'))
    _expired_keys(fake, 1)

    result = cli("run")

    assert result.exit_code == 0
    (failed,) = _notices(env)
    assert failed["last_error"] == "KH_TEST_WEBHOOK is not set"


def _two_targets(*, broken_on: str, ops_on: str, broken_env: str = "KH_TEST_OTHER_WEBHOOK") -> str:
    """The usual rules, with a second target (named first) whose URL is in ``broken_env``."""
    return _rules(on=ops_on).replace(
        "[[notify]]",
        f'[[notify]]\nname = "other"\nurl_env = "{broken_env}"\nformat = "json"\non = {broken_on}\n'
        'upcoming_within = "7d"\n\n[[notify]]',
        1,
    )


@pytest.mark.parametrize(
    ("base", "error", "attempts"),
    [
        pytest.param("https://hooks.example.com:443x", "does not hold a valid http(s) URL", 0, id="bad-port"),
        # httpx takes any number; each attempt would fail to connect.
        pytest.param("http://hooks.example.com:99999", "does not hold a valid http(s) URL", 0, id="port-too-large"),
        pytest.param("http://hooks.example.com:0", "does not hold a valid http(s) URL", 0, id="port-zero"),
        pytest.param("https://hooks.\u2100.example", "does not hold a valid http(s) URL", 0, id="bad-idna-host"),
        pytest.param("https://[::1", "does not hold a valid http(s) URL", 0, id="unclosed-bracket"),
        # httpx takes it; the socket layer cannot encode the host name: the same on every attempt.
        pytest.param("http://hooks..example.com", "UnicodeError (not sent)", 1, id="empty-label"),
    ],
)
def test_a_target_whose_url_cannot_be_used_fails_alone_and_the_others_get_theirs(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    sink: WebhookSink,
    monkeypatch: pytest.MonkeyPatch,
    base: str,
    error: str,
    attempts: int,
) -> None:
    bad_url = f"{base}/services/hook-{'0b' * 16}"
    monkeypatch.setenv("KH_TEST_OTHER_WEBHOOK", bad_url)
    rules_file(_two_targets(broken_on='["done", "upcoming"]', ops_on='["done", "upcoming"]'))
    expired = _expired_keys(fake, 2)
    soon = _idle_soon(fake)

    first = cli("run")

    assert first.exit_code == 0, first.stderr
    bodies = sink.bodies()
    assert [(body["event"], body["outcome"]) for body in bodies] == [("run", "done"), ("upcoming", None)]
    assert sorted(key["key_hash"] for key in bodies[0]["keys"]) == sorted(expired)
    assert [key["key_hash"] for key in bodies[1]["keys"]] == [soon]
    broken = [notice for notice in _notices(env) if notice["target"] == "other"]
    expected = f"KH_TEST_OTHER_WEBHOOK {error}" if attempts == 0 else error
    assert [(n["event"], n["status"], n["attempts"], n["last_error"]) for n in broken] == [
        ("run", "failed", attempts, expected),
        ("upcoming", "failed", attempts, expected),
    ]
    failed = first.events_named("notice_failed")
    assert [(event["target"], event["error"]) for event in failed] == [("other", expected)] * 2

    # The next run gives each its one retry, fails the same way, and gives up; the others are not held.
    second = cli("run")

    assert second.exit_code == 0, second.stderr
    assert len(sink.bodies()) == 2  # nothing new to say
    assert [n["status"] for n in _notices(env) if n["target"] == "other"] == ["gave_up", "gave_up"]
    assert len(second.events_named("notice_given_up")) == 2
    assert not second.events_named("notices_not_sent")
    for result in (first, second):
        assert bad_url not in result.stdout + result.stderr
    assert bad_url not in _stored_text(env)


def test_upcoming_actions_are_announced_after_a_run_in_which_a_change_failed_not_after_a_failed_sync(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    sink: WebhookSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rules_file(_rules(on='["upcoming"]'))
    (failing,) = _expired_keys(fake, 1)
    soon = _idle_soon(fake)
    assert cli("sync").exit_code == 0

    # The sync fails: there is no fresh plan, so nothing is announced from the old snapshot.
    monkeypatch.setenv("KEYHYGIENE_HTTP_RETRY_SECONDS", "0.3")
    fake.faults.server_error(10_000, status=500, retry_after=0.05, method="GET", path="/keys")
    assert cli("run").exit_code == 1
    assert sink.received == []

    # The enforcement completes, but one change fails (the run fails): its plan is still announced.
    # (A 500 to the DELETE: the key shows no change, and the change stays in doubt, counted failed.)
    fake.faults.clear()
    fake.faults.server_error(10_000, status=500, method="DELETE", path=f"/keys/{failing}")
    result = cli("run")

    assert result.exit_code == 1, result.stderr
    assert [event["action"] for event in result.events_named("key_action_in_doubt")] == ["delete"]
    (body,) = sink.bodies()
    assert body["event"] == "upcoming"
    assert [key["key_hash"] for key in body["keys"]] == [soon]


def test_a_run_with_done_and_failed_changes_tells_done_targets_what_it_changed(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    sink: WebhookSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``on = ["done"]`` hears of the keys changed; a target that asks for ``failed`` too gets the
    ``failed`` message only (one per run), whose counts say how many were done."""
    failing, *deleted = _expired_keys(fake, 3)
    fake.faults.server_error(10_000, status=500, method="DELETE", path=f"/keys/{failing}")
    with WebhookSink() as oncall:
        monkeypatch.setenv("KH_TEST_OTHER_WEBHOOK", oncall.url)
        rules_file(_two_targets(broken_on='["done", "failed"]', ops_on='["done"]'))

        result = cli("run")

    assert result.exit_code == 1, result.stderr
    (done,) = sink.bodies()
    assert (done["event"], done["outcome"], done["run_id"]) == (
        "run",
        "done",
        result.events_named("run_finished")[0]["run_id"],
    )
    assert sorted(key["key_hash"] for key in done["keys"]) == sorted(deleted)
    assert {key["action"] for key in done["keys"]} == {"delete"}
    assert (done["counts"]["done"], done["counts"]["failed"], done["more"]) == (2, 1, 0)
    assert set(done) == {"event", "run_id", "outcome", "counts", "keys", "more", "message", "dry_run"}
    (failed,) = oncall.bodies()
    assert (failed["event"], failed["outcome"]) == ("run", "failed")
    assert [key["key_hash"] for key in failed["keys"]] == [failing]
    assert (failed["counts"]["done"], failed["counts"]["failed"]) == (2, 1)
    _assert_no_secret(sink, env, result)


@pytest.mark.parametrize("db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_a_run_notice_lists_its_keys_in_code_point_order_whatever_the_database_collation(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    sink: WebhookSink,
    database: Database,
) -> None:
    """Every list of a notice orders names as Python does (code point: capitals first), so the keys
    named, and the first 50 of a longer list, are the same on SQLite and on a PostgreSQL database
    whose collation orders words as a dictionary does (ICU English: "alpha" before "Beta")."""
    with database.engine.begin() as connection:
        connection.execute(text('ALTER TABLE actions ALTER COLUMN key_name TYPE text COLLATE "en-x-icu"'))
        names = "SELECT name FROM (VALUES ('beta'), ('Alpha'), ('alpha'), ('Beta')) AS v(name)"
        in_database_order = connection.scalars(text(f'{names} ORDER BY name COLLATE "en-x-icu"')).all()
    assert in_database_order == ["alpha", "Alpha", "beta", "Beta"]  # the collation orders otherwise
    now = utcnow()
    for name in ("beta", "Alpha", "alpha", "Beta"):
        fake.add_key(name, created_at=now - 90 * DAY, expires_at=now - DAY)
    rules_file(_rules(on='["done"]'))

    result = cli("run")

    assert result.exit_code == 0, result.stderr
    (body,) = sink.bodies()
    assert [key["key_name"] for key in body["keys"]] == ["Alpha", "Beta", "alpha", "beta"]


def test_more_than_fifty_upcoming_actions_are_each_named_once_in_messages_of_at_most_fifty(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    sink: WebhookSink,
) -> None:
    now = utcnow()
    soon = {
        fake.add_key(f"svc-{n:02d}", created_at=now - 60 * DAY, last_used_at=now - 25 * DAY, usage=1.0)["hash"]
        for n in range(120)
    }
    rules_file(_rules(on='["upcoming"]'))

    assert cli("run").exit_code == 0
    assert cli("run").exit_code == 0  # nothing new: said once

    bodies = sink.bodies()
    assert [(body["event"], len(body["keys"]), body["more"], body["counts"]) for body in bodies] == [
        ("upcoming", 50, 0, {"upcoming": 50}),
        ("upcoming", 50, 0, {"upcoming": 50}),
        ("upcoming", 20, 0, {"upcoming": 20}),
    ]
    named = [key["key_hash"] for body in bodies for key in body["keys"]]
    assert sorted(named) == sorted(soon)  # every one, once
    assert all(key["due"] and key["rule"] == "disable-idle" for body in bodies for key in body["keys"])


def test_run_notices_name_the_owner_of_each_key(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    sink: WebhookSink,
) -> None:
    """The key's ``creator_user_id`` as the upcoming notices give it, in refused and done notices alike."""
    expired = _expired_keys(fake, 2)
    ownerless = fake.add_key("old-nobody", created_at=utcnow() - 90 * DAY, expires_at=utcnow() - DAY)["hash"]
    owners = {expired[0]: "user_0", expired[1]: "user_1", ownerless: None}

    rules_file(_rules(on='["done", "refused"]', max_actions=1))
    assert cli("run").exit_code == 3
    rules_file(_rules(on='["done", "refused"]'))
    assert cli("run").exit_code == 0

    refused, done = sink.bodies()
    assert (refused["outcome"], done["outcome"]) == ("refused", "done")
    for body in (refused, done):
        assert {key["key_hash"]: key["owner"] for key in body["keys"]} == owners


# -- a retry cut short ------------------------------------------------------------------------------

NOW = datetime(2031, 5, 4, 12, 0, tzinfo=UTC)
"""The retry pass's time in the tests below: they call ``after_run`` with it, never the clock."""


def _retry_pass(database: Database, *, now: datetime = NOW) -> list[dict[str, Any]]:
    """What a later run does first after its job (a sync, which says nothing itself): retry the
    notices earlier runs could not deliver. Returns the events it logged."""
    ruleset = parse_rules(_rules(on='["done"]'))
    with capture_logs() as logs:
        after_run(database, ruleset, JobOutcome("sync", runs.OK, 0, "synced"), now=now, timeout=2, retry_seconds=0)
    return logs


def _recorded(database: Database, *, status: str, claimed_at: datetime | None = None) -> tuple[int, int]:
    """A run's ``done`` notice to ``ops``, recorded two days before ``NOW`` and left as ``status``
    (and claimed at ``claimed_at``): its id and its run's."""
    with session_scope(database) as session:
        run = runs.start_run(session, kind="run", now=NOW - 2 * DAY)
        body = notice_body(
            event="run", run_id=run.id, outcome="done", counts={"done": 1}, keys=[], message="done", dry_run=False
        )
        notice_id = stored_notices.record_notice(
            session,
            now=NOW - 2 * DAY,
            target="ops",
            event="run",
            run_id=run.id,
            status=status,
            attempts=2,
            payload=body,
            error="HTTP 500",
        )
        session.execute(update(Notice).where(Notice.id == notice_id).values(claimed_at=claimed_at))
        return notice_id, run.id


def _stored(database: Database, notice_id: int) -> Notice:
    with database.sessions() as session:
        notice = session.get(Notice, notice_id)
        assert notice is not None
        session.expunge(notice)
        return notice


@pytest.mark.parametrize(
    "claimed_at",
    [NOW - timedelta(hours=2), None],
    ids=["claimed-two-hours-before", "claimed-before-migration-0017"],
)
def test_a_retry_cut_short_is_given_up_and_logged_by_a_later_run_not_sent_again(
    database: Database, sink: WebhookSink, claimed_at: datetime | None
) -> None:
    """The process that claimed a failed notice's one retry died while sending it (or a release
    before 0017 did, which recorded no claim time): the next run records it given up, as it may have
    arrived, and says so; its one retry was spent, so it is not sent again, then or later."""
    notice_id, run_id = _recorded(database, status=stored_notices.RETRYING, claimed_at=claimed_at)

    logs = _retry_pass(database)

    given_up = _stored(database, notice_id)
    assert (given_up.status, given_up.last_error, given_up.sent_at) == (
        "gave_up",
        "cut short while its retry was being sent: it may have arrived",
        None,
    )
    assert [event for event in logs if event["event"] == "notice_given_up"] == [
        {
            "event": "notice_given_up",
            "log_level": "warning",
            "target": "ops",
            "notice_id": notice_id,
            "run_id": run_id,
            "error": "cut short while its retry was being sent: it may have arrived",
        }
    ]
    later = _retry_pass(database, now=NOW + DAY)
    assert sink.received == []
    assert not [event for event in later if event["event"].startswith("notice_")]
    assert _stored(database, notice_id).status == "gave_up"


def test_a_retry_claimed_recently_is_left_to_the_run_that_may_still_be_sending_it(
    database: Database, sink: WebhookSink
) -> None:
    """Another run claimed the retry seconds ago and may still be sending it: not given up, not
    sent again; it is that run's to finish."""
    notice_id, _ = _recorded(database, status=stored_notices.RETRYING, claimed_at=NOW - timedelta(seconds=5))

    logs = _retry_pass(database)

    left = _stored(database, notice_id)
    assert (left.status, left.last_error, left.claimed_at) == ("retrying", "HTTP 500", NOW - timedelta(seconds=5))
    assert sink.received == []
    assert not [event for event in logs if event["event"].startswith("notice_")]


def test_a_failed_notice_gets_exactly_one_retry_and_its_claim_is_recorded(
    database: Database, sink: WebhookSink
) -> None:
    """Its retry is claimed (when, recorded) and sent once; failing again, it is given up for good,
    and a run long after the claim neither sends it again nor takes it for a retry cut short."""
    notice_id, run_id = _recorded(database, status=stored_notices.FAILED)
    sink.status = 500

    logs = _retry_pass(database)

    (body,) = sink.bodies()
    assert (body["event"], body["run_id"]) == ("run", run_id)
    retried = _stored(database, notice_id)
    assert (retried.status, retried.attempts, retried.last_error) == ("gave_up", 3, "HTTP 500")
    # Claimed at the pass's time, plus what the pass had taken by then (here, close to nothing).
    assert retried.claimed_at is not None and NOW <= retried.claimed_at < NOW + timedelta(minutes=1)
    (event,) = [event for event in logs if event["event"] == "notice_given_up"]
    assert (event["notice_id"], event["error"]) == (notice_id, "HTTP 500")

    later = _retry_pass(database, now=NOW + DAY)

    assert len(sink.received) == 1
    assert not [event for event in later if event["event"].startswith("notice_")]
    assert _stored(database, notice_id).last_error == "HTTP 500"


def test_a_notice_is_recorded_at_the_time_it_is_sent_not_when_the_pass_began() -> None:
    """A pass that spent ten minutes retrying a backlog records its next notice (and claims its
    next retry) ten minutes after the run's time: another run takes a notice recorded longer ago
    than any send may take for one cut short, and would send it again while it is being sent."""
    ticks = [1000.0]
    with Sender(timeout=5, retry_seconds=0, monotonic=lambda: ticks[0]) as sender:
        assert sender.at(NOW) == NOW
        ticks[0] += 600
        assert sender.at(NOW) == NOW + timedelta(minutes=10)


def _notices_of_a_failed_sync(
    database: Database, *, timeout: float, stops: tuple[type[BaseException], ...] = ()
) -> None:
    """What a sync whose listing failed does last: its `failed` notice to ``ops``, after the retries."""
    outcome = JobOutcome("sync", runs.FAILED, 1, "the listing failed")
    ruleset = parse_rules(_rules(on='["failed"]'))
    after_run(database, ruleset, outcome, now=NOW, timeout=timeout, retry_seconds=0, stops=stops)


class SoftLimit(Exception):
    """Stands for celery's SoftTimeLimitExceeded: an Exception a signal handler raises wherever the job stands."""


def test_a_stop_while_earlier_notices_are_retried_leaves_this_runs_notices_to_the_next_run(
    database: Database, sink: WebhookSink
) -> None:
    """The worker's soft time limit lands while a run retries an earlier run's notice at a receiver
    that hangs: the notices stop there (the limit is not that retry's failure, after which the run
    would go on sending), and this run's own notice, not reached, is on record for the next run."""
    earlier, _ = _recorded(database, status=stored_notices.FAILED)
    sink.hang = True
    main = threading.get_ident()

    def time_is_up(*_: object) -> None:
        raise SoftLimit("the soft time limit")

    def limit_once_the_retry_hangs() -> None:
        wait_until(lambda: sink.received, timeout=30, what="the retry to reach the receiver")
        signal.pthread_kill(main, signal.SIGALRM)  # as Celery's pool signals the job's thread

    previous = signal.signal(signal.SIGALRM, time_is_up)
    limiter = threading.Thread(target=limit_once_the_retry_hangs, daemon=True)
    limiter.start()
    try:
        with pytest.raises(SoftLimit):
            _notices_of_a_failed_sync(database, timeout=30, stops=(SoftLimit,))
    finally:
        limiter.join(timeout=30)
        signal.signal(signal.SIGALRM, previous)

    assert len(sink.received) == 1
    assert _stored(database, earlier).status == stored_notices.RETRYING  # cut short mid-retry
    with database.sessions() as session:
        later = session.scalars(select(Notice).where(Notice.id > earlier)).all()
        assert [(n.target, n.status, n.last_error, n.payload["outcome"]) for n in later] == [
            ("ops", stored_notices.FAILED, UNREACHED, "failed")
        ]


def test_a_proxy_variable_holding_no_url_fails_the_notices_without_quoting_it(
    database: Database, sink: WebhookSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx refuses the proxy URL quoting it (its password masked, as httpx masks it): the log
    says which variables to look at instead."""
    monkeypatch.setenv("HTTP_PROXY", "ftp://ops:Pr0xyPw@proxy.example:21")  # no proxy httpx can use

    with capture_logs() as logs:
        _notices_of_a_failed_sync(database, timeout=2)

    (event,) = [event for event in logs if event["event"] == "notices_not_sent"]
    assert "holds no proxy URL httpx can use" in event["error"]
    assert "Pr0xyPw" not in json.dumps(logs, default=str)
    assert sink.received == []


def test_a_stop_while_a_notice_is_put_on_record_leaves_it_for_the_next_run(
    database: Database, sink: WebhookSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM lands while the second target's notice is being recorded as being sent, before its
    record is written: it was lost (neither sent nor on record); it is recorded for the next run, as
    the third one is. (The stop is raised from the recording call: a signal cannot be aimed there.)"""
    two_more = "".join(
        f'\n[[notify]]\nname = "{name}"\nurl_env = "KH_TEST_WEBHOOK"\nformat = "json"\non = ["failed"]\n'
        for name in ("audit", "oncall")
    )
    ruleset = parse_rules(_rules(on='["failed"]') + two_more)
    record = stored_notices.record_notice
    calls = []

    def stopped_at_the_second(*args: Any, **kwargs: Any) -> int:
        calls.append(kwargs["target"])
        if len(calls) == 2:
            raise KeyboardInterrupt("terminated by SIGTERM")
        return record(*args, **kwargs)

    monkeypatch.setattr(stored_notices, "record_notice", stopped_at_the_second)
    outcome = JobOutcome("sync", runs.FAILED, 1, "the listing failed")
    with pytest.raises(KeyboardInterrupt):
        after_run(database, ruleset, outcome, now=NOW, timeout=2, retry_seconds=0)
    monkeypatch.setattr(stored_notices, "record_notice", record)

    assert len(sink.received) == 1  # ops
    with database.sessions() as session:
        rows = session.execute(select(Notice.target, Notice.status, Notice.last_error).order_by(Notice.id)).all()
    assert [tuple(row) for row in rows] == [
        ("ops", stored_notices.SENT, None),
        ("audit", stored_notices.FAILED, UNREACHED),
        ("oncall", stored_notices.FAILED, UNREACHED),
    ]


def test_a_notice_a_stopped_run_never_reached_gets_a_first_send_and_then_its_retry(
    database: Database, sink: WebhookSink
) -> None:
    """Recorded failed by a run a stop came to first, it was given only "its one retry": one
    attempt, then given up. It is sent as any notice is: failing, it still gets its retry."""
    with session_scope(database) as session:
        run = runs.start_run(session, kind="run", now=NOW - DAY)
        body = notice_body(
            event="run", run_id=run.id, outcome="done", counts={"done": 1}, keys=[], message="done", dry_run=False
        )
        notice_id = stored_notices.record_notice(
            session,
            now=NOW - DAY,
            target="ops",
            event="run",
            run_id=run.id,
            status=stored_notices.FAILED,
            attempts=0,
            payload=body,
            error=UNREACHED,
        )
    sink.status = 500

    first = _retry_pass(database)

    failed = _stored(database, notice_id)
    assert (failed.status, failed.attempts, failed.last_error) == (stored_notices.FAILED, 1, "HTTP 500")
    assert [event["event"] for event in first if event["event"].startswith("notice_")] == ["notice_failed"]
    sink.status = 200

    second = _retry_pass(database, now=NOW + DAY)

    assert _stored(database, notice_id).status == stored_notices.SENT
    assert [event["event"] for event in second if event["event"].startswith("notice_")] == ["notice_retry_sent"]
    assert len(sink.received) == 2


def test_a_stop_is_not_swallowed_when_the_notices_it_left_cannot_be_recorded(
    database: Database, sink: WebhookSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM lands as the first notice is put on record, and the database then refuses the record
    of the ones left: that is logged, and the stop still ends the job (it was taken for a database
    error, logged as one, and the process went on)."""
    from sqlalchemy.exc import OperationalError

    def stop_then_fail(*args: Any, **kwargs: Any) -> int:
        if kwargs["status"] == stored_notices.SENDING:
            raise KeyboardInterrupt("terminated by SIGTERM")
        raise OperationalError("INSERT INTO notices", {}, Exception("the database went away"))

    monkeypatch.setattr(stored_notices, "record_notice", stop_then_fail)

    with capture_logs() as logs, pytest.raises(KeyboardInterrupt):
        _notices_of_a_failed_sync(database, timeout=2)

    assert [event["event"] for event in logs if event["event"].startswith("notice")] == ["notices_not_sent"]
    assert sink.received == []
