"""Operations on a real ``qbgw worker``: its metrics endpoint after a handful of jobs holds exactly the
counts they should give (also summed over prefork children), the exporter process agrees with the
database, its log is JSON Lines, and Celery's own ``inspect`` finds it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import qbgw.ops.metrics  # noqa: F401 - prometheus_client picks its value store at import: before any setenv below
from qbgw import producer
from qbgw.emulator.server import Emulator
from qbgw.lifecycle import JobStatus
from qbgw.queries import wait_for_job
from qbgw.settings import Settings
from tests.conftest import ASSISTANT, ROOT, wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples:
    """Every sample of http://127.0.0.1:port/metrics by (name, sorted labels); empty while it is not up."""
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except requests.ConnectionError:
        return {}
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def attempts(samples: Samples) -> dict[tuple[str, str], float]:
    """qbgw_attempts_total by (outcome, http_status), duplicates (skipped) left out."""
    found = {}
    for (name, labels), value in samples.items():
        named = dict(labels)
        if name == "qbgw_attempts_total" and named["outcome"] != "skipped" and value:
            found[(named["outcome"], named["http_status"])] = value
    return found


def run_handful(settings: Settings) -> list[str]:
    """Three answers, one 503 then an answer, one permanent 422: 6 attempts."""
    texts = ["first", "second", "third", "fourth [[emulator:fail=503x1]]", "fifth [[emulator:fail=422]]"]
    ids = [producer.submit(ASSISTANT, [{"role": "user", "content": t}], settings=settings) for t in texts]
    for job_id in ids:
        wait_for_job(job_id, timeout=60, settings=settings)
    return ids


EXPECTED = {("succeeded", "200"): 4, ("retrying", "503"): 1, ("failed", "422"): 1}


def test_the_worker_endpoint_counts_a_handful_of_jobs_and_the_exporter_agrees(
    stack: Settings, emu: Emulator, worker_process: Callable[..., Any], tmp_path: Path
) -> None:
    port = free_port()
    settings = stack.with_(metrics_port=port, log_format="json")
    worker_process(settings)
    ids = run_handful(settings)
    ok_sweeps = ("qbgw_sweeps_total", (("result", "ok"),))
    # The jobs can be done before the sweeper's first sweep is (it runs every 0.5 s beside them): wait for both.
    wait_until(lambda: attempts(found := scrape(port)) == EXPECTED and found.get(ok_sweeps, 0) >= 1, timeout=20)
    samples = scrape(port)
    assert samples[("qbgw_retries_total", (("reason", "UpstreamServerError"),))] == 1
    assert samples[("qbgw_attempt_duration_seconds_count", ())] == 6
    assert emu.stats()["requests"] == 6

    exporter_port = free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "qbgw", "metrics", "serve", "--port", str(exporter_port)],
        env={**os.environ, **settings.to_env()},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: bool(scrape(exporter_port)), timeout=20)
        fleet = scrape(exporter_port)
    finally:
        exporter.terminate()
        exporter.wait(timeout=15)
    jobs = {dict(labels)["status"]: v for (name, labels), v in fleet.items() if name == "qbgw_jobs"}
    assert jobs == {"queued": 0, "running": 0, "retrying": 0, "succeeded": 4, "failed": 1, "cancelled": 0}
    assert fleet[("qbgw_up", (("part", "database"),))] == 1
    assert fleet[("qbgw_up", (("part", "broker"),))] == 1
    assert fleet[("qbgw_oldest_waiting_job_age_seconds", ())] == 0

    log = [json.loads(line) for line in (tmp_path / "worker-0.log").read_text().splitlines() if line.strip()]
    finished = {(line["job_id"], line["outcome"], line.get("http_status")) for line in log if "outcome" in line}
    assert (ids[3], "retrying", 503) in finished
    assert (ids[4], "failed", 422) in finished
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in log)


def test_prefork_children_are_summed_through_the_multiprocess_directory(
    embedded_settings: Settings,
    emu: Emulator,
    worker_process: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "prom"
    folder.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    port = free_port()
    worker_process(embedded_settings.with_(metrics_port=port, pool="prefork"), concurrency=2)
    run_handful(embedded_settings)
    wait_until(lambda: attempts(scrape(port)) == EXPECTED, timeout=20)
    assert len(list(folder.glob("counter_*.db"))) >= 2  # the parent (sweeps) and at least one child


def test_celery_inspect_finds_the_worker_and_shows_only_the_task_name(
    production_settings: Settings, worker_process: Callable[..., Any]
) -> None:
    proc = worker_process(production_settings)
    env = {**os.environ, **production_settings.to_env()}

    def celery(*args: str) -> str:
        command = [sys.executable, "-m", "celery", "-A", "qbgw.celery_entry", *args, "--timeout", "5"]
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        return done.stdout

    wait_until(lambda: f"qbgw-{proc.pid}@" in celery("inspect", "ping"), timeout=30, interval=1)
    registered = celery("inspect", "registered")
    assert f"qbgw-{proc.pid}@" in registered
    assert "qbgw.run_job" in registered
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": "ping"}], settings=production_settings)
    assert wait_for_job(job_id, timeout=60, settings=production_settings).status is JobStatus.SUCCEEDED
