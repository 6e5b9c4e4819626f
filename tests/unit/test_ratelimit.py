"""The fleet rate limiter's arithmetic (GCRA over several budgets, the cooldown), with a fake clock."""

from __future__ import annotations

import math
import random
import time

import pytest

from qbgw.errors import ConfigError, RateLimited
from qbgw.settings import Settings, parse_assistant_rates
from qbgw.upstream.ratelimit import (
    COOLDOWN,
    RATE_LIMIT,
    Budget,
    Gate,
    MemoryLimiter,
    budgets_for,
    cooldown_length,
    take_slot,
)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def worst_window(times: list[float], width: float = 1.0) -> int:
    """The most events in any half-open window [t, t + width) that starts at an event."""
    times = sorted(times)
    worst, j = 0, 0
    for i, start in enumerate(times):
        j = max(j, i)
        while j < len(times) and times[j] < start + width:
            j += 1
        worst = max(worst, j - i)
    return worst


def test_a_burst_then_one_call_per_interval() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock=clock)
    budget = [Budget("global", rate=10, burst=3)]
    waits = [limiter.acquire(budget, horizon=60).wait for _ in range(6)]
    assert waits[:3] == [0.0, 0.0, 0.0]  # the burst goes at once
    assert waits[3:] == pytest.approx([0.1, 0.2, 0.3], abs=1e-4)  # then one per 1/rate seconds


@pytest.mark.parametrize(("rate", "burst"), [(20, 1), (20, 2), (160, 10), (7.5, 4)])
def test_no_one_second_window_holds_more_than_rate_plus_burst_minus_one(rate: float, burst: int) -> None:
    clock, rng = Clock(), random.Random(7)
    limiter = MemoryLimiter(clock=clock)
    budget = [Budget("global", rate=rate, burst=burst)]
    slots = []
    for _ in range(4000):  # callers come faster than the rate, with lulls; each goes at its reserved slot
        clock.now += 1.5 if rng.random() < 0.002 else rng.choice([0.0, 0.0, 0.0, 0.5 / rate, 1 / rate])
        grant = limiter.acquire(budget, horizon=2.0)
        if grant.reserved:
            slots.append(clock.now + grant.wait)
    assert worst_window(slots) <= math.ceil(rate) + burst - 1
    assert worst_window(slots) >= math.floor(rate)  # and the budget is used, not wasted


def test_the_log_of_calls_sent_holds_back_a_caller_that_woke_late() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock=clock)
    budget = [Budget("global", rate=5, burst=1)]  # at most 5 calls sent in any second
    for _ in range(5):
        assert limiter.admit(budget) == 0.0
        clock.now += 0.01
    assert limiter.admit(budget) == pytest.approx(0.95, abs=1e-6)  # the first call leaves the window then
    assert limiter.admit(budget) == pytest.approx(0.95, abs=1e-6)  # a refusal logs nothing
    clock.now += 0.951
    assert limiter.admit(budget) == 0.0
    assert limiter.admit([]) == 0.0


def test_a_wait_beyond_the_horizon_reserves_nothing() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock=clock)
    budget = [Budget("global", rate=1, burst=1)]
    assert limiter.acquire(budget, horizon=0.5).reserved
    refused = limiter.acquire(budget, horizon=0.5)
    assert (refused.reserved, refused.reason) == (False, RATE_LIMIT)
    assert refused.wait == pytest.approx(1.0, abs=1e-4)
    again = limiter.acquire(budget, horizon=0.5)  # the refusal took no slot: the same wait
    assert again.wait == pytest.approx(1.0, abs=1e-4)


def test_an_assistant_budget_holds_its_assistant_without_draining_the_fleet() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock=clock)
    settings = Settings(rate_limit=10, rate_burst=1, rate_limit_assistants="noisy=2")
    noisy, quiet = budgets_for(settings, "noisy"), budgets_for(settings, "quiet")
    assert [b.name for b in noisy] == ["global", "assistant:noisy"]
    assert [b.name for b in quiet] == ["global"]
    assert limiter.acquire(noisy, horizon=10).wait == 0
    refused = [limiter.acquire(noisy, horizon=0.2) for _ in range(5)]
    assert all(not g.reserved and g.wait == pytest.approx(0.5, abs=1e-4) for g in refused)
    # The refused calls took nothing from the global budget: the next slot is 1/10 s after the first call.
    assert limiter.acquire(quiet, horizon=10).wait == pytest.approx(0.1, abs=1e-4)


def test_per_assistant_budget_and_overrides() -> None:
    settings = Settings(rate_limit=0, rate_limit_per_assistant=5, rate_limit_assistants="vip=50")
    assert budgets_for(settings, "x") == [Budget("assistant:x", 5, 1)]
    assert budgets_for(settings, "vip") == [Budget("assistant:vip", 50, 1)]
    assert budgets_for(settings, None) == []  # a session creation has no assistant
    assert budgets_for(Settings(), "x") == []  # no limit set: only the cooldown is checked


def test_a_cooldown_holds_every_budget_then_calls_resume_at_the_rate() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock=clock, cooldown_base=2.0, cooldown_cap=60.0)
    budget = [Budget("global", rate=10, burst=1)]
    until = limiter.cool_down(retry_after=3.0)
    assert until == pytest.approx(clock.now + 3.0, abs=1e-4)
    held = limiter.acquire(budget, horizon=10)
    assert (held.reason, held.wait) == (COOLDOWN, pytest.approx(3.0, abs=1e-4))
    assert limiter.acquire([], horizon=10).wait == pytest.approx(3.0, abs=1e-4)  # the cooldown-only check, too
    assert limiter.acquire(budget, horizon=10).wait == pytest.approx(3.1, abs=1e-4)  # spaced after it, not a stampede


def test_without_retry_after_the_cooldown_doubles_only_for_429s_after_it_ended() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock=clock, cooldown_base=2.0, cooldown_cap=5.0)
    assert limiter.cool_down(None) - clock.now == pytest.approx(2.0, abs=1e-4)
    # 429s to calls that were in flight when it began do not lengthen it.
    assert limiter.cool_down(None) - clock.now == pytest.approx(2.0, abs=1e-4)
    clock.now += 2.5
    assert limiter.cool_down(None) - clock.now == pytest.approx(4.0, abs=1e-4)
    clock.now += 4.5
    assert limiter.cool_down(None) - clock.now == pytest.approx(5.0, abs=1e-4)  # capped
    clock.now += 120  # a quiet minute forgets the streak
    assert limiter.cool_down(None) - clock.now == pytest.approx(2.0, abs=1e-4)
    clock.now += 2.5
    assert limiter.cool_down(None) - clock.now == pytest.approx(4.0, abs=1e-4)
    clock.now += 4.5  # this 429 came after the caller saw answers again: news, not the same overload
    assert limiter.cool_down(None, fresh=True) - clock.now == pytest.approx(2.0, abs=1e-4)
    assert cooldown_length(7.0, 9, base=2, cap=5) == 7.0  # the upstream's Retry-After wins


def test_the_gate_takes_a_slot_for_a_session_creation() -> None:
    limiter = MemoryLimiter()
    gate = Gate(limiter, Settings(rate_limit=20, rate_burst=1))
    started = time.monotonic()
    assert gate.wait() < 0.01
    # the next slot is 1/20 s after the first; a loaded machine may oversleep, never undersleep
    gate.wait()
    assert 0.049 <= time.monotonic() - started < 2.0


def test_a_long_cooldown_does_not_hold_a_session_creation_past_the_gate_bound() -> None:
    limiter = MemoryLimiter()
    gate = Gate(limiter, Settings(rate_limit=20, rate_burst=1))
    limiter.cool_down(retry_after=3000.0)
    started = time.monotonic()
    with pytest.raises(RateLimited) as caught:
        gate.wait(longest=0.2)
    assert time.monotonic() - started < 1.0  # it neither slept the hour nor looped in 10 s steps
    assert caught.value.retry_after is not None
    assert caught.value.retry_after > 2900
    assert "rate limit" in str(caught.value)


def test_a_retry_after_beyond_an_hour_is_read_as_an_hour() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock=clock)
    assert limiter.cool_down(retry_after=10**9) - clock.now == pytest.approx(3600.0)
    assert cooldown_length(float("inf"), 1, base=2, cap=5) == 3600.0


def test_a_wall_clock_step_back_does_not_stretch_the_wait_for_a_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    limiter = MemoryLimiter()
    budget = [Budget("global", rate=20, burst=1)]
    take_slot(limiter, budget, give_up=5)  # the next slot is 50 ms ahead
    real_time = time.time
    calls = {"n": 0}

    def stepping() -> float:  # the wall clock steps an hour back once the slot was granted
        calls["n"] += 1
        return real_time() - (3600.0 if calls["n"] > 2 else 0.0)

    monkeypatch.setattr(time, "time", stepping)
    started = time.monotonic()
    grant = take_slot(limiter, budget, give_up=5)
    assert time.monotonic() - started < 5.5
    assert grant.wait < 5.5


@pytest.mark.parametrize("raw", ["x", "a=", "=3", "a=-1", "a=fast", "a=nan", "a=inf"])
def test_a_bad_assistant_budget_names_the_entry_and_the_format(raw: str) -> None:
    with pytest.raises(ValueError, match="ASSISTANT_ID=CALLS_PER_SECOND"):
        parse_assistant_rates(raw)
    with pytest.raises(ConfigError, match="QBGW_RATE_LIMIT_ASSISTANTS"):
        Settings.from_env({"QBGW_RATE_LIMIT_ASSISTANTS": raw})


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("RATE_LIMIT", "-1", "0 or more"),
        ("RATE_LIMIT", "lots", "must be a float"),
        ("RATE_BURST", "0", "at least 1"),
        ("RATE_COOLDOWN", "0", "positive"),
        ("RATE_MAX_SLEEP", "-0.5", "0 or more"),
    ],
)
def test_bad_rate_settings_are_refused_by_name(name: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError, match=f"QBGW_{name}.*{says}"):
        Settings.from_env({f"QBGW_{name}": value})
