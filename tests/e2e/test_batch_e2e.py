"""A 50-job batch through a real ``qbgw worker`` process, on the embedded default and on
PostgreSQL + Redis, to the end: a few jobs fail, and the batch says so."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

from qbgw.batches import export as batch_export
from qbgw.producer import submit_batch
from qbgw.queries import batch_results, wait_for_batch
from qbgw.settings import Settings
from qbgw.store.batches import BatchStatus
from tests.conftest import ASSISTANT

FAILING = (7, 23, 41)


def test_a_50_job_batch_completes_with_its_failures_reported(
    stack: Settings, worker_process: Callable[..., Any]
) -> None:
    lines = []
    for i in range(50):
        text = f"Batch question {i}" + (" [[emulator:fail=400]]" if i in FAILING else "")
        lines.append({"custom_id": f"q-{i:02d}", "messages": [{"role": "user", "content": text}]})
    view = submit_batch(lines, assistant_id=ASSISTANT, actor="e2e", settings=stack)
    worker_process(stack)
    seen: list[int] = []
    done = wait_for_batch(view.id, timeout=120, poll=0.2, on_progress=lambda v: seen.append(v.finished), settings=stack)
    assert done.status is BatchStatus.COMPLETED
    assert (done.succeeded, done.failed, done.pending) == (47, 3, 0)
    assert done.summary == "completed with 3 failures (47 succeeded)"
    assert not done.all_succeeded
    assert seen == sorted(seen)
    assert seen[-1] == 50
    out = io.StringIO()
    batch_export.write_jsonl(batch_results(view.id, settings=stack), out)
    rows = {row["custom_id"]: row for row in map(json.loads, out.getvalue().splitlines())}
    assert {c for c, r in rows.items() if r["status"] == "failed"} == {f"q-{i:02d}" for i in FAILING}
    assert 'you said "Batch question 12"' in rows["q-12"]["answer"]
