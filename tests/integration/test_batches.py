"""Batches on SQLite and PostgreSQL: stored all or nothing, counted as their jobs finish, cancelled
and expired with finished results kept, exported (audited) and re-submitted. Jobs run in process."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from qbgw.admin import sweep
from qbgw.audit import events as audit
from qbgw.batches import export as batch_export
from qbgw.control import cancel_batch
from qbgw.errors import BatchNotFound, InvalidBatch
from qbgw.execution.tasks import run_attempt
from qbgw.lifecycle import JobStatus, utcnow
from qbgw.producer import submit_batch
from qbgw.queries import AuditFilter, audit_query, batch_results, get_batch, get_job, list_batches, wait_for_batch
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings
from qbgw.store import jobs as store
from qbgw.store.batches import BatchStatus
from qbgw.store.models import AuditEvent, Batch, Job
from tests.conftest import ASSISTANT


def lines(n: int, *, fail: tuple[int, ...] = (), prefix: str = "row") -> list[str]:
    """``n`` lines; those in ``fail`` get a 400 from the emulator."""
    out = []
    for i in range(n):
        text = f"Question {i}" + (" [[emulator:fail=400]]" if i in fail else "")
        out.append(json.dumps({"custom_id": f"{prefix}-{i:03d}", "messages": [{"role": "user", "content": text}]}))
    return out


def job_ids(settings: Settings, batch_id: str) -> dict[str, str]:
    """custom_id → job id."""
    with runtime(settings).transaction() as session:
        return dict(session.execute(select(Job.custom_id, Job.id).where(Job.batch_id == batch_id)).all())  # type: ignore[arg-type]


def run(settings: Settings, batch_id: str, custom_ids: list[str] | None = None) -> None:
    ids = job_ids(settings, batch_id)
    for custom_id in custom_ids if custom_ids is not None else sorted(ids):
        run_attempt(runtime(settings), ids[custom_id])


def end_window(settings: Settings, batch_id: str) -> None:
    """Move a batch's window to have ended a second ago.

    Moved rather than slept past: on a slow machine, running a batch's jobs took longer than a short window,
    and the batch expired before they ran."""
    with runtime(settings).transaction() as session:
        session.execute(update(Batch).where(Batch.id == batch_id).values(expires_at=utcnow() - timedelta(seconds=1)))


def stored(settings: Settings) -> tuple[int, int]:
    with runtime(settings).transaction() as session:
        return (
            session.scalar(select(func.count()).select_from(Batch)) or 0,
            session.scalar(select(func.count()).select_from(Job)) or 0,
        )


def test_one_invalid_line_stores_nothing_and_skip_invalid_stores_the_rest(settings: Settings) -> None:
    batch = lines(5)
    batch[3] = json.dumps({"custom_id": "row-003", "messages": [{"role": "doctor", "content": "x"}]})
    with pytest.raises(InvalidBatch) as caught:
        submit_batch(batch, assistant_id=ASSISTANT, settings=settings)
    assert caught.value.problems[0][0] == 4
    assert "messages[0].role: 'doctor'" in caught.value.problems[0][1]
    assert stored(settings) == (0, 0)
    view = submit_batch(batch, assistant_id=ASSISTANT, skip_invalid=True, settings=settings)
    assert (view.total, view.skipped, view.pending) == (4, 1, 4)
    assert [n for n, _ in view.problems] == [4]
    assert view.status is BatchStatus.IN_PROGRESS
    assert stored(settings) == (1, 4)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ('{"custom_id": "row-001", "messages": ' + "[" * 50_000 + "]" * 50_000 + "}", "nested too deeply to parse"),
        (
            json.dumps({"custom_id": "row-001\udc80", "messages": [{"role": "user", "content": "x"}]}),
            "custom_id: not encodable as UTF-8",
        ),
        (
            json.dumps({"custom_id": "row-001", "messages": [{"role": "user", "content": "x", "name": 5}]}),
            "messages[0].name: must be 1 to 64 letters",
        ),
        (
            json.dumps({"custom_id": "row-001", "messages": [{"role": "user", "content": "x" * 300_000}]}),
            "over the request limit of 200000 bytes",
        ),
        (
            {
                "custom_id": "row-001",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://[2002:7f00:1::/x.png"}}],
                    }
                ],
            },
            "lacks its closing ']'",
        ),
    ],
)
def test_a_line_that_used_to_crash_or_pass_rejects_the_batch_and_stores_nothing(
    settings: Settings, bad: str | dict[str, Any], reason: str
) -> None:
    batch: list[str | dict[str, Any]] = [*lines(3)]
    batch[1] = bad
    with pytest.raises(InvalidBatch) as caught:
        submit_batch(batch, assistant_id=ASSISTANT, settings=settings.with_(max_request_bytes=200_000))
    assert [n for n, _ in caught.value.problems] == [2]
    assert reason in caught.value.problems[0][1]
    assert stored(settings) == (0, 0)
    with runtime(settings).transaction() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == 0


def test_counts_and_status_follow_the_jobs_and_failures_are_reported_as_such(settings: Settings) -> None:
    view = submit_batch(lines(6, fail=(1, 4)), assistant_id=ASSISTANT, actor="clinic-app", settings=settings)
    assert view.in_progress_at is not None
    assert view.expires_at - view.created_at == timedelta(hours=24)
    run(settings, view.id, ["row-000", "row-001"])
    middle = get_batch(view.id, settings=settings)
    assert (middle.status, middle.succeeded, middle.failed, middle.pending) == (BatchStatus.IN_PROGRESS, 1, 1, 4)
    run(settings, view.id, ["row-002", "row-003", "row-004", "row-005"])
    done = get_batch(view.id, settings=settings)
    assert done.status is BatchStatus.COMPLETED
    assert done.done
    assert not done.all_succeeded
    assert (done.succeeded, done.failed, done.pending) == (4, 2, 0)
    assert done.summary == "completed with 2 failures (4 succeeded)"
    assert done.completed_at is not None
    assert done.completed_at <= utcnow()
    assert [b.id for b in list_batches(settings=settings)] == [view.id]


def test_every_job_submitted_event_carries_the_batch_id(settings: Settings) -> None:
    view = submit_batch(lines(3), assistant_id=ASSISTANT, actor="clinic-app", settings=settings)
    events = audit_query(AuditFilter(batch_id=view.id), settings=settings)
    assert [e.action for e in events] == ["batch.created"] + ["job.submitted"] * 3
    assert {e.job_id for e in events[1:]} == set(job_ids(settings, view.id).values())
    assert events[0].detail == {"jobs": 3, "skipped_lines": 0, "window_seconds": 86400}
    assert all(e.actor == "clinic-app" for e in events)


def test_cancel_keeps_finished_results_and_a_running_job_ends_cancelled(settings: Settings) -> None:
    view = submit_batch(lines(5, fail=(1,)), assistant_id=ASSISTANT, settings=settings)
    run(settings, view.id, ["row-000", "row-001"])
    ids = job_ids(settings, view.id)
    with runtime(settings).transaction() as session:  # row-002 is in the middle of its call
        claim = store.claim(
            session=session, job_id=ids["row-002"], worker="w1", lease=timedelta(seconds=60), now=utcnow()
        )
    assert claim is not None
    cancelled = cancel_batch(view.id, actor="nurse-7", settings=settings)
    assert cancelled.status is BatchStatus.CANCELLED
    assert cancelled.cancelled_at is not None
    assert (cancelled.succeeded, cancelled.failed, cancelled.cancelled, cancelled.pending) == (1, 1, 2, 1)
    assert not cancelled.done
    assert cancelled.summary.endswith("1 still finishing")
    with runtime(settings).transaction() as session:
        ended = store.record_success(session=session, claim=claim, worker="w1", answer="late", now=utcnow())
    assert ended is JobStatus.CANCELLED
    final = get_batch(view.id, settings=settings)
    assert final.done
    assert (final.succeeded, final.failed, final.cancelled) == (1, 1, 3)
    assert get_job(ids["row-000"], settings=settings).answer is not None  # the finished result stands
    assert cancel_batch(view.id, settings=settings).cancelled_at == final.cancelled_at  # again: nothing changes
    events = audit_query(AuditFilter(batch_id=view.id, actor="nurse-7"), settings=settings)
    # The end is decided first (one decision, however many race), then its jobs are cancelled.
    assert sorted(e.action for e in events).count("job.cancelled") == 2
    assert events[0].action == "batch.cancelled"


def test_expiry_cancels_unfinished_jobs_and_keeps_finished_results(settings: Settings) -> None:
    view = submit_batch(lines(4), assistant_id=ASSISTANT, window=60, settings=settings)
    run(settings, view.id, ["row-000"])
    assert sweep(settings=settings).expired == []
    end_window(settings, view.id)
    assert sweep(settings=settings).expired == [view.id]
    expired = get_batch(view.id, settings=settings)
    assert expired.status is BatchStatus.EXPIRED
    assert expired.done
    assert expired.expired_at is not None
    assert (expired.succeeded, expired.cancelled) == (1, 3)
    results = {r.custom_id: r for r in batch_results(view.id, settings=settings)}
    assert results["row-000"].answer is not None
    assert results["row-000"].status is JobStatus.SUCCEEDED
    assert results["row-001"].error_class == "Expired"
    assert "completion window" in (results["row-001"].error or "")
    events = audit_query(AuditFilter(batch_id=view.id, actor="batch-expiry"), settings=settings)
    assert [e.action for e in events] == ["batch.expired"] + ["job.cancelled"] * 3


def test_batch_status_expires_an_overdue_batch_by_itself(settings: Settings) -> None:
    view = submit_batch(lines(2), assistant_id=ASSISTANT, window=0.2, settings=settings)
    time.sleep(0.3)
    assert get_batch(view.id, settings=settings).status is BatchStatus.EXPIRED


def test_a_completed_batch_past_its_window_stays_completed(settings: Settings) -> None:
    view = submit_batch(lines(2), assistant_id=ASSISTANT, window=60, settings=settings)
    run(settings, view.id)
    end_window(settings, view.id)
    assert sweep(settings=settings).expired == []
    assert get_batch(view.id, settings=settings).summary == "completed: all 2 succeeded"


def export(settings: Settings, batch_id: str, writer: Any, **kwargs: Any) -> str:
    out = io.StringIO()
    writer(batch_results(batch_id, settings=settings, **kwargs), out)
    return out.getvalue()


def test_export_jsonl_csv_and_failed_only_round_trip(settings: Settings) -> None:
    view = submit_batch(lines(4, fail=(2,)), assistant_id=ASSISTANT, settings=settings)
    run(settings, view.id, ["row-000", "row-001", "row-002"])  # row-003 still queued: a partial export
    rows = [json.loads(x) for x in export(settings, view.id, batch_export.write_jsonl).splitlines()]
    assert [r["custom_id"] for r in rows] == ["row-000", "row-001", "row-002", "row-003"]
    assert 'you said "Question 0"' in rows[0]["answer"]
    assert rows[0]["error"] is None
    assert rows[0]["attempts"] == 1
    assert rows[0]["seconds"] >= 0
    assert rows[0]["finished_at"] is not None
    assert rows[2]["answer"] is None
    assert rows[2]["error"]["http_status"] == 400
    assert rows[2]["status"] == "failed"
    assert rows[3]["status"] == "queued"
    assert rows[3]["seconds"] is None
    table = list(csv.DictReader(io.StringIO(export(settings, view.id, batch_export.write_csv))))
    assert [r["custom_id"] for r in table] == ["row-000", "row-001", "row-002", "row-003"]
    assert table[2]["error_class"] == "UpstreamRejected"
    assert table[2]["http_status"] == "400"
    failed = export(settings, view.id, batch_export.write_inputs, failed_only=True).splitlines()
    assert [json.loads(x)["custom_id"] for x in failed] == ["row-002"]
    assert json.loads(failed[0])["messages"][0]["content"] == "Question 2 [[emulator:fail=400]]"
    again = submit_batch(failed, settings=settings)  # the failed-only output is input as it stands
    assert again.total == 1
    assert again.assistant_id is None


def test_exporting_is_an_audited_read_of_each_job(settings: Settings) -> None:
    view = submit_batch(lines(3, fail=(0,)), assistant_id=ASSISTANT, settings=settings)
    run(settings, view.id, ["row-000", "row-001"])
    batch_results(view.id, reader="auditor-jane", settings=settings)
    reads = audit_query(AuditFilter(batch_id=view.id, actor="auditor-jane"), settings=settings)
    # Two jobs carry PHI (an error, an answer); the third has nothing to read yet.
    assert [e.action for e in reads] == ["result.read", "result.read", "batch.exported"]
    assert {e.job_id for e in reads[:2]} == {job_ids(settings, view.id)[c] for c in ("row-000", "row-001")}
    assert reads[-1].detail == {"jobs": 3, "failed_only": False}
    assert reads[-1].action in audit.READS


def test_an_unknown_batch_is_not_found(settings: Settings) -> None:
    for call in (get_batch, cancel_batch, batch_results):
        with pytest.raises(BatchNotFound, match="no such batch: nope"):
            call("nope", settings=settings)


def test_a_batch_is_stored_in_chunks_and_announced_through_one_connection(settings: Settings) -> None:
    view = submit_batch(lines(1203), assistant_id=ASSISTANT, settings=settings)
    assert view.total == 1203
    assert view.pending == 1203
    messages = list((settings.broker_dir / "queue").glob("*.msg"))
    assert len(messages) == 1203
    with runtime(settings).transaction() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.announced_at.is_(None))) == 0


def test_a_broker_outage_stores_the_batch_for_the_sweeper(settings: Settings) -> None:
    down = settings.with_(broker_url="redis://127.0.0.1:1/0")
    view = submit_batch(lines(3), assistant_id=ASSISTANT, settings=down)
    assert view.pending == 3
    with runtime(settings).transaction() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.announced_at.is_(None))) == 3


def test_wait_for_batch_returns_when_done_and_times_out_otherwise(settings: Settings) -> None:
    view = submit_batch(lines(2), assistant_id=ASSISTANT, settings=settings)
    with pytest.raises(TimeoutError, match="is still in_progress"):
        wait_for_batch(view.id, timeout=0.2, poll=0.05, settings=settings)
    run(settings, view.id)
    seen: list[str] = []
    done = wait_for_batch(view.id, timeout=5, on_progress=lambda v: seen.append(v.summary), settings=settings)
    assert done.all_succeeded
    assert seen == ["completed: all 2 succeeded"]


def test_a_batch_jobs_retry_and_redispatch_go_back_to_the_batch_queue(embedded_settings: Settings) -> None:
    """Fairness holds past the first message: a batch job's retry, and the sweeper's re-publish of it,
    wait in the batch queue, not in front of interactive jobs."""
    from qbgw.execution.tasks import Outcome, run_attempt
    from qbgw.runtime.app import backlog

    settings = embedded_settings
    line = {
        "custom_id": "x",
        "smart_chat_assistant_id": ASSISTANT,
        "messages": [{"role": "user", "content": "[[emulator:fail=503x1]] retry me"}],
    }
    batch = submit_batch([line], settings=settings)
    app, interactive, batch_queue = runtime(settings).celery, settings.queue, settings.effective_batch_queue
    assert (backlog(app, interactive), backlog(app, batch_queue)) == (0, 1)
    job_id = batch_results(batch.id, settings=settings)[0].job_id
    assert run_attempt(runtime(settings), job_id) is Outcome.RETRYING
    assert (backlog(app, interactive), backlog(app, batch_queue)) == (0, 2)  # the retry's countdown message
    time.sleep(0.3)  # past the retry's backoff (at most 0.2 s here)
    assert sweep(settings=settings, grace=0).dispatched == [job_id]  # its message "looks lost": published again
    assert (backlog(app, interactive), backlog(app, batch_queue)) == (0, 3)


def test_an_expiry_is_one_decision_a_reader_settling_between_its_chunks_cannot_turn_into_completed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the expiry cancelled its jobs chunk by chunk and marked the batch expired last; a reader (or a
    # second sweeper) that settled the batch between the last chunk and that mark found nothing pending and
    # made it "completed", with its jobs cancelled as Expired, no expired_at and no batch.expired event.
    from qbgw.store import batches as batch_store

    monkeypatch.setattr(batch_store, "CHUNK", 3)
    view = submit_batch(lines(7), assistant_id=ASSISTANT, window=60, settings=settings)
    real = batch_store.cancel_jobs
    readers: list[BatchStatus] = []

    def cancel_then_someone_reads(**kwargs: Any) -> int:
        done = real(**kwargs)
        kwargs["session"].commit()  # the chunk is committed, as by its own transaction ...
        readers.append(get_batch(view.id, settings=settings).status)  # ... and a reader settles the batch
        return done

    monkeypatch.setattr(batch_store, "cancel_jobs", cancel_then_someone_reads)
    end_window(settings, view.id)
    assert sweep(settings=settings).expired == [view.id]
    final = get_batch(view.id, settings=settings)
    assert final.status is BatchStatus.EXPIRED
    assert final.expired_at is not None
    assert final.cancelled == 7
    assert set(readers) == {BatchStatus.EXPIRED}
    assert len(readers) == 3
    ended = audit_query(AuditFilter(batch_id=view.id, action="batch.expired"), settings=settings)
    assert len(ended) == 1
    assert ended[0].detail == {"jobs_to_cancel": 7}
    assert sweep(settings=settings).expired == []
    assert cancel_batch(view.id, settings=settings).status is BatchStatus.EXPIRED  # expired stays expired


def test_an_end_whose_run_stopped_short_is_finished_by_the_next_sweep(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qbgw.store import batches as batch_store

    monkeypatch.setattr(batch_store, "CHUNK", 2)
    view = submit_batch(lines(5), assistant_id=ASSISTANT, settings=settings)
    real = batch_store.cancel_jobs

    def crash_after_one_chunk(**kwargs: Any) -> int:
        monkeypatch.setattr(batch_store, "cancel_jobs", real)
        real(**kwargs)
        raise RuntimeError("the process died")

    monkeypatch.setattr(batch_store, "cancel_jobs", crash_after_one_chunk)
    with pytest.raises(RuntimeError):
        cancel_batch(view.id, actor="nurse-7", settings=settings)
    half = get_batch(view.id, settings=settings)
    assert half.status is BatchStatus.CANCELLED
    assert half.pending == 5
    sweep(settings=settings)
    done = get_batch(view.id, settings=settings)
    assert done.status is BatchStatus.CANCELLED
    assert done.cancelled == 5
    assert done.done


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "postgres-block"])
def test_a_batch_cancelled_while_it_is_still_being_stored_stores_the_rest_cancelled(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the chunks stored after the cancel were queued and published, and ran. In block mode the cancel's
    # event is still staged when the storing sees the end: the actor is read once it is chained.
    from qbgw.batches import submission
    from qbgw.store import batches as batch_store

    monkeypatch.setattr(batch_store, "CHUNK", 3)
    real = submission.announce_many

    def publish_then_cancel(rt: Any, ids: list[str], **options: Any) -> bool:
        done = real(rt, ids, **options)
        with rt.transaction() as session:
            batch_id = session.scalar(select(Job.batch_id).where(Job.id == ids[0]))
        cancel_batch(batch_id, actor="ops", settings=settings)  # between the first chunk and the second
        monkeypatch.setattr(submission, "announce_many", real)
        return done

    monkeypatch.setattr(submission, "announce_many", publish_then_cancel)
    view = submit_batch(lines(7), assistant_id=ASSISTANT, settings=settings)
    assert view.status is BatchStatus.CANCELLED
    assert (view.total, view.cancelled, view.pending) == (7, 7, 0)
    assert len(list((settings.broker_dir / "queue").glob("*.msg"))) == 3  # only the first chunk was published
    cancelled = audit_query(AuditFilter(batch_id=view.id, action="job.cancelled"), settings=settings)
    assert len(cancelled) == 7
    assert {e.actor for e in cancelled} == {"ops"}


def test_an_audit_query_by_batch_has_every_event_of_its_jobs(settings: Settings) -> None:
    """An attempt's event names its job, not its batch: --batch finds it through the job, so an export of a batch's
    trail has its disclosures to the gateway."""
    view = submit_batch(lines(2), assistant_id=ASSISTANT, settings=settings)
    other = submit_batch(lines(1, prefix="other"), assistant_id=ASSISTANT, settings=settings)
    run(settings, view.id)
    run(settings, other.id)
    found = audit_query(AuditFilter(batch_id=view.id), settings=settings)
    ids = set(job_ids(settings, view.id).values())
    assert {e.action for e in found} >= {"batch.created", "job.submitted", "attempt.request", "job.succeeded"}
    assert sum(1 for e in found if e.action == "attempt.request") == 2
    assert all(e.batch_id == view.id or e.job_id in ids for e in found)


def test_a_broker_down_while_a_batch_is_stored_is_one_warning_with_the_whole_count(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    from qbgw.store import batches as batch_store

    down = settings.with_(broker_url="redis://127.0.0.1:1/13")
    total = batch_store.CHUNK * 2 + 7
    with caplog.at_level("WARNING"):
        view = submit_batch(lines(total), assistant_id=ASSISTANT, settings=down)
    assert view.total == total
    counts = [r.getMessage() for r in caplog.records if "for the sweeper to publish" in r.getMessage()]
    assert f"{total} of the batch's {total} job(s) stored for the sweeper to publish" in counts[-1], counts
    with runtime(settings).transaction() as session:
        waiting = session.scalar(
            select(func.count()).select_from(Job).where(Job.batch_id == view.id, Job.announced_at.is_(None))
        )
    assert waiting == total


def test_a_replayed_job_that_fails_again_moves_its_batchs_completed_at(settings: Settings) -> None:
    from qbgw.control import replay

    view = submit_batch(lines(2, fail=(1,)), assistant_id=ASSISTANT, settings=settings)
    run(settings, view.id)
    first = get_batch(view.id, settings=settings)
    assert first.status == "completed"
    assert first.completed_at is not None
    failed = job_ids(settings, view.id)["row-001"]
    time.sleep(0.05)
    replay(failed, settings=settings)  # nobody reads the batch until the job has failed again
    run_attempt(runtime(settings), failed)
    again = get_batch(view.id, settings=settings)
    assert again.status == "completed"
    assert again.completed_at is not None
    assert again.completed_at > first.completed_at
    assert again.completed_at == get_job(failed, settings=settings).finished_at


def test_a_batch_line_s_file_replaced_before_its_attempt_fails_that_job_only(
    settings: Settings, tmp_path: Path
) -> None:
    from tests.images import png_bytes

    root = tmp_path / "scans"
    root.mkdir()
    for name in ("a.png", "b.png"):
        (root / name).write_bytes(png_bytes(8, 8))
    settings = settings.with_(image_roots=str(root))
    batch = [
        json.dumps(
            {
                "custom_id": name,
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(root / name)}}]}
                ],
            }
        )
        for name in ("a.png", "b.png")
    ]
    view = submit_batch(batch, assistant_id=ASSISTANT, settings=settings)
    (root / "b.png.new").write_bytes(png_bytes(16, 16))
    os.replace(root / "b.png.new", root / "b.png")
    run(settings, view.id)
    results = {r.custom_id: r for r in batch_results(view.id, settings=settings)}
    assert results["a.png"].status is JobStatus.SUCCEEDED
    assert results["b.png"].status is JobStatus.FAILED
    assert results["b.png"].error_class == "ResolutionFailed"
    assert "b.png was replaced or rewritten after the job was submitted" in (results["b.png"].error or "")
