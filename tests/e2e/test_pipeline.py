"""A real ``qbgw worker`` process: on the embedded default (SQLite + filesystem broker), on PostgreSQL + Redis
and on PostgreSQL + RabbitMQ (+ Redis for the shared state), with the emulator over a socket."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qbgw import producer
from qbgw.emulator.server import Emulator
from qbgw.lifecycle import JobStatus
from qbgw.queries import job_events, wait_for_job
from qbgw.runtime.app import publish
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings
from tests.conftest import ASSISTANT, TOKEN
from tests.e2e.conftest import all_stacks
from tests.images import data_uri, jpeg_bytes, png_bytes


def submit(settings: Settings, content: Any) -> str:
    return producer.submit(ASSISTANT, [{"role": "user", "content": content}], settings=settings)


@all_stacks
def test_text_and_image_jobs_are_answered(stack: Settings, worker_process: Callable[..., Any]) -> None:
    worker_process(stack)
    png, jpeg = data_uri("png", png_bytes(64, 48)), data_uri("jpeg", jpeg_bytes(320, 240))
    text_job = submit(stack, "What is a normal resting heart rate?")
    image_job = submit(
        stack,
        [
            {"type": "text", "text": "Compare these."},
            {"type": "image_url", "image_url": {"url": png}},
            {"type": "image_url", "image_url": {"url": jpeg}},
        ],
    )
    text_view = wait_for_job(text_job, timeout=60, settings=stack)
    image_view = wait_for_job(image_job, timeout=60, settings=stack)
    assert text_view.status is JobStatus.SUCCEEDED
    assert "normal resting heart rate" in (text_view.answer or "")
    assert image_view.status is JobStatus.SUCCEEDED
    assert "png 64x48" in (image_view.answer or "")
    assert "jpeg 320x240" in (image_view.answer or "")


@all_stacks
def test_two_503s_then_success_on_the_third_attempt(stack: Settings, worker_process: Callable[..., Any]) -> None:
    worker_process(stack)
    job_id = submit(stack, "flaky upstream [[emulator:fail=503x2]]")
    view = wait_for_job(job_id, timeout=60, settings=stack)
    assert view.status is JobStatus.SUCCEEDED
    assert view.attempts == 3
    events = job_events(job_id, settings=stack)
    requests = [e.attempt for e in events if e.action == "attempt.request"]
    responses = [(e.attempt, e.http_status) for e in events if e.action == "attempt.response"]
    assert requests == [1, 2, 3]
    assert responses == [(1, 503), (2, 503), (3, 200)]


@all_stacks
def test_a_405_fails_at_once_with_the_reason(stack: Settings, worker_process: Callable[..., Any]) -> None:
    worker_process(stack)
    job_id = submit(stack, "feature is off [[emulator:fail=405]]")
    view = wait_for_job(job_id, timeout=60, settings=stack)
    assert view.status is JobStatus.FAILED
    assert view.attempts == 1
    assert view.http_status == 405
    assert "HTTP 405" in (view.error or "")


@all_stacks
def test_the_same_message_delivered_twice_yields_one_result(
    stack: Settings, worker_process: Callable[..., Any], emu: Emulator
) -> None:
    job_id = submit(stack, "deliver me twice [[emulator:sleep=0.5]]")
    publish(runtime(stack).celery, job_id)  # a second doorbell for the same job
    worker_process(stack)
    view = wait_for_job(job_id, timeout=60, settings=stack)
    assert view.status is JobStatus.SUCCEEDED
    assert view.attempts == 1
    actions = [e.action for e in job_events(job_id, settings=stack)]
    assert actions.count("attempt.request") == 1
    assert actions.count("job.succeeded") == 1
    assert emu.stats()["requests"] == 1


@all_stacks
def test_the_worker_log_holds_no_token_and_no_message_text(
    stack: Settings, worker_process: Callable[..., Any], tmp_path: Any
) -> None:
    worker_process(stack)
    secret_text = "Canary patient Ximena Oduya-Blackwood"
    job_id = submit(stack, f"{secret_text} [[emulator:fail=503x1]]")
    view = wait_for_job(job_id, timeout=60, settings=stack)
    assert view.status is JobStatus.SUCCEEDED
    assert secret_text in (view.answer or "")
    log = (tmp_path / "worker-0.log").read_text()
    assert job_id in log  # the log does say what happened to which job...
    assert TOKEN not in log
    assert "Oduya" not in log


def test_with_block_sealing_a_workers_sealer_chains_every_event(
    production_settings: Settings, worker_process: Callable[..., Any]
) -> None:
    # QBGW_AUDIT_SEAL=block on PostgreSQL + Redis: the worker's commits stage their events and its own sealer
    # chains them (nobody reads the chain meanwhile); a retried job's whole trail is there, and it verifies.
    from sqlalchemy import create_engine, func, select

    from qbgw.admin import verify_log
    from qbgw.store.models import AuditEvent, AuditPending
    from tests.conftest import wait_until

    block = production_settings.with_(audit_seal="block", audit_seal_interval=0.1)
    worker_process(block)
    ids = [submit(block, f"block sealing {n} [[emulator:fail=503x1]]") for n in range(10)]
    for job_id in ids:
        assert wait_for_job(job_id, timeout=60, settings=block).status is JobStatus.SUCCEEDED
    engine = create_engine(block.database_url)
    seen: list[tuple[int | None, int | None]] = []

    def settled() -> bool:
        with engine.connect() as connection:
            staged = connection.scalar(select(func.count()).select_from(AuditPending))
            chained = connection.scalar(select(func.count()).select_from(AuditEvent))
        seen.append((staged, chained))
        # at least: submitted, 2 x (request, response), a retry, succeeded
        return staged == 0 and (chained or 0) >= 10 * 7

    try:
        wait_until(settled, timeout=30)
    except AssertionError:
        raise AssertionError(f"(staged, chained) at the end: {seen[-1]}") from None
    finally:
        engine.dispose()
    trails = [job_events(job_id, include_reads=True, settings=block) for job_id in ids]
    assert sum(len(t) for t in trails) == seen[-1][1]  # every event of theirs chained by the sealer, none else
    trail = [(e.action, e.attempt) for e in trails[0]]
    assert trail[0] == ("job.submitted", None)
    assert [action for action, _ in trail[-2:]] == ["job.succeeded", "result.read"]
    assert [a for action, a in trail if action == "attempt.request"] == [1, 2]
    assert verify_log(settings=block).ok
