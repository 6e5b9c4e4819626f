"""A large batch does not starve an interactive job submitted while it runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select

from qbgw import producer
from qbgw.lifecycle import TERMINAL, JobStatus
from qbgw.producer import submit_batch
from qbgw.queries import wait_for_job
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings
from qbgw.store.models import Job
from tests.conftest import ASSISTANT

BATCH = 60


def test_an_interactive_job_overtakes_a_waiting_batch(
    stack: Settings, worker_process: Callable[..., Any], emu: Any
) -> None:
    emu.reconfigure(latency=0.25)
    lines = [
        {
            "custom_id": f"line-{n}",
            "smart_chat_assistant_id": ASSISTANT,
            "messages": [{"role": "user", "content": f"batch job {n}"}],
        }
        for n in range(BATCH)
    ]
    batch = submit_batch(lines, settings=stack)
    worker_process(stack, concurrency=2)  # 60 jobs x 0.25 s / 2 threads: the batch takes ~8 s
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": "a web app's question"}], settings=stack)
    view = wait_for_job(job_id, timeout=60, settings=stack)
    with runtime(stack).transaction() as session:
        done = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.batch_id == batch.id, Job.status.in_([str(s) for s in TERMINAL]))
        )
    assert view.status is JobStatus.SUCCEEDED
    # In one shared queue it would have waited behind all 60; here it goes next.
    assert done is not None
    assert done < BATCH // 3, f"{done} of {BATCH} batch jobs finished first"
