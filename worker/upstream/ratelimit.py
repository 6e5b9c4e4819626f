"""Rate limit: one budget of upstream calls per second for the whole fleet, and one cooldown after a 429.

QuickBlox counts API calls per application and second (Basic 80, Starter 120, Growth/HIPAA 160; session
creation counts too) and answers 429 beyond that. Celery's ``rate_limit`` is per worker process, so N
workers would send N times the limit; here every worker of a deployment draws from one budget:

- **Redis** (``QBGW_REDIS_URL``, else the broker when it is Redis): the state lives in Redis and each
  decision is one Lua script, so it is atomic across every worker on every host, on Redis's own clock
  (``TIME``);
- **a file** (the embedded default, whose workers share one machine): the same decision under ``flock``;
- **process memory** for any other broker without ``QBGW_REDIS_URL``: only when no budget is set (a budget
  would hold per process only, so the settings refuse it at start) and the 429 cooldown is per process.

The algorithm is GCRA (the "generic cell rate algorithm", a token bucket kept as one timestamp per
budget: the theoretical arrival time, TAT). A budget of ``rate`` calls per second with a ``burst`` of B
admits B calls at once after a quiet spell, then one per 1/rate seconds; any one-second window then holds
at most ``rate + B - 1`` calls. A call may *reserve* its slot up to ``horizon`` seconds ahead: the caller
waits for it (briefly, in its thread) or comes back then (rescheduled), and the slot is its own, so a
crowd of waiting jobs is served in order instead of polling.

A 429 from the upstream sets a **cooldown** every budget honours: no call is admitted before it ends. Its
length is the ``Retry-After`` when the upstream sent one, else a backoff that doubles while 429s keep
coming (QuickBlox documents no ``Retry-After``).

Sub-budgets (one per assistant, optional) sit under the global one: a call needs a slot in both, and
takes neither unless it gets both, so a noisy assistant waits on its own budget without draining the
fleet's.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import redis

from ..errors import RateLimited
from ..settings import Settings
from .gateway import RETRY_AFTER_MAX

__all__ = [
    "Budget",
    "Grant",
    "Limiter",
    "RedisLimiter",
    "FileLimiter",
    "MemoryLimiter",
    "decide",
    "limiter_for",
    "budgets_for",
    "planned",
    "RATE_LIMIT",
    "COOLDOWN",
]

log = logging.getLogger("qbgw.ratelimit")


def _script(name: str) -> str:
    """A Lua script shipped beside this module (package data): each decision in Redis is one of them."""
    return (resources.files(__package__) / name).read_text(encoding="utf-8")


#: Why a call waits (in the audit trail, the job's status and the logs).
RATE_LIMIT = "rate limit"
COOLDOWN = "cooldown after HTTP 429"

#: The shared state of the memory and file limiters: TATs, the cooldown, and the logs of calls sent.
State = dict[str, Any]

#: A 429 streak (for the doubling cooldown) is forgotten after this many quiet seconds.
_STREAK_SECONDS = 60


@dataclass(frozen=True)
class Budget:
    """``rate`` calls per second with a burst of ``burst``, named ``name`` (``global``, ``assistant:<id>``)."""

    name: str
    rate: float
    burst: int = 1

    @property
    def interval(self) -> float:
        # A microsecond more than 1/rate: rounding in the stored times never lets one call too many in.
        return 1.0 / self.rate + 1e-6

    @property
    def cap(self) -> int:
        """The most calls sent in any one-second window: what the log of calls sent enforces."""
        return max(1, math.ceil(self.rate) + self.burst - 1)

    @property
    def tolerance(self) -> float:
        """How far ahead of its theoretical arrival time a call is still admitted (GCRA's tau)."""
        return (self.burst - 1) * self.interval


@dataclass(frozen=True)
class Grant:
    """The limiter's answer: go after ``wait`` seconds (``reserved``: the slot is held for the caller), or,
    not reserved, ask again in about ``wait`` seconds. ``reason`` says what made the wait ("" for none)."""

    wait: float
    reserved: bool
    reason: str = ""
    #: When the slot is, in Unix seconds on the limiter's clock (0: now); callers sleep until it.
    at: float = 0.0


GO = Grant(0.0, True)


def decide(
    tats: Sequence[float],
    budgets: Sequence[Budget],
    cooldown_until: float,
    now: float,
    horizon: float,
    lead: float = 0.0,
) -> tuple[Grant, list[float] | None]:
    """GCRA over several budgets at once: the grant, and the budgets' new TATs (None: nothing reserved).

    ``tats`` are the stored theoretical arrival times (0 when none). The slot is never sooner than
    ``lead`` seconds from now: the time the caller needs to get ready to send (so it sends on time). The
    Lua script in :class:`RedisLimiter` is this function, line for line; tests/integration runs both.
    """
    start, reason = now + lead, ""
    if cooldown_until > start:
        start, reason = cooldown_until, COOLDOWN
    current = [max(tat, now) for tat in tats]
    for tat, budget in zip(current, budgets, strict=True):
        allowed = tat - budget.tolerance
        if allowed > start:
            start, reason = allowed, RATE_LIMIT
    wait = start - now
    if wait > horizon:
        return Grant(wait, False, reason, start), None
    new = [max(tat, start) + b.interval for tat, b in zip(current, budgets, strict=True)]
    return Grant(wait, True, reason, start), new


def cooldown_length(retry_after: float | None, streak: int, *, base: float, cap: float) -> float:
    """Seconds to pause after a 429: the upstream's Retry-After, else ``base`` doubled per 429 in a row."""
    if retry_after is not None:
        return min(max(0.0, retry_after), RETRY_AFTER_MAX)
    return min(cap, base * float(2 ** min(max(streak - 1, 0), 30)))


class Limiter(Protocol):
    """The fleet's shared budget of upstream calls."""

    def acquire(self, budgets: Sequence[Budget], *, horizon: float, lead: float = 0.0) -> Grant:
        """A slot in every one of ``budgets`` (none: only the cooldown is checked), at least ``lead`` and at
        most ``horizon`` seconds ahead; a grant that is not ``reserved`` took nothing."""
        ...

    def admit(self, budgets: Sequence[Budget]) -> float:
        """Log a call about to be sent, if no budget has had ``rate + burst - 1`` calls sent in the last
        second: 0.0. Else log nothing and return the seconds until one ages out of the window."""
        ...

    def cool_down(self, retry_after: float | None, *, fresh: bool = False) -> float:
        """A 429 came back: pause every caller. Returns when the cooldown ends (Unix seconds). ``fresh``: the
        caller saw the upstream answer normally since its last 429, so this one starts a new streak."""
        ...

    def cooldown_until(self) -> float:
        """When the current cooldown ends (Unix seconds; in the past when there is none)."""
        ...


class _Cooldown:
    """The cooldown's shared arithmetic: a streak of 429s doubles the pause unless Retry-After says."""

    def __init__(self, base: float, cap: float) -> None:
        self.base, self.cap = base, cap

    def extend(self, state: State, retry_after: float | None, now: float, fresh: bool = False) -> float:
        cooling = state.get("cooldown", 0.0) > now
        if not cooling:  # 429s answering calls sent before the pause began do not lengthen it
            recent = now - state.get("streak_at", 0.0) < _STREAK_SECONDS
            state["streak"] = state.get("streak", 0.0) + 1 if recent and not fresh else 1.0
            state["streak_at"] = now
        until = now + cooldown_length(retry_after, int(state["streak"]), base=self.base, cap=self.cap)
        ends: float = max(state.get("cooldown", 0.0), until)
        state["cooldown"] = ends
        return ends


class MemoryLimiter:
    """One process's memory: the state of one process only (the cooldown where the workers share nothing,
    and tests). ``clock`` is injectable for tests."""

    def __init__(self, *, cooldown_base: float = 2.0, cooldown_cap: float = 60.0, clock: Any = time.time) -> None:
        self._state: State = {}
        self._lock = threading.Lock()
        self._cooldown = _Cooldown(cooldown_base, cooldown_cap)
        self._clock = clock

    def acquire(self, budgets: Sequence[Budget], *, horizon: float, lead: float = 0.0) -> Grant:
        with self._lock:
            return _acquire_in(self._state, budgets, self._clock(), horizon, lead)

    def admit(self, budgets: Sequence[Budget]) -> float:
        with self._lock:
            return _admit_in(self._state, budgets, self._clock())

    def cool_down(self, retry_after: float | None, *, fresh: bool = False) -> float:
        with self._lock:
            return self._cooldown.extend(self._state, retry_after, self._clock(), fresh)

    def cooldown_until(self) -> float:
        return float(self._state.get("cooldown", 0.0))


def _admit_in(state: State, budgets: Sequence[Budget], now: float) -> float:
    """The sliding log of calls sent, per budget: see :meth:`Limiter.admit` (and ``_ADMIT``, its twin)."""
    logs = [[t for t in state.get("log:" + b.name, []) if t > now - 1.0] for b in budgets]
    wait = 0.0
    for log_, budget in zip(logs, budgets, strict=True):
        if len(log_) >= budget.cap:
            wait = max(wait, log_[len(log_) - budget.cap] + 1.0 - now)
    for log_, budget in zip(logs, budgets, strict=True):
        state["log:" + budget.name] = log_ if wait > 0 else [*log_, now]
    return wait


def _cooldown_grant(until: float, now: float, horizon: float) -> Grant:
    """The grant when no budget applies: go, unless a cooldown holds every call."""
    return GO if until <= now else Grant(until - now, until - now <= horizon, COOLDOWN, until)


def _acquire_in(state: State, budgets: Sequence[Budget], now: float, horizon: float, lead: float) -> Grant:
    if not budgets:  # only the cooldown: no slot to place
        return _cooldown_grant(state.get("cooldown", 0.0), now, horizon)
    tats = [state.get("tat:" + b.name, 0.0) for b in budgets]
    grant, new = decide(tats, budgets, state.get("cooldown", 0.0), now, horizon, lead)
    if new is not None:
        for budget, tat in zip(budgets, new, strict=True):
            state["tat:" + budget.name] = tat
    return grant


class FileLimiter:
    """``{directory}/ratelimit-<scope>.json``, read and rewritten under ``flock``: every worker process of
    one machine (the embedded default) shares it. A damaged file counts as empty (a burst at worst)."""

    def __init__(self, directory: Path, scope: str, *, cooldown_base: float = 2.0, cooldown_cap: float = 60.0) -> None:
        self._path = directory / f"ratelimit-{scope}.json"
        self._cooldown = _Cooldown(cooldown_base, cooldown_cap)
        self._view = _CooldownView(self._read_cooldown)

    def acquire(self, budgets: Sequence[Budget], *, horizon: float, lead: float = 0.0) -> Grant:
        if not budgets:
            return _cooldown_grant(self.cooldown_until(), time.time(), horizon)
        with self._state() as state:
            return _acquire_in(state, budgets, time.time(), horizon, lead)

    def admit(self, budgets: Sequence[Budget]) -> float:
        if not budgets:
            return 0.0
        with self._state() as state:
            return _admit_in(state, budgets, time.time())

    def cool_down(self, retry_after: float | None, *, fresh: bool = False) -> float:
        with self._state() as state:
            until = self._cooldown.extend(state, retry_after, time.time(), fresh)
        self._view.forget()
        return until

    def cooldown_until(self) -> float:
        return self._view.get()

    def _read_cooldown(self) -> float:  # without the lock: a cooldown-only check must stay cheap
        try:
            return float(json.loads(self._path.read_bytes() or b"{}").get("cooldown", 0.0))
        except (OSError, ValueError, AttributeError):
            return 0.0

    @contextmanager
    def _state(self) -> Iterator[State]:
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                try:
                    state = _checked_state(json.loads(handle.read() or b"{}"))
                except (ValueError, TypeError, AttributeError):
                    log.warning("the rate-limit state in %s was unreadable; starting it afresh", self._path)
                    state = {}
                yield state
                now = time.time()
                # Budgets idle for a minute are back to full: forget them, so the file stays small.
                kept = {k: v for k, v in state.items() if _fresh(k, v, now)}
                handle.seek(0)
                handle.write(json.dumps(kept, separators=(",", ":")).encode())
                handle.truncate()
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _fresh(key: str, value: Any, now: float) -> bool:
    """Worth keeping in the file: a budget used in the last minute, a log with a call in the last second."""
    if key.startswith("tat:"):
        return bool(value > now - 60)
    if key.startswith("log:"):
        return bool(value) and bool(max(value) > now - 1.0)
    return True


def _checked_state(doc: Any) -> State:
    """The file's JSON as state: numbers, and lists of numbers for the logs (else ValueError)."""
    state: State = {}
    for key, value in dict(doc).items():
        state[str(key)] = [float(t) for t in value] if str(key).startswith("log:") else float(value)
    return state


#: How stale a worker's view of the shared cooldown may be when it checks nothing else (seconds).
_COOLDOWN_CACHE_SECONDS = 0.05


class _CooldownView:
    """A process's view of the shared cooldown, read again at most every 50 ms: with no budget set, this
    is all a job checks, so it must not cost a round trip (or a lock) per job."""

    def __init__(self, read: Callable[[], float]) -> None:
        self._read = read
        self._read_at, self._until = -_COOLDOWN_CACHE_SECONDS, 0.0

    def get(self) -> float:
        now = time.monotonic()
        if now - self._read_at >= _COOLDOWN_CACHE_SECONDS:
            self._until, self._read_at = self._read(), now
        return self._until

    def forget(self) -> None:
        self._read_at = -_COOLDOWN_CACHE_SECONDS


_ACQUIRE = _script("acquire.lua")

_ADMIT = _script("admit.lua")

_COOL_DOWN = _script("cool_down.lua")


class RedisLimiter:
    """The budgets in Redis (``qbgw:rl:<scope>:...``), each decision one atomic script on Redis's clock.

    Redis trouble is logged (once a minute) and the call goes ahead: when the broker is the same Redis, a
    worker that cannot reach it is not taking new jobs anyway; with a Redis of its own (``QBGW_REDIS_URL``
    beside RabbitMQ) the workers keep working unthrottled until it is back (docs/rate-limits.md).
    """

    def __init__(
        self,
        url: str,
        scope: str,
        *,
        cooldown_base: float = 2.0,
        cooldown_cap: float = 60.0,
        client: redis.Redis | None = None,
    ) -> None:
        self._client: redis.Redis = client or redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._errors: tuple[type[Exception], ...] = (redis.RedisError,)
        self._prefix = f"qbgw:rl:{scope}:"
        self._acquire = self._client.register_script(_ACQUIRE)
        self._cool = self._client.register_script(_COOL_DOWN)
        self._admit = self._client.register_script(_ADMIT)
        self._base, self._cap = cooldown_base, cooldown_cap
        self._complained = 0.0
        self._view = _CooldownView(self._read_cooldown)

    def __repr__(self) -> str:
        return f"RedisLimiter({self._prefix!r})"

    def acquire(
        self, budgets: Sequence[Budget], *, horizon: float, lead: float = 0.0, now: float | None = None
    ) -> Grant:
        if not budgets and now is None:
            return _cooldown_grant(self.cooldown_until(), time.time(), horizon)
        keys = [self._prefix + "cooldown", *(self._prefix + "tat:" + b.name for b in budgets)]
        args: list[Any] = [repr(horizon), "" if now is None else repr(now), repr(lead if budgets else 0.0)]
        for budget in budgets:
            args += [repr(budget.interval), repr(budget.tolerance)]
        try:
            reserved, wait, reason, at = self._acquire(keys=keys, args=args)
        except self._errors as exc:
            self._complain(exc)
            return GO
        why = reason.decode() if isinstance(reason, bytes) else str(reason)
        return Grant(float(wait), bool(int(reserved)), why, float(at))

    def admit(self, budgets: Sequence[Budget], *, now: float | None = None) -> float:
        if not budgets:
            return 0.0
        keys = [self._prefix + "log:" + b.name for b in budgets]
        args: list[str | int] = ["" if now is None else repr(now), uuid.uuid4().hex, *(b.cap for b in budgets)]
        try:
            return float(self._admit(keys=keys, args=args))
        except self._errors as exc:
            self._complain(exc)
            return 0.0

    def cool_down(self, retry_after: float | None, *, fresh: bool = False, now: float | None = None) -> float:
        keys = [self._prefix + "cooldown", self._prefix + "streak", self._prefix + "streak_at"]
        args: list[str | int] = [
            "" if retry_after is None else repr(retry_after),
            repr(self._base),
            repr(self._cap),
            "" if now is None else repr(now),
            _STREAK_SECONDS,
            "1" if fresh else "0",
        ]
        try:
            until = float(self._cool(keys=keys, args=args))
        except self._errors as exc:
            self._complain(exc)
            return time.time() + cooldown_length(retry_after, 1, base=self._base, cap=self._cap)
        self._view.forget()
        return until

    def cooldown_until(self) -> float:
        return self._view.get()

    def _read_cooldown(self) -> float:
        try:
            raw = self._client.get(self._prefix + "cooldown")
        except self._errors as exc:
            self._complain(exc)
            return 0.0
        return float(raw) if raw else 0.0

    def _complain(self, exc: Exception) -> None:
        if time.monotonic() - self._complained > 60:
            self._complained = time.monotonic()
            log.warning(
                "the fleet rate limiter cannot reach Redis (%s); calls go ahead unthrottled", type(exc).__name__
            )


def scope_of(settings: Settings) -> str:
    """The budget's name: ``QBGW_RATE_SCOPE``, else one per upstream and QuickBlox application (every
    deployment that calls the same application with the same Redis shares it)."""
    if settings.rate_scope:
        return settings.rate_scope
    return hashlib.sha256(f"{settings.base_url.rstrip('/')}|{settings.application_id}".encode()).hexdigest()[:16]


def limiter_for(settings: Settings) -> Limiter:
    """Redis (``QBGW_REDIS_URL``, else the broker when it is Redis), a file in the data directory on the
    embedded default, else this process's memory: then no budget is set (Settings refuse one where the
    workers share nothing) and only the cooldown after a 429 is the process's own."""
    base, cap = settings.rate_cooldown, settings.rate_cooldown_max
    scope = scope_of(settings)
    if settings.coordination_url:
        return RedisLimiter(settings.coordination_url, scope, cooldown_base=base, cooldown_cap=cap)
    if settings.is_embedded_broker:
        return FileLimiter(settings.data_dir, scope, cooldown_base=base, cooldown_cap=cap)
    log.info(
        "the cooldown after a 429 is kept per worker process: the broker is neither Redis nor the filesystem "
        "and QBGW_REDIS_URL is not set"
    )
    return MemoryLimiter(cooldown_base=base, cooldown_cap=cap)


def budgets_for(settings: Settings, assistant_id: str | None) -> list[Budget]:
    """The budgets a call for ``assistant_id`` (None: a session creation) must fit in."""
    budgets = []
    if settings.rate_limit > 0:
        budgets.append(Budget("global", settings.rate_limit, settings.rate_burst))
    if assistant_id is not None:
        rate = settings.assistant_rates.get(assistant_id, settings.rate_limit_per_assistant)
        if rate > 0:
            budgets.append(Budget("assistant:" + assistant_id, rate, max(1, min(settings.rate_burst, math.ceil(rate)))))
    return budgets


def planned(budgets: Sequence[Budget]) -> list[Budget]:
    """The same budgets in the plan: places given to jobs before they are claimed (to spread the work and
    reschedule the excess), kept apart from the slots calls take just before they are sent."""
    return [Budget("plan:" + b.name, b.rate, b.burst) for b in budgets]


def take_slot(limiter: Limiter, budgets: Sequence[Budget], *, give_up: float) -> Grant:
    """Take a slot in ``budgets``, sleep until it, and log the call as sent: the caller sends at once.

    The slots space the calls (GCRA); the log of calls sent is the guard: a caller that woke late (a busy
    machine wakes sleepers late) and would make one second hold more than ``rate + burst - 1`` calls waits
    a little more instead. Returns the grant, with ``wait`` the seconds spent in all; not ``reserved`` when
    they would pass ``give_up`` (a cooldown holds the fleet): then nothing was logged, do not send.
    """
    # The slot is a Unix time (the fleet shares it); the wait for it is measured on this process's
    # monotonic clock, so a wall-clock step (NTP, a VM resumed) cannot stretch or skip it.
    started = time.monotonic()
    grant = limiter.acquire(budgets, horizon=give_up)
    if not grant.reserved:
        return Grant(grant.wait, False, grant.reason, grant.at)
    at = grant.at or time.time()
    delay = min(max(0.0, at - time.time()), give_up)
    while True:
        if delay > 0:
            time.sleep(delay)
        wait = limiter.admit(budgets)
        spent = time.monotonic() - started
        if wait <= 0:
            return Grant(spent, True, grant.reason, at)
        if spent + wait > give_up:
            return Grant(spent + wait, False, grant.reason, at)
        delay, at = wait, time.time() + wait
        grant = Grant(wait, True, grant.reason or RATE_LIMIT, at)


class Gate:
    """The limiter as a call outside a job sees it (session creation): wait for a slot, report a 429."""

    def __init__(self, limiter: Limiter, settings: Settings) -> None:
        self._limiter = limiter
        self._budgets = budgets_for(settings, None)

    def wait(self, *, longest: float | None = None) -> float:
        """Block until this call may go (a session is needed now; it is rare). Returns the seconds waited.

        Waits at most ``longest`` seconds (default :data:`GATE_MAX_WAIT`): a cooldown of an hour must not
        hold a worker thread for an hour. Past it, raises :class:`~qbgw.errors.RateLimited` with the time
        still to wait, and the attempt that needed the session is retried as a rate-limited one."""
        longest = GATE_MAX_WAIT if longest is None else longest
        started = time.monotonic()
        while True:
            left = longest - (time.monotonic() - started)
            grant = take_slot(self._limiter, self._budgets, give_up=max(0.0, min(_GATE_HORIZON, left)))
            if grant.reserved:
                return time.monotonic() - started
            left = longest - (time.monotonic() - started)
            if grant.wait > left:
                raise RateLimited(
                    f"the fleet's rate limit holds session creation for {grant.wait:.1f} s more "
                    f"(a caller waits at most {longest:.0f} s)",
                    status=None,
                    retry_after=grant.wait,
                )
            time.sleep(max(0.0, min(grant.wait, left)))

    def rate_limited(self, retry_after: float | None) -> None:
        until = self._limiter.cool_down(retry_after)
        log.warning("the upstream answered 429: every worker pauses its calls for %.1f s", until - time.time())


_GATE_HORIZON = 10.0
GATE_MAX_WAIT = 30.0
