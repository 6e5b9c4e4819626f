"""``POST /v1/chat/completions`` waits for its job as the long-polls do (woken by the database) and, past its
wait, answers 504 ``timeout`` naming the job, which goes on. In process (no worker runs: the job stays queued),
with the wait shortened."""

from __future__ import annotations

import base64
import time

import pytest
from fastapi.testclient import TestClient

from qbgw import access, queries
from qbgw.api import create_app
from qbgw.api import openai as compat
from qbgw.images.samples import png_bytes
from qbgw.lifecycle import JobStatus
from qbgw.settings import Settings
from tests.conftest import ASSISTANT


def test_a_chat_completion_not_answered_in_time_is_a_504_naming_the_job_that_goes_on(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compat, "CHAT_WAIT", 0.5)
    _, key = access.create_key("chat", "submitter", actor="test-setup", settings=settings)
    body = {"model": ASSISTANT, "messages": [{"role": "user", "content": "nobody will answer this"}]}
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"}) as client:
        started = time.monotonic()
        answer = client.post("/v1/chat/completions", json=body)
        waited = time.monotonic() - started
    assert answer.status_code == 504, answer.text
    assert answer.json()["error"]["code"] == "timeout"
    assert answer.headers["x-should-retry"] == "false"
    job_id = answer.headers[compat.JOB_HEADER]
    assert f"GET /v1/jobs/{job_id}" in answer.json()["error"]["message"]
    assert waited >= 0.5
    assert queries.job_status(job_id, settings=settings) is JobStatus.QUEUED  # it goes on


PNG = "data:image/png;base64," + base64.b64encode(png_bytes(4, 4)).decode()
IMAGE = [{"type": "text", "text": "an image: validated in a thread"}, {"type": "image_url", "image_url": {"url": PNG}}]


@pytest.mark.parametrize(
    ("content", "webhook"),
    [
        ("text only: validated on the event loop, stored by the intake", None),
        (
            [
                {"type": "text", "text": "an image: validated in a thread"},
                {"type": "image_url", "image_url": {"url": PNG}},
            ],
            None,
        ),
        ("a key with a webhook: stored by submit(), with its delivery", "https://hooks.example.org/qbgw"),
    ],
)
def test_each_way_a_chat_completion_is_stored_records_the_job_as_submit_does(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, content: object, webhook: str | None
) -> None:
    from sqlalchemy import select

    from qbgw.runtime.locator import runtime
    from qbgw.store.models import WebhookDelivery

    monkeypatch.setattr(compat, "CHAT_WAIT", 0.2)
    _, key = access.create_key("chat", "submitter", webhook_url=webhook, actor="test-setup", settings=settings)
    body = {"model": ASSISTANT, "messages": [{"role": "user", "content": content}]}
    app = create_app(settings)
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        answer = client.post("/v1/chat/completions", json=body)
        intake = app.state.ctx._intake
    assert app.state.ctx._intake is None  # the server stopped: its intake was closed ...
    if intake is not None:
        assert intake._storer is not None
        intake._storer.join(timeout=10)
        assert not intake._storer.is_alive()  # ... and its storer ended
    assert (intake is not None) == (webhook is None)  # a webhook's job is stored by submit()
    assert answer.status_code == 504, answer.text
    job_id = answer.headers[compat.JOB_HEADER]
    view = queries.get_job(job_id, settings=settings)
    assert (view.status, view.actor, view.assistant_id) == (JobStatus.QUEUED, "key:chat", ASSISTANT)
    (submitted,) = [e for e in queries.job_events(job_id, settings=settings) if e.action == "job.submitted"]
    assert submitted.actor == "key:chat"
    with runtime(settings).transaction() as session:
        deliveries = session.scalars(select(WebhookDelivery.job_id).where(WebhookDelivery.job_id == job_id)).all()
    assert len(deliveries) == (webhook is not None)


def test_a_chat_completion_woken_by_its_job_s_end_reads_the_answer_without_reading_the_status_again(
    production_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On PostgreSQL the job's end is notified: the answer is read at once (one audited read), not after a second
    # status read. The job ends only after the request's first status read, so the wake is the notification's.
    import threading

    from qbgw.execution import tasks
    from qbgw.runtime.locator import runtime

    settings = production_settings
    status_reads: list[str] = []
    first_read = threading.Event()
    real_status, real_get = queries.job_status, queries.get_job
    answered: list[str] = []

    def job_status(job_id: str, **kwargs: object) -> JobStatus:
        found = real_status(job_id, **kwargs)  # type: ignore[arg-type]
        status_reads.append(job_id)
        first_read.set()
        return found

    def get_job(job_id: str, **kwargs: object) -> object:
        answered.append(job_id)
        return real_get(job_id, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(queries, "job_status", job_status)
    monkeypatch.setattr(queries, "get_job", get_job)
    _, key = access.create_key("chat", "submitter", actor="test-setup", settings=settings)
    body = {"model": ASSISTANT, "messages": [{"role": "user", "content": "answer me"}]}
    app = create_app(settings)
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        deadline = time.monotonic() + 10  # the listener connected: a job's end is notified (not found by a recheck)
        while not app.state.ctx.waiter.listening and time.monotonic() < deadline:
            time.sleep(0.02)
        done: list[object] = []
        request = threading.Thread(target=lambda: done.append(client.post("/v1/chat/completions", json=body)))
        request.start()
        assert first_read.wait(10)
        (job_id,) = set(status_reads)
        time.sleep(0.05)  # the request is waiting now
        assert tasks.run_attempt(runtime(settings), job_id) == tasks.Outcome.SUCCEEDED
        request.join(10)
    (answer,) = done
    assert answer.status_code == 200, answer.text  # type: ignore[attr-defined]
    assert answer.json()["choices"][0]["message"]["content"]  # type: ignore[attr-defined]
    assert status_reads == [job_id]  # the first read only
    assert answered == [job_id]
