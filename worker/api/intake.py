"""Intake: the jobs of concurrent ``POST /v1/jobs`` (and ``POST /v1/chat/completions``) stored and published
together (a group commit).

A POST validates its job (on the event loop for a small text-only body, in a thread otherwise) and hands it
here. One storer thread per process takes whatever jobs are waiting, up to a group's bounds, and stores them
together (``producer.store_together``: one statement on PostgreSQL, one round trip to the broker), then
settles each POST's wait and takes the next group. Nobody waits on a timer: alone, a POST costs what
``submit()`` costs plus one wake of the storer; under load, each group shares one database round trip, one
seal of the audit chain and one broker round trip, and a POST waits on the event loop, not in a thread of its
own (``bench/api.py``). A job with an idempotency key or a webhook is not grouped (it is stored by
``submit()``, with its key's look-up or its webhook in its transaction).

All or none: a group whose statement fails fails for each of its POSTs (the database is away: each answers
503, nothing was stored). A POST whose client goes away while it waits is still stored (it was handed over);
nobody is told. An intake belongs to the process that made it (``qbgw serve`` spawns its server processes:
each makes its own).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from collections import deque
from dataclasses import dataclass

from .. import producer
from ..runtime.context import Runtime
from ..store.jobs import NewJob

__all__ = ["Intake", "MAX_GROUP", "MAX_GROUP_BYTES"]

log = logging.getLogger(__name__)

#: The most jobs stored in one statement ...
MAX_GROUP = 64
#: ... and the most bytes of their messages (a POST's may be large, inline images: QBGW_MAX_REQUEST_BYTES): a
#: job that would pass it waits for the next group (a job larger than this is a group of its own).
MAX_GROUP_BYTES = 4 * 1024 * 1024


@dataclass(eq=False)
class _Waiting:
    job: NewJob
    #: Its messages' size (the canonical payload: made by the POST before it hands the job over, in the thread
    #: that validated it when the body was large).
    size: int
    #: A thread's wait (``submit``) ...
    done: threading.Event | None = None
    #: ... or a coroutine's (``submit_async``): its future, set on its loop.
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[bool] | None = None
    announced: bool = False
    error: BaseException | None = None


class Intake:
    """Stores the jobs handed to :meth:`submit` (by threads) and :meth:`submit_async` (by coroutines) in groups,
    in a storer thread of its own (see the module's text)."""

    def __init__(self, rt: Runtime, *, max_group: int = MAX_GROUP) -> None:
        self.runtime, self._max = rt, max_group
        self._ready = threading.Condition(threading.Lock())
        self._queue: deque[_Waiting] = deque()
        self._storer: threading.Thread | None = None
        self._closed = False
        #: Groups stored and jobs in them (for tests and the bench; a group that failed is not counted).
        self.groups = 0
        self.jobs = 0

    def submit(self, job: NewJob) -> bool:
        """Store ``job`` (made by ``producer.new_job``, without an idempotency key) with whichever jobs wait with
        it, and publish their messages; returns whether its message was published (if not, the sweeper
        publishes it). Raises what ``producer.store_together`` raises (nothing of its group was stored), or
        RuntimeError when the intake is closed or its storer failed (then nothing of the group was stored)."""
        waiting = _Waiting(job, len(job.payload), done=threading.Event())
        self._hand(waiting)
        waiting.done.wait()  # type: ignore[union-attr]
        return _outcome(waiting)

    async def submit_async(self, job: NewJob) -> bool:
        """:meth:`submit` for a coroutine: its event loop is free while the job is stored."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(job, len(job.payload), loop=loop, future=loop.create_future())
        self._hand(waiting)
        await waiting.future  # type: ignore[misc]
        return _outcome(waiting)

    def close(self) -> None:
        """No more jobs: the storer stores those already handed over, then ends."""
        with self._ready:
            self._closed = True
            self._ready.notify()

    def _hand(self, waiting: _Waiting) -> None:
        with self._ready:
            if self._closed:
                raise RuntimeError("this intake is closed")
            # The storer is started before the job is queued: a thread that cannot start leaves nothing behind.
            if self._storer is None or not self._storer.is_alive():
                storer = threading.Thread(target=self._store_all, name="qbgw-intake", daemon=True)
                storer.start()
                self._storer = storer
            self._queue.append(waiting)
            self._ready.notify()  # cheap when the storer is busy storing: nobody waits on it then

    def _store_all(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return
                group = self._take()
            try:
                self._store(group)
            except BaseException:  # never leave a POST waiting, whatever happened
                for waiting in group:
                    waiting.announced, waiting.error = False, RuntimeError("the intake failed to store this job")
                log.exception("intake: storing a group of %d jobs failed", len(group))
            finally:
                _settle(group)  # once, whatever happened

    def _take(self) -> list[_Waiting]:
        """The queue's first group: at most ``max_group`` jobs and MAX_GROUP_BYTES bytes (at least one job)."""
        size, group = 0, list[_Waiting]()
        while self._queue and len(group) < self._max:
            size += self._queue[0].size
            if group and size > MAX_GROUP_BYTES:
                break
            group.append(self._queue.popleft())
        return group

    def _store(self, group: list[_Waiting]) -> None:
        try:
            announced = producer.store_together(self.runtime, [w.job for w in group])
        except Exception as exc:  # each POST of the group answers with it (an error of its own: _outcome)
            for waiting in group:
                waiting.error = exc
            return
        for waiting in group:
            waiting.announced = announced
        self.groups, self.jobs = self.groups + 1, self.jobs + len(group)


def _settle(group: list[_Waiting]) -> None:
    """Wake each waiter of ``group``: a thread's event, and one call per event loop for its coroutines."""
    loops: dict[asyncio.AbstractEventLoop, list[_Waiting]] = {}
    for waiting in group:
        if waiting.done is not None:
            waiting.done.set()
        elif waiting.loop is not None:
            loops.setdefault(waiting.loop, []).append(waiting)
    for loop, waitings in loops.items():
        try:
            loop.call_soon_threadsafe(_wake, waitings)
        except RuntimeError:  # its loop has closed: nobody is left to tell
            pass
        except Exception:  # the other loops' waiters are still woken
            log.exception("intake: waking %d waiters failed", len(waitings))


def _wake(waitings: list[_Waiting]) -> None:
    for waiting in waitings:
        if waiting.future is not None and not waiting.future.done():  # (cancelled: its client went away)
            waiting.future.set_result(True)


def _outcome(waiting: _Waiting) -> bool:
    if waiting.error is not None:
        raise _own(waiting.error) from waiting.error
    return waiting.announced


def _own(error: BaseException) -> BaseException:
    """The group's error for one of its waiters: of the same class, with the same arguments, and a traceback of
    its own. Raising the group's one instance in each waiter would grow its traceback with every raise, and
    mix the waiters' frames into one another's reports."""
    try:
        own = copy.copy(error)
    except Exception:  # an error whose class cannot be made again from its arguments
        own = RuntimeError(f"the intake failed to store this job: {error}")
    own.__traceback__ = None
    return own
