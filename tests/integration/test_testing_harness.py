"""``worker.testing``: a web app's own test suite submits and drains jobs in its process, with no worker
process and no server, against the real embedded store and the emulator."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import qbgw
from qbgw.lifecycle import JobStatus
from qbgw.testing import harness


def handle_upload(note: str) -> str:
    """Stands for a web app's view: it reads its settings from the environment, as apps do."""
    return qbgw.submit("65d5f3473d5d68095462165d", [{"role": "user", "content": note}], custom_id="upload-1")


def test_a_web_app_submits_through_its_own_code_and_the_drain_runs_the_job(tmp_path: Path) -> None:
    with harness(tmp_path) as h:
        job_id = handle_upload("Summarise this visit")
        assert qbgw.job_status(job_id) is JobStatus.QUEUED  # nothing runs until the drain
        assert h.drain() == 1
        view = qbgw.get_job(job_id)
        assert view.status is JobStatus.SUCCEEDED
        assert "Summarise this visit" in (view.answer or "")
        assert [e.action for e in qbgw.job_events(job_id)][-1] == "job.succeeded"
        assert h.emulator.stats()["requests"] == 1


def test_retries_drain_without_waiting_out_real_backoffs_and_failures_are_recorded(tmp_path: Path) -> None:
    with harness(tmp_path) as h:
        flaky = qbgw.submit(h.assistant_id, [{"role": "user", "content": "x [[emulator:fail=503x2]]"}])
        refused = qbgw.submit(h.assistant_id, [{"role": "user", "content": "y [[emulator:fail=400]]"}])
        assert h.drain(timeout=10) == 4
        assert qbgw.get_job(flaky).status is JobStatus.SUCCEEDED
        assert qbgw.get_job(flaky).attempts == 3
        failed = qbgw.get_job(refused)
        assert failed.status is JobStatus.FAILED
        assert failed.http_status == 400


def test_the_environment_is_the_harness_s_only_inside_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QBGW_ACTOR", "the-app")
    with harness(tmp_path, actor="in-test") as h:
        assert os.environ["QBGW_ACTOR"] == "in-test"
        assert os.environ["QBGW_BASE_URL"] == h.emulator.url
    assert os.environ["QBGW_ACTOR"] == "the-app"
    assert "QBGW_BASE_URL" not in os.environ


def test_a_retry_due_beyond_the_timeout_is_a_timeout_naming_the_job(tmp_path: Path) -> None:
    with harness(tmp_path, environ=False, backoff_base=30.0, backoff_max=30.0) as h:
        job_id = qbgw.submit(
            h.assistant_id, [{"role": "user", "content": "z [[emulator:fail=503]]"}], settings=h.settings
        )

        def drain_three_times() -> None:  # full jitter may draw a short first wait; three cannot all be short
            for _ in range(3):
                h.drain(timeout=0.2)

        with pytest.raises(TimeoutError, match=job_id):
            drain_three_times()
