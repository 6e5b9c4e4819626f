"""Long-polls woken by the database: a job's end wakes the requests waiting for it.

On PostgreSQL one listener thread per server process holds a connection that ``LISTEN``s on
``qbgw_job_ended`` (a trigger NOTIFYs it when a job's status becomes terminal, at commit); each
notification wakes the waiters of that job. A waiter still re-reads the job every few seconds, so a
listener connection that dropped (and reconnects) costs latency, never a wait past its deadline. SQLite has
no NOTIFY: there the waiter re-reads on a bounded poll (50 ms, growing to 500 ms).

A coroutine may give its watch the read to make once the job has ended (``on_end``): the listener thread then
hands it to the waiter's own reader threads as soon as the notification arrives, and the event loop is woken
once, with the answer read, instead of twice (the end, then the read's return from a thread it started). Of
the listener and the coroutine (whose wait timed out meanwhile) only one starts that read: see
:meth:`AsyncWake.claim`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import make_url

__all__ = ["JobWaiter", "Wake", "AsyncWake", "CHANNEL"]

log = logging.getLogger(__name__)

R = TypeVar("R")

#: The channel the jobs table's trigger notifies, with the job id as payload.
CHANNEL = "qbgw_job_ended"
#: How often a waiter re-reads the job while the listener is connected (a safety net, not the mechanism).
RECHECK = 5.0
#: The bounded poll without a listener (SQLite, or while PostgreSQL's listener reconnects).
POLL_FIRST, POLL_MAX = 0.05, 0.5
#: Threads that make the coroutines' reads on a job's end (``on_end``), per waiter.
READERS = 8


class Wake(threading.Event):
    """What a thread waits on: set when its job ended (``ended``), or to make it read the job again."""

    ended = False


class AsyncWake(asyncio.Event):
    """:class:`Wake` for a coroutine; with ``on_end``, the read the listener starts when the job ends (its
    outcome in ``read``, the event set once it is made)."""

    ended = False

    def __init__(self) -> None:
        super().__init__()
        #: The read to make when the job ends (set by :meth:`JobWaiter.wait_end` while the coroutine waits).
        self.on_end: Callable[[], Any] | None = None
        #: The read ``on_end`` started by the listener (None: not started).
        self.read: Future[Any] | None = None
        self._claimed = False
        self._claim = threading.Lock()

    def claim(self, read: Future[Any] | None = None) -> bool:
        """Whether the caller is the first to claim this wake's end: the listener, with the ``read`` it will make
        (``on_end``), or the coroutine, done waiting. Exactly one of the two gets True: the coroutine that gets
        False finds ``read`` set."""
        with self._claim:
            if self._claimed:
                return False
            self._claimed, self.read = True, read
            return True


class JobWaiter:
    """Wakes the waiters of a job when it ends (see the module's docstring)."""

    def __init__(self, database_url: str) -> None:
        url = make_url(database_url)
        self._dsn = (
            url.set(drivername="postgresql").render_as_string(hide_password=False)
            if url.get_backend_name() == "postgresql"
            else None
        )
        self._waiting: dict[str, set[AsyncWake]] = {}
        #: Threads blocked in :meth:`watch_sync` (the synchronous API): set from the listener thread directly.
        self._blocked: dict[str, set[Wake]] = {}
        self._blocked_lock = threading.Lock()
        # Weakly: a waiter must not keep a closed loop (and itself) alive; its thread ends when the loop closes.
        self._loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listening = False
        #: Notifications received, and of them those handed to the event loop (a coroutine waited for the job).
        self.woken = 0
        self.loop_wakes = 0
        #: The reader threads of ``on_end`` (started on first use).
        self._readers: ThreadPoolExecutor | None = None
        self._readers_lock = threading.Lock()
        self._readers_closed = False

    @property
    def notifies(self) -> bool:
        """True where the database can wake waiters (PostgreSQL)."""
        return self._dsn is not None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start listening (PostgreSQL); ``loop``: the event loop of the asyncio waiters (None: threads only, and
        the listener lives as long as the process)."""
        self._loop = None if loop is None else weakref.ref(loop)
        if self._dsn is not None and self._thread is None:
            self._thread = threading.Thread(target=self._listen, name="qbgw-job-listener", daemon=True)
            self._thread.start()

    def stop(self, *, wait: bool = True) -> None:
        """Stop listening; ``wait``: until the listener thread has ended (up to 3 s; never on an event loop)."""
        self._stop.set()
        if wait and self._thread is not None:
            self._thread.join(timeout=3)
        self._close_readers()

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[AsyncWake]:
        """An event set when ``job_id`` ends (its ``ended`` then True), or when the listener reconnected
        (``ended`` False); register it *before* reading the job's status, so an end between the read and the
        wait is not missed. Wait on it with :meth:`wait_end`, which can give the listener the read to make."""
        event = AsyncWake()
        self._waiting.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiting.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiting[job_id]

    async def wait_end(self, event: AsyncWake, timeout: float | None, on_end: Callable[[], R]) -> Future[R] | None:
        """Wait on ``event`` (of :meth:`watch`) up to ``timeout`` seconds, ``on_end`` given to the listener meanwhile
        (when it listens): the read the listener started, made, if it did; else None, and ``event.ended`` says
        whether the job ended."""
        if self.listening:
            event.on_end = on_end
        try:
            await asyncio.wait_for(event.wait(), timeout=timeout)
        except TimeoutError:
            pass
        except BaseException:  # cancelled: no read for nobody (one already made cannot be taken back)
            if not event.claim():
                _drop(event.read)
            raise
        if event.on_end is None or event.claim():
            return None
        read = event.read  # the listener's (set with its claim)
        if read is not None and read.cancel():
            # The wait timed out with the read still queued behind other ends' reads (a burst): the coroutine
            # takes it back and reads by itself, rather than overrun its wait by the queue.
            return None
        if read is not None and not read.done():
            try:
                await asyncio.wait([asyncio.wrap_future(read)])
            except BaseException:
                _drop(read)
                raise
        if read is not None and not read.cancelled() and isinstance(read.exception(), _NotStarted):
            return None  # the listener could not start it: the coroutine reads by itself (``event.ended``)
        return read

    @contextlib.contextmanager
    def watch_sync(self, job_id: str) -> Iterator[Wake]:
        """:meth:`watch` for a thread: an event set when ``job_id`` ends (its ``ended`` then True), or when the
        listener reconnected (``ended`` False: read the job again)."""
        event = Wake()
        with self._blocked_lock:
            self._blocked.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            with self._blocked_lock:
                waiters = self._blocked.get(job_id)
                if waiters is not None:
                    waiters.discard(event)
                    if not waiters:
                        del self._blocked[job_id]

    def _wake_threads(self, job_id: str | None) -> None:
        with self._blocked_lock:
            groups = list(self._blocked.values()) if job_id is None else [self._blocked.get(job_id, set())]
            for events in groups:
                for event in events:
                    event.ended = event.ended or job_id is not None
                    event.set()

    def interval(self, polls: int) -> float:
        """How long a waiter sleeps before re-reading, after ``polls`` reads."""
        if self.listening:
            return RECHECK
        return min(POLL_MAX, POLL_FIRST * (1.5**polls))

    @staticmethod
    def _wake(events: list[AsyncWake]) -> None:
        for event in events:
            event.ended = True
            event.set()

    def _read_on_end(self, job_id: str) -> tuple[int, list[AsyncWake]]:
        """Start the ``on_end`` reads of ``job_id``'s coroutines (the listener thread): how many were started,
        and the coroutines to wake now (those without such a read: they read once woken)."""
        started, others = 0, []
        for event in list(self._waiting.get(job_id, ())):  # (a set of the loop's: copied at once, under the GIL)
            on_end = event.on_end
            if on_end is None:
                others.append(event)
                continue
            read: Future[Any] = Future()
            with self._readers_lock:
                if self._readers_closed:  # stopped: woken to read itself, as a coroutine without a read
                    others.append(event)
                    continue
                event.ended = True  # (before the claim: a coroutine that finds the claim taken knows the job ended)
                if not event.claim(read):  # the coroutine is done waiting: it reads, if it needs to
                    continue
                if self._readers is None:
                    self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="qbgw-ended-read")
                started += 1
                read.add_done_callback(functools.partial(self._read_made, event))
                try:
                    self._readers.submit(_make, read, on_end)
                except Exception as exc:  # no thread to make it (shutting down, or none could start)
                    log.warning("the job listener could not start a read (%s): its waiter reads by itself", exc)
                    if read.set_running_or_notify_cancel():
                        read.set_exception(_NotStarted())
        return started, others

    def _read_made(self, event: AsyncWake, _: Future[Any]) -> None:
        self._call(event.set)

    def _notified(self, job_id: str) -> None:
        """A job ended (the listener thread): wake its threads, and its coroutines through their loop only if one
        of them waits for it. Every job's end is notified to every server process, most of them waiting for
        none: waking their loops for nothing would cost each one a loop turn per job.

        Not missing one: a coroutine registers in ``_waiting`` before it reads the job, and a notification
        arrives after the end's commit. So either this test sees its registration, or its read comes after
        the commit and finds the job ended. (A dict's membership test is atomic: the GIL.)"""
        self.woken += 1
        self._wake_threads(job_id)
        if job_id in self._waiting:
            started, others = self._read_on_end(job_id)
            self.loop_wakes += started + bool(others)  # each read wakes the loop once it is made
            if others:
                self._call(self._wake, others)

    def _wake_all(self) -> None:
        for events in self._waiting.values():
            for event in events:
                event.set()

    def _listen(self) -> None:
        import psycopg

        assert self._dsn is not None  # noqa: S101 - started only with a PostgreSQL URL
        backoff = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True, connect_timeout=5) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    self.listening = True
                    backoff = 0.5
                    # Waiters that slept on the long interval while the listener was away re-read now.
                    self._call(self._wake_all)
                    self._wake_threads(None)
                    while not self._stop.is_set() and not self.orphaned:
                        for note in connection.notifies(timeout=1.0):
                            self._notified(note.payload)
                    if self.orphaned:
                        break
            except Exception as exc:  # the database went away: poll until the listener is back
                if self.orphaned:
                    break
                if self.listening:
                    log.warning("the job listener lost its connection (%s); polling until it is back", exc)
                self.listening = False
                self._call(self._wake_all)
                self._wake_threads(None)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
        self.listening = False
        self._close_readers()  # (stopped, or its loop closed: nobody is left to read for)

    def _close_readers(self) -> None:
        with self._readers_lock:
            self._readers_closed = True
            if self._readers is not None:
                self._readers.shutdown(wait=False)

    @property
    def orphaned(self) -> bool:
        """The loop it wakes has closed (or is gone): nothing can wait on it any more."""
        loop = self._loop() if self._loop is not None else None
        return self._loop is not None and (loop is None or loop.is_closed())

    def _call(self, fn: object, *args: object) -> None:
        loop = self._loop() if self._loop is not None else None
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(fn, *args)  # type: ignore[arg-type]


class _NotStarted(Exception):
    """A read the listener claimed but could not start: the coroutine makes it."""


def _drop(read: Future[Any] | None) -> None:
    """Cancel ``read`` if no reader has started it yet (its coroutine went away)."""
    if read is not None:
        read.cancel()


def _make(read: Future[Any], on_end: Callable[[], Any]) -> None:
    """Make ``on_end``'s read (a reader thread), its outcome in ``read``."""
    if not read.set_running_or_notify_cancel():
        return
    try:
        read.set_result(on_end())
    except BaseException as exc:  # what the read raised goes to the coroutine that waits for it
        read.set_exception(exc)
