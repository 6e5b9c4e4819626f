"""``POST /v1/chat/completions`` waits for its job as the long-polls do (woken by the database) and, past its
wait, answers 504 ``timeout`` naming the job, which goes on. In process (no worker runs: the job stays queued),
with the wait shortened."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from qbgw import access, queries
from qbgw.api import create_app
from qbgw.api import openai as compat
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
