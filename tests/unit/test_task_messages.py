"""A batch's task messages are built from one template: each must equal the one Celery would build."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qbgw.runtime import app as app_module
from qbgw.runtime.app import TASK_NAME, create_celery_app, task_messages
from qbgw.settings import Settings


def test_each_templated_message_equals_celerys_own(tmp_path: Path) -> None:
    app = create_celery_app(Settings(data_dir=tmp_path / "data"))
    ids = ["0b7e7f9e-2d4c-4f63-9a43-1f0a3c2b5d11", "5c0e2a41-8a0e-4b8e-b7a2-6f3a9d1e0c22", "x'\"\\y"]
    built = list(task_messages(app, ids))
    assert len(built) == len(ids)
    for job_id, message in zip(ids, built, strict=True):
        expected = app.amqp.create_task_message(job_id, TASK_NAME, [job_id], {})
        assert message.headers == expected.headers
        assert message.properties == expected.properties
        assert message.body == expected.body
        assert message.sent_event == expected.sent_event
    assert list(task_messages(app, [])) == []


def test_the_template_is_made_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its ``origin`` header names the process: a forked worker makes its own."""
    app = create_celery_app(Settings(data_dir=tmp_path / "data"))
    first = app_module._template(app)
    assert app_module._template(app) is first
    parent = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: parent + 1)
    assert app_module._template(app) is not first
