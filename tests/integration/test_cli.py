"""``qbgw`` commands, through click's runner (in process) against a real SQLite database."""

from __future__ import annotations

import base64
import json
import time
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from qbgw.cli.main import EXIT, cli
from qbgw.emulator.server import Emulator
from qbgw.execution.tasks import run_attempt
from qbgw.queries import AuditFilter, audit_query, job_events
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings
from tests.conftest import ASSISTANT
from tests.images import jpeg_bytes, png_bytes


@pytest.fixture
def env(embedded_settings: Settings) -> dict[str, str]:
    return {**embedded_settings.to_env(), "QBGW_ASSISTANT_ID": ASSISTANT}


def qbgw(env: dict[str, str], *args: str, input: str | None = None) -> Result:
    runtime_reset()
    return CliRunner().invoke(cli, list(args), env=env, input=input, catch_exceptions=False)


def runtime_reset() -> None:
    from qbgw.runtime import locator as runtime_module

    runtime_module.reset()


def jobs_stored(settings: Settings) -> int:
    from sqlalchemy import func, select

    from qbgw.store.models import Job

    with runtime(settings).transaction() as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0


def test_submit_text_then_status_and_result(env: dict[str, str], embedded_settings: Settings, emu: Emulator) -> None:
    submitted = qbgw(env, "submit", "--text", "Hello from the CLI", "--custom-id", "cli-1")
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip()
    pending = qbgw(env, "result", job_id)
    assert pending.exit_code == EXIT["timeout"]
    assert "is queued" in pending.stderr
    run_attempt(runtime(embedded_settings), job_id)
    status = json.loads(qbgw(env, "status", job_id, "--actor", "st").stdout)
    assert status["status"] == "succeeded"
    assert status["custom_id"] == "cli-1"
    assert status["error"] is None
    assert "answer" not in status
    result = qbgw(env, "result", job_id, "--actor", "dr-cli")
    assert result.exit_code == 0
    assert 'you said "Hello from the CLI"' in result.stdout
    reads = [e for e in job_events(job_id, include_reads=True, settings=embedded_settings) if e.action == "result.read"]
    # who read it is the reader the CLI was given; the status, which showed no answer and no error, read nothing
    assert [e.actor for e in reads] == ["dr-cli"]
    events = [json.loads(line) for line in qbgw(env, "events", job_id).stdout.splitlines()]
    assert [e["action"] for e in events][-1] == "job.succeeded"
    with_reads = [
        json.loads(line) for line in qbgw(env, "events", job_id, "--reads", "--actor", "aud-1").stdout.splitlines()
    ]
    assert [(e["action"], e["actor"]) for e in with_reads][-1] == ("result.read", "dr-cli")
    queried = audit_query(AuditFilter(action="audit.queried"), settings=embedded_settings)[-1]
    assert (queried.actor, queried.detail["filter"]) == ("aud-1", {"job_id": job_id})  # on the record, by whom
    refused = qbgw(env, "events", job_id, "--actor", "bell\x07")
    assert refused.exit_code == EXIT["bad_input"], refused.output
    assert "reader: must not contain control characters" in refused.stderr


def test_submit_messages_from_stdin_and_an_image_file(env: dict[str, str], tmp_path: Path) -> None:
    messages = json.dumps([{"role": "user", "content": "from stdin"}])
    assert qbgw(env, "submit", "-", input=messages).exit_code == 0
    image = tmp_path / "scan.png"
    image.write_bytes(png_bytes(8, 8))
    refused = qbgw(env, "submit", "-t", "look", "-i", str(image))
    assert refused.exit_code == EXIT["bad_input"]
    assert "no image roots are configured" in refused.stderr
    assert qbgw({**env, "QBGW_IMAGE_ROOTS": str(tmp_path)}, "submit", "-t", "look", "-i", str(image)).exit_code == 0


def test_a_failed_job_exits_1_with_its_reason(env: dict[str, str], embedded_settings: Settings) -> None:
    job_id = qbgw(env, "submit", "--text", "x [[emulator:fail=400]]").stdout.strip()
    run_attempt(runtime(embedded_settings), job_id)
    result = qbgw(env, "result", job_id)
    assert result.exit_code == EXIT["job_failed"]
    assert "failed: gateway answered HTTP 400" in result.stderr
    # the status shows the error: that is a read, audited as the reader given
    status = json.loads(qbgw(env, "status", job_id, "--actor", "st").stdout)
    assert status["status"] == "failed"
    assert "400" in status["error"]
    reads = [e for e in job_events(job_id, include_reads=True, settings=embedded_settings) if e.action == "result.read"]
    assert reads[-1].actor == "st"


@pytest.mark.parametrize(
    ("args", "stdin", "code", "message"),
    [
        (["submit", "-"], "{oops", "bad_input", "qbgw: error: stdin: not valid JSON"),
        (["submit", "-"], '[{"role": "robot", "content": "x"}]', "bad_input", "messages[0].role: 'robot'"),
        (["submit"], None, "usage", "nothing to send"),
        (["submit", "m.json", "--text", "x"], None, "usage", "not both"),
        (["submit", "--text", "x", "--assistant", " "], None, "bad_input", "smart_chat_assistant_id"),
        (["submit", "--text", "x", "--image", "/no/such.png"], None, "bad_input", "image_url.url: local files are not"),
        (["status", "00000000-0000-0000-0000-000000000000"], None, "not_found", "no such job: 00000000"),
        (["result", "nope"], None, "not_found", "no such job: nope"),
        (["events", "nope"], None, "not_found", "no such job: nope"),
    ],
)
def test_bad_input_is_one_line_and_a_named_exit_code(
    env: dict[str, str], embedded_settings: Settings, args: list[str], stdin: str | None, code: str, message: str
) -> None:
    result = qbgw(env, *args, input=stdin)
    assert result.exit_code == EXIT[code]
    assert message in result.stderr
    if code != "usage":  # (a usage mistake also shows the usage line, as click does)
        assert len(result.stderr.strip().splitlines()) == 1
    assert jobs_stored(embedded_settings) == 0


def audit_events(settings: Settings) -> int:
    from sqlalchemy import func, select

    from qbgw.store.models import AuditEvent

    with runtime(settings).transaction() as session:
        return session.scalar(select(func.count()).select_from(AuditEvent)) or 0


HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[" * 2000 + "]" * 2000, "nested too deeply to parse"),
        (
            json.dumps({"messages": HI, "model": "gpt-4o", "temperature": 0}),
            "unknown field(s) model, temperature; accepted: custom_id, idempotency_key, messages, "
            "smart_chat_assistant_id",
        ),
        (json.dumps({"messages": HI, "custom_id": 7}), "custom_id: must be a string, got int"),
        (json.dumps({"messages": HI, "custom_id": ""}), "custom_id: must be a non-empty string"),
        ('[{"role": "user", "content": "a\\ud800b"}]', "messages[0].content: not encodable as UTF-8"),
        (json.dumps([{"role": "user", "content": "hi", "name": {"first": "Ann"}}]), "messages[0].name: must be 1"),
        (
            json.dumps(
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://h:65536/x.png"}}]}]
            ),
            "the port '65536' of an https URL is not a number from 1 to 65535",
        ),
        (
            json.dumps(
                [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {
                                    "url": "data:image/png;base64," + base64.b64encode(jpeg_bytes(4, 4)).decode()
                                },
                            }
                        ],
                    }
                ]
            ),
            "data uri declares image/png but its bytes are a jpeg",
        ),
        (json.dumps(HI) + " " * 5000, "bytes is over the request limit of 4096 bytes (QBGW_MAX_REQUEST_BYTES)"),
    ],
)
def test_a_bad_request_file_exits_3_with_one_line_and_stores_nothing(
    env: dict[str, str], embedded_settings: Settings, tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "request.json"
    path.write_text(content)
    result = qbgw({**env, "QBGW_MAX_REQUEST_BYTES": "4096"}, "submit", str(path))
    assert result.exit_code == EXIT["bad_input"], result.output
    assert result.stderr.startswith("qbgw: error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr
    assert jobs_stored(embedded_settings) == 0
    assert audit_events(embedded_settings) == 0


@pytest.mark.parametrize(
    ("ref", "scheme"), [("http://127.0.0.1/x.png", "http"), ("ftp://h/x.png", "ftp"), ("file:x.png", None)]
)
def test_an_image_reference_with_another_scheme_says_so(
    env: dict[str, str], embedded_settings: Settings, tmp_path: Path, ref: str, scheme: str | None
) -> None:
    result = qbgw({**env, "QBGW_IMAGE_ROOTS": str(tmp_path)}, "submit", "-t", "look", "--image", ref)
    assert result.exit_code == EXIT["bad_input"]
    assert len(result.stderr.strip().splitlines()) == 1
    said = f"the scheme {scheme!r} is not accepted" if scheme else "an image reference must be"
    assert f"messages[0].content[1].image_url.url: {said}" in result.stderr
    assert "https:// URL, a data:image/...;base64, URI, or a local file path" in result.stderr
    assert "not under an allowed root" not in result.stderr
    assert jobs_stored(embedded_settings) == 0


def test_a_broker_outage_keeps_the_job_and_warns(env: dict[str, str], embedded_settings: Settings) -> None:
    result = qbgw({**env, "QBGW_BROKER_URL": "redis://127.0.0.1:1/0"}, "submit", "--text", "hi")
    assert result.exit_code == 0
    assert len(result.stdout.split()) == 1
    assert "warning: job" in result.stderr
    assert "sweep" in result.stderr
    assert jobs_stored(embedded_settings) == 1


def test_require_broker_exits_5_and_stores_nothing(env: dict[str, str], embedded_settings: Settings) -> None:
    down = {**env, "QBGW_BROKER_URL": "redis://127.0.0.1:1/0"}
    result = qbgw(down, "submit", "--require-broker", "--text", "hi")
    assert result.exit_code == EXIT["unavailable"]
    assert "unreachable" in result.stderr
    assert jobs_stored(embedded_settings) == 0


def test_a_bad_setting_exits_7(env: dict[str, str]) -> None:
    result = qbgw({**env, "QBGW_READ_TIMEOUT": "later"}, "status", "x")
    assert result.exit_code == EXIT["config"]
    assert "QBGW_READ_TIMEOUT must be a float" in result.stderr


def test_db_upgrade_migrates_a_named_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ops.db'}"
    result = qbgw({"QBGW_DATABASE_URL": url, "QBGW_DATA_DIR": str(tmp_path)}, "db", "upgrade")
    assert result.exit_code == 0
    assert "is at head" in result.stdout
    # Without the upgrade a named database is refused with the command to run.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    refused = qbgw({"QBGW_DATABASE_URL": other, "QBGW_DATA_DIR": str(tmp_path)}, "status", "x")
    assert refused.exit_code == EXIT["config"]
    assert "run `qbgw db upgrade`" in refused.stderr


def test_sweep_re_announces_a_job_whose_message_was_lost(env: dict[str, str], embedded_settings: Settings) -> None:
    job_id = qbgw(env, "submit", "--text", "lost").stdout.strip()
    for message in (embedded_settings.broker_dir / "queue").glob("*.msg"):
        message.unlink()  # the broker forgot it
    time.sleep(0.05)
    assert qbgw({**env, "QBGW_SWEEP_GRACE": "0.01"}, "sweep").stdout.split() == ["dispatched", job_id]
    assert len(list((embedded_settings.broker_dir / "queue").glob("*.msg"))) == 1


def test_cancel_failed_and_replay_commands(env: dict[str, str], embedded_settings: Settings) -> None:
    waiting = qbgw(env, "submit", "--text", "never mind").stdout.strip()
    assert qbgw(env, "cancel", waiting, "--actor", "nurse-7").stdout.strip() == "cancelled"
    again = qbgw(env, "cancel", waiting)
    assert again.exit_code == 0
    broken = qbgw(env, "submit", "--text", "x [[emulator:fail=422x1]]").stdout.strip()
    run_attempt(runtime(embedded_settings), broken)
    listed = qbgw(env, "failed").stdout
    assert broken in listed
    assert "UpstreamRejected: gateway answered HTTP 422" in listed
    assert json.loads(qbgw(env, "failed", "--json").stdout.splitlines()[0])["id"] == broken
    assert qbgw(env, "replay", broken).stdout.strip() == f"{broken} queued for attempt 2"
    run_attempt(runtime(embedded_settings), broken)
    assert qbgw(env, "result", broken).exit_code == 0
    refused = qbgw(env, "replay", broken)
    assert refused.exit_code == EXIT["conflict"]
    assert "only a failed job can be replayed" in refused.stderr
    assert qbgw(env, "cancel", broken).exit_code == EXIT["conflict"]
    assert qbgw(env, "cancel", "nope").exit_code == EXIT["not_found"]


def test_keys_and_purge_commands(env: dict[str, str], embedded_settings: Settings) -> None:
    job_id = qbgw(env, "submit", "--text", "to be purged").stdout.strip()
    run_attempt(runtime(embedded_settings), job_id)
    refused = qbgw(env, "keys", "rotate")
    assert refused.exit_code == EXIT["config"]
    assert "QBGW_ENCRYPTION_KEYS" in refused.stderr
    assert qbgw(env, "keys", "status").stdout.split() == ["ktest", "2"]  # payload and answer
    assert qbgw(env, "purge", "--older-than", "soon").exit_code == 2
    assert qbgw(env, "purge", "--older-than", "²d").exit_code == 2  # a Unicode digit: no traceback
    assert qbgw(env, "purge", "--older-than", "1000000000d").exit_code == 2  # past a hundred years: no traceback
    unconfirmed = qbgw(env, "purge", "--older-than", "0s")  # today's answers too: only when said so
    assert unconfirmed.exit_code == 2
    assert "pass --yes" in unconfirmed.stderr
    assert qbgw(env, "keys", "status").stdout.split() == ["ktest", "2"]  # nothing was erased
    confirmed = qbgw(env, "purge", "--older-than", "0s", "--yes")
    assert confirmed.stdout.strip() == "purged the PHI of 1 job(s) and file(s)"
    for bad in (["sweep", "--every", "0"], ["sweep", "--every", "-1"], ["sweep", "--grace", "-5"]):
        assert qbgw(env, *bad).exit_code == 2, bad  # a busy loop, a traceback after one sweep, a grace before now
    assert qbgw(env, "worker", "-l", "bogus").exit_code == 2
    purged = qbgw(env, "result", job_id)  # no answer to print: said so, not an empty line and exit 0
    assert purged.exit_code == EXIT["job_failed"]
    assert purged.stdout == ""
    assert "succeeded, but its answer was purged" in purged.stderr


def test_a_batch_job_shows_its_batch_and_a_limit_below_one_is_a_usage_error(
    env: dict[str, str], embedded_settings: Settings
) -> None:
    from qbgw import producer
    from qbgw.errors import InputError
    from qbgw.queries import batch_results
    from qbgw.store.reads import AuditFilter

    line = {"custom_id": "a", "smart_chat_assistant_id": ASSISTANT, "messages": [{"role": "user", "content": "x"}]}
    batch = producer.submit_batch([line], settings=embedded_settings)
    job_id = batch_results(batch.id, settings=embedded_settings)[0].job_id
    assert json.loads(qbgw(env, "status", job_id).stdout)["batch_id"] == batch.id
    alone = qbgw(env, "submit", "--text", "alone").stdout.strip()
    assert json.loads(qbgw(env, "status", alone).stdout)["batch_id"] is None
    for limit in ("0", "-1", "99999999999999999999"):
        refused = qbgw(env, "audit", "--limit", limit)
        assert refused.exit_code == EXIT["usage"], refused.stderr
        assert "--limit" in refused.stderr
    naive = datetime(2026, 12, 1)  # without a time zone: refused by name
    for bad, says in (
        ({"limit": 0}, "^limit: "),
        ({"limit": 10**30}, "^limit: must be a whole number of events from 1 to"),
        ({"since": naive}, "^since: must be a datetime with a time zone .* got a naive datetime"),
        ({"until": "2026-12-01"}, "^until: must be a datetime with a time zone .* got str"),
        ({"after_seq": -1}, "^after_seq: "),
        ({"job_id": 5}, "^job_id: must be a string; got int"),
    ):
        with pytest.raises(InputError, match=says):
            AuditFilter(**bad)


def test_health_with_an_unusable_database_url_is_a_configuration_error(env: dict[str, str]) -> None:
    result = qbgw({**env, "QBGW_DATABASE_URL": "foo://bar"}, "health")
    assert result.exit_code == EXIT["config"], result.stdout + result.stderr
    assert "foo://bar" in result.stderr


@pytest.mark.parametrize("keys", ["garbage", "k1:notbase64!!", "k1:" + "QUFB" * 4])
def test_health_with_a_malformed_encryption_key_is_a_configuration_error(env: dict[str, str], keys: str) -> None:
    result = qbgw({**env, "QBGW_ENCRYPTION_KEYS": keys}, "health", "--skip", "upstream")
    assert result.exit_code == EXIT["config"], result.stdout + result.stderr  # as submit and worker say: 7, not 10
    assert "FAIL keys" in result.stdout
    assert "QBGW_ENCRYPTION_KEYS" in result.stdout
