"""The compose deployment, checked without a Docker engine: every service runs a real keyhygiene
command, the dependencies and health checks are in place, and no secret is baked in anywhere."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from sqlalchemy.engine import make_url

from keyhygiene.cli import cli
from keyhygiene.settings import ENV_NAMES, Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
KEYHYGIENE_SERVICES = ("migrate", "worker", "beat")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]  # type: ignore[no-any-return]


def resolve_command(argv: list[str]) -> click.Command:
    """The click command ``keyhygiene ARGV...`` would run (failing if there is none)."""
    assert argv[0] == "keyhygiene", f"{argv} does not run keyhygiene"
    command: click.Command = cli
    words = [word for word in argv[1:] if not word.startswith("-")]
    ctx = click.Context(cli)
    for word in words:
        if not isinstance(command, click.Group):
            break
        sub = command.get_command(ctx, word)
        assert sub is not None, f"`keyhygiene {' '.join(words)}` is not a keyhygiene command"
        command = sub
    assert not isinstance(command, click.Group), f"{argv} names a group, not a command"
    return command


def test_every_keyhygiene_service_runs_a_real_command(compose: dict[str, Any]) -> None:
    expected = {"migrate": ["db", "upgrade"], "worker": ["worker"], "beat": ["beat"]}
    for name in KEYHYGIENE_SERVICES:
        argv = services(compose)[name]["command"]
        assert isinstance(argv, list), f"{name}: use the exec form (a list), not a shell string"
        command = resolve_command(argv)
        assert command.name == expected[name][-1]
        assert argv[1 : 1 + len(expected[name])] == expected[name]


def test_redis_and_postgres_have_health_checks_and_volumes(compose: dict[str, Any]) -> None:
    redis, postgres = services(compose)["redis"], services(compose)["postgres"]
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(str(volume).endswith(":/data") for volume in redis["volumes"])
    assert any(str(volume).endswith(":/var/lib/postgresql/data") for volume in postgres["volumes"])
    assert set(compose["volumes"]) >= {"redis-data", "postgres-data", "beat-state"}


def test_migrate_waits_for_postgres_and_worker_and_beat_wait_for_migrate(compose: dict[str, Any]) -> None:
    svc = services(compose)
    assert svc["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert svc["migrate"]["restart"] == "no"
    for name in ("worker", "beat"):
        depends = svc[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
    assert svc["worker"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_worker_health_check_is_the_heartbeat_the_worker_writes(compose: dict[str, Any]) -> None:
    worker = services(compose)["worker"]
    test = worker["healthcheck"]["test"]
    # As uid 10001, like everything else in the container (a healthcheck skips the entrypoint).
    assert test[:5] == ["CMD", "setpriv", "--reuid=10001", "--regid=10001", "--clear-groups"]
    assert test[5:8] == ["python", "-m", "worker.health"]
    heartbeat = test[test.index("--file") + 1]
    command = worker["command"]
    assert command[command.index("--heartbeat-file") + 1] == heartbeat
    assert "solo" not in command, "the solo pool stops the heartbeat during a job"


def test_there_is_exactly_one_beat(compose: dict[str, Any]) -> None:
    beat = services(compose)["beat"]
    assert beat["deploy"]["replicas"] == 1
    assert "scale" not in beat
    schedule_file = beat["command"][beat["command"].index("--schedule") + 1]
    assert any(f":{Path(schedule_file).parent}" in str(volume) for volume in beat["volumes"])
    assert [name for name, svc in services(compose).items() if "beat" in svc.get("command", [])] == ["beat"]


def test_the_rules_file_is_mounted_read_only_where_the_settings_point(compose: dict[str, Any]) -> None:
    for name in ("migrate", "worker"):
        service = services(compose)[name]
        rules_path = service["environment"]["KEYHYGIENE_RULES_FILE"]
        (mount,) = service["volumes"]
        assert mount["source"] == "./keyhygiene.toml" and mount["target"] == rules_path and mount["read_only"]
        # A missing file stops `up` instead of becoming a directory of that name.
        assert mount["bind"]["create_host_path"] is False


def test_the_management_key_and_database_password_are_secrets_never_values(compose: dict[str, Any]) -> None:
    for name in ("migrate", "worker"):
        service = services(compose)[name]
        assert "OPENROUTER_MANAGEMENT_KEY" not in service["environment"]
        assert set(service["secrets"]) == {"openrouter_management_key", "postgres_password"}
        assert service["environment"]["OPENROUTER_MANAGEMENT_KEY_FILE"] == "/run/secrets/openrouter_management_key"
    beat = services(compose)["beat"]
    assert "OPENROUTER_MANAGEMENT_KEY_FILE" not in beat["environment"] and beat["secrets"] == ["postgres_password"]
    for name in KEYHYGIENE_SERVICES:
        environment = services(compose)[name]["environment"]
        assert make_url(environment["KEYHYGIENE_DATABASE_URL"]).password is None
        assert environment["KEYHYGIENE_DATABASE_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "POSTGRES_PASSWORD" not in services(compose)["postgres"]["environment"]
    assert services(compose)["postgres"]["secrets"] == ["postgres_password"]
    assert compose["secrets"]["openrouter_management_key"]["file"].startswith("./secrets/")
    assert compose["secrets"]["postgres_password"]["file"].startswith("./secrets/")
    text = COMPOSE.read_text() + DOCKERFILE.read_text()
    assert not re.search(r"sk-or-v1-[0-9a-f]{16,}", text)


def test_every_setting_the_services_pass_is_one_keyhygiene_reads(compose: dict[str, Any]) -> None:
    image_only = {"OPENROUTER_MANAGEMENT_KEY_FILE", "KEYHYGIENE_DATABASE_PASSWORD_FILE"}
    for name in KEYHYGIENE_SERVICES:
        assert set(services(compose)[name]["environment"]) <= set(ENV_NAMES.values()) | image_only, name


def test_every_setting_in_the_env_file_reaches_every_keyhygiene_service(compose: dict[str, Any]) -> None:
    for name in KEYHYGIENE_SERVICES:
        assert services(compose)[name]["env_file"] == [{"path": ".env", "required": False}], name
    example = (ROOT / "deploy" / "env.example").read_text()
    named = set(re.findall(r"^#?(KEYHYGIENE_[A-Z_]+)=", example, re.MULTILINE))
    assert "POSTGRES_PASSWORD" not in example.replace("#", "")
    assert {"KEYHYGIENE_AUDIT_RETENTION", "KEYHYGIENE_JOB_TIME_LIMIT", "KEYHYGIENE_HTTP_CONCURRENCY"} <= named


def test_one_image_is_built_once_for_every_keyhygiene_service(compose: dict[str, Any]) -> None:
    svc = services(compose)
    assert [name for name, service in svc.items() if "build" in service] == ["migrate"]
    assert {svc[name]["image"] for name in KEYHYGIENE_SERVICES} == {svc["migrate"]["image"]}


def test_the_dockerfile_installs_the_package_and_bakes_in_no_secret() -> None:
    text = DOCKERFILE.read_text()
    # The package itself, with the same pinned versions the tests ran with.
    assert re.search(r"^RUN pip install --constraint constraints\.txt \.", text, re.MULTILINE)
    assert "COPY pyproject.toml README.md constraints.txt" in text
    assert "OPENROUTER_MANAGEMENT_KEY=" not in text
    for package in ("keyhygiene", "db", "migrations", "tasks", "worker"):
        assert f"COPY {package} " in text, f"the image lacks the {package} package"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", "secrets/", "*.db", ".venv"} <= set(ignored)
    # Started as root only to read the secrets; every command runs as uid 10001 (the compose smoke
    # test, scripts/compose-smoke, checks the running processes).
    entrypoint = (ROOT / "deploy" / "docker-entrypoint.sh").read_text()
    assert "--useradd --system --uid 10001" not in text and "--uid 10001" in text
    assert re.search(r'exec setpriv --reuid="\$APP_UID" .* -- "\$@"', entrypoint)


def test_the_example_rules_file_is_valid_and_changes_nothing() -> None:
    from keyhygiene.rules import load_rules

    ruleset = load_rules(ROOT / "deploy" / "keyhygiene.toml.example")
    assert ruleset.safety.dry_run is True


# -- the image's entrypoint, run here as the container runs it --------------------------------------

ENTRYPOINT = ROOT / "deploy" / "docker-entrypoint.sh"


def run_entrypoint(tmp_path: Path, env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    # The venv's python (with SQLAlchemy) first on PATH, as the image's is.
    path = f"{Path(sys.executable).parent}{os.pathsep}/usr/sbin:/usr/bin:/sbin:/bin"
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *command], env={"PATH": path, **env}, capture_output=True, text=True, timeout=60
    )


def test_the_entrypoint_reads_the_secrets_escapes_the_password_and_drops_root(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    password = "p@ss:w/rd%41#?& x"
    (secrets / "postgres_password").write_text(password + "\n")
    (secrets / "openrouter_management_key").write_text("sk-or-v1-" + "ab" * 32 + "\n")
    webhook = "https://hooks.example.test/services/T0/B0/" + "x" * 24
    (secrets / "ops_webhook").write_text(webhook + "\n")
    for secret in secrets.iterdir():
        secret.chmod(0o600)  # as the README says: readable by its owner only
    done = run_entrypoint(
        tmp_path,
        {
            "KEYHYGIENE_DATABASE_URL": "postgresql+psycopg://keyhygiene@postgres:5432/keyhygiene",
            "KEYHYGIENE_DATABASE_PASSWORD_FILE": str(secrets / "postgres_password"),
            "OPENROUTER_MANAGEMENT_KEY_FILE": str(secrets / "openrouter_management_key"),
            "KEYHYGIENE_OPS_WEBHOOK_FILE": str(secrets / "ops_webhook"),  # a [[notify]] target's url_env
            "KEYHYGIENE_RULES_FILE": "/etc/keyhygiene/keyhygiene.toml",  # a setting: left as it is
        },
        "sh",
        "-c",
        'id -u; echo "$KEYHYGIENE_DATABASE_URL"; echo "$OPENROUTER_MANAGEMENT_KEY"; echo "$KEYHYGIENE_OPS_WEBHOOK";'
        ' echo "${OPENROUTER_MANAGEMENT_KEY_FILE-unset} ${KEYHYGIENE_DATABASE_PASSWORD_FILE-unset}'
        ' ${KEYHYGIENE_OPS_WEBHOOK_FILE-unset} ${KEYHYGIENE_RULES_FILE-unset} ${KEYHYGIENE_RULES-unset}"',
    )
    assert done.returncode == 0, done.stderr
    uid, url, key, hook, files = done.stdout.splitlines()
    assert make_url(url).password == password and make_url(url).host == "postgres"
    # The settings take the URL as the entrypoint wrote it: a space in the password unescaped.
    assert Settings(KEYHYGIENE_DATABASE_URL=url).database.password == password  # type: ignore[call-arg]
    assert key == "sk-or-v1-" + "ab" * 32
    assert hook == webhook
    assert files == "unset unset unset /etc/keyhygiene/keyhygiene.toml unset"
    if os.getuid() == 0:
        assert uid == "10001", "the command still runs as root"


def test_the_entrypoint_names_what_it_cannot_use(tmp_path: Path) -> None:
    missing = run_entrypoint(tmp_path, {"OPENROUTER_MANAGEMENT_KEY_FILE": str(tmp_path / "nope")}, "true")
    assert missing.returncode == 2
    assert "OPENROUTER_MANAGEMENT_KEY_FILE" in missing.stderr and "cannot be read" in missing.stderr
    (tmp_path / "keyhygiene.toml").mkdir()  # what Docker makes of a missing bind-mount source
    directory = run_entrypoint(tmp_path, {"KEYHYGIENE_RULES_FILE": str(tmp_path / "keyhygiene.toml")}, "true")
    assert directory.returncode == 2
    assert "is a directory" in directory.stderr and "deploy/keyhygiene.toml.example" in directory.stderr
    (tmp_path / "postgres_password").write_text("secret\n")
    no_url = run_entrypoint(
        tmp_path,
        {"KEYHYGIENE_DATABASE_PASSWORD_FILE": str(tmp_path / "postgres_password"), "KEYHYGIENE_DATABASE_URL": "::"},
        "true",
    )
    assert no_url.returncode == 2
    # Off a terminal the logs are JSON lines (the default, auto): so is the entrypoint's one line.
    for done in (missing, directory, no_url):
        (line,) = done.stderr.splitlines()
        event = json.loads(line)
        assert (event["event"], event["level"], event["exit_code"]) == ("command_failed", "error", 2), line
        assert event["timestamp"].endswith("Z")
    assert json.loads(no_url.stderr)["error"] == "KEYHYGIENE_DATABASE_URL is not a database URL"
    (tmp_path / "postgres_password").write_bytes(b"\xff\xfe\n")
    not_text = run_entrypoint(
        tmp_path,
        {
            "KEYHYGIENE_DATABASE_PASSWORD_FILE": str(tmp_path / "postgres_password"),
            "KEYHYGIENE_DATABASE_URL": "postgresql+psycopg://keyhygiene@postgres/keyhygiene",
        },
        "true",
    )
    assert not_text.returncode == 2
    (line,) = not_text.stderr.splitlines()  # no traceback
    assert json.loads(line)["error"].endswith("postgres_password, which cannot be read as UTF-8 text")
    console = run_entrypoint(
        tmp_path, {"OPENROUTER_MANAGEMENT_KEY_FILE": str(tmp_path / "nope"), "KEYHYGIENE_LOG_FORMAT": "Console"}, "true"
    )
    assert console.returncode == 2
    assert console.stderr.startswith("keyhygiene: error: OPENROUTER_MANAGEMENT_KEY_FILE names ")


def test_the_entrypoint_keeps_a_bug_in_its_password_step_to_one_line_without_the_password(tmp_path: Path) -> None:
    # A stand-in SQLAlchemy whose URL fails the way a bug would, quoting the password it was given.
    fake = tmp_path / "fake" / "sqlalchemy"
    (fake / "engine").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "engine" / "__init__.py").write_text(
        "class _Url:\n"
        "    def set(self, password):\n"
        "        raise RuntimeError(f'cannot set {password}')\n"
        "def make_url(text):\n"
        "    return _Url()\n"
    )
    (tmp_path / "postgres_password").write_text("hunter2-secret\n")
    env = {
        "KEYHYGIENE_DATABASE_PASSWORD_FILE": str(tmp_path / "postgres_password"),
        "KEYHYGIENE_DATABASE_URL": "postgresql+psycopg://keyhygiene@postgres/keyhygiene",
        "PYTHONPATH": str(tmp_path / "fake"),
    }
    done = run_entrypoint(tmp_path, env, "echo", "ran")
    assert done.returncode == 2 and done.stdout == ""
    assert "hunter2-secret" not in done.stderr
    (line,) = done.stderr.splitlines()  # no traceback
    assert json.loads(line)["error"] == (
        "KEYHYGIENE_DATABASE_PASSWORD_FILE could not be put into KEYHYGIENE_DATABASE_URL (RuntimeError)"
    )


def test_the_entrypoint_takes_the_log_format_named_in_any_case(tmp_path: Path) -> None:
    missing = {"OPENROUTER_MANAGEMENT_KEY_FILE": str(tmp_path / "nope")}
    console = run_entrypoint(tmp_path, {**missing, "keyhygiene_log_format": "console"}, "true")
    assert console.returncode == 2
    assert console.stderr.startswith("keyhygiene: error: OPENROUTER_MANAGEMENT_KEY_FILE names "), console.stderr
    # The upper-case name wins over another spelling, as in keyhygiene's own lookup before its settings.
    both = run_entrypoint(
        tmp_path, {**missing, "keyhygiene_log_format": "console", "KEYHYGIENE_LOG_FORMAT": "json"}, "true"
    )
    assert json.loads(both.stderr)["event"] == "command_failed"
