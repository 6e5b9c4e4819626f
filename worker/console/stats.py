"""The dashboard's figures, read from the audit trail (no PHI: actions, times, statuses, latencies)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select

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


def _hour(when: datetime) -> datetime:
    return when.replace(minute=0, second=0, microsecond=0)


def _percentiles(values: list[int]) -> dict[str, float | None]:
    values.sort()
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99)}


def dashboard(since: datetime, until: datetime, *, settings: Settings | None = None) -> Dashboard:
    """The figures of the period [since, until), hour by hour."""
    board = Dashboard(since, until)
    ends: dict[datetime, Counter[str]] = {}
    latencies: dict[datetime, list[int]] = {}
    every: list[int] = []
    in_period = (AuditEvent.occurred_at >= since, AuditEvent.occurred_at < until)
    with runtime(settings).transaction() as session:
        for when, action in session.execute(
            select(AuditEvent.occurred_at, AuditEvent.action).where(AuditEvent.action.in_(list(ENDINGS)), *in_period)
        ):
            ends.setdefault(_hour(when), Counter())[ENDINGS[action]] += 1
        for when, status, latency in session.execute(
            select(AuditEvent.occurred_at, AuditEvent.http_status, AuditEvent.latency_ms).where(
                AuditEvent.action.in_(ATTEMPTS), *in_period
            )
        ):
            board.statuses[str(status) if status else "no answer"] += 1
            if latency is not None:
                latencies.setdefault(_hour(when), []).append(int(latency))
                every.append(int(latency))
    hour = _hour(since)
    while hour < until:
        board.hours.append((hour, ends.get(hour, Counter())))
        board.latency.append((hour, _percentiles(latencies.get(hour, []))))
        hour += timedelta(hours=1)
    board.latency_all = _percentiles(every)
    return board


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
