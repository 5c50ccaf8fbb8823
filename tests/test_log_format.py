"""KEYHYGIENE_LOG_FORMAT=auto, the default: readable lines on a terminal, JSON lines otherwise, for
every line a command, the worker or beat writes (Celery's own and its shutdown lines included).

The terminal is a real pseudo-terminal (``pty``) the process writes to, as an operator's shell.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.timeutil import utcnow

from .celery_support import (
    Deployment,
    Process,
    keyhygiene_executable,
    wait_until,
)
from .conftest import MANAGEMENT_KEY, CliResult

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def is_json(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


class Terminal:
    """A process whose stdin, stdout and stderr are one pseudo-terminal, as in an operator's shell."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        master, slave = pty.openpty()
        self.master = master
        self.process = subprocess.Popen(
            [keyhygiene_executable(), *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        os.close(slave)
        self.output = b""

    def _read(self, seconds: float) -> bool:
        """Read what is there within ``seconds``; False once the terminal is closed."""
        ready, _, _ = select.select([self.master], [], [], seconds)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: every process holding the terminal has exited
            return False
        self.output += chunk
        return bool(chunk)

    def read_until(self, text: str, *, timeout: float) -> None:
        def seen() -> bool:
            open_ = self._read(0.2)
            if text in self.text():
                return True
            if not open_:
                pytest.fail(f"the terminal closed before {text!r} was written:\n{self.text()[-3000:]}")
            return False

        wait_until(seen, timeout=timeout, interval=0, what=f"{text!r} on the terminal")

    def wait(self, *, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self._read(0.2) and time.monotonic() < deadline:
            pass
        return self.process.wait(timeout=max(1.0, deadline - time.monotonic()))

    def text(self) -> str:
        return ANSI.sub("", self.output.decode(errors="replace")).replace("\r", "")

    def lines(self) -> list[str]:
        return [line for line in self.text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        os.close(self.master)


def command_env(tmp_path: Path, fake_url: str, **extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("KEYHYGIENE_", "OPENROUTER_"))}
    env.update(
        OPENROUTER_MANAGEMENT_KEY=MANAGEMENT_KEY,
        OPENROUTER_BASE_URL=fake_url,
        KEYHYGIENE_DATABASE_URL=f"sqlite:///{tmp_path / 'keyhygiene.db'}",
        KEYHYGIENE_RULES_FILE=str(tmp_path / "keyhygiene.toml"),
        TERM="xterm",
        **extra,
    )
    return env


def three_expired_keys_and_a_cap_of_one(tmp_path: Path, fake: FakeOpenRouter) -> None:
    """An organisation and a rules file that a `run` refuses (exit 3): three planned deletes, a cap of one."""
    for number in range(3):
        fake.add_key(f"dev-old-{number}", expires_at=utcnow() - timedelta(days=1))
    (tmp_path / "keyhygiene.toml").write_text(
        "[safety]\nmax_actions_per_run = 1\nmax_action_percent = 100\n\n"
        '[[rule]]\nname = "delete-expired"\nmatch = "expired"\naction = "delete"\n'
    )


# -- commands -------------------------------------------------------------------------------------


def test_a_command_logs_json_lines_when_stderr_is_not_a_terminal(tmp_path: Path, fake_url: str) -> None:
    env = command_env(tmp_path, fake_url)
    subprocess.run([keyhygiene_executable(), "db", "upgrade"], env=env, cwd=tmp_path, check=True)
    done = subprocess.run(
        [keyhygiene_executable(), "sync"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and all(is_json(line) for line in lines), done.stderr
    assert {"sync_started", "sync_complete"} <= {json.loads(line)["event"] for line in lines}


def test_json_chosen_on_a_terminal_gives_json_lines_and_no_spinner(tmp_path: Path, fake_url: str) -> None:
    """`docker compose run` or `ssh -t` with KEYHYGIENE_LOG_FORMAT=json: sync drew its spinner on the
    terminal anyway, through the JSON lines, and rich wrapped each of them at the terminal's width."""
    env = command_env(tmp_path, fake_url, KEYHYGIENE_LOG_FORMAT="json")
    subprocess.run([keyhygiene_executable(), "db", "upgrade"], env=env, cwd=tmp_path, check=True, capture_output=True)
    sync = Terminal(["sync"], env, tmp_path)
    try:
        assert sync.wait(timeout=120) == 0
        *logged, outcome = sync.lines()  # one terminal: the outcome line (stdout) comes last
        assert logged and all(is_json(line) for line in logged), sync.text()
        assert {"sync_started", "sync_complete"} <= {json.loads(line)["event"] for line in logged}
        assert outcome.startswith("run 1 sync ok")
        assert b"listing keys" not in sync.output and b"\x1b[?25l" not in sync.output
    finally:
        sync.close()


def test_a_rules_warning_is_a_json_line_where_the_logs_are_json(tmp_path: Path, fake_url: str) -> None:
    """`rules check` warned in plain text among JSON lines (it set up no logging of its own)."""
    env = command_env(tmp_path, fake_url, KEYHYGIENE_LOG_FORMAT="json")
    (tmp_path / "keyhygiene.toml").write_text(
        '[safety]\nprotect_hashes = ["5c5c5c5c5c"]\n\n[[rule]]\nname = "x"\nmatch = "expired"\naction = "report"\n'
    )
    done = subprocess.run(
        [keyhygiene_executable(), "rules", "check"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stderr
    (line,) = done.stderr.splitlines()
    event = json.loads(line)
    assert (event["event"], event["level"]) == ("rules_warning", "warning")
    assert "protect_hashes: entry 1" in event["message"]


def run_command(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [keyhygiene_executable(), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def only_json(stderr: str) -> list[dict[str, Any]]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and all(is_json(line) for line in lines), stderr
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize(
    ("case", "args", "extra", "code", "said"),
    [
        ("bad settings", ["sync"], {"KEYHYGIENE_HTTP_CONCURRENCY": "lots"}, 2, "KEYHYGIENE_HTTP_CONCURRENCY"),
        (
            "bad settings, auto",
            ["sync"],
            {"KEYHYGIENE_LOG_FORMAT": "auto", "KEYHYGIENE_RETENTION": "1y"},
            2,
            "KEYHYGIENE_RETENTION",
        ),
        ("no store", ["sync"], {}, 1, "sync failed: there is no database"),
        ("bad option value", ["report", "spend", "--since", "3x"], {}, 2, "invalid duration '3x'"),
        ("unknown option", ["plan", "--colour"], {}, 2, "No such option '--colour'"),
        ("bad rules", ["plan"], {}, 2, "keyhygiene.toml"),
    ],
)
def test_a_failing_command_ends_with_a_json_event_where_the_logs_are_json(
    tmp_path: Path, fake_url: str, case: str, args: list[str], extra: dict[str, str], code: int, said: str
) -> None:
    """The interface: with JSON logs every line on stderr is one JSON object. A failing command
    ended with a plain `keyhygiene: ...` line, and a mistyped option with click's usage text."""
    env = command_env(tmp_path, fake_url, **({"KEYHYGIENE_LOG_FORMAT": "json"} | extra))
    if case == "bad rules":
        subprocess.run(
            [keyhygiene_executable(), "db", "upgrade"], env=env, cwd=tmp_path, check=True, capture_output=True
        )
        (tmp_path / "keyhygiene.toml").write_text('[safety]\ndry_run = "yes"\n')

    done = run_command(args, env, tmp_path)

    assert done.returncode == code, done.stderr
    *_, last = only_json(done.stderr)
    assert (last["event"], last["level"], last["exit_code"]) == ("command_failed", "error", code), last
    assert said in last["error"], last
    assert MANAGEMENT_KEY not in done.stderr
    if case == "unknown option":
        assert last["command"] == "keyhygiene plan"
    if case == "no store":
        assert (last["kind"], last["status"], last["run_id"]) == ("sync", "failed", None)


def test_a_refused_run_ends_with_its_outcome_as_an_event_and_as_a_line_on_console(
    tmp_path: Path, fake_url: str, fake: FakeOpenRouter
) -> None:
    """A job's own outcome (a refusal, exit 3) ends the output the same way, in either format."""
    three_expired_keys_and_a_cap_of_one(tmp_path, fake)
    env = command_env(tmp_path, fake_url, KEYHYGIENE_LOG_FORMAT="json")
    subprocess.run([keyhygiene_executable(), "db", "upgrade"], env=env, cwd=tmp_path, check=True, capture_output=True)

    done = run_command(["run"], env, tmp_path)

    assert done.returncode == 3, done.stderr
    *_, finished, last = only_json(done.stderr)
    assert finished["event"] == "run_finished"
    assert last["event"] == "command_failed" and last["exit_code"] == 3
    assert (last["run_id"], last["kind"], last["status"]) == (finished["run_id"], "run", "refused")
    assert last["error"] == f"run {finished['run_id']} run refused: {finished['message']}"

    console = run_command(["run"], env | {"KEYHYGIENE_LOG_FORMAT": "console"}, tmp_path)

    assert console.returncode == 3, console.stderr
    assert console.stderr.splitlines()[-1].startswith(f"keyhygiene: run {finished['run_id'] + 1} run refused: ")
    assert not any(is_json(line) for line in console.stderr.splitlines())


def test_a_bug_is_a_json_event_with_its_traceback_and_no_secret(
    cli: Callable[..., CliResult], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception (a bug) printed Python's traceback as raw lines among the JSON ones."""
    from keyhygiene import jobs

    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError(f"a bug that quotes {MANAGEMENT_KEY}")

    monkeypatch.setattr(jobs, "execute", broken)

    result = cli("enforce")

    assert result.exit_code == 1
    *_, last = only_json(result.stderr)
    assert (last["event"], last["exit_code"]) == ("command_failed", 1)
    assert last["error"].startswith("unexpected error: RuntimeError(")
    (frame_list,) = [item["frames"] for item in last["exception"]]
    assert any(frame["name"] == "broken" for frame in frame_list), last["exception"]
    assert MANAGEMENT_KEY not in result.stderr


@pytest.mark.parametrize("name", ["KEYHYGIENE_LOG_FORMAT", "keyhygiene_log_format"])
def test_a_log_format_set_in_dotenv_holds_before_the_settings_are_read(
    tmp_path: Path, fake_url: str, name: str
) -> None:
    """A mistyped option or a bad setting: the format was taken from the environment alone, so a
    `.env` that asks for console logs still got JSON off a terminal. (The settings take a name in
    any case: so does this.)"""
    env = command_env(tmp_path, fake_url)
    (tmp_path / ".env").write_text(f"{name}=console\n")

    mistyped = run_command(["sync", "--bogus"], env, tmp_path)
    refused = run_command(["sync"], env | {"KEYHYGIENE_RETENTION": "bogus"}, tmp_path)

    assert mistyped.returncode == refused.returncode == 2
    assert mistyped.stderr.splitlines()[-1] == "Error: No such option '--bogus'.", mistyped.stderr
    assert refused.stderr.splitlines()[-1].startswith("keyhygiene: error: invalid settings: KEYHYGIENE_RETENTION: ")
    assert not any(is_json(line) for line in mistyped.stderr.splitlines() + refused.stderr.splitlines())


def test_a_command_given_no_subcommand_prints_its_help_on_stdout_and_one_event(tmp_path: Path, fake_url: str) -> None:
    env = command_env(tmp_path, fake_url)
    done = run_command(["db"], env, tmp_path)

    assert done.returncode == 2
    (event,) = only_json(done.stderr)
    assert (event["event"], event["command"]) == ("command_failed", "keyhygiene db")
    assert "upgrade" in done.stdout and done.stdout.startswith("Usage: keyhygiene db")

    # `keyhygiene db | true`: the help's reader is gone (a traceback, exit 1, before).
    reader, writer = os.pipe()
    os.close(reader)
    try:
        unread = subprocess.run(
            [keyhygiene_executable(), "db"],
            env=env,
            cwd=tmp_path,
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(writer)
    assert unread.returncode == 2, unread.stderr
    (event,) = only_json(unread.stderr)
    assert event["event"] == "command_failed"


def test_a_command_stopped_by_sigterm_says_so_in_json_lines_only(tmp_path: Path, fake_url: str) -> None:
    """click caught the interrupt of a command that is not a job: it wrote a blank line, and the
    reason became "aborted"."""
    with socket.socket() as silent:  # a database server that accepts and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"postgresql+psycopg://keyhygiene@127.0.0.1:{silent.getsockname()[1]}/keyhygiene"
        env = command_env(tmp_path, fake_url) | {"KEYHYGIENE_DATABASE_URL": url}
        status = subprocess.Popen(
            [keyhygiene_executable(), "status"], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True
        )
        try:
            silent.settimeout(60)
            connection, _ = silent.accept()  # the command is waiting for the database now
            status.send_signal(signal.SIGTERM)
            _, stderr = status.communicate(timeout=60)
            connection.close()
        finally:
            if status.poll() is None:
                status.kill()
                status.wait()

    assert status.returncode == 1
    assert stderr.endswith("\n") and "\n\n" not in stderr and not stderr.startswith("\n"), repr(stderr)
    *_, last = only_json(stderr)
    assert (last["event"], last["error"], last["exit_code"]) == ("command_failed", "terminated by SIGTERM", 1)


def test_the_demo_refusing_its_folder_says_so_in_a_json_event(tmp_path: Path, fake_url: str) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "keyhygiene.toml").write_text("# an operator's own rules\n")

    done = run_command(["demo", "--dir", "demo"], command_env(tmp_path, fake_url), tmp_path)

    assert done.returncode == 2
    (event,) = only_json(done.stderr)
    assert event["event"] == "command_failed" and "which the demo did not write" in event["error"], event


def test_a_librarys_warning_is_a_json_line_too() -> None:
    """A warning a library raises (SQLAlchemy ignoring a URL option, say) went to stderr as two raw
    lines of text among the JSON ones."""
    code = (
        "import warnings\n"
        "from keyhygiene import logging\n"
        "logging.configure_logging('json')\n"
        "warnings.warn('an option is ignored by the driver')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    (line,) = done.stderr.splitlines()
    event = json.loads(line)
    assert event["level"] == "warning" and "an option is ignored by the driver" in event["event"]


def loaded_modules(import_profile: str) -> set[str]:
    """The modules a process loaded, from what ``PYTHONPROFILEIMPORTTIME`` wrote on its stderr."""
    return {line.rsplit("|", 1)[1].strip() for line in import_profile.splitlines() if line.startswith("import time:")}


def test_a_sync_leaves_out_the_extras_it_never_uses_and_plan_still_draws_its_table(
    tmp_path: Path, fake_url: str, fake: FakeOpenRouter
) -> None:
    fake.add_key("dev-old-extras", expires_at=utcnow() - timedelta(days=1))
    env = command_env(tmp_path, fake_url, PYTHONPROFILEIMPORTTIME="1")
    subprocess.run([keyhygiene_executable(), "db", "upgrade"], env=env, cwd=tmp_path, check=True, capture_output=True)
    sync = subprocess.run(
        [keyhygiene_executable(), "sync"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert sync.returncode == 0, sync.stderr[-2000:]
    loaded = loaded_modules(sync.stderr)
    assert {"httpx", "structlog", "sqlalchemy"} <= loaded
    # Neither httpx's own command line nor structlog's rich tracebacks (a failed import of ``rich``
    # is listed too, but nothing under it is): about a third of a second of start-up.
    assert not {"rich.console", "rich.pretty", "rich.traceback", "pygments"} & loaded
    (tmp_path / "keyhygiene.toml").write_text('[[rule]]\nname = "expired"\nmatch = "expired"\naction = "disable"\n')
    plan = subprocess.run(
        [keyhygiene_executable(), "plan"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "rich.table" in loaded_modules(plan.stderr)
    assert re.search(r"key\s+name\s+action\s+rule\s+why", plan.stdout), plan.stdout
    assert re.search(r"dev-old-extras\s+disable\s+expired", plan.stdout), plan.stdout


def test_a_command_on_a_terminal_prints_readable_lines_and_no_json(tmp_path: Path, fake_url: str) -> None:
    env = command_env(tmp_path, fake_url)
    upgrade = Terminal(["db", "upgrade"], env, tmp_path)
    try:
        assert upgrade.wait(timeout=60) == 0
        lines = upgrade.lines()
        assert not any(is_json(line) for line in lines), upgrade.text()
        assert any(re.search(r"\[info\s*\] Running upgrade  -> 0001", line) for line in lines), upgrade.text()
        assert lines[-1].startswith("database upgraded from empty to migration ")
    finally:
        upgrade.close()
    sync = Terminal(["sync"], env, tmp_path)
    try:
        assert sync.wait(timeout=120) == 0
        lines = sync.lines()
        assert not any(is_json(line) for line in lines), sync.text()
        assert re.search(r"\[info\s*\] sync_complete", sync.text()), sync.text()
        assert lines[-1].startswith("run 1 sync ok")
    finally:
        sync.close()


def test_a_refused_run_on_a_terminal_ends_with_its_one_line_set_apart(
    tmp_path: Path, fake_url: str, fake: FakeOpenRouter
) -> None:
    three_expired_keys_and_a_cap_of_one(tmp_path, fake)
    env = command_env(tmp_path, fake_url)
    subprocess.run([keyhygiene_executable(), "db", "upgrade"], env=env, cwd=tmp_path, check=True, capture_output=True)
    run = Terminal(["run"], env, tmp_path)
    try:
        assert run.wait(timeout=120) == 3
        lines = run.lines()
        assert sum("key_action" in line for line in lines) == 3
        assert re.match(r"keyhygiene: run \d+ run refused: .*3", lines[-1]), run.text()
        # Bold red, after an empty line, on the terminal itself.
        raw = run.output.decode(errors="replace").replace("\r", "")
        assert re.search(r"\n\n\x1b\[[0-9;]*m(\x1b\[[0-9;]*m)?keyhygiene: run \d+ run refused", raw), raw[-500:]
    finally:
        run.close()


def test_readable_lines_show_a_keys_name_with_its_control_characters_escaped(
    tmp_path: Path, fake_url: str, fake: FakeOpenRouter
) -> None:
    """A key's name is the API's to give: in readable log lines (`console`, the default on a
    terminal) its ESC sequences and line breaks reached the terminal raw, colouring it or faking a
    line; they are shown as the tables show them."""
    fake.add_key("evil\x1b[31mRED\x1b[0m\r\nkeyhygiene: run 9 run ok", expires_at=utcnow() - timedelta(days=1))
    rule = '[safety]\nmax_action_percent = 100\n\n[[rule]]\nname = "gone"\nmatch = "expired"\naction = "delete"\n'
    (tmp_path / "keyhygiene.toml").write_text(rule)  # dry run: planned, logged, not made
    env = command_env(tmp_path, fake_url, KEYHYGIENE_LOG_FORMAT="console")
    subprocess.run([keyhygiene_executable(), "db", "upgrade"], env=env, cwd=tmp_path, check=True, capture_output=True)

    done = subprocess.run([keyhygiene_executable(), "run"], env=env, cwd=tmp_path, capture_output=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert b"x1b[31mRED" in done.stderr and b"x0akeyhygiene: run 9" in done.stderr, done.stderr
    assert b"\x1b" not in done.stderr and b"\r" not in done.stderr
    assert not [line for line in done.stderr.splitlines() if line.startswith(b"keyhygiene: run 9")]


def test_an_explicit_format_wins_over_the_terminal(tmp_path: Path, fake_url: str) -> None:
    env = command_env(tmp_path, fake_url, KEYHYGIENE_LOG_FORMAT="json")
    subprocess.run([keyhygiene_executable(), "db", "upgrade"], env=env, cwd=tmp_path, check=True)
    sync = Terminal(["sync"], env, tmp_path)
    try:
        assert sync.wait(timeout=120) == 0
        # (on a terminal the progress spinner shares lines with the log, so look for the JSON itself)
        assert '"event": "sync_complete"' in sync.text(), sync.text()
    finally:
        sync.close()


# -- the worker and beat --------------------------------------------------------------------------


@pytest.mark.celery
@pytest.mark.timeout(150)
def test_worker_and_beat_off_a_terminal_write_only_json_lines_their_shutdown_included(
    deploy: Deployment, fake: FakeOpenRouter
) -> None:
    auto = {"KEYHYGIENE_LOG_FORMAT": "auto"}
    worker = deploy.start_worker(**auto)
    heartbeat = deploy.directory / "beat.heartbeat"
    beat = Process(
        "beat",
        ["beat", "--schedule", str(deploy.directory / "celerybeat-schedule"), "--heartbeat-file", str(heartbeat)],
        deploy.env(**auto),
        deploy.directory,
    )
    deploy.processes.append(beat)
    beat.wait_for_event(lambda e: e.get("event") == "beat_next_run", timeout=60, what="beat's next run")
    wait_until(heartbeat.exists, timeout=60, what="beat's heartbeat file")

    for process in (worker, beat):
        process.kill(signal.SIGINT)  # Ctrl-C
        process.popen.wait(timeout=60)

    shutdown = worker.events_named("worker: Warm shutdown (MainProcess)")
    assert shutdown and shutdown[0]["level"] == "info", worker.tail()
    for process in (worker, beat):
        lines = [line for line in process.lines() if line.strip()]
        assert lines and all(is_json(line) for line in lines), process.tail()
        assert process.stdout_path.read_text().strip() == "", f"{process.name} wrote to stdout"
    due = next(event for event in beat.events_named("beat_next_run") if event["job"] == "hygiene-run")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:00:00\+00:00", due["due_at"]), due
    # After a clean stop, the health check says so instead of "has not started".
    check = subprocess.run(
        [str(Path(keyhygiene_executable()).parent / "python"), "-m", "worker.health", "--file", str(heartbeat)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 1 and check.stderr.startswith("stopped at "), check.stderr


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.celery
@pytest.mark.timeout(150)
def test_a_pool_process_that_dies_is_told_of_in_a_json_line(deploy: Deployment) -> None:
    """The pool's "Process 'ForkPoolWorker-1' pid:… exited with 'signal 9 (SIGKILL)'" was printed
    raw among the JSON lines (billiard's logger has no handler and does not propagate), as it is
    whenever a pool process dies: killed by the hard time limit, out of memory, by a signal."""
    worker = deploy.start_worker()
    pool = wait_until(lambda: _children(worker.popen.pid), timeout=30, what="the worker's pool process")
    os.kill(pool[0], signal.SIGKILL)

    wait_until(
        lambda: any("exited with" in line for line in worker.lines()), timeout=30, what="the pool process's death"
    )
    told = [line for line in worker.lines() if "exited with" in line]
    assert all(is_json(line) for line in told), told
    assert json.loads(told[0])["level"] == "error"


@pytest.mark.celery
@pytest.mark.timeout(150)
def test_the_worker_on_a_terminal_writes_readable_lines_its_shutdown_included(deploy: Deployment) -> None:
    env = deploy.env(KEYHYGIENE_LOG_FORMAT="auto", TERM="xterm")
    worker = Terminal(
        ["worker", "--concurrency", "1", "--without-mingle", "--without-gossip", "--heartbeat-file", "hb"],
        env,
        deploy.directory,
    )
    try:
        worker.read_until(" ready.", timeout=60)
        os.killpg(worker.process.pid, signal.SIGINT)  # Ctrl-C on the terminal reaches the whole group
        worker.wait(timeout=60)
        lines = worker.lines()
        assert not any(is_json(line) for line in lines), worker.text()
        assert any("worker_starting" in line for line in lines)
        assert any("Warm shutdown" in line and "[info" in line for line in lines), worker.text()
    finally:
        worker.close()
