"""Intake: the jobs of concurrent ``POST /v1/jobs`` stored and published together (a group commit).

Each POST validates its job in its own thread, then hands it here and waits. The first to arrive while
nothing is being stored stores at once, alone; the POSTs that arrive meanwhile wait for it, and the next of
them stores all of them together (``producer.store_together``: one statement on PostgreSQL, one round trip
to the broker), then hands on to the next group. Nobody waits on a timer: alone, a POST costs what
``submit()`` costs; under load, each group shares one database round trip, one seal of the audit chain and
one broker round trip (``bench/api.py``). A job with an idempotency key or a webhook is not grouped (it is
stored by ``submit()``, with its key's look-up or its webhook in its transaction).

All or none: a group whose statement fails fails for each of its POSTs (the database is away: each answers
503, nothing was stored).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .. import producer
from ..runtime.context import Runtime
from ..store.jobs import NewJob

__all__ = ["Intake", "MAX_GROUP", "MAX_GROUP_BYTES"]

#: The most jobs stored in one statement ...
MAX_GROUP = 64
#: ... and the most bytes of their messages (a POST's may be large, inline images: QBGW_MAX_REQUEST_BYTES): a
#: job that would pass it waits for the next group (a job larger than this is a group of its own).
MAX_GROUP_BYTES = 4 * 1024 * 1024


@dataclass(eq=False)
class _Waiting:
    job: NewJob
    #: Its messages' size (the canonical payload, made here, in its own thread, not under the lock).
    size: int
    done: threading.Event = field(default_factory=threading.Event)
    #: Set by the group before ``done``: this one stores the next group.
    leads: bool = False
    announced: bool = False
    error: BaseException | None = None


class Intake:
    """Stores the jobs handed to :meth:`submit` by concurrent threads in groups (see the module's text)."""

    def __init__(self, rt: Runtime, *, max_group: int = MAX_GROUP) -> None:
        self.runtime, self._max = rt, max_group
        self._lock = threading.Lock()
        self._queue: list[_Waiting] = []
        self._storing = False
        #: Groups stored and jobs in them (for tests and the bench).
        self.groups = 0
        self.jobs = 0

    def submit(self, job: NewJob) -> bool:
        """Store ``job`` (made by ``producer.new_job``, without an idempotency key) with whichever jobs wait with
        it, and publish their messages; returns whether its message was published (if not, the sweeper
        publishes it). Raises what ``producer.store_together`` raises (nothing of its group was stored)."""
        waiting = _Waiting(job, len(job.payload))
        with self._lock:
            self._queue.append(waiting)
            leads = not self._storing
            self._storing = True
        if not leads:
            waiting.done.wait()
            if not waiting.leads:
                return _outcome(waiting)
        self._store_next()
        return _outcome(waiting)

    def _store_next(self) -> None:
        """Store the queue's first group (this thread's own job is in it), then hand on to the next waiting one."""
        with self._lock:
            size, taken = 0, 0
            for waiting in self._queue[: self._max]:
                size += waiting.size
                if taken and size > MAX_GROUP_BYTES:
                    break
                taken += 1
            group, self._queue = self._queue[:taken], self._queue[taken:]
        try:
            announced = producer.store_together(self.runtime, [w.job for w in group])
            for waiting in group:
                waiting.announced = announced
        except BaseException as exc:  # each POST of the group answers with it
            for waiting in group:
                waiting.error = exc
        with self._lock:
            self.groups, self.jobs = self.groups + 1, self.jobs + len(group)
            following = self._queue[0] if self._queue else None
            if following is None:
                self._storing = False
            else:
                following.leads = True
        for waiting in group:
            waiting.done.set()
        if following is not None:
            following.done.set()


def _outcome(waiting: _Waiting) -> bool:
    if waiting.error is not None:
        raise waiting.error
    return waiting.announced
