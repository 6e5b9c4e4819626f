"""The console dashboard's figures (worker/console/stats.py), counted by the database: the same figures as
counting every event in Python, on both backends, hour by hour in UTC whatever the database session's time
zone, with the period's bounds [since, until) kept exactly."""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import insert

from qbgw.console import stats
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings
from qbgw.store.models import AuditEvent

SINCE = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)
UNTIL = SINCE + timedelta(hours=4)


def _events() -> list[dict[str, Any]]:
    """Ends and attempts over the period's four hours, on its bounds, and just outside them."""
    rows: list[dict[str, Any]] = []

    def add(at: datetime, action: str, status: int | None = None, latency: int | None = None) -> None:
        rows.append({"occurred_at": at, "action": action, "http_status": status, "latency_ms": latency})

    add(SINCE, "job.succeeded")  # the first instant is in
    add(SINCE - timedelta(microseconds=1), "job.failed")  # before: out
    add(UNTIL, "job.cancelled")  # the end is out
    add(UNTIL - timedelta(microseconds=1), "job.cancelled")  # its last instant is in
    for hour in range(4):
        start = SINCE + timedelta(hours=hour)
        for n in range(3 + 2 * hour):
            add(start + timedelta(minutes=5 * n, seconds=7), ("job.succeeded", "job.failed", "job.cancelled")[n % 3])
        for n in range(11 * hour + 1):  # a different number of attempts each hour, with ties and gaps
            status = (200, 200, 429, None, 502)[n % 5]
            latency = None if n % 7 == 6 else (n * 37) % 50 + 10 * hour
            action = "attempt.response" if status else ("attempt.error", "attempt.interrupted")[n % 2]
            add(start + timedelta(minutes=59, seconds=59, microseconds=999_999 - n), action, status, latency)
    add(SINCE + timedelta(minutes=30), "job.submitted")  # neither an end nor an attempt
    add(SINCE + timedelta(minutes=31), "attempt.request", None, 999)
    add(SINCE - timedelta(minutes=1), "attempt.response", 200, 5000)  # out
    return rows


def _seed(settings: Settings, rows: list[dict[str, Any]]) -> None:
    with runtime(settings).transaction() as session:
        session.execute(
            insert(AuditEvent),
            [
                {"seq": n, "prev_hash": "0" * 64, "row_hash": "0" * 64, "actor": "t", **row}
                for n, row in enumerate(rows, 1)
            ],
        )


def _nearest_rank(values: list[int], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[max(1, math.ceil(len(ordered) * q)) - 1])


def _expected(rows: list[dict[str, Any]]) -> tuple[list[Any], Counter[str], list[Any], dict[str, Any]]:
    """The figures, counted one event at a time."""
    inside = [r for r in rows if SINCE <= r["occurred_at"] < UNTIL]
    hours = [SINCE + timedelta(hours=h) for h in range(4)]
    ends = {h: Counter[str]() for h in hours}
    latencies: dict[datetime, list[int]] = {h: [] for h in hours}
    statuses: Counter[str] = Counter()
    for row in inside:
        hour = row["occurred_at"].replace(minute=0, second=0, microsecond=0)
        if row["action"] in stats.ENDINGS:
            ends[hour][stats.ENDINGS[row["action"]]] += 1
        if row["action"] in stats.ATTEMPTS:
            statuses[str(row["http_status"]) if row["http_status"] else "no answer"] += 1
            if row["latency_ms"] is not None:
                latencies[hour].append(row["latency_ms"])

    def ranks(values: list[int]) -> dict[str, float | None]:
        return {name: _nearest_rank(values, q) for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}

    every = [v for values in latencies.values() for v in values]
    return [(h, ends[h]) for h in hours], statuses, [(h, ranks(latencies[h])) for h in hours], ranks(every)


def _check(board: stats.Dashboard, rows: list[dict[str, Any]]) -> None:
    hours, statuses, latency, latency_all = _expected(rows)
    assert board.hours == hours
    assert board.statuses == statuses
    assert board.latency == latency
    assert board.latency_all == latency_all


def test_the_dashboard_counts_as_every_event_would_be_counted(settings: Settings) -> None:
    rows = _events()
    _seed(settings, rows)
    board = stats.dashboard(SINCE, UNTIL, settings=settings)
    _check(board, rows)
    assert sum(board.jobs.values()) == 2 + sum(3 + 2 * h for h in range(4))  # (the test's own arithmetic)
    assert board.latency[0][1]["p50"] is not None


def test_an_empty_period_has_its_hours_and_no_percentiles(settings: Settings) -> None:
    board = stats.dashboard(SINCE, UNTIL, settings=settings)
    assert [h for h, _ in board.hours] == [SINCE + timedelta(hours=h) for h in range(4)]
    assert all(not counts for _, counts in board.hours)
    assert board.attempts == 0
    assert board.latency_all == {"p50": None, "p90": None, "p99": None}


def test_a_period_given_in_another_time_zone_is_the_same_period_in_utc_hours(settings: Settings) -> None:
    """The same instants written in UTC+5:30 (whose hours start at :30 UTC) give the same UTC hours and counts."""
    rows = _events()
    _seed(settings, rows)
    kolkata = timezone(timedelta(hours=5, minutes=30))
    board = stats.dashboard(SINCE.astimezone(kolkata), UNTIL.astimezone(kolkata), settings=settings)
    assert [h for h, _ in board.hours] == [SINCE + timedelta(hours=h) for h in range(4)]
    _check(board, rows)


@pytest.mark.parametrize("backend", ["postgres"])
def test_hours_are_utc_hours_whatever_the_sessions_time_zone(settings: Settings) -> None:
    """A session in Asia/Kolkata (UTC+5:30) would cut its hours at :30 UTC if the database truncated local time."""
    rows = _events()
    _seed(settings, rows)
    # Straight to PostgreSQL (PgBouncer refuses the options startup parameter, and its transaction mode would
    # not keep a SET): the listener's direct URL when the tests go through PgBouncer.
    direct = settings.effective_listen_url
    separator = "&" if "?" in direct else "?"
    options = "options=-c%20timezone%3DAsia/Kolkata"
    kolkata = settings.with_(database_url=f"{direct}{separator}{options}", db_transaction_pooling=False)
    with runtime(kolkata).transaction() as session:
        assert session.connection().exec_driver_sql("SHOW timezone").scalar() == "Asia/Kolkata"
    _check(stats.dashboard(SINCE, UNTIL, settings=kolkata), rows)
