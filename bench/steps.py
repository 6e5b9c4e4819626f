"""A job's four database steps on PostgreSQL, each timed alone, beside the audited minimal task's four statements.

Where a job's submit-to-result time goes on the database's side, without the broker's and the gateway's: on a
scratch PostgreSQL database and a private ``redis-server``, ``--jobs`` jobs one at a time, each through

* ``submit()``: the job's row and its ``job.submitted`` event in one statement, then its message published;
* the claim, as a worker claims (``qbgw.execution.tasks``: the hot path on PostgreSQL), with its request event;
* a success (``HotPath.succeed``: the answer and the ``attempt.response`` and ``job.succeeded`` events);
* an audited read (``qbgw.get_job`` with a reader: the job and its ``result.read`` event),

and, interleaved job by job, the audited minimal task's four statements (``bench.minimal_app``: each one
round trip in autocommit, a hash-chained event each, no encryption, no publish). Medians of each rep, and the
median of those::

    .venv/bin/python -m bench.steps                 # 3 reps of 700 jobs, about a minute
    .venv/bin/python -m bench.steps --jobs 200 --reps 1
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable

import psycopg

import qbgw
from bench import minimal_app
from bench.throughput import ASSISTANT, Config, bench_environment
from qbgw.audit import events as audit
from qbgw.execution import tasks
from qbgw.lifecycle import utcnow
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings

STEPS = ("submit", "claim", "success", "read")
WARM = 100


def qbgw_job(settings: Settings, n: int) -> dict[str, float]:
    """One job through the four steps (no broker consumer, no gateway call: the answer is made up)."""
    rt = runtime(settings)
    hot = rt.hot_path
    if hot is None:
        raise RuntimeError("the bench needs PostgreSQL's hot path")
    times, started = {}, time.perf_counter()
    job_id = qbgw.submit(ASSISTANT, [{"role": "user", "content": f"step {n}"}], settings=settings)
    times["submit"], started = time.perf_counter() - started, time.perf_counter()
    claimed = tasks._claim(rt, job_id)
    times["claim"], started = time.perf_counter() - started, time.perf_counter()
    if claimed is None:
        raise RuntimeError(f"job {job_id} was not claimed")
    claim, _ = claimed
    response = audit.event(
        action=audit.Action.ATTEMPT_RESPONSE,
        job_id=job_id,
        actor=rt.identity,
        attempt=claim.attempt,
        outcome="succeeded",
        http_status=200,
        latency_ms=1,
        response=("0" * 64, 32),
    )
    if not hot.succeed(claim=claim, worker=rt.identity, answer="an answer", response_event=response, now=utcnow()):
        raise RuntimeError(f"job {job_id}: the success missed")
    times["success"], started = time.perf_counter() - started, time.perf_counter()
    if qbgw.get_job(job_id, reader="bench", settings=settings).answer is None:
        raise RuntimeError(f"job {job_id}: no answer read")
    times["read"] = time.perf_counter() - started
    return times


def floor_job(connection: psycopg.Connection[object], n: int) -> dict[str, float]:
    """The audited minimal task's four statements for one job."""
    row = f"steps-{uuid.uuid4().hex}"
    statements: list[tuple[str, Callable[[], object]]] = [
        ("submit", lambda: minimal_app.submit_audited(connection, row, f"step {n}")),
        ("claim", lambda: connection.execute(minimal_app._CLAIM, {"id": row, "event": f"request {row}"}).fetchone()),
        (
            "success",
            lambda: connection.execute(
                minimal_app._FINISH, {"id": row, "answer": "an answer", "done_at": time.time(), "event": f"r {row}"}
            ),
        ),
        ("read", lambda: minimal_app.read_audited(connection, row)),
    ]
    times = {}
    for name, statement in statements:
        started = time.perf_counter()
        statement()
        times[name] = time.perf_counter() - started
    return times


def run(jobs: int, reps: int) -> None:
    with bench_environment(Config(), print, "qbgw-steps-") as bench:
        settings = bench.settings
        found: dict[str, dict[str, list[float]]] = {way: {s: [] for s in STEPS} for way in ("qbgw", "floor")}
        with minimal_app.connect(bench.database_url) as connection:
            for n in range(WARM):
                qbgw_job(settings, n)
                floor_job(connection, n)
            for rep in range(1, reps + 1):
                samples: dict[str, dict[str, list[float]]] = {way: {s: [] for s in STEPS} for way in found}
                for n in range(jobs):
                    for way, times in (("qbgw", qbgw_job(settings, n)), ("floor", floor_job(connection, n))):
                        for step in STEPS:
                            samples[way][step].append(times[step])
                for way in found:
                    for step in STEPS:
                        found[way][step].append(statistics.median(samples[way][step]))
                line = ", ".join(
                    f"{s} {1000 * found['qbgw'][s][-1]:.3f}/{1000 * found['floor'][s][-1]:.3f}" for s in STEPS
                )
                print(f"  rep {rep} qbgw/floor median ms: {line}")
        print(f"\nstep     | qbgw ms | audited minimal task ms | ratio   ({jobs} jobs x {reps} reps, medians)")
        total = {way: 0.0 for way in found}
        for step in STEPS:
            ms = {way: 1000 * statistics.median(found[way][step]) for way in found}
            for way in found:
                total[way] += ms[way]
            print(f"{step:8} | {ms['qbgw']:7.3f} | {ms['floor']:23.3f} | {ms['qbgw'] / ms['floor']:.2f}x")
        print(f"{'sum':8} | {total['qbgw']:7.3f} | {total['floor']:23.3f} | {total['qbgw'] / total['floor']:.2f}x")
        print("(qbgw's submit also publishes to Redis; the floor's publish is not in its statement)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=700, help="jobs per rep, each way (default 700)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    run(args.jobs, args.reps)


if __name__ == "__main__":
    main()
