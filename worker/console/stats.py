"""The dashboard's figures, read from the audit trail (no PHI: actions, times, statuses, latencies)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from ..audit.events import Action
from ..runtime.locator import runtime
from ..settings import Settings
from ..store.models import AuditEvent

__all__ = ["Dashboard", "ChainState", "dashboard", "chain_state", "percentile", "ENDINGS", "ATTEMPTS"]

#: The events that end a job, by the outcome they plot as.
ENDINGS = {Action.SUCCEEDED.value: "succeeded", Action.FAILED.value: "failed", Action.CANCELLED.value: "cancelled"}
#: The events of an attempt that went (or may have gone) to the gateway.
ATTEMPTS = (Action.ATTEMPT_RESPONSE.value, Action.ATTEMPT_ERROR.value, Action.ATTEMPT_INTERRUPTED.value)


@dataclass
class Dashboard:
    since: datetime
    until: datetime
    #: One entry per hour (its start), with the jobs that ended in it, by outcome.
    hours: list[tuple[datetime, Counter[str]]] = field(default_factory=list)
    #: Attempts by the gateway's HTTP status ("no answer" for a timeout or a connection error).
    statuses: Counter[str] = field(default_factory=Counter)
    #: Per hour: the 50th, 90th and 99th percentile of the attempts' latency (ms), None when there was none.
    latency: list[tuple[datetime, dict[str, float | None]]] = field(default_factory=list)
    #: The percentiles over the whole period.
    latency_all: dict[str, float | None] = field(default_factory=dict)

    @property
    def jobs(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for _, counts in self.hours:
            total.update(counts)
        return total

    @property
    def attempts(self) -> int:
        return sum(self.statuses.values())


def percentile(values: list[int], p: float) -> float | None:
    """The ``p``-th percentile (0-100) of sorted ``values``, by nearest rank; None for none."""
    if not values:
        return None
    rank = max(1, -(-len(values) * p // 100))
    return float(values[int(rank) - 1])


def _in_utc(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _hour(when: datetime) -> datetime:
    return when.replace(minute=0, second=0, microsecond=0)


def _percentiles(values: list[int]) -> dict[str, float | None]:
    values.sort()
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99)}


def dashboard(since: datetime, until: datetime, *, settings: Settings | None = None) -> Dashboard:
    """The figures of the period [since, until), hour by hour (hours in UTC).

    Counted by the database, grouped by hour: the rows of a month of a busy fleet never come to this process.
    PostgreSQL also takes the latency percentiles (``percentile_disc``, the nearest rank, as :func:`percentile`);
    SQLite has none, so there each attempt's latency is read (the embedded default's scale).

    ``since`` and ``until`` may be in any time zone (naive: UTC); the hours are UTC's."""
    since, until = _in_utc(since), _in_utc(until)
    board = Dashboard(since, until)
    ends: dict[datetime, Counter[str]] = {}
    latencies: dict[datetime, dict[str, float | None]] = {}
    in_period = (AuditEvent.occurred_at >= since, AuditEvent.occurred_at < until)
    with runtime(settings).transaction() as session:
        postgres = session.get_bind().dialect.name == "postgresql"
        hour = _hour_of(postgres)
        for when, action, count in session.execute(
            select(hour, AuditEvent.action, func.count())
            .where(AuditEvent.action.in_(list(ENDINGS)), *in_period)
            .group_by(hour, AuditEvent.action)
        ):
            ends.setdefault(_utc_hour(when), Counter())[ENDINGS[action]] += int(count)
        attempts = (AuditEvent.action.in_(ATTEMPTS), *in_period)
        for status, count in session.execute(
            select(AuditEvent.http_status, func.count()).where(*attempts).group_by(AuditEvent.http_status)
        ):
            board.statuses[str(status) if status else "no answer"] += int(count)
        if postgres:
            timed = (*attempts, AuditEvent.latency_ms.is_not(None))
            for when, *ranks in session.execute(select(hour, *_ranks()).where(*timed).group_by(hour)):
                latencies[_utc_hour(when)] = _named(ranks)
            overall = session.execute(select(*_ranks()).where(*timed)).one()
            board.latency_all = _named(list(overall))
        else:
            every: list[int] = []
            per_hour: dict[datetime, list[int]] = {}
            for when, latency in session.execute(
                select(hour, AuditEvent.latency_ms).where(*attempts, AuditEvent.latency_ms.is_not(None))
            ):
                per_hour.setdefault(_utc_hour(when), []).append(int(latency))
                every.append(int(latency))
            latencies = {when: _percentiles(values) for when, values in per_hour.items()}
            board.latency_all = _percentiles(every)
    at = _hour(since)
    while at < until:
        board.hours.append((at, ends.get(at, Counter())))
        board.latency.append((at, latencies.get(at) or _percentiles([])))
        at += timedelta(hours=1)
    return board


#: The percentiles the dashboard plots, as fractions.
_PERCENTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}


def _ranks() -> list[Any]:
    return [func.percentile_disc(q).within_group(AuditEvent.latency_ms) for q in _PERCENTILES.values()]


def _named(ranks: list[Any]) -> dict[str, float | None]:
    return {name: None if value is None else float(value) for name, value in zip(_PERCENTILES, ranks, strict=True)}


def _hour_of(postgres: bool) -> Any:
    """The hour an event occurred in, in UTC, as the database says it: PostgreSQL truncates the time in UTC
    (not in the session's time zone); SQLite stores UTC text, whose first 13 characters are the hour."""
    if postgres:
        return func.date_trunc("hour", func.timezone("UTC", AuditEvent.occurred_at))
    return func.substr(AuditEvent.occurred_at, 1, 13)


def _utc_hour(value: datetime | str) -> datetime:
    if isinstance(value, str):  # SQLite: "2026-12-05 10"
        return datetime.strptime(value, "%Y-%m-%d %H").replace(tzinfo=UTC)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else _hour(value.astimezone(UTC))


@dataclass(frozen=True)
class ChainState:
    """The chain's head, and its last verification (None: never verified)."""

    head_seq: int
    verified_at: datetime | None
    verified_by: str | None
    verified_outcome: str | None
    verified_events: int | None


def chain_state(*, settings: Settings | None = None) -> ChainState:
    """Where the chain stands: its last seq and its newest ``audit.verified`` event (read newest first)."""
    with runtime(settings).transaction() as session:
        head = session.execute(select(AuditEvent.seq).order_by(AuditEvent.seq.desc()).limit(1)).scalar()
        last = session.execute(
            select(AuditEvent.occurred_at, AuditEvent.actor, AuditEvent.outcome, AuditEvent.detail)
            .where(AuditEvent.action == Action.AUDIT_VERIFIED.value)
            .order_by(AuditEvent.action, AuditEvent.occurred_at.desc())
            .limit(1)
        ).first()
    if last is None:
        return ChainState(int(head or 0), None, None, None, None)
    events = json.loads(last.detail).get("events") if last.detail else None
    return ChainState(int(head or 0), last.occurred_at, last.actor, last.outcome, events)
