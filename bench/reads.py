"""A producer's calls on PostgreSQL, each through the hot path (``qbgw.store.hotpath``) beside the same call
through the store's Session path, in the same run, on the same database.

The calls a waiting producer makes once per job: ``qbgw.submit`` (no idempotency key: one statement on the
hot path), ``qbgw.job_status``, ``qbgw.queries.job_metadata`` (what ``GET /v1/jobs/{id}`` reads) and
``qbgw.get_job`` of a finished job (the audited read: its ``result.read`` event is sealed before the answer is
returned). One thread, one call at a time, ``--calls`` (500) of each per rep, the two paths alternating by rep;
medians over reps of each rep's median. A scratch PostgreSQL database and a private Redis, dropped afterwards
(``bench.throughput``'s).

    .venv/bin/python -m bench.reads              # 3 reps, ~1 min
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import qbgw
from bench.throughput import ASSISTANT, Config, bench_environment
from qbgw.execution.tasks import Outcome, run_attempt
from qbgw.queries import job_metadata, job_status
from qbgw.runtime import locator
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings
from qbgw.store import hotpath

PATHS = ("hot path", "store (Session)")
CALLS = ("submit", "job_status", "job_metadata", "get_job (audited)")


def _message(n: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"reads bench {n}"}]


def _timed(action: Callable[[], object], times: int) -> float:
    """The median of ``times`` runs of ``action``, in ms."""
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return 1000 * statistics.median(samples)


def _one_rep(settings: Settings, calls: int) -> dict[str, float]:
    rt = runtime(settings)
    done = [qbgw.submit(ASSISTANT, _message(n), settings=settings) for n in range(calls)]
    for job_id in done:  # finished jobs to read: the attempt runs here, through the same path
        if run_attempt(rt, job_id) is not Outcome.SUCCEEDED:
            raise RuntimeError(f"job {job_id} did not succeed")
    counter = iter(range(10**9))
    found = {"submit": _timed(lambda: qbgw.submit(ASSISTANT, _message(next(counter)), settings=settings), calls)}
    ids = iter(done * 3)
    found["job_status"] = _timed(lambda: job_status(next(ids), settings=settings), calls)
    found["job_metadata"] = _timed(lambda: job_metadata(next(ids), settings=settings), calls)
    found["get_job (audited)"] = _timed(lambda: qbgw.get_job(next(ids), settings=settings), calls)
    return found


def run(calls: int, reps: int, say: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    config = Config(jobs=calls, latency=0.0, reps=reps, sequential=calls, timeout=600)
    results: dict[str, dict[str, list[float]]] = {path: {call: [] for call in CALLS} for path in PATHS}
    with bench_environment(config, say, "qbgw-reads-bench-") as bench:
        settings = bench.settings
        qbgw.submit(ASSISTANT, _message(-1), settings=settings)  # migrate, pools, keys: untimed
        original = hotpath.hot_path_for
        for rep in range(reps):
            for path in PATHS if rep % 2 == 0 else PATHS[::-1]:
                locator.reset()
                hotpath.hot_path_for = original if path == PATHS[0] else (lambda *_args: None)  # type: ignore[assignment]
                try:
                    if (runtime(settings).hot_path is not None) != (path == PATHS[0]):
                        raise RuntimeError(f"{path}: the runtime did not take that path")
                    found = _one_rep(settings, calls)
                finally:
                    hotpath.hot_path_for = original
                    locator.reset()
                for call, ms in found.items():
                    results[path][call].append(ms)
                say(f"  rep {rep + 1} {path}: " + ", ".join(f"{c} {ms:.2f} ms" for c, ms in found.items()))
    return {path: {call: statistics.median(v) for call, v in per.items()} for path, per in results.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500, help="calls of each kind per rep (default 500)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions, the paths alternating (default 3)")
    args = parser.parse_args(argv)
    medians = run(args.calls, args.reps)
    hot, store = medians[PATHS[0]], medians[PATHS[1]]
    print()
    print(f"{'call, one at a time (median ms)':34} | {'hot path':>8} | {'store (Session), same run':>25} | ratio")
    for call in CALLS:
        print(f"{call:34} | {hot[call]:8.2f} | {store[call]:25.2f} | {hot[call] / store[call]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
