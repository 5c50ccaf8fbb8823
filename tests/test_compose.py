"""The compose deployment, checked without a Docker engine: every service runs a real keyhygiene
command, the dependencies and health checks are in place, and no secret is baked in anywhere."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from keyhygiene.cli import cli
from keyhygiene.settings import ENV_NAMES

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
    assert test[:4] == ["CMD", "python", "-m", "worker.health"]
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
        assert f"./keyhygiene.toml:{rules_path}:ro" in service["volumes"]


def test_the_management_key_is_a_secret_never_a_value(compose: dict[str, Any]) -> None:
    for name in ("migrate", "worker"):
        service = services(compose)[name]
        assert "OPENROUTER_MANAGEMENT_KEY" not in service["environment"]
        assert service["secrets"] == ["openrouter_management_key"]
        assert service["environment"]["OPENROUTER_MANAGEMENT_KEY_FILE"] == "/run/secrets/openrouter_management_key"
    assert "OPENROUTER_MANAGEMENT_KEY_FILE" not in services(compose)["beat"]["environment"]
    assert compose["secrets"]["openrouter_management_key"]["file"].startswith("./secrets/")
    text = COMPOSE.read_text() + DOCKERFILE.read_text()
    assert not re.search(r"sk-or-v1-[0-9a-f]{16,}", text)


def test_every_setting_the_services_pass_is_one_keyhygiene_reads(compose: dict[str, Any]) -> None:
    known = set(ENV_NAMES.values()) | {"OPENROUTER_MANAGEMENT_KEY_FILE"}
    for name in KEYHYGIENE_SERVICES:
        assert set(services(compose)[name]["environment"]) <= known, name


def test_the_dockerfile_installs_the_package_and_bakes_in_no_secret() -> None:
    text = DOCKERFILE.read_text()
    # The package itself, with the same pinned versions the tests ran with.
    assert re.search(r"^RUN pip install --constraint constraints\.txt \.", text, re.MULTILINE)
    assert "COPY pyproject.toml README.md constraints.txt" in text
    assert "OPENROUTER_MANAGEMENT_KEY=" not in text
    assert re.search(r"^USER (?!root)", text, re.MULTILINE), "the image does not run as root"
    for package in ("keyhygiene", "db", "migrations", "tasks", "worker"):
        assert f"COPY {package} " in text, f"the image lacks the {package} package"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", "secrets/", "*.db", ".venv"} <= set(ignored)
    entrypoint = (ROOT / "deploy" / "docker-entrypoint.sh").read_text()
    assert 'exec "$@"' in entrypoint


def test_the_example_rules_file_is_valid_and_changes_nothing() -> None:
    from keyhygiene.rules import load_rules

    ruleset = load_rules(ROOT / "deploy" / "keyhygiene.toml.example")
    assert ruleset.safety.dry_run is True
