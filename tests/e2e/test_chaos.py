"""A small chaos run in the suite (bench/chaos.py runs the big one): random upstream faults,
workers SIGKILLed and replaced, Redis restarted empty; nothing may be lost or doubled."""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.chaos import ChaosConfig, run_chaos
from tests.conftest import _port_open, require_service


def test_chaos_loses_nothing_and_doubles_nothing(tmp_path: Path) -> None:
    require_service("PostgreSQL on 127.0.0.1:5432", _port_open("127.0.0.1", 5432))
    require_service("the redis-server program", shutil.which("redis-server") is not None)
    config = ChaosConfig(
        jobs=80,
        workers=2,
        concurrency=4,
        kills=3,
        kill_every=1.5,
        fault_rate=0.25,
        latency=0.3,
        seed=11,
        timeout=240,
        log_dir=tmp_path,
    )
    lines: list[str] = []
    report = run_chaos(config, say=lines.append)
    summary = "\n".join(lines + report.lines())
    assert report.submitted == 80, summary
    assert report.lost == 0, summary
    assert report.multiple_results == 0, summary
    assert report.foreign_answers == 0, summary
    assert report.early_retries == 0, summary
    assert report.kills >= 2, summary
    assert report.redis_restarts == 1, summary
    assert sum(report.faults.values()) > 0, summary
    # Every failure has a permanent reason: the injected malformed answers, nothing else.
    assert set(report.failed) <= {"MalformedResponse"}, summary
    assert report.succeeded + sum(report.failed.values()) == 80, summary
    # A kill can land between auditing a request and sending it; never the other way round. (Requests held
    # back by a 429 cooldown that began after their claim are audited as unsent and not counted.)
    assert report.upstream_requests <= report.attempts_audited <= report.upstream_requests + report.interrupted
