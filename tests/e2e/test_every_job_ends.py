"""Every job ends, through a real worker process: jobs that meet an unexpected failure in the worker (text that
cannot be encoded, a URL that cannot be parsed, a payload that no longer decrypts) end ``failed`` with a reason
in bounded time, and the worker goes on with the next job. On the embedded default and PostgreSQL + Redis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qbgw import producer
from qbgw.lifecycle import TERMINAL, JobStatus
from qbgw.queries import get_job, job_events, wait_for_job
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings
from tests.conftest import ASSISTANT, wait_until
from tests.integration.test_faults import store_unchecked, tamper_payload


def test_jobs_that_cannot_be_sent_end_failed_and_the_worker_goes_on(
    stack: Settings, worker_process: Callable[..., Any], tmp_path: Any
) -> None:
    settings = stack.with_(fetch_remote_images=True)
    surrogate = store_unchecked(settings, [{"role": "user", "content": "a\ud800b"}])
    image = {"type": "image_url", "image_url": {"url": "https://h:abc/x.png"}}
    bad_port = store_unchecked(settings, [{"role": "user", "content": [{"type": "text", "text": "Hi"}, image]}])
    tampered = producer.submit(ASSISTANT, [{"role": "user", "content": "Hello"}], settings=settings)
    tamper_payload(settings, tampered)
    for job_id in (surrogate, bad_port):  # stored behind the producer's back: ring the doorbell by hand
        producer.announce(runtime(settings), job_id)
    proc = worker_process(settings)

    jobs = (surrogate, bad_port, tampered)
    wait_until(lambda: all(get_job(j, settings=settings).status in TERMINAL for j in jobs), timeout=60)
    views = {j: get_job(j, settings=settings) for j in jobs}
    assert {j: v.status for j, v in views.items()} == dict.fromkeys(jobs, JobStatus.FAILED)
    assert views[surrogate].error_class == "InternalError"
    assert views[surrogate].attempts == 0
    assert views[bad_port].error_class in ("InternalError", "ResolutionFailed")
    assert views[tampered].error_class == "DecryptionFailed"
    for job_id, view in views.items():
        assert (
            view.error is not None
            and view.error.startswith(f"{view.error_class}: ")
            or view.error_class == "ResolutionFailed"
        ), view.error
        assert [e.action for e in job_events(job_id, settings=settings)][-1] == "job.failed"

    after = producer.submit(ASSISTANT, [{"role": "user", "content": "still working?"}], settings=settings)
    assert wait_for_job(after, timeout=30, settings=settings).status is JobStatus.SUCCEEDED
    assert proc.poll() is None
    log = (tmp_path / "worker-0.log").read_text()
    assert "Traceback" not in log
    assert "\ud800" not in log
