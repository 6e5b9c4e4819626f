"""Worker metrics count what the task tells them, under documented names with closed label sets."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import REGISTRY, generate_latest

from qbgw.execution.tasks import Outcome
from qbgw.ops import metrics

ROOT = Path(__file__).resolve().parents[2]


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_an_attempt_counts_by_outcome_and_status_and_observes_its_latency() -> None:
    before = (
        value("qbgw_attempts_total", outcome="retrying", http_status="503"),
        value("qbgw_attempts_total", outcome="failed", http_status="none"),
        value("qbgw_retries_total", reason="UpstreamServerError"),
        value("qbgw_attempt_duration_seconds_count"),
    )
    metrics.attempt(Outcome.RETRYING, 503, 250, "UpstreamServerError")
    metrics.attempt(Outcome.FAILED)  # nothing sent: no status, no latency
    assert value("qbgw_attempts_total", outcome="retrying", http_status="503") == before[0] + 1
    assert value("qbgw_attempts_total", outcome="failed", http_status="none") == before[1] + 1
    assert value("qbgw_retries_total", reason="UpstreamServerError") == before[2] + 1
    assert value("qbgw_attempt_duration_seconds_count") == before[3] + 1


def test_throttled_counts_a_wait_and_its_length() -> None:
    count, total = value("qbgw_throttled_total"), value("qbgw_throttle_wait_seconds_sum")
    metrics.throttled(0.75)
    assert value("qbgw_throttled_total") == count + 1
    assert abs(value("qbgw_throttle_wait_seconds_sum") - total - 0.75) < 1e-9


def test_every_exported_name_is_in_the_readme_table() -> None:
    exported = set(re.findall(r"^# TYPE (qbgw_\w+) ", generate_latest(REGISTRY).decode(), re.M))
    collector = (ROOT / "worker" / "ops" / "exporter.py").read_text()
    exported |= set(re.findall(r'GaugeMetricFamily\(\s*"(qbgw_\w+)"', collector))
    readme = (ROOT / "docs" / "operations.md").read_text()  # the metrics table
    documented = set(re.findall(r"^\| `(qbgw_\w+)`", readme, re.M))
    counters = {n + "_total" if n + "_total" in documented else n for n in exported}
    assert counters
    assert counters <= documented, counters - documented
