"""Resident memory of one qbgw worker after 100 jobs and after 10,000: no leak.

One ``qbgw worker`` process (threads, 32) on PostgreSQL (a scratch database) and a private Redis, the
gateway emulator answering at once. Jobs are submitted from ``--producers`` threads while the worker
runs; after each checkpoint (100, 1,000, 2,500, 5,000, 10,000 finished jobs by default) the worker's
VmRSS (its own and its children's, from /proc/PID/status) is read. Printed: each checkpoint's RSS, the
growth from the 100-job checkpoint, and growth per 1,000 jobs over the second half (where a leak shows:
the first thousands fill pools and caches). ``--embedded`` runs the same on the embedded default.

    .venv/bin/python -m bench.memory                     # ~3 min
    .venv/bin/python -m bench.memory --embedded
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.chaos import PrivateRedis
from bench.throughput import (
    ASSISTANT,
    TOKEN,
    Bench,
    Config,
    _counts,
    _submit,
    _warm_pipeline,
    bench_settings,
    qbgw_workers,
    rss_bytes,
    scratch_database,
    wait_until,
)
from qbgw.emulator.server import Emulator, EmulatorConfig
from qbgw.settings import Settings

CHECKPOINTS = (100, 1000, 2500, 5000, 10_000)


def measure(bench: Bench, settings: Settings, checkpoints: Sequence[int], producers: int) -> list[tuple[int, int]]:
    """(jobs finished, worker RSS bytes) at each checkpoint."""
    tag, points, done_so_far = f"mem-{uuid.uuid4().hex[:8]}", [], 0
    with qbgw_workers(bench, settings) as fleet, ThreadPoolExecutor(producers) as pool:
        _warm_pipeline(settings, fleet, 120)
        pid = fleet.procs[0].pid
        bench.say(f"  after warm-up ({settings.concurrency} jobs): RSS {rss_bytes(pid) / 2**20:.1f} MiB")
        for target in checkpoints:
            list(pool.map(lambda n: _submit(settings, tag, n), range(done_so_far, target)))
            done_so_far = target

            def finished(target: int = target) -> bool:
                fleet.check_alive()
                return _counts(settings, tag)[0] >= target

            wait_until(finished, bench.config.timeout, f"{target} jobs", poll=0.5)
            time.sleep(1.0)  # let the last jobs' threads go idle
            terminal, succeeded = _counts(settings, tag)
            rss = rss_bytes(pid)
            points.append((target, rss))
            bench.say(f"  {target:6} jobs finished ({succeeded} succeeded): RSS {rss / 2**20:.1f} MiB")
            if succeeded != terminal:
                raise RuntimeError(f"{terminal - succeeded} jobs did not succeed")
    return points


def report(points: Sequence[tuple[int, int]]) -> list[str]:
    first_n, first = points[0]
    last_n, last = points[-1]
    lines = [
        f"RSS after {first_n} jobs: {first / 2**20:.1f} MiB; after {last_n}: {last / 2**20:.1f} MiB; "
        f"ratio {last / first:.2f} ({(last - first) / 2**20:+.1f} MiB)"
    ]
    mid = [p for p in points if p[0] >= last_n // 2]
    if len(mid) >= 2 and mid[-1][0] > mid[0][0]:
        per = (mid[-1][1] - mid[0][1]) / (mid[-1][0] - mid[0][0]) * 1000 / 1024
        lines.append(f"growth from {mid[0][0]} to {mid[-1][0]} jobs: {per:+.1f} KiB per 1,000 jobs")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", default=",".join(map(str, CHECKPOINTS)))
    parser.add_argument("--producers", type=int, default=6)
    parser.add_argument("--embedded", action="store_true", help="the embedded default (SQLite + fs broker)")
    args = parser.parse_args(argv)
    checkpoints = [int(n) for n in args.checkpoints.split(",")]
    config, say = Config(latency=0.0, timeout=900.0), (lambda line: print(line, flush=True))
    folder = Path(tempfile.mkdtemp(prefix="qbgw-memory-"))
    emulator_config = EmulatorConfig(tokens=frozenset({TOKEN}), assistants=frozenset({ASSISTANT}), latency=0.0)
    started = time.monotonic()
    with Emulator(emulator_config) as emu:
        if args.embedded:
            settings = bench_settings(config, emu.url, folder / "data")
            bench = Bench(config, emu, "", "", folder, None, say, settings)  # type: ignore[arg-type]
            say("one worker, threads -c 32, embedded default (SQLite + fs broker), upstream answering at once")
            points = measure(bench, settings, checkpoints, args.producers)
        else:
            private = PrivateRedis(folder)
            private.start()
            try:
                with scratch_database() as database_url:
                    settings = bench_settings(config, emu.url, folder / "data", database_url, private.url)
                    bench = Bench(config, emu, private.url, database_url, folder, None, say, settings)  # type: ignore[arg-type]
                    say("one worker, threads -c 32, PostgreSQL + Redis, upstream answering at once")
                    points = measure(bench, settings, checkpoints, args.producers)
            finally:
                private.kill()
    print()
    print("\n".join(report(points)))
    print(f"whole run {time.monotonic() - started:.0f}s (a shared 2-CPU machine)")


if __name__ == "__main__":
    main()
