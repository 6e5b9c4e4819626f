"""The embedded broker (``worker.runtime.filebroker``): a message appears in the queue folder whole, so a worker
polling while another process publishes never reads a file still being written (kombu's own transport let it
read an empty one, and the worker stopped on the JSON error)."""

from __future__ import annotations

import json
from pathlib import Path
from queue import Empty
from typing import Any

import pytest

from qbgw.runtime.app import create_celery_app, publish
from qbgw.settings import Settings


class _Peeker:
    """A value that, while the message holding it is being written, lets another worker's channel read the queue."""

    def __init__(self, channel: Any, queue: str) -> None:
        self.channel, self.queue = channel, queue
        self.seen: list[str] = []

    def __json__(self) -> str:
        try:
            self.seen.append(f"a message: {self.channel._get(self.queue)}")
        except Empty:
            self.seen.append("nothing")
        except json.JSONDecodeError as exc:
            self.seen.append(f"a torn message: {exc}")
        return "peeked"


def test_a_reader_never_sees_a_message_before_it_is_written_whole(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    app = create_celery_app(settings)
    with app.connection_for_write() as writer, app.connection_for_read() as reader:
        peeker = _Peeker(reader.default_channel, settings.queue)
        writer.default_channel._put(settings.queue, {"body": peeker})
        assert peeker.seen == ["nothing"]
        assert reader.default_channel._get(settings.queue) == {"body": "peeked"}
    assert list((settings.broker_dir / "queue").iterdir()) == []  # nothing staged is left behind


def test_a_published_job_is_read_back_whole(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    app = create_celery_app(settings)
    publish(app, "job-1")
    with app.connection_for_read() as reader:
        message = reader.default_channel._get(settings.queue)
        assert message["headers"]["id"] == "job-1"
        with pytest.raises(Empty):
            reader.default_channel._get(settings.queue)
