"""API keys: made, rotated, revoked, refused; names are principals and are never reused; every change and
every refusal audited without the secret. On both databases."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from click.testing import CliRunner

from qbgw import access, queries
from qbgw.cli.main import cli
from qbgw.errors import InputError, Unauthenticated
from qbgw.settings import Settings
from qbgw.store.reads import AuditFilter


def test_a_key_is_shown_once_and_only_its_hash_is_stored(settings: Settings) -> None:
    result = CliRunner().invoke(
        cli, ["api-keys", "create", "--name", "web", "--role", "submitter"], env=settings.to_env()
    )
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert key.startswith("qbgw_")
    assert len(key.splitlines()) == 1  # stdout holds only the key; the note goes to stderr
    principal = access.authenticate(key, settings=settings)
    assert (principal.name, principal.role, principal.actor) == ("web", "submitter", "key:web")
    listed = CliRunner().invoke(cli, ["api-keys", "list", "--json"], env=settings.to_env())
    assert key.split("_", 2)[2] not in listed.stdout
    assert json.loads(listed.stdout.splitlines()[0])["state"] == "active"
    events = queries.audit_query(AuditFilter(action="apikey.created"), settings=settings)
    assert events[0].detail["principal"] == "web"
    assert key.split("_", 2)[2] not in json.dumps([e.as_dict() for e in events])


def test_rotation_overlaps_then_the_old_key_expires(settings: Settings) -> None:
    _, old = access.create_key("batchjob", "submitter", settings=settings)
    row, new = access.rotate_key("batchjob", overlap=timedelta(seconds=0), settings=settings)
    assert row.role == "submitter"
    assert access.authenticate(new, settings=settings).name == "batchjob"
    with pytest.raises(Unauthenticated, match="expired"):
        access.authenticate(old, settings=settings)
    _, newer = access.rotate_key("batchjob", overlap=timedelta(hours=1), settings=settings)
    assert access.authenticate(new, settings=settings).name == "batchjob"  # still, for the overlap
    assert access.authenticate(newer, settings=settings).name == "batchjob"


def test_revoked_unknown_and_malformed_keys_are_refused_and_audited(settings: Settings) -> None:
    row, key = access.create_key("gone", "reader", settings=settings)
    access.revoke_key(row.id, actor="security", settings=settings)
    for presented, reason in [
        (key, "revoked key"),
        (key[:-4] + "AAAA", "unknown key"),
        ("qbgw_nothex!!_" + "x" * 40, "malformed key"),
        (None, "no key"),
    ]:
        with pytest.raises(Unauthenticated) as refused:
            access.authenticate(presented, source="10.0.0.7", settings=settings)
        assert refused.value.reason == reason
    failures = queries.audit_query(AuditFilter(action="auth.failed"), settings=settings)
    assert [e.detail["reason"] for e in failures] == ["revoked key", "unknown key", "malformed key", "no key"]
    assert all(e.detail["source"] == "10.0.0.7" and e.actor == "anonymous" for e in failures)
    revoked = queries.audit_query(AuditFilter(action="apikey.revoked"), settings=settings)
    assert [(e.actor, e.detail["key_id"]) for e in revoked] == [("security", row.id)]


@pytest.mark.parametrize(
    ("name", "role", "expires", "says"),
    [
        ("web app", "submitter", None, "name:"),
        ("", "submitter", None, "name:"),
        ("web", "root", None, "role: 'root' is not a role"),
        ("web", "reader", "forever", "is not a duration"),
        ("web", "reader", "999999w", "longer than the longest"),
        ("web", "reader", "0d", "is not a duration"),
    ],
)
def test_bad_key_requests_name_what_is_wrong(
    settings: Settings, name: str, role: str, expires: str | None, says: str
) -> None:
    with pytest.raises(InputError, match=says):
        access.create_key(name, role, expires_in=access.parse_duration(expires) if expires else None, settings=settings)
    assert access.list_keys(settings=settings) == []  # nothing stored


def test_a_name_is_a_principal_and_is_never_given_to_another_party(settings: Settings) -> None:
    row, _ = access.create_key("clinic-a", "submitter", settings=settings)
    with pytest.raises(InputError, match="already has an active key"):
        access.create_key("clinic-a", "reader", settings=settings)
    access.revoke_key(row.id, settings=settings)
    with pytest.raises(InputError, match="never given to another party"):
        access.create_key("clinic-a", "reader", settings=settings)
    with pytest.raises(InputError, match="no active key to rotate"):
        access.rotate_key("clinic-a", settings=settings)
    with pytest.raises(InputError, match="no key has the id"):
        access.revoke_key("nope", settings=settings)


def test_the_cli_reports_a_bad_duration_in_one_line(settings: Settings) -> None:
    result = CliRunner().invoke(
        cli, ["api-keys", "create", "--name", "x", "--role", "reader", "--expires", "999999w"], env=settings.to_env()
    )
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "--expires" in result.stderr


def test_a_rotation_keeps_replaces_or_drops_the_key_s_default_webhook(settings: Settings) -> None:
    from qbgw.runtime.locator import runtime
    from qbgw.store import keys as key_store

    def default_of(row: access.KeyRow) -> str | None:
        with runtime(settings).transaction() as session:
            return key_store.webhook_url(session, row.id)

    dev = settings.with_(webhooks_development=True)
    first, _ = access.create_key("hooked", "submitter", webhook_url="http://127.0.0.1:9/h", settings=dev)
    kept, _ = access.rotate_key("hooked", settings=settings)
    assert default_of(kept) == "http://127.0.0.1:9/h"
    with pytest.raises(InputError, match="webhook_url: must be https://"):  # development is off now
        access.rotate_key("hooked", webhook_url="http://127.0.0.1:9/h2", settings=settings)
    replaced, _ = access.rotate_key("hooked", webhook_url="https://app.example/hook", settings=settings)
    assert default_of(replaced) == "https://app.example/hook"
    dropped, _ = access.rotate_key("hooked", webhook_url="", settings=settings)
    assert default_of(dropped) is None
    result = CliRunner().invoke(
        cli, ["api-keys", "rotate", "--name", "hooked", "--webhook-url", "https://b.example/h"], env=settings.to_env()
    )
    assert result.exit_code == 0, result.output
    assert default_of(access.list_keys(settings=settings)[-1]) == "https://b.example/h"
    assert first.id != dropped.id
