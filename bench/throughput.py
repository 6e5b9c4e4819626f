"""Throughput and cost per job of qbgw's pipeline, each figure beside anchors measured in the same run.

On PostgreSQL (a scratch database, dropped afterwards) and a private ``redis-server`` on a free port,
against the gateway emulator (``worker.emulator``) in this process:

1. **throughput against a slow upstream** (the emulator answers in ``--latency`` s, default 0.2): one
   ``qbgw worker`` process (threads, ``--concurrency`` 32) first runs one warm-up job per thread. Then
   ``--jobs`` jobs (2000) are submitted with ``worker.submit`` from ``--producers`` threads while the worker's
   consumer is cancelled (Celery remote control), and the worker is timed from ``add_consumer`` to the last
   job's own ``finished_at``: the worker draining a backlog. Beside it: the ideal (concurrency / latency),
   raw ``requests`` POSTs from a ThreadPoolExecutor(concurrency), one Session per thread, and a minimal
   hand-written Celery task (``bench.minimal_app``: one POST + one INSERT, threads pool, ``acks_late``,
   prefetch 1, no results) on the same broker and database, timed the same way. Target: the pipeline >= 95%
   of the minimal task. A second pipeline burst ("live") submits while the worker runs and is timed from the
   first submission: the producer is then in the loop, and its submit() rate is printed too.
2. **cost per job**: worker CPU (user + sys of every worker process, from ``/proc/PID/stat``) over the timed
   part, per job, beside the minimal task's (target <= 2x); and, with the emulator answering at once,
   submit-to-result time of ``--sequential`` (200) one-at-a-time jobs (polling ``job_status`` every 2 ms),
   beside the same for the minimal task, an INSERT-only task and a bare Celery no-op (a task that SETs a
   Redis key, polled).
3. scaling: the throughput run with each of ``--workers`` (default 2; ``--workers 1,2,4``) worker processes
   (anchors: the ideal, raw requests with as many threads, the minimal task on as many processes), and on
   the embedded default (SQLite + filesystem broker, ``Settings(data_dir=...)`` only) with 1 and the same
   counts of processes.

Worker CPU and memory count each worker process and its live descendants (a prefork pool's children).
``--pool`` runs the qbgw workers with another Celery pool (``bench.pools`` compares them).

During each burst the machine's CPU use and PostgreSQL's sessions (running, waiting on a lock) are sampled.
Bursts are repeated ``--reps`` times, interleaved; the table shows medians. ``--profile FILE`` adds one
pipeline burst under ``py-spy record`` (``pip install py-spy``; raw collapsed stacks in FILE) and prints
where the worker's samples fall (``--profile-mode gil``: the GIL holder, i.e. Python CPU; ``wall``: every
thread, waiting ones too). ``--worker-switch-interval MS`` is a what-if: the same workers with another GIL
switch interval.

    .venv/bin/python -m bench.throughput                          # everything: 2000 jobs x 3 reps, ~9 min
    .venv/bin/python -m bench.throughput --jobs 500 --reps 1      # a quick run, ~2 min
    .venv/bin/python -m bench.throughput --parts multi,embedded --workers 1,2,4   # scaling
    .venv/bin/python -m bench.throughput --parts "" --jobs 3000 --profile /tmp/worker.txt   # profile only
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests
from sqlalchemy import Engine, create_engine, func, select, text

from bench import chaos, minimal_app
from bench.chaos import PrivateRedis
from qbgw import producer
from qbgw.emulator.server import GATEWAY_PATH, Emulator, EmulatorConfig
from qbgw.lifecycle import TERMINAL, JobStatus
from qbgw.queries import job_status
from qbgw.runtime.locator import runtime
from qbgw.settings import Secret, Settings
from qbgw.store.models import Job

ASSISTANT = "65d5f3473d5d68095462165d"
TOKEN = "bench-token"
MINIMAL_QUEUE = "bench-minimal"
PARTS = ("throughput", "latency", "multi", "embedded")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent
Say = Callable[[str], None]


@dataclass
class Config:
    jobs: int = 2000
    concurrency: int = 32
    latency: float = 0.2
    reps: int = 3
    producers: int = 4
    sequential: int = 200
    #: Worker process counts for part 3 ("multi" on PostgreSQL + Redis, "embedded" on the default).
    workers: tuple[int, ...] = (2,)
    #: The qbgw workers' pool (threads, prefork, gevent, solo).
    pool: str = "threads"
    parts: tuple[str, ...] = PARTS
    profile: Path | None = None
    profile_seconds: float = 20.0
    #: "gil": samples of the thread holding the GIL (where Python CPU goes); "wall": every thread, idle too.
    profile_mode: str = "gil"
    #: What-if: the qbgw workers' GIL switch interval in ms (None: Python's default, 5 ms).
    switch_interval: float | None = None
    timeout: float = 600.0

    @property
    def ideal(self) -> float:
        return self.concurrency / self.latency


@dataclass
class Burst:
    """One timed burst: ``jobs`` done in ``seconds``, costing the worker processes ``cpu`` seconds."""

    jobs: int
    seconds: float
    cpu: float = 0.0
    submit_seconds: float = 0.0
    failed: int = 0
    #: What else was seen during the timed part: the machine's CPU use, the database's sessions.
    notes: str = ""

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu / self.jobs

    def line(self) -> str:
        cost = f", worker CPU {self.cpu_ms:.2f} ms/job" if self.cpu else ""
        submit = f", submitted in {self.submit_seconds:.1f}s" if self.submit_seconds else ""
        failed = f", {self.failed} NOT SUCCEEDED" if self.failed else ""
        notes = f"\n      ({self.notes})" if self.notes else ""
        return f"{self.jobs} in {self.seconds:.2f}s = {self.rate:.1f}/s{cost}{submit}{failed}{notes}"


@dataclass
class Results:
    bursts: dict[str, list[Burst]] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, burst: Burst) -> None:
        self.bursts.setdefault(name, []).append(burst)

    def rate(self, name: str) -> float | None:
        runs = self.bursts.get(name)
        return statistics.median(b.rate for b in runs) if runs else None

    def cpu_ms(self, name: str) -> float | None:
        runs = [b for b in self.bursts.get(name, []) if b.cpu]
        return statistics.median(b.cpu_ms for b in runs) if runs else None

    def publish_rate(self, name: str) -> float | None:
        runs = [b for b in self.bursts.get(name, []) if b.submit_seconds]
        return statistics.median(b.jobs / b.submit_seconds for b in runs) if runs else None


@dataclass
class Bench:
    """What every measurement shares: the emulator, the private Redis, the scratch database."""

    config: Config
    emu: Emulator
    redis_url: str
    database_url: str
    folder: Path
    engine: Engine
    say: Say
    #: qbgw's settings on PostgreSQL + Redis (made once: its random encryption key must not change).
    settings: Settings


def bench_settings(
    config: Config, emulator_url: str, data_dir: Path, database_url: str = "", broker_url: str = ""
) -> Settings:
    """qbgw's settings for the bench; without URLs, the embedded default in ``data_dir``."""
    keys = Secret("kb:" + base64.b64encode(os.urandom(32)).decode()) if database_url else Secret("")
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        broker_url=broker_url,
        base_url=emulator_url,
        token=Secret(TOKEN),
        queue="qbgw-bench",
        encryption_keys=keys,
        concurrency=config.concurrency,
    )


# --- processes -------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (field 3 onwards: state, ppid, ...)."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (a prefork pool's children, say)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat(int(entry))[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):  # the process ended while we looked
                continue
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], ()))
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU so far of process ``pid`` (all its threads) and its live descendants."""
    total = 0.0
    for member in process_tree(pid):
        try:
            fields = _stat(member)
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15
    return total


def rss_bytes(pid: int) -> int:
    """Resident memory (VmRSS) of process ``pid`` and its live descendants."""
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status", encoding="ascii", errors="replace") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class Workers:
    """``count`` worker processes running ``argv``, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, count: int = 1) -> None:
        self.argv, self.env, self.log, self.count = argv, {**os.environ, **env}, log, count
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Workers:
        with open(self.log, "ab") as log:
            for n in range(self.count):
                argv = [a.replace("{n}", str(n)) for a in self.argv]
                self.procs.append(subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        return self

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a worker exited with {proc.returncode}; see {self.log}")

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


#: PostgreSQL connections the qbgw workers of one burst may hold in all (of its max_connections, 100 by
#: default; the bench's own engines and the anchors' workers take the rest).
PG_CONNECTION_BUDGET = 80


def qbgw_workers(bench: Bench, settings: Settings, count: int = 1) -> Workers:
    if settings.database_url and not settings.db_pool_size and settings.pool == "threads":
        # Each process pools a connection per thread (+4 overflow): 4 x 32 would exceed max_connections.
        per_process = min(settings.concurrency, PG_CONNECTION_BUDGET // count - 4)
        if per_process < settings.concurrency:
            settings = settings.with_(db_pool_size=per_process)
    argv = [
        sys.executable,
        "-m",
        "qbgw",
        "worker",
        "--concurrency",
        str(settings.concurrency),
        "--pool",
        settings.pool,
        "--loglevel",
        "WARNING",
    ]
    if bench.config.switch_interval is not None:  # a what-if: the same worker, another GIL switch interval
        start = f"import runpy, sys; sys.setswitchinterval({bench.config.switch_interval / 1000!r}); "
        argv[1:3] = ["-c", start + "runpy.run_module('worker', run_name='__main__')"]
    return Workers(argv, settings.to_env(), bench.folder / "qbgw-workers.log", count)


def minimal_workers(bench: Bench, count: int = 1) -> Workers:
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench.minimal_app",
        "worker",
        "--pool",
        "threads",
        "-c",
        str(bench.config.concurrency),
        "--loglevel",
        "WARNING",
        "-Q",
        MINIMAL_QUEUE,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        f"--hostname=minimal-{{n}}-{uuid.uuid4().hex[:6]}@%h",
    ]
    env = {
        "BENCH_MIN_BROKER_URL": bench.redis_url,
        "BENCH_MIN_DATABASE_URL": bench.database_url,
        "BENCH_MIN_GATEWAY_URL": bench.emu.url,
        "BENCH_MIN_TOKEN": TOKEN,
        "BENCH_MIN_ASSISTANT": ASSISTANT,
        "BENCH_MIN_QUEUE": MINIMAL_QUEUE,
    }
    return Workers(argv, env, bench.folder / "minimal-workers.log", count)


def wait_until(done: Callable[[], bool], timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout:g}s")
        time.sleep(poll)


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / CLOCK_TICKS, sum(ticks) / CLOCK_TICKS


class DbSampler:
    """Samples pg_stat_activity every 50 ms in a thread: how many of the database's sessions are
    running a statement, and how many of those wait on a lock (the audit chain head, for one)."""

    QUERY = text(
        "SELECT count(*) FILTER (WHERE state = 'active'), count(*) FILTER (WHERE wait_event_type = 'Lock'), "
        "count(*) FILTER (WHERE state = 'idle in transaction') FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )

    def __init__(self, engine: Engine | None) -> None:
        self.engine, self.samples, self.note = engine, [(0, 0, 0)], ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="db-sampler", daemon=True)
        self._cpu = machine_cpu()

    def _run(self) -> None:
        assert self.engine is not None
        self.samples = []
        with self.engine.connect() as connection:
            while not self._stop.wait(0.05):
                active, locked, idle = connection.execute(self.QUERY).one()
                self.samples.append((int(active), int(locked), int(idle)))
                connection.commit()

    def __enter__(self) -> DbSampler:
        self._cpu = machine_cpu()
        if self.engine is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        busy, total = (after - before for after, before in zip(machine_cpu(), self._cpu, strict=True))
        cores = os.cpu_count() or 1
        self.note = f"machine CPU {100 * busy / total:.0f}% busy of {cores} cores"
        if self.engine is not None and self.samples:
            mean = [statistics.fmean(column) for column in zip(*self.samples, strict=True)]
            self.note += (
                f"; db sessions: {mean[0]:.1f} running a statement, {mean[1]:.1f} of them waiting on a"
                f" lock, {mean[2]:.1f} idle in transaction"
            )


# --- the pipeline ----------------------------------------------------------------------------------


def _message(content: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


def _submit(settings: Settings, tag: str, n: int) -> str:
    return producer.submit(ASSISTANT, _message(f"throughput job {n}"), custom_id=f"{tag}:{n}", settings=settings)


def _counts(settings: Settings, tag: str) -> tuple[int, int]:
    """(terminal, succeeded) jobs of burst ``tag``."""
    like = Job.custom_id.like(f"{tag}:%")
    with runtime(settings).transaction() as session:
        rows = session.execute(select(Job.status, func.count()).where(like).group_by(Job.status)).all()
    by_status = {status: int(n) for status, n in rows}
    return sum(n for s, n in by_status.items() if s in TERMINAL), by_status.get(JobStatus.SUCCEEDED, 0)


def _last_finished(settings: Settings, tag: str) -> float:
    with runtime(settings).transaction() as session:
        last = session.scalar(select(func.max(Job.finished_at)).where(Job.custom_id.like(f"{tag}:%")))
    assert last is not None
    return last.timestamp()


def _warm_pipeline(settings: Settings, fleet: Workers, timeout: float) -> None:
    """One job per worker thread, run to the end: the workers are up, their pools connected."""
    tag, count = f"warm-{uuid.uuid4().hex[:8]}", settings.concurrency * fleet.count
    for n in range(count):
        _submit(settings, tag, n)

    def done() -> bool:
        fleet.check_alive()
        return _counts(settings, tag)[0] >= count

    wait_until(done, timeout, "warm-up job")


def _pause(app: Any, queue: str, workers: int) -> None:
    """The workers stop taking messages from ``queue`` (Celery remote control); raises unless all answered."""
    replies = app.control.cancel_consumer(queue, reply=True, timeout=10, limit=workers)
    if len(replies or ()) < workers:
        raise RuntimeError(f"only {len(replies or ())} of {workers} workers answered cancel_consumer")


def _resume(app: Any, queue: str, workers: int) -> None:
    replies = app.control.add_consumer(queue, reply=True, timeout=10, limit=workers)
    if len(replies or ()) < workers:
        raise RuntimeError(f"only {len(replies or ())} of {workers} workers answered add_consumer")


@dataclass
class Plan:
    """How one burst is run: the fleet, how to publish all and to count the finished, where its queue is."""

    fleet: Workers
    warm: Callable[[Workers], None]
    publish_all: Callable[[], None]
    finished: Callable[[], int]
    app: Any
    queue: str
    #: The database to sample during the burst (None: not PostgreSQL).
    engine: Engine | None = None
    #: Other queues the workers consume (qbgw's batch queue): paused with ``queue`` and resumed after it. Left
    #: running, a worker waits on them in a blocking read (1 s on Redis) that the resumed queue only joins at
    #: its next round: up to a second of idle time inside the timed burst that no real backlog would see.
    idle_queues: tuple[str, ...] = ()


def timed_burst(
    plan: Plan,
    config: Config,
    *,
    live: bool,
    on_start: Callable[[Workers], Any] | None = None,
    on_end: Callable[[Workers], Any] | None = None,
) -> tuple[float, Burst]:
    """Live: publish while the workers run, timed from the first publication. Otherwise (a drain): publish
    with the workers' consumers cancelled, then time from their resumption. Waits until all are finished;
    returns the start (time.time()) and the burst, whose ``seconds`` the caller sets from the last
    task's own finishing time (polling only detects the end)."""
    with plan.fleet as fleet:
        plan.warm(fleet)
        if not live:
            for queue in (plan.queue, *plan.idle_queues):
                _pause(plan.app, queue, fleet.count)
            submitted = _timed(plan.publish_all)
        if on_start is not None:
            on_start(fleet)

        def done() -> bool:
            fleet.check_alive()
            return plan.finished() >= config.jobs

        with DbSampler(plan.engine) as sampler:
            cpu0, start = fleet.cpu(), time.time()
            if live:
                submitted = _timed(plan.publish_all)
            else:
                for queue in (plan.queue, *plan.idle_queues):  # the burst's queue first
                    _resume(plan.app, queue, fleet.count)
            wait_until(done, config.timeout, "burst")
            cpu = fleet.cpu() - cpu0
        if on_end is not None:
            on_end(fleet)
    return start, Burst(config.jobs, 0.0, cpu, submitted, notes=sampler.note)


def _timed(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def pipeline_burst(
    bench: Bench,
    settings: Settings,
    workers: int = 1,
    *,
    live: bool = False,
    on_start: Callable[[Workers], Any] | None = None,
    on_end: Callable[[Workers], Any] | None = None,
) -> Burst:
    """``--jobs`` jobs through ``workers`` qbgw worker processes (see ``timed_burst``)."""
    config, tag = bench.config, f"burst-{uuid.uuid4().hex[:8]}"

    def publish_all() -> None:
        with ThreadPoolExecutor(config.producers) as pool:
            list(pool.map(lambda n: _submit(settings, tag, n), range(config.jobs)))

    plan = Plan(
        qbgw_workers(bench, settings, workers),
        lambda fleet: _warm_pipeline(settings, fleet, 120),
        publish_all,
        lambda: _counts(settings, tag)[0],
        runtime(settings).celery,
        settings.queue,
        bench.engine if settings.database_url else None,
        idle_queues=(settings.effective_batch_queue,),
    )
    start, burst = timed_burst(plan, config, live=live, on_start=on_start, on_end=on_end)
    burst.seconds = _last_finished(settings, tag) - start
    burst.failed = config.jobs - _counts(settings, tag)[1]
    with runtime(settings).transaction() as session:
        where = Job.custom_id.like(f"{tag}:%"), Job.attempts > 1
        retried = session.scalar(select(func.count()).select_from(Job).where(*where))
    if retried:
        burst.notes += f"; {retried} jobs needed more than one attempt"
    return burst


def pipeline_latencies(bench: Bench) -> dict[str, list[float]]:
    """Submit-to-terminal seconds of ``--sequential`` jobs, one at a time, polling every 2 ms (and how
    long the ``submit()`` call itself took)."""
    settings, tag = bench.settings, f"seq-{uuid.uuid4().hex[:8]}"
    times: dict[str, list[float]] = {"pipeline": [], "pipeline submit()": []}
    with qbgw_workers(bench, settings) as fleet:
        _warm_pipeline(settings, fleet, 120)
        for n in range(bench.config.sequential):
            started = time.perf_counter()
            job_id = _submit(settings, tag, n)
            times["pipeline submit()"].append(time.perf_counter() - started)
            while job_status(job_id, settings=settings) not in TERMINAL:
                time.sleep(0.002)
            times["pipeline"].append(time.perf_counter() - started)
    return times


# --- the anchors -----------------------------------------------------------------------------------


def raw_requests(bench: Bench, threads: int) -> Burst:
    """``--jobs`` POSTs from a thread pool, one requests.Session per thread."""
    local, url = threading.local(), bench.emu.url + GATEWAY_PATH
    headers = {"QB-Token": TOKEN, "Content-Type": "application/json"}

    retried: list[int] = []

    def post(n: int) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        body = {"smart_chat_assistant_id": ASSISTANT, "messages": _message(f"raw request {n}")}
        for tries_left in (2, 1, 0):
            try:
                session.post(url, json=body, headers=headers, timeout=(5, 120)).raise_for_status()
                return
            except requests.ConnectionError:
                # The emulator listens with socketserver's backlog of 5: a burst of new connections
                # can be reset; retried (and counted) like any client would.
                if not tries_left:
                    raise
                retried.append(n)

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(post, range(bench.config.jobs)))
    burst = Burst(bench.config.jobs, time.perf_counter() - started)
    burst.notes = f"{len(retried)} requests retried after a connection reset" if retried else ""
    return burst


def _rows(bench: Bench, tag: str) -> int:
    with bench.engine.connect() as connection:
        query = text(f"SELECT count(*) FROM {minimal_app.TABLE} WHERE id LIKE :tag")
        return int(connection.execute(query, {"tag": f"{tag}:%"}).scalar_one())


def _minimal_publisher(bench: Bench) -> Any:
    return minimal_app.make_app(bench.redis_url, MINIMAL_QUEUE)


def _warm_minimal(bench: Bench, app: Any, fleet: Workers) -> None:
    tag, count = f"warm-{uuid.uuid4().hex[:8]}", bench.config.concurrency * fleet.count
    for n in range(count):
        app.send_task(minimal_app.CALL, args=[f"{tag}:{n}", "warm-up"])

    def done() -> bool:
        fleet.check_alive()
        return _rows(bench, tag) >= count

    wait_until(done, 120, "minimal warm-up task")


def minimal_burst(bench: Bench, workers: int = 1, *, live: bool = False) -> Burst:
    """``--jobs`` minimal tasks (POST + INSERT) through ``workers`` processes (see ``timed_burst``)."""
    config, tag, app = bench.config, f"burst-{uuid.uuid4().hex[:8]}", _minimal_publisher(bench)

    def publish_all() -> None:
        for n in range(config.jobs):
            app.send_task(minimal_app.CALL, args=[f"{tag}:{n}", f"minimal job {n}"])

    plan = Plan(
        minimal_workers(bench, workers),
        lambda fleet: _warm_minimal(bench, app, fleet),
        publish_all,
        lambda: _rows(bench, tag),
        app,
        MINIMAL_QUEUE,
        bench.engine,
    )
    start, burst = timed_burst(plan, config, live=live)
    with bench.engine.connect() as connection:
        query = text(f"SELECT max(done_at) FROM {minimal_app.TABLE} WHERE id LIKE :tag")
        burst.seconds = float(connection.execute(query, {"tag": f"{tag}:%"}).scalar_one()) - start
    return burst


def minimal_latencies(bench: Bench) -> dict[str, list[float]]:
    """Publish-to-visible seconds, one at a time, of the minimal task, the INSERT-only task and a no-op; and
    submit-to-answer seconds of the minimal task with an audited design's four commits (``audited``: see
    ``bench.minimal_app``), its end found the minimal task's way."""
    times: dict[str, list[float]] = {name: [] for name in BASELINES}
    with minimal_workers(bench) as fleet, baseline_steps(bench, fleet) as steps:
        for n in range(bench.config.sequential):
            for name, step in steps.items():
                times[name].append(step(f"sequential {n}"))
    return times


#: The baselines of a submit-to-result latency, each timed by one call of its step (see ``baseline_steps``).
BASELINES = ("minimal", "insert-only", "no-op", "audited")


@contextmanager
def baseline_steps(bench: Bench, fleet: Workers) -> Iterator[dict[str, Callable[[str], float]]]:
    """For each of BASELINES, a step that runs one job on ``fleet`` (``minimal_workers``, warmed here) and
    returns its seconds, from its submit until its end was seen (a read every 2 ms)."""
    app, keys = _minimal_publisher(bench), redis.Redis.from_url(bench.redis_url)
    with ExitStack() as stack:
        stack.callback(keys.close)
        _warm_minimal(bench, app, fleet)
        audited = stack.enter_context(minimal_app.connect(bench.database_url))
        for n in range(3):  # untimed: the audited task's statements and connections
            _audited_job(bench, app, audited, f"warm {n}")

        def timed_audited(content: str) -> float:
            started = time.perf_counter()
            _audited_job(bench, app, audited, content)
            return time.perf_counter() - started

        def timed_row(task: str) -> Callable[[str], float]:
            def step(content: str) -> float:
                row, started = f"seq-{uuid.uuid4().hex}", time.perf_counter()
                app.send_task(task, args=[row, content] if task == minimal_app.CALL else [row])
                while not _row_exists(bench, row):
                    time.sleep(0.002)
                return time.perf_counter() - started

            return step

        def timed_noop(_: str) -> float:
            key, started = f"noop-{uuid.uuid4().hex}", time.perf_counter()
            app.send_task(minimal_app.NOOP, args=[key])
            while not keys.exists(key):
                time.sleep(0.002)
            return time.perf_counter() - started

        yield {
            "minimal": timed_row(minimal_app.CALL),
            "insert-only": timed_row(minimal_app.INSERT_ONLY),
            "no-op": timed_noop,
            "audited": timed_audited,
        }


def _audited_job(bench: Bench, app: Any, connection: Any, content: str) -> None:
    """One audited minimal task, submitted, run, its end found by a read every 2 ms, and its answer read."""
    row = f"audited-{uuid.uuid4().hex}"
    minimal_app.submit_audited(connection, row, content)
    app.send_task(minimal_app.CALL_AUDITED, args=[row])
    while not _audited_done(bench, row):
        time.sleep(0.002)
    if not minimal_app.read_audited(connection, row):
        raise RuntimeError(f"audited minimal task {row}: no answer")


def _audited_done(bench: Bench, row: str) -> bool:
    with bench.engine.connect() as connection:
        query = text(f"SELECT 1 FROM {minimal_app.JOBS} WHERE id = :id AND done_at IS NOT NULL")
        return connection.execute(query, {"id": row}).first() is not None


def _row_exists(bench: Bench, row: str) -> bool:
    with bench.engine.connect() as connection:
        query = text(f"SELECT 1 FROM {minimal_app.TABLE} WHERE id = :id")
        return connection.execute(query, {"id": row}).first() is not None


# --- the parts -------------------------------------------------------------------------------------


def _repeat(bench: Bench, results: Results, runs: Sequence[tuple[str, Callable[[], Burst]]]) -> None:
    """Each run once per rep, interleaved, so that drift over the run touches them alike."""
    width = max(len(name) for name, _ in runs)
    for rep in range(1, bench.config.reps + 1):
        for name, run in runs:
            burst = run()
            results.add(name, burst)
            bench.say(f"  rep {rep} {name:{width}} {burst.line()}")


def part_throughput(bench: Bench, results: Results) -> None:
    runs = [
        ("raw", lambda: raw_requests(bench, bench.config.concurrency)),
        ("minimal", lambda: minimal_burst(bench)),
        ("pipeline", lambda: pipeline_burst(bench, bench.settings)),
        ("pipeline-live", lambda: pipeline_burst(bench, bench.settings, live=True)),
    ]
    _repeat(bench, results, runs)


def part_latency(bench: Bench, results: Results) -> None:
    bench.emu.reconfigure(latency=0.0)
    try:
        for name, times in [*pipeline_latencies(bench).items(), *minimal_latencies(bench).items()]:
            results.latencies[name] = times
            bench.say(f"  {name}: {_describe(times)}")
    finally:
        bench.emu.reconfigure(latency=bench.config.latency)


def _multi_runs(bench: Bench, workers: int) -> list[tuple[str, Callable[[], Burst]]]:
    threads = bench.config.concurrency * workers
    return [
        (f"raw-x{workers}", lambda: raw_requests(bench, threads)),
        (f"minimal-x{workers}", lambda: minimal_burst(bench, workers)),
        (f"pipeline-x{workers}", lambda: pipeline_burst(bench, bench.settings, workers)),
    ]


def part_multi(bench: Bench, results: Results) -> None:
    for workers in bench.config.workers:
        bench.say(f"  -- {workers} worker process(es)")
        _repeat(bench, results, _multi_runs(bench, workers))


def embedded_counts(config: Config) -> list[int]:
    return sorted({1, *config.workers})


def part_embedded(bench: Bench, results: Results) -> None:
    def embedded(workers: int) -> Burst:
        data_dir = bench.folder / f"embedded-{uuid.uuid4().hex[:8]}"  # a fresh SQLite database each time
        settings = bench_settings(bench.config, bench.emu.url, data_dir).with_(pool=bench.config.pool)
        return pipeline_burst(bench, settings, workers)

    runs = [(_embedded_name(n), lambda n=n: embedded(n)) for n in embedded_counts(bench.config)]
    _repeat(bench, results, runs)


def _embedded_name(workers: int) -> str:
    return "embedded" if workers == 1 else f"embedded-x{workers}"


def part_profile(bench: Bench, results: Results) -> None:
    """One more pipeline burst with py-spy sampling the worker; prints where its samples fall."""
    out, seconds = bench.config.profile, bench.config.profile_seconds
    assert out is not None
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    recorders: list[subprocess.Popen[bytes]] = []

    def attach(fleet: Workers) -> None:
        argv = [
            spy,
            "record",
            "--pid",
            str(fleet.procs[0].pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--format",
            "raw",
            "--nonblocking",
            "-o",
            str(out),
            "--gil" if bench.config.profile_mode == "gil" else "--idle",
        ]
        recorders.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))

    burst = pipeline_burst(bench, bench.settings, on_start=attach)
    bench.say(f"  profiled   {burst.line()} (under py-spy, not counted)")
    for recorder in recorders:
        _, err = recorder.communicate(timeout=seconds + 60)
        if recorder.returncode:
            raise RuntimeError(f"py-spy failed: {err.decode(errors='replace').strip()}")
    bench.say("\n".join(summarize(out.read_text(encoding="utf-8"))))


# --- profile summary -------------------------------------------------------------------------------

#: Buckets for a stack, tried from its innermost frame outwards; generic stdlib frames (threading,
#: socket, selectors, ...) are skipped so that their time goes to the library that called them.
LIBRARIES = (
    ("PostgreSQL driver (psycopg)", ("psycopg",)),
    ("SQLAlchemy (ORM, Core, pool)", ("sqlalchemy",)),
    ("encryption (cryptography, worker/crypto.py)", ("cryptography", "worker/crypto.py")),
    ("HTTP client (requests, urllib3, http.client)", ("requests/", "urllib3", "http/client", "email/")),
    ("broker (kombu, redis-py)", ("kombu", "redis/")),
    ("Celery", ("celery", "billiard", "vine")),
    ("JSON", ("json/",)),
    ("logging", ("logging/",)),
    ("hashing (hashlib, hmac)", ("hashlib", "hmac.py")),
    ("qbgw code", ("worker/",)),
)


def _frame_name(frame: str) -> str:
    """'run_attempt (worker/tasks.py:77)' -> 'run_attempt (worker/tasks.py)'."""
    head, _, where = frame.rpartition(" (")
    return f"{head} ({where.rsplit(':', 1)[0]})" if head else frame


def _bucket(frames: Sequence[str]) -> str:
    for frame in reversed(frames):
        for name, needles in LIBRARIES:
            if any(needle in frame for needle in needles):
                return name
    return "other (stdlib, interpreter)"


def summarize(raw: str, top: int = 15) -> list[str]:
    """Where a py-spy raw (collapsed) profile's samples fall: by library, by qbgw function, by leaf."""
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames, n = stack.split(";"), int(count)
        leaf[_frame_name(frames[-1])] += n
        inclusive.update(dict.fromkeys({_frame_name(f) for f in frames}, n))
        buckets[_bucket(frames)] += n
    total = sum(leaf.values()) or 1
    attempt = next((n for name, n in inclusive.items() if name.startswith("run_attempt (")), 0) or total
    lines = [f"  {total} samples, {100 * attempt / total:.0f}% of them in worker.tasks.run_attempt"]
    lines += ["  by library (innermost non-stdlib frame):"]
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in buckets.most_common()]
    ours = [(name, n) for name, n in inclusive.most_common() if "worker/" in name]
    lines += ["  qbgw functions, inclusive (% of all samples, % of run_attempt's):"]
    lines += [f"    {100 * n / total:5.1f}% {100 * n / attempt:5.1f}%  {name}" for name, n in ours[: top + 10]]
    lines += ["  hottest functions, self:"] + [
        f"    {100 * n / total:5.1f}%  {name}" for name, n in leaf.most_common(top)
    ]
    return lines


# --- report ----------------------------------------------------------------------------------------


def _quantile(times: Sequence[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _describe(times: Sequence[float]) -> str:
    return f"median {1000 * _quantile(times, 0.5):.1f} ms, p99 {1000 * _quantile(times, 0.99):.1f} ms"


def _ratio(value: float | None, anchor: float | None) -> str:
    return "-" if value is None or not anchor else f"{value / anchor:.2f}"


def _times(value: float | None, anchor: float | None) -> str:
    return "-" if value is None or not anchor else f"{value / anchor:.2f}x"


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


Row = tuple[str, str, str, str]


def _one_worker_rows(config: Config, r: Results, head: str) -> list[Row]:
    pipe, minimal, raw = r.rate("pipeline"), r.rate("minimal"), r.rate("raw")
    cpu, cpu_min = r.cpu_ms("pipeline"), r.cpu_ms("minimal")
    return [
        (
            f"jobs/s, 1 worker, {head}",
            _fmt(pipe),
            f"ideal {config.ideal:.0f}; raw requests {_fmt(raw)}; minimal task {_fmt(minimal)}",
            f"{_ratio(pipe, config.ideal)} of ideal; {_ratio(pipe, minimal)} of minimal (target >= 0.95)",
        ),
        ("  anchors / ideal", "", f"raw {_ratio(raw, config.ideal)}; minimal {_ratio(minimal, config.ideal)}", ""),
        (
            "worker CPU ms per job, 1 worker",
            _fmt(cpu, 2),
            f"minimal task {_fmt(cpu_min, 2)}",
            f"{_times(cpu, cpu_min)} (target <= 2x)",
        ),
        *_live_rows(config, r),
    ]


def _live_rows(config: Config, r: Results) -> list[Row]:
    """The pipeline with the producer in the loop, and the producer's own rate."""
    live, minimal = r.rate("pipeline-live"), r.rate("minimal")
    paused, running, publish = r.publish_rate("pipeline"), r.publish_rate("pipeline-live"), r.publish_rate("minimal")
    threads = f"{config.producers} threads"
    return [
        (
            "jobs/s, 1 worker, jobs submitted while it runs",
            _fmt(live),
            f"minimal task {_fmt(minimal)}",
            f"{_ratio(live, config.ideal)} of ideal; {_ratio(live, minimal)} of minimal",
        ),
        (
            f"producer submit()/s, {threads}, worker paused",
            _fmt(paused),
            f"send_task/s, 1 thread {_fmt(publish)}",
            f"{_ratio(paused, publish)} of send_task",
        ),
        (
            f"producer submit()/s, {threads}, worker running",
            _fmt(running),
            f"ideal {config.ideal:.0f}",
            f"{_ratio(running, config.ideal)} of ideal",
        ),
    ]


def _multi_rows(config: Config, r: Results, head: str) -> list[Row]:
    rows: list[Row] = []
    for workers in config.workers:
        if f"pipeline-x{workers}" not in r.bursts:
            continue
        ideal, threads = config.ideal * workers, config.concurrency * workers
        pipe, minimal, raw = (r.rate(f"{name}-x{workers}") for name in ("pipeline", "minimal", "raw"))
        cpu, cpu_min = r.cpu_ms(f"pipeline-x{workers}"), r.cpu_ms(f"minimal-x{workers}")
        rows += [
            (
                f"jobs/s, {workers} worker(s) x {head}, PostgreSQL + Redis",
                _fmt(pipe),
                f"ideal {ideal:.0f}; raw requests x{threads} {_fmt(raw)}; minimal task x{workers} {_fmt(minimal)}",
                f"{_ratio(pipe, ideal)} of ideal; {_ratio(pipe, minimal)} of minimal",
            ),
            (
                f"worker CPU ms per job, {workers} worker(s)",
                _fmt(cpu, 2),
                f"minimal task {_fmt(cpu_min, 2)}",
                _times(cpu, cpu_min),
            ),
        ]
    return rows


def _embedded_rows(config: Config, r: Results, head: str) -> list[Row]:
    rows: list[Row] = []
    for workers in embedded_counts(config):
        name = _embedded_name(workers)
        if name not in r.bursts:
            continue
        pg = "pipeline" if workers == 1 else f"pipeline-x{workers}"
        emb, pipe, ideal = r.rate(name), r.rate(pg), config.ideal * workers
        cpu, cpu_pipe = r.cpu_ms(name), r.cpu_ms(pg)
        rows += [
            (
                f"jobs/s, embedded default (SQLite + fs broker), {workers} worker(s) x {head}",
                _fmt(emb),
                f"ideal {ideal:.0f}; PostgreSQL + Redis pipeline x{workers} {_fmt(pipe)}",
                f"{_ratio(emb, ideal)} of ideal; {_ratio(emb, pipe)} of PostgreSQL + Redis",
            ),
            (
                f"worker CPU ms per job, embedded, {workers} worker(s)",
                _fmt(cpu, 2),
                f"PostgreSQL + Redis pipeline {_fmt(cpu_pipe, 2)}",
                _times(cpu, cpu_pipe),
            ),
        ]
    return rows


def _throughput_rows(config: Config, r: Results) -> list[Row]:
    head = f"{config.concurrency} {config.pool}, {1000 * config.latency:.0f} ms upstream"
    rows: list[Row] = []
    if "pipeline" in r.bursts:
        rows += _one_worker_rows(config, r, head)
    return rows + _multi_rows(config, r, head) + _embedded_rows(config, r, head)


def _latency_rows(r: Results) -> list[Row]:
    rows: list[Row] = []
    if "pipeline" not in r.latencies:
        return rows
    for label, q in (("median", 0.5), ("p99", 0.99)):
        value = {name: 1000 * _quantile(times, q) for name, times in r.latencies.items()}
        anchors = "; ".join(f"{name} {value[name]:.1f}" for name in ("minimal", "audited", "insert-only", "no-op"))
        rows.append(
            (
                f"submit -> result ms, upstream at once, {label}",
                f"{value['pipeline']:.1f}",
                anchors,
                f"{_ratio(value['pipeline'], value['minimal'])} of minimal; "
                f"{_ratio(value['pipeline'], value['no-op'])} of no-op",
            )
        )
        submit = value["pipeline submit()"]
        rows.append((f"  of which the submit() call, {label}", f"{submit:.1f}", "", ""))
    return rows


def table(config: Config, results: Results) -> list[str]:
    rows: list[Row] = [
        ("figure", "qbgw", "anchor(s)", "ratio"),
        *_throughput_rows(config, results),
        *_latency_rows(results),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [" | ".join([*(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)), row[3]]) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in [*widths, 30]))
    return lines


# --- setup -----------------------------------------------------------------------------------------


def scratch_database() -> AbstractContextManager[str]:
    """A migrated PostgreSQL database of our own, dropped afterwards (as the chaos run makes)."""
    return chaos.scratch_database("qbgw_tput")


@contextmanager
def bench_environment(config: Config, say: Say, prefix: str) -> Iterator[Bench]:
    """What every run needs: a private Redis, the emulator, a scratch PostgreSQL database with the
    minimal task's table, and the qbgw settings on them; all removed afterwards."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("the bench needs the redis-server program")
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    emulator_config = EmulatorConfig(
        tokens=frozenset({TOKEN}), assistants=frozenset({ASSISTANT}), latency=config.latency
    )
    private = PrivateRedis(folder)
    private.start()
    try:
        with Emulator(emulator_config) as emu, scratch_database() as database_url:
            engine = create_engine(database_url)
            try:
                with engine.begin() as connection:
                    for ddl in (minimal_app.TABLE_DDL, *minimal_app.AUDITED_DDL):
                        connection.execute(text(ddl))
                settings = bench_settings(config, emu.url, folder / "data", database_url, private.url)
                yield Bench(config, emu, private.url, database_url, folder, engine, say, settings)
            finally:
                engine.dispose()
    finally:
        private.kill()
        shutil.rmtree(folder, ignore_errors=True)


def run(config: Config, say: Say = print) -> Results:
    """Every part asked for; returns what they measured."""
    results = Results()
    with bench_environment(config, say, "qbgw-throughput-") as bench:
        bench.settings = bench.settings.with_(pool=config.pool)
        _run_parts(bench, results)
    return results


def _run_parts(bench: Bench, results: Results) -> None:
    parts: dict[str, Callable[[Bench, Results], None]] = {
        "throughput": part_throughput,
        "latency": part_latency,
        "multi": part_multi,
        "embedded": part_embedded,
    }
    titles = {
        "throughput": f"1. throughput, {bench.config.jobs} jobs, upstream {bench.config.latency:g}s",
        "latency": f"2. submit -> result, {bench.config.sequential} sequential jobs, upstream at once",
        "multi": f"3a. throughput with {', '.join(map(str, bench.config.workers))} worker processes",
        "embedded": f"3b. throughput on the embedded default (SQLite + filesystem broker), "
        f"{', '.join(map(str, embedded_counts(bench.config)))} worker processes",
    }
    for name in bench.config.parts:
        bench.say(titles[name])
        started = time.monotonic()
        parts[name](bench, results)
        bench.say(f"  ({time.monotonic() - started:.0f}s)")
    if bench.config.profile is not None:
        bench.say(f"profile: one pipeline burst with py-spy on the worker for {bench.config.profile_seconds:g}s")
        part_profile(bench, results)


def parse_args(argv: Sequence[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per burst (default 2000)")
    parser.add_argument("--concurrency", type=int, default=32, help="threads per worker process (default 32)")
    parser.add_argument("--latency", type=float, default=0.2, help="the emulator's answer time in s (default 0.2)")
    parser.add_argument("--reps", type=int, default=3, help="bursts per figure; medians are printed (default 3)")
    parser.add_argument("--producers", type=int, default=4, help="threads submitting qbgw jobs (default 4)")
    parser.add_argument("--sequential", type=int, default=200, help="one-at-a-time jobs for part 2 (default 200)")
    parser.add_argument(
        "--workers",
        default="2",
        help="comma-separated worker process counts for parts 3a and 3b (default 2; e.g. 1,2,4)",
    )
    parser.add_argument(
        "--pool",
        choices=("threads", "prefork", "solo"),
        default="threads",
        help="the qbgw workers' pool (default threads; the minimal task always runs threads)",
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    parser.add_argument("--profile", type=Path, help="also profile one pipeline burst with py-spy into this file")
    parser.add_argument("--profile-seconds", type=float, default=20.0)
    parser.add_argument(
        "--profile-mode",
        choices=("gil", "wall"),
        default="gil",
        help="gil: sample the GIL holder (CPU); wall: every thread, waiting ones too",
    )
    parser.add_argument(
        "--worker-switch-interval",
        type=float,
        metavar="MS",
        help="what-if: start the qbgw workers with sys.setswitchinterval(MS / 1000)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="longest wait for one burst (s)")
    args = parser.parse_args(argv)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    return Config(
        jobs=args.jobs,
        concurrency=args.concurrency,
        latency=args.latency,
        reps=args.reps,
        producers=args.producers,
        sequential=args.sequential,
        parts=parts,
        pool=args.pool,
        workers=tuple(int(n) for n in args.workers.split(",") if n.strip()),
        profile=args.profile,
        profile_seconds=args.profile_seconds,
        profile_mode=args.profile_mode,
        switch_interval=args.worker_switch_interval,
        timeout=args.timeout,
    )


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    started = time.monotonic()
    results = run(config, say=lambda line: print(line, flush=True))
    print()
    print("\n".join(table(config, results)))
    print(f"\nwhole run {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
