"""Fuzzing the settings: any value of any variable is either accepted, and then safe to use (finite
timeouts, durations of at most 100 years, a key that fits an HTTP header), or refused with one line
naming the variable, never echoing the management key; the same holds through the real command."""

from __future__ import annotations

import math
import os
import tempfile
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyhygiene.settings import ENV_NAMES, Settings, SettingsError, load_settings
from keyhygiene.timeutil import MAX_DURATION
from tests.conftest import _invoke, failure_lines

EXAMPLES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VARIABLES = sorted(ENV_NAMES.values())
KEY = "OPENROUTER_MANAGEMENT_KEY"

# Values near what each variable takes, and plain garbage; no NUL (no environment can hold one).
texts = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=24)
near_misses = st.one_of(
    st.builds(
        lambda n, unit: f"{n}{unit}", st.integers(-(10**20), 10**20), st.sampled_from(["s", "m", "h", "d", "w", ""])
    ),
    st.sampled_from(["inf", "-inf", "nan", "1e309", "0", "-1", "65", "1", "json", "console", "0 * * * *"]),
    st.builds(str, st.floats()),
    st.builds(lambda base, junk: base + junk, st.just("sk-or-v1-abc"), texts),
)
# URLs: a scheme, then pieces of what may follow it (user, password, host, port, path, brackets).
urls = st.builds(
    lambda scheme, parts: scheme + "".join(parts),
    st.sampled_from(["http://", "https://", "redis://", "rediss://", "unix://"]),
    st.lists(
        st.one_of(st.sampled_from(["u:p@", "@", ":", "[", "]", "::1", "h", "/", "?", "#", " ", "0", "99999"]), texts),
        max_size=6,
    ),
)
assignments = st.dictionaries(st.sampled_from(VARIABLES), st.one_of(texts, near_misses), min_size=1, max_size=4)


def _assert_safe(value: Settings) -> None:
    for url in (value.base_url, value.broker_url):
        # What the client, Celery and redis-py will do with it must not raise.
        parts = urlsplit(url)
        assert parts.port is None or 0 < parts.port < 65536
        assert url == url.strip() and url.isprintable()
    assert urlsplit(value.base_url).hostname
    assert math.isfinite(value.http_timeout) and 0 < value.http_timeout <= MAX_DURATION.total_seconds()
    assert math.isfinite(value.http_retry_seconds) and value.http_retry_seconds > 0
    for duration in (value.retention, value.job_time_limit, value.audit_retention):
        assert duration is None or timedelta(0) < duration <= MAX_DURATION
    if value.management_key is not None and value.management_key.get_secret_value().strip():
        # It can be sent: httpx encodes header values as ASCII and refuses line breaks.
        key = value.require_management_key()
        request = httpx.Request("GET", "http://localhost/", headers={"Authorization": f"Bearer {key}"})
        assert request.headers["Authorization"].endswith(key)


KEY_REFUSAL = (
    "contains a character that cannot go in an HTTP header "
    "(a key is printable ASCII, with no spaces or line breaks inside)"
)


def _assert_refusal(message: str, assigned: dict[str, str]) -> None:
    assert "\n" not in message
    assert message.startswith("invalid settings: ")
    assert any(f"{name}: " in message for name in assigned), message
    if f"{KEY}: " in message:
        # Named, never echoed: what follows the name is fixed text, whatever the key was.
        assert message.split(f"{KEY}: ", 1)[1].split("; ", 1)[0] == KEY_REFUSAL, message


def _assert_safe_or_refused(assigned: dict[str, str]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        for name in VARIABLES:
            patch.delenv(name, raising=False)
        try:
            value = load_settings(_env_file=None, **assigned)
        except SettingsError as exc:
            _assert_refusal(str(exc), assigned)
        else:
            _assert_safe(value)


@EXAMPLES
@given(assigned=assignments)
def test_every_setting_is_accepted_safe_or_refused_naming_it(assigned: dict[str, str]) -> None:
    _assert_safe_or_refused(assigned)


@EXAMPLES
@given(base_url=urls, broker_url=urls)
def test_every_url_is_accepted_usable_or_refused_naming_it(base_url: str, broker_url: str) -> None:
    # An accepted URL was once a traceback later: "Invalid IPv6 URL", "Port out of range".
    _assert_safe_or_refused({"OPENROUTER_BASE_URL": base_url, "KEYHYGIENE_BROKER_URL": broker_url})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(assigned=assignments)
def test_the_command_refuses_bad_settings_with_exit_2_and_one_line(assigned: dict[str, str]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        for name in VARIABLES:
            patch.delenv(name, raising=False)
        for name, text in assigned.items():
            patch.setenv(name, text)
        with tempfile.TemporaryDirectory() as directory:
            patch.chdir(directory)  # no .env, and nothing may be created here
            try:
                load_settings()
            except SettingsError as exc:
                refusal: str | None = str(exc)
            else:
                refusal = None
            # `trigger prune --dry-run` reads the settings first, then is refused before touching
            # anything: exit 2 either way, and the line says which.
            result = _invoke(["trigger", "prune", "--dry-run"])
            assert os.listdir(directory) == []

    assert "Traceback" not in result.stderr
    assert result.exit_code == 2
    lines = failure_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    if refusal is None:
        assert lines[0] == "keyhygiene: error: prune has no dry run: it would delete the history all the same"
    else:
        assert lines[0].startswith("keyhygiene: error: invalid settings: ")
