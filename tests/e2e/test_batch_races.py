"""Batches that end once, and times that follow the chain, with real worker processes racing: two workers
(each with its sweeper) run a 1,500-job batch whose 2 s window ends mid-run, and a second batch cancelled
while they run, with a reader settling both all along. On the embedded default and PostgreSQL + Redis."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from qbgw.control import cancel_batch
from qbgw.emulator.server import Emulator
from qbgw.producer import submit_batch
from qbgw.queries import AuditFilter, audit_query, get_batch
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings
from qbgw.store.batches import BatchStatus
from qbgw.store.models import AuditEvent


def lines(n: int, prefix: str) -> list[str]:
    return [
        json.dumps({"custom_id": f"{prefix}-{i:04d}", "messages": [{"role": "user", "content": f"note {i}"}]})
        for i in range(n)
    ]


def test_an_expiring_and_a_cancelled_batch_end_once_and_every_event_time_follows_its_seq(
    stack: Settings, emu: Emulator, worker_process: Callable[..., Any]
) -> None:
    from tests.conftest import ASSISTANT

    emu.reconfigure(latency=0.1)
    settings = stack.with_(sweep_interval=0.2)
    worker_process(settings, concurrency=8)
    worker_process(settings, concurrency=8)
    expiring = submit_batch(lines(1500, "exp"), assistant_id=ASSISTANT, window=2.0, settings=settings)
    cancelled = submit_batch(lines(600, "can"), assistant_id=ASSISTANT, settings=settings)
    stop = threading.Event()

    def read_all_along() -> None:  # a reader settles the batches all along (as `qbgw batch wait` does)
        while not stop.is_set():
            for batch_id in (expiring.id, cancelled.id):
                get_batch(batch_id, settings=settings)

    reader = threading.Thread(target=read_all_along, daemon=True)
    reader.start()
    try:
        time.sleep(0.5)
        cancel_batch(cancelled.id, actor="nurse-7", settings=settings)
        deadline = time.monotonic() + 120
        while not all(get_batch(b, settings=settings).done for b in (expiring.id, cancelled.id)):
            assert time.monotonic() < deadline, "the batches did not end"
            time.sleep(0.2)
    finally:
        stop.set()
        reader.join(timeout=30)
        emu.reconfigure(latency=0.0)

    exp, can = get_batch(expiring.id, settings=settings), get_batch(cancelled.id, settings=settings)
    assert exp.status is BatchStatus.EXPIRED, exp
    assert exp.expired_at is not None, exp
    assert exp.cancelled > 0, exp
    assert can.status is BatchStatus.CANCELLED, can
    assert can.cancelled_at is not None, can
    assert can.cancelled > 0, can
    assert exp.succeeded + exp.cancelled == 1500
    assert can.succeeded + can.cancelled == 600
    ends = audit_query(AuditFilter(action="batch.expired"), settings=settings)
    ends += audit_query(AuditFilter(action="batch.cancelled"), settings=settings)
    assert sorted(e.batch_id or "" for e in ends) == sorted([expiring.id, cancelled.id])  # one decision each

    with runtime(settings).transaction() as session:
        rows = session.execute(
            select(AuditEvent.seq, AuditEvent.occurred_at, AuditEvent.job_id).order_by(AuditEvent.seq)
        ).all()
    late = [(a.seq, b.seq) for a, b in zip(rows, rows[1:], strict=False) if b.occurred_at < a.occurred_at]
    assert not late, f"{len(late)} events sort before an event that committed earlier: {late[:5]}"
    by_job: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        if row.job_id:
            by_job[row.job_id].append(row.occurred_at)
    assert all(times == sorted(times) for times in by_job.values())
