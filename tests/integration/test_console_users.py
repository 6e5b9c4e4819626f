"""Console users (``qbgw users``) and their sessions: argon2 hashes, passwords never on the command line,
names never reused, lockout, idle sessions ended, every change and failure audited without the password. On
both databases."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from qbgw import queries, users
from qbgw.cli.main import cli
from qbgw.errors import InputError
from qbgw.settings import Settings
from qbgw.store.reads import AuditFilter
from qbgw.store.users import token_id

PASSWORD = "correct horse battery staple"


def test_a_user_is_created_with_the_password_from_stdin_and_only_its_argon2_hash_is_stored(
    settings: Settings, owner_url: str
) -> None:
    made = CliRunner().invoke(
        cli, ["users", "create", "--name", "alice", "--role", "auditor"], input=PASSWORD + "\n", env=settings.to_env()
    )
    assert made.exit_code == 0, made.output
    listed = CliRunner().invoke(cli, ["users", "list", "--json"], env=settings.to_env())
    row = json.loads(listed.stdout.splitlines()[0])
    assert (row["name"], row["role"], row["state"]) == ("alice", "auditor", "active")
    engine = create_engine(owner_url)
    try:
        with engine.connect() as connection:
            stored = connection.execute(text("SELECT password_hash FROM console_users")).scalar_one()
    finally:
        engine.dispose()
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored
    signed = users.sign_in("alice", PASSWORD, source="10.1.2.3", settings=settings)
    assert signed.actor == "user:alice"
    events = queries.audit_query(AuditFilter(), settings=settings)
    assert [e.action for e in events][:2] == ["user.created", "console.signed_in"]
    assert PASSWORD not in json.dumps([e.as_dict() for e in events])


def test_no_submitter_no_short_password_and_a_name_is_never_reused(settings: Settings) -> None:
    with pytest.raises(InputError, match="not a console role"):
        users.create_user("sam", "submitter", PASSWORD, settings=settings)
    with pytest.raises(InputError, match="12 to 1024 characters"):
        users.create_user("sam", "reader", "short", settings=settings)
    refused = CliRunner().invoke(cli, ["users", "create", "--name", "sam", "--role", "submitter"], input=PASSWORD)
    assert refused.exit_code != 0
    users.create_user("sam", "reader", PASSWORD, settings=settings)
    disabled = CliRunner().invoke(cli, ["users", "disable", "sam", "--actor", "security"], env=settings.to_env())
    assert disabled.exit_code == 0, disabled.output
    assert "disabled" in disabled.stdout
    with pytest.raises(InputError, match="never given to anyone else"):
        users.create_user("sam", "reader", PASSWORD, settings=settings)
    with pytest.raises(users.SignInRefused, match="disabled user"):
        users.sign_in("sam", PASSWORD, settings=settings)


def test_failures_lock_the_user_and_are_audited_without_the_password(settings: Settings) -> None:
    settings = settings.with_(console_max_failures=3)
    users.create_user("bob", "reader", PASSWORD, settings=settings)
    for _ in range(3):
        with pytest.raises(users.SignInRefused):
            users.sign_in("bob", "a wrong password!", source="10.0.0.9", settings=settings)
    with pytest.raises(users.SignInRefused) as locked:
        users.sign_in("bob", PASSWORD, settings=settings)
    assert locked.value.locked
    with pytest.raises(users.SignInRefused, match="unknown user"):
        users.sign_in("nobody", PASSWORD, settings=settings)
    failed = queries.audit_query(AuditFilter(action="console.signin_failed"), settings=settings)
    assert [e.detail["reason"] for e in failed] == [
        "wrong password",
        "wrong password",
        "wrong password; user locked",
        "locked user",
        "unknown user",
    ]
    assert failed[0].detail["source"] == "10.0.0.9"
    assert all(e.actor == "anonymous" for e in failed)
    assert "wrong password!" not in json.dumps([e.as_dict() for e in failed])
    reset = CliRunner().invoke(cli, ["users", "reset-password", "bob"], input=PASSWORD + "!\n", env=settings.to_env())
    assert reset.exit_code == 0, reset.output  # a new password unlocks
    assert [e.actor for e in queries.audit_query(AuditFilter(action="user.password_reset"), settings=settings)] == [
        "operator"
    ]
    assert users.sign_in("bob", PASSWORD + "!", settings=settings).user.name == "bob"


def test_a_session_keeps_only_a_hash_ends_when_idle_and_views_are_audited(settings: Settings, owner_url: str) -> None:
    settings = settings.with_(console_idle_timeout=3.0)  # sign-in to the first view must take less, when slow too
    users.create_user("carol", "admin", PASSWORD, settings=settings)
    signed = users.sign_in("carol", PASSWORD, settings=settings)
    engine = create_engine(owner_url)
    try:
        with engine.connect() as connection:
            ids = connection.execute(text("SELECT id FROM console_sessions")).scalars().all()
    finally:
        engine.dispose()
    assert ids == [token_id(signed.token)]
    assert signed.token not in ids[0]
    now = users.current(signed.token, page="dashboard", detail={"period": "24h"}, settings=settings)
    assert now.actor == "user:carol"
    viewed = queries.audit_query(AuditFilter(action="console.viewed"), settings=settings)
    assert [(e.actor, e.detail) for e in viewed] == [("user:carol", {"page": "dashboard", "period": "24h"})]
    time.sleep(3.3)
    with pytest.raises(users.SessionEnded, match="idle"):
        users.current(signed.token, page="dashboard", settings=settings)
    with pytest.raises(users.SessionEnded):  # ended for good
        users.current(signed.token, settings=settings)
    ended = queries.audit_query(AuditFilter(action="console.signed_out"), settings=settings)
    assert [e.detail["reason"] for e in ended] == ["idle"]
    # disabling a user ends their sessions at once
    again = users.sign_in("carol", PASSWORD, settings=settings)
    users.disable_user("carol", settings=settings)
    with pytest.raises(users.SessionEnded):
        users.current(again.token, settings=settings)
    assert users.csrf_token(again.token) != users.csrf_token(signed.token)
