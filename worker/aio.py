"""``qbgw.aio``: the Python API for async web apps (FastAPI, Starlette, aiohttp...). Nothing here blocks the
event loop: database and broker calls run in worker threads (``asyncio.to_thread``), and :func:`wait` sleeps
on the event loop until the database says the job ended (PostgreSQL ``LISTEN/NOTIFY``; a bounded poll on
SQLite), the mechanism of ``GET /v1/jobs/{id}?wait=``.

    job_id = await qbgw.aio.submit(assistant_id, messages)
    view = await qbgw.aio.wait(job_id, timeout=30)
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import weakref
from typing import Any

from . import producer, queries
from .lifecycle import TERMINAL
from .runtime.locator import runtime
from .runtime.waiter import JobWaiter
from .settings import Settings
from .store.reads import JobView

__all__ = ["submit", "get", "status", "wait"]

_waiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, JobWaiter]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


async def submit(
    assistant_id: str,
    messages: list[dict[str, Any]],
    *,
    custom_id: str | None = None,
    idempotency_key: str | None = None,
    actor: str | None = None,
    require_broker: bool = False,
    webhook_url: str | None = None,
    subject: str | None = None,
    settings: Settings | None = None,
) -> str:
    """:func:`qbgw.submit` without blocking the loop; the same arguments, errors and result."""
    return await asyncio.to_thread(
        producer.submit,
        assistant_id,
        messages,
        custom_id=custom_id,
        idempotency_key=idempotency_key,
        actor=actor,
        require_broker=require_broker,
        webhook_url=webhook_url,
        subject=subject,
        settings=settings,
    )


async def get(job_id: str, *, reader: str | None = None, settings: Settings | None = None) -> JobView:
    """:func:`qbgw.get_job` (the answer included; the read is audited)."""
    return await asyncio.to_thread(queries.get_job, job_id, reader=reader, settings=settings)


async def status(job_id: str, *, settings: Settings | None = None) -> JobView:
    """The job without its PHI (answer and error are None; not audited)."""
    view, _ = await asyncio.to_thread(queries.job_metadata, job_id, settings=settings)
    return view


def _waiter(settings: Settings | None) -> JobWaiter:
    loop = asyncio.get_running_loop()
    url = runtime(settings).settings.effective_listen_url
    with _lock:
        for other in [other for other in list(_waiters.keys()) if other.is_closed()]:
            for ended in _waiters.pop(other).values():
                ended.stop(wait=False)  # its listener and connection end with the closed loop; this one runs on
        per_loop = _waiters.setdefault(loop, {})
        found = per_loop.get(url)
        if found is None:
            found = per_loop[url] = JobWaiter(url)
            found.start(loop)
        return found


async def wait(
    job_id: str, *, timeout: float | None = None, reader: str | None = None, settings: Settings | None = None
) -> JobView:
    """Until the job has ended (or ``timeout`` seconds), then :func:`get` it.

    Raises:
        JobNotFound: no job has this id.
        TimeoutError: ``timeout`` passed first.
    """
    waiter = _waiter(settings)
    deadline = None if timeout is None else time.monotonic() + timeout
    polls = 0
    while True:
        with waiter.watch(job_id) as ended:
            current = await asyncio.to_thread(queries.job_status, job_id, settings=settings)
            if current in TERMINAL:
                return await get(job_id, reader=reader, settings=settings)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"job {job_id} is still {current} after {timeout:g}s")
            pause = waiter.interval(polls) if left is None else min(left, waiter.interval(polls))
            # The listener reads the job as its end is notified (one wake of this loop, with the answer).
            read = await waiter.wait_end(
                ended, pause, functools.partial(queries.get_job, job_id, reader=reader, settings=settings)
            )
            polls += 1
        if read is not None:
            view = read.result()  # (raises what the read raised)
            if view.done:
                return view
        elif ended.ended:  # the database said the job ended: read it at once
            view = await get(job_id, reader=reader, settings=settings)
            if view.done:  # (else it was replayed meanwhile: wait on)
                return view
