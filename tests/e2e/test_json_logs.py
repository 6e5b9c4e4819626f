"""A worker told to log JSON writes nothing else, on either stream, from its start to its warm shutdown:
container runtimes merge the two streams, so one plain line breaks every parser downstream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from qbgw import producer
from qbgw.lifecycle import JobStatus
from qbgw.queries import wait_for_job
from qbgw.settings import Settings
from tests.conftest import ASSISTANT, ROOT, wait_until


def not_json(path: Path) -> list[str]:
    bad = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError:
            bad.append(line)
    return bad


def messages(path: Path) -> list[str]:
    return [json.loads(line)["message"] for line in path.read_text().splitlines() if line.strip()]


def test_every_line_on_stdout_and_stderr_is_json_from_start_to_warm_shutdown(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    settings = embedded_settings.with_(log_format="json")
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        worker = subprocess.Popen(
            [sys.executable, "-m", "qbgw", "worker", "--loglevel", "INFO"],
            env={**os.environ, **settings.to_env()},
            stdout=stdout,
            stderr=stderr,
            cwd=ROOT,
        )
    try:
        wait_until(lambda: "ready." in err.read_text() + out.read_text(), timeout=30)
        job_id = producer.submit(ASSISTANT, [{"role": "user", "content": "hello"}], settings=settings)
        assert wait_for_job(job_id, timeout=30, settings=settings).status is JobStatus.SUCCEEDED
        worker.send_signal(signal.SIGUSR1)  # Celery's stack dump of every thread, written from a signal handler
        wait_until(lambda: "MainThread" in err.read_text() + out.read_text(), timeout=10)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert not_json(out) == []
    assert not_json(err) == []
    said = messages(out) + messages(err)
    assert any("Warm shutdown" in m for m in said)
    assert any("MainThread" in m for m in said)
