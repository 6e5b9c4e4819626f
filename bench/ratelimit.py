"""The fleet rate limit at the QuickBlox HIPAA plan's 160 calls/s: achieved rate and worst one-second window.

    python -m bench.ratelimit                      # both parts, 60 s each (PostgreSQL + Redis on localhost)
    python -m bench.ratelimit --seconds 20 --parts limiter

Two parts, each printed beside the limit it must hold:

- ``limiter``: the limiter alone, as the workers use it (one Redis script per call, then the call), from
  ``--processes`` processes x ``--threads`` threads that each call the emulator as fast as they are let,
  for ``--seconds``: far more offered than the limit, so the limit is what shapes the traffic.
- ``pipeline``: ``--processes`` real ``qbgw worker`` processes (PostgreSQL + Redis) given enough jobs for
  ``--seconds`` at the limit: the whole path (claim, audit, encryption, the call), shaped by the limit
  unless the machine cannot keep up (then the table says so: the rate is the machine's, not the limit's).

The emulator records every call's arrival time; the worst window is the most arrivals in any one-second
window that starts at an arrival. The limit holds if it is at most limit + burst.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text

from qbgw import producer
from qbgw.emulator.server import Emulator, EmulatorConfig
from qbgw.queries import job_status
from qbgw.settings import Secret, Settings
from qbgw.store import schema

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("QBGW_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("QBGW_BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
TOKEN, ASSISTANT = "bench-token", "65d5f3473d5d68095462165d"
KEYS = "kbench:" + "B" * 43 + "="

_MEMBER = """
import json, sys, threading, time
import requests
from qbgw.upstream.ratelimit import Budget, RedisLimiter, take_slot
url, redis_url, scope = sys.argv[1:4]
rate, burst, until, threads = float(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
limiter = RedisLimiter(redis_url, scope)
budget = [Budget("global", rate, burst)]
waits, sent = [], []
def run():
    session = requests.Session()
    body = json.dumps({"smart_chat_assistant_id": "65d5f3473d5d68095462165d",
                       "messages": [{"role": "user", "content": "hi"}]})
    while time.time() < until:
        grant = take_slot(limiter, budget, give_up=1e9)
        waits.append(grant.wait)
        sent.append(time.time())
        session.post(url + "/ai/ai_extensions/ai_gateway", data=body,
                     headers={"QB-Token": "bench-token", "Content-Type": "application/json"})
workers = [threading.Thread(target=run) for _ in range(threads)]
[w.start() for w in workers]
[w.join() for w in workers]
print(json.dumps({"calls": len(waits), "median_wait": sorted(waits)[len(waits) // 2], "sent": sent}))
"""


def worst_window(times: list[float]) -> int:
    times, worst, j = sorted(times), 0, 0
    for i, start in enumerate(times):
        j = max(j, i)
        while j < len(times) and times[j] < start + 1.0:
            j += 1
        worst = max(worst, j - i)
    return worst


def rate_of(times: list[float], trim: float = 1.0) -> float:
    """Calls per second over the run, leaving out its first and last ``trim`` seconds (start and end)."""
    times = sorted(times)
    inner = [t for t in times if times[0] + trim <= t <= times[-1] - trim]
    return (len(inner) - 1) / (inner[-1] - inner[0]) if len(inner) > 1 else 0.0


def limiter_part(args: argparse.Namespace, emu: Emulator) -> dict[str, object]:
    emu.reset()
    scope, until = uuid.uuid4().hex, time.time() + 2.0 + args.seconds
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _MEMBER,
                emu.url,
                REDIS,
                scope,
                str(args.limit),
                str(args.burst),
                repr(until),
                str(args.threads),
            ],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        for _ in range(args.processes)
    ]
    reports = [json.loads(p.communicate(timeout=args.seconds + 60)[0]) for p in procs]
    arrivals = emu.arrivals()
    sent = [t for r in reports for t in r["sent"]]
    return {
        "part": "limiter alone",
        "calls": len(arrivals),
        "rate": rate_of(arrivals),
        "worst": worst_window(arrivals),
        "429s": emu.stats()["by_status"].get("429", 0),
        "note": f"{args.processes} processes x {args.threads} threads; median wait for a slot "
        f"{statistics.median(r['median_wait'] for r in reports) * 1000:.0f} ms; worst window "
        f"of send times {worst_window(sent)} (as the callers' clocks saw them)",
    }


def pipeline_part(args: argparse.Namespace, emu: Emulator, data_dir: Path) -> dict[str, object]:
    emu.reset()
    name = f"qbgw_bench_rl_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    settings = Settings(
        data_dir=data_dir,
        database_url=url,
        broker_url=REDIS,
        base_url=emu.url,
        token=Secret(TOKEN),
        encryption_keys=Secret(KEYS),
        queue=f"bench-rl-{uuid.uuid4().hex[:6]}",
        rate_limit=args.limit,
        rate_burst=args.burst,
        rate_scope=uuid.uuid4().hex,
        concurrency=args.threads,
        sweep_interval=5.0,
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        schema.upgrade(url)
        env = {**os.environ, **settings.to_env()}
        for i in range(args.processes):
            with open(data_dir / f"worker-{i}.log", "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "qbgw", "worker", "--loglevel", "WARNING"],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=ROOT,
                    )
                )
        jobs = int(args.limit * args.seconds)
        ids = [
            producer.submit(ASSISTANT, [{"role": "user", "content": f"job {i}"}], settings=settings)
            for i in range(jobs)
        ]
        deadline = time.monotonic() + args.seconds * 4 + 60
        while time.monotonic() < deadline and str(job_status(ids[-1], settings=settings)) != "succeeded":
            time.sleep(0.5)
        while time.monotonic() < deadline and len(emu.arrivals()) < jobs:
            time.sleep(0.5)
        arrivals = emu.arrivals()
        busy = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or 0)
        return {
            "part": "qbgw pipeline",
            "calls": len(arrivals),
            "rate": rate_of(arrivals),
            "worst": worst_window(arrivals),
            "429s": emu.stats()["by_status"].get("429", 0),
            "note": f"{args.processes} workers x {args.threads} threads, {jobs} jobs, {busy} CPUs",
        }
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
        from qbgw.runtime import context as runtime

        runtime.reset()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=float, default=160.0, help="calls per second (default: the HIPAA plan's)")
    parser.add_argument("--burst", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.05, help="the emulator's answer time (seconds)")
    parser.add_argument("--parts", default="limiter,pipeline")
    args = parser.parse_args()
    rows = []
    config = EmulatorConfig(tokens=frozenset({TOKEN}), latency=args.latency)
    with Emulator(config) as emu, tempfile.TemporaryDirectory(prefix="qbgw-bench-rl-") as tmp:
        if "limiter" in args.parts:
            rows.append(limiter_part(args, emu))
        if "pipeline" in args.parts:
            rows.append(pipeline_part(args, emu, Path(tmp)))
    bound = args.limit + args.burst
    print(f"\nlimit {args.limit:g}/s, burst {args.burst}: no one-second window may hold more than {bound:g} calls")
    print(f"{'part':<16}{'calls':>8}{'rate/s':>9}{'worst 1 s':>11}{'bound':>7}{'429s':>6}  held   notes")
    for row in rows:
        held = "yes" if int(row["worst"]) <= bound else "NO"  # type: ignore[call-overload]
        print(
            f"{row['part']:<16}{row['calls']:>8}{row['rate']:>9.1f}{row['worst']:>11}{bound:>7g}{row['429s']:>6}"
            f"  {held:<6} {row['note']}"
        )


if __name__ == "__main__":
    main()
