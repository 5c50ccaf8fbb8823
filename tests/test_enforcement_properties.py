"""Properties of enforcement that must hold for any inventory and any rules: through the real
job function, the fake API over HTTP and a real SQLite database, on random organisations."""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from db.migrate import upgrade
from db.models import Action
from keyhygiene.context import Database, open_client
from keyhygiene.fakeapi import FakeOpenRouter, FakeServer
from keyhygiene.jobs import execute
from keyhygiene.settings import Settings
from keyhygiene.timeutil import utcnow

from .conftest import MANAGEMENT_KEY

RULE_TEMPLATES = {
    "expired": '[[rule]]\nname = "expired"\nmatch = "expired"\naction = "{action}"\n',
    "idle": '[[rule]]\nname = "idle"\nmatch = "unused"\nidle_for = "30d"\naction = "{action}"\n',
    "spend": '[[rule]]\nname = "spend"\nmatch = "over_budget"\nwindow = "monthly"\nthreshold_usd = 50.0\n'
    'action = "{action}"\n',
    "limit": '[[rule]]\nname = "limit"\nmatch = "over_budget"\nwindow = "monthly"\naction = "{action}"\n',
}

key_specs = st.lists(
    st.fixed_dictionaries(
        {
            "prefix": st.sampled_from(["dev", "svc", "prod", "ci"]),
            "disabled": st.booleans(),
            "expired": st.booleans(),
            "idle_days": st.integers(0, 120),
            "monthly": st.floats(0, 200, allow_nan=False),
            "limit": st.one_of(st.none(), st.floats(1, 100, allow_nan=False)),
            "age_days": st.integers(1, 400),
        }
    ),
    min_size=1,
    max_size=25,
)
rule_sets = st.dictionaries(
    st.sampled_from(sorted(RULE_TEMPLATES)), st.sampled_from(["disable", "delete", "report"]), min_size=1
)
safeties = st.fixed_dictionaries(
    {
        "dry_run": st.booleans(),
        "max_actions": st.integers(1, 30),
        "max_percent": st.integers(1, 100),
        "protect_prod": st.booleans(),
    }
)


def _build(fake: FakeOpenRouter, specs: list[dict[str, Any]]) -> None:
    now = utcnow()
    for index, spec in enumerate(specs):
        monthly = round(spec["monthly"], 2)
        fake.add_key(
            f"{spec['prefix']}-{index}",
            disabled=spec["disabled"],
            created_at=now - timedelta(days=spec["age_days"]),
            expires_at=now - timedelta(days=1) if spec["expired"] else None,
            last_used_at=now - timedelta(days=spec["idle_days"]),
            usage=monthly + 1.0,
            usage_monthly=monthly,
            limit=spec["limit"],
            limit_reset="monthly" if spec["limit"] is not None else None,
        )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=key_specs, chosen=rule_sets, safety=safeties, flag_dry_run=st.booleans())
def test_enforcement_never_breaks_a_safety_limit(
    specs: list[dict[str, Any]], chosen: dict[str, str], safety: dict[str, Any], flag_dry_run: bool
) -> None:
    fake = FakeOpenRouter(MANAGEMENT_KEY)
    fake.add_workspace("Default", default=True)
    _build(fake, specs)
    before = {key["hash"]: key for key in fake.keys}
    rules = (
        f"[safety]\ndry_run = {str(safety['dry_run']).lower()}\nmax_actions_per_run = {safety['max_actions']}\n"
        f"max_action_percent = {safety['max_percent']}\n"
        f"protect_names = {['prod-*'] if safety['protect_prod'] else []}\n\n"
    )
    rules += "\n".join(
        RULE_TEMPLATES[name].format(action=action) + ('grace = "7d"\n' if action == "delete" else "")
        for name, action in sorted(chosen.items())
    )
    with tempfile.TemporaryDirectory() as tmp, FakeServer(fake) as server:
        rules_path = Path(tmp) / "rules.toml"
        rules_path.write_text(rules.replace("'", '"'))
        config = Settings(  # type: ignore[call-arg]
            OPENROUTER_MANAGEMENT_KEY=MANAGEMENT_KEY,
            OPENROUTER_BASE_URL=server.base_url,
            KEYHYGIENE_DATABASE_URL=f"sqlite:///{tmp}/kh.db",
            KEYHYGIENE_RULES_FILE=str(rules_path),
            KEYHYGIENE_HTTP_RETRY_SECONDS=2,
        )
        database = Database.open(config, check=False)
        upgrade(database.engine)
        client = open_client(config)
        try:
            outcome = execute("run", config, dry_run=flag_dry_run, database=database, client=client)
            with database.sessions() as session:
                actions = list(session.scalars(select(Action)))
        finally:
            client.close()
            database.close()

    changes = fake.mutating_calls()
    assert outcome.exit_code in (0, 3), outcome.message
    if safety["dry_run"] or flag_dry_run:
        assert changes == [], "a dry run called a mutating endpoint"
    assert len(changes) <= safety["max_actions"]
    assert len(changes) * 100 <= safety["max_percent"] * len(specs)
    for call in changes:
        key = before[call.path.rsplit("/", 1)[-1]]
        if safety["protect_prod"]:
            assert not key["name"].startswith("prod-"), "a protected key was changed"
        if call.method == "DELETE":
            assert key["disabled"], "an enabled key was deleted in one step"
    assert not [a for a in actions if a.outcome == "pending"]
    changed_in_audit = {a.key_hash for a in actions if a.outcome == "done" and a.action != "report"}
    assert {call.path.rsplit("/", 1)[-1] for call in changes} == changed_in_audit
