"""Operations against real parts: the exporter's gauges on SQLite and PostgreSQL, and ``qbgw health``, which
passes on a working setup and fails with one clear line for each missing dependency."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from prometheus_client import generate_latest

from qbgw import producer
from qbgw.admin import anchor_now
from qbgw.cli.main import EXIT, cli
from qbgw.control import cancel
from qbgw.emulator.server import Emulator
from qbgw.execution.tasks import Outcome, run_attempt
from qbgw.lifecycle import utcnow
from qbgw.ops import metrics
from qbgw.ops.exporter import FleetCollector
from qbgw.runtime import locator as runtime_module
from qbgw.runtime.locator import runtime
from qbgw.settings import Secret, Settings
from tests.conftest import ASSISTANT

OTHER_KEY = "kother:" + "B" * 43 + "="


def submit(settings: Settings, text: str = "hello") -> str:
    return producer.submit(ASSISTANT, [{"role": "user", "content": text}], settings=settings)


def test_the_exporter_counts_jobs_by_status_queue_depth_and_checkpoint_age(settings: Settings, emu: Emulator) -> None:
    done, cancelled, waiting = submit(settings), submit(settings), submit(settings)
    assert run_attempt(runtime(settings), done) is Outcome.SUCCEEDED
    cancel(cancelled, actor="ops", settings=settings)
    anchor = anchor_now(settings=settings)
    registry = metrics.registry_for(fleet=FleetCollector(runtime(settings)), workers=False)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert {
        s: value("qbgw_jobs", status=s) for s in ("queued", "running", "retrying", "succeeded", "failed", "cancelled")
    } == {"queued": 1, "running": 0, "retrying": 0, "succeeded": 1, "failed": 0, "cancelled": 1}
    assert (value("qbgw_oldest_waiting_job_age_seconds") or 0) > 0
    assert value("qbgw_queue_depth", queue=settings.queue) == 3  # run_attempt above did not take a message
    assert value("qbgw_queue_depth", queue=settings.effective_batch_queue) == 0
    assert 0 <= (value("qbgw_audit_checkpoint_age_seconds") or -1) < 30
    assert value("qbgw_audit_checkpoint_seq") == anchor.seq
    assert [value("qbgw_up", part=p) for p in ("database", "broker", "audit_anchor_file")] == [1, 1, 1]
    text = generate_latest(registry).decode()
    assert not any(job_id in text for job_id in (done, cancelled, waiting))  # no job id is ever a label


def test_the_exporter_says_what_it_cannot_read_instead_of_failing(embedded_settings: Settings) -> None:
    away = embedded_settings.with_(
        database_url="postgresql+psycopg://postgres@127.0.0.1:1/none",
        broker_url="redis://127.0.0.1:1/0",
        connect_timeout=1.0,
    )
    registry = metrics.registry_for(fleet=FleetCollector(runtime(away)), workers=False)
    assert registry.get_sample_value("qbgw_up", {"part": "database"}) == 0
    assert registry.get_sample_value("qbgw_up", {"part": "broker"}) == 0
    assert registry.get_sample_value("qbgw_jobs", {"status": "queued"}) is None  # left out, never stale


# --- qbgw health ----------------------------------------------------------------------------------
def health(settings: Settings, *args: str) -> Result:
    runtime_module.reset()
    result = CliRunner().invoke(cli, ["health", *args], env=settings.to_env(), catch_exceptions=False)
    runtime_module.reset()
    return result


def ready(settings: Settings) -> Settings:
    """A working setup: migrated, one job stored (so its key is in use), a fresh audit checkpoint."""
    submit(settings)
    anchor_now(settings=settings)
    runtime_module.reset()
    return settings


def test_health_passes_with_one_ok_line_per_dependency(settings: Settings, emu: Emulator) -> None:
    result = health(ready(settings))
    assert result.exit_code == EXIT["ok"], result.output
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["ok", n] for n in ("database", "broker", "upstream", "audit", "keys")
    ]
    assert "credentials accepted, gateway feature on" in lines[2]
    report = json.loads(health(settings, "--json", "--skip", "upstream").stdout)
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == ["database", "broker", "audit", "keys"]


def failing(result: Result, name: str) -> str:
    """The one FAIL line, which must name ``name``; every other check passed."""
    assert result.exit_code == EXIT["unhealthy"], result.output
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1, result.stdout
    assert failed[0].split()[1] == name, result.stdout
    return failed[0]


def test_health_names_an_unreachable_database(embedded_settings: Settings, emu: Emulator) -> None:
    broken = ready(embedded_settings).with_(database_url="postgresql+psycopg://postgres@127.0.0.1:1/qbgw")
    line = failing(health(broken, "--skip", "keys"), "database")
    assert "cannot reach database postgresql+psycopg://postgres@127.0.0.1:1/qbgw" in line
    assert "fix:" in line


def test_health_names_a_database_that_is_not_migrated(
    embedded_settings: Settings, emu: Emulator, tmp_path: Path
) -> None:
    empty = ready(embedded_settings).with_(database_url=f"sqlite:///{tmp_path / 'empty.db'}")
    line = failing(health(empty), "database")
    assert "is at revision none, not" in line
    assert "run `qbgw db upgrade`" in line


def test_health_names_an_unreachable_broker(embedded_settings: Settings, emu: Emulator) -> None:
    line = failing(health(ready(embedded_settings).with_(broker_url="redis://127.0.0.1:1/0")), "broker")
    assert "cannot reach broker redis://" in line
    assert "127.0.0.1:1" in line


def test_health_on_rabbitmq_pings_the_fleets_redis_too(rabbitmq_settings: Settings, emu: Emulator) -> None:
    settings = ready(rabbitmq_settings)
    result = health(settings, "--skip", "upstream")
    assert result.exit_code == EXIT["ok"], result.output
    broker = next(line for line in result.stdout.splitlines() if line.split()[1] == "broker")
    assert "shared state in redis://127.0.0.1:6379/" in broker
    line = failing(
        health(settings.with_(redis_url="redis://:pw-hidden-1@127.0.0.1:1/0"), "--skip", "upstream"), "broker"
    )
    assert "cannot reach the fleet's Redis redis://" in line
    assert "QBGW_REDIS_URL right?" in line
    assert "pw-hidden-1" not in line


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"base_url": "http://127.0.0.1:1"}, "is unreachable or failing"),
        ({"token": Secret("tok-wrong-0000")}, "refused the credentials: gateway answered HTTP 401"),
        ({"feature_enabled": False}, "answered HTTP 405: the AI gateway feature is off"),
    ],
)
def test_health_names_an_upstream_that_is_down_refuses_the_token_or_has_the_feature_off(
    embedded_settings: Settings, emu: Emulator, change: dict[str, object], expected: str
) -> None:
    settings = ready(embedded_settings)
    if "feature_enabled" in change:
        emu.reconfigure(feature_enabled=False)
    else:
        settings = settings.with_(**change)
    line = failing(health(settings), "upstream")
    assert expected in line
    assert "fix:" in line


def test_health_names_a_stale_or_missing_audit_checkpoint(embedded_settings: Settings, emu: Emulator) -> None:
    settings = ready(embedded_settings)
    path = settings.anchor_path
    last = json.loads(path.read_text().splitlines()[-1])
    last["at"] = (utcnow() - timedelta(hours=1)).isoformat(timespec="microseconds")
    path.write_text(json.dumps(last) + "\n")
    assert "the last audit checkpoint is 3600s old (limit 180s)" in failing(health(settings), "audit")
    assert health(settings, "--max-checkpoint-age", "7200").exit_code == EXIT["ok"]
    path.unlink()
    assert "no audit checkpoint (anchor) in" in failing(health(settings), "audit")


def test_health_names_a_missing_or_lost_encryption_key(embedded_settings: Settings, emu: Emulator) -> None:
    settings = ready(embedded_settings)
    line = failing(health(settings.with_(encryption_keys=Secret(OTHER_KEY))), "keys")
    assert "stored jobs are encrypted with key(s) ktest" in line
    assert "restore QBGW_ENCRYPTION_KEYS" in line
    line = failing(health(settings.with_(encryption_keys=Secret(""))), "keys")
    assert "no encryption key" in line


def test_health_fails_a_base_url_where_something_other_than_the_gateway_answers(tmp_path: Path) -> None:
    """A web server's plain 404 at the probe's path is not the gateway refusing the probe: the base URL is wrong
    (it was reported as credentials accepted, while every real job would fail)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from qbgw.ops.health import check_health

    class NotTheGateway(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            body = b"<html><body>Not Found</body></html>"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotTheGateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = Settings(
            data_dir=tmp_path, base_url=f"http://127.0.0.1:{server.server_address[1]}", token=Secret("t")
        )
        (upstream,) = check_health(settings, skip=("database", "broker", "audit", "keys"), timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert not upstream.ok
    assert "not as the gateway does" in upstream.detail
    assert "QBGW_BASE_URL" in upstream.fix
