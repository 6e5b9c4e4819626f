"""Chaos run: many jobs through real workers on PostgreSQL + Redis while the emulator injects
random faults, workers are killed with SIGKILL and restarted, and Redis is restarted empty.

It then counts, from the database and the emulator: jobs lost (must be 0), jobs with more than
one result (must be 0), answers that belong to another job (must be 0), attempts audited
against requests the upstream saw, and retries sent before a Retry-After elapsed (must be 0).

    .venv/bin/python -m bench.chaos                       # 1,000 jobs, 2 workers x 16 threads, 6 kills
    .venv/bin/python -m bench.chaos --jobs 200 --kills 3  # a shorter run

Needs PostgreSQL on 127.0.0.1:5432 (a scratch database is made and dropped) and the
``redis-server`` program (a private Redis on a free port, so restarting it disturbs nothing).
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
from sqlalchemy import create_engine, text

from qbgw import producer
from qbgw.emulator.server import Emulator, EmulatorConfig
from qbgw.errors import NotAnnounced
from qbgw.runtime.locator import reset as reset_runtimes
from qbgw.runtime.locator import runtime
from qbgw.settings import Secret, Settings
from qbgw.store import schema
from qbgw.store.jobs import open_text

ASSISTANT = "65d5f3473d5d68095462165d"
TOKEN = "chaos-token"
PG_ADMIN = os.environ.get("QBGW_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@dataclass
class ChaosConfig:
    jobs: int = 1000
    workers: int = 2
    concurrency: int = 16
    kills: int = 6
    kill_every: float = 3.0
    fault_rate: float = 0.2
    #: The emulator's answer time: long enough that kills land on calls in flight.
    latency: float = 0.4
    seed: int = 7
    timeout: float = 900.0
    log_dir: Path | None = None


@dataclass
class ChaosReport:
    submitted: int = 0
    succeeded: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    cancelled: int = 0
    lost: int = 0
    multiple_results: int = 0
    foreign_answers: int = 0
    attempts_audited: int = 0
    upstream_requests: int = 0
    interrupted: int = 0
    held_back: int = 0
    redispatched: int = 0
    early_retries: int = 0
    retry_after_sent: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    kills: int = 0
    redis_restarts: int = 0
    not_announced: int = 0
    settle_seconds: float = 0.0
    total_seconds: float = 0.0

    def lines(self) -> list[str]:
        failed = ", ".join(f"{n} {reason}" for reason, n in self.failed.most_common()) or "none"
        return [
            f"jobs submitted                        {self.submitted}",
            f"  succeeded                           {self.succeeded}",
            f"  failed (permanent reasons)          {sum(self.failed.values())}: {failed}",
            f"  cancelled                           {self.cancelled}",
            f"  lost (must be 0)                    {self.lost}",
            f"jobs with more than one result (0)    {self.multiple_results}",
            f"answers of another job (must be 0)    {self.foreign_answers}",
            f"attempts audited / upstream requests  {self.attempts_audited} / {self.upstream_requests}",
            f"  of which interrupted by a kill      {self.interrupted}",
            f"  (held back by a 429 cooldown, unsent {self.held_back}, not counted above)",
            f"retries before Retry-After (0)        {self.early_retries} (of {self.retry_after_sent} 429s with it)",
            f"upstream faults injected              {sum(self.faults.values())}: {dict(sorted(self.faults.items()))}",
            f"workers SIGKILLed / Redis restarts    {self.kills} / {self.redis_restarts}",
            f"submissions told 'not announced'      {self.not_announced}",
            f"sweeper re-dispatches                 {self.redispatched}",
            f"last kill/restart to all terminal     {self.settle_seconds:.1f} s",
            f"whole run                             {self.total_seconds:.1f} s",
        ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server of our own that keeps nothing on disk: a restart empties it."""

    def __init__(self, folder: Path) -> None:
        self.port, self.folder, self.proc = _free_port(), folder, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.folder),
        ]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def shutdown(self) -> None:
        """Stop it as an operator would (``SHUTDOWN NOSAVE``): clients see their connections closed."""
        if self.proc is not None:
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)
            client.shutdown(nosave=True)
            client.close()
            self.proc.wait(timeout=10)
            self.proc = None


@contextmanager
def scratch_database(prefix: str = "qbgw_chaos") -> Iterator[str]:
    """A migrated PostgreSQL database of our own, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    try:
        schema.upgrade(url)
        yield url
    finally:
        reset_runtimes()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Fleet:
    """Worker processes that can be killed and replaced."""

    def __init__(self, settings: Settings, config: ChaosConfig, log_dir: Path) -> None:
        self.env = {**os.environ, **settings.with_(concurrency=config.concurrency).to_env()}
        self.log_dir, self.procs, self.started = log_dir, [], 0

    def start(self) -> None:
        with open(self.log_dir / f"worker-{self.started}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "qbgw", "worker", "--loglevel", "WARNING"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started += 1
        self.procs.append(proc)

    def kill_one(self) -> None:
        victim = self.procs.pop(0)  # the oldest: every worker gets killed in turn
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.start()

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def chaos_settings(emulator_url: str, database_url: str, broker_url: str, data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        broker_url=broker_url,
        base_url=emulator_url,
        token=Secret(TOKEN),
        connect_timeout=1.0,
        read_timeout=2.0,
        lease_margin=2.0,
        visibility_timeout=30.0,
        backoff_base=0.2,
        backoff_max=2.0,
        max_attempts=12,
        retry_deadline=600.0,
        sweep_interval=1.0,
        sweep_grace=3.0,
        queue="qbgw-chaos",
        encryption_keys=Secret("kchaos:" + base64.b64encode(os.urandom(32)).decode()),
    )


def run_chaos(config: ChaosConfig, *, say: Callable[[str], None] = print) -> ChaosReport:
    """Run the whole chaos scenario and count what happened."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("the chaos run needs the redis-server program")
    report = ChaosReport()
    rng = random.Random(config.seed)
    folder = Path(tempfile.mkdtemp(prefix="qbgw-chaos-"))
    log_dir = config.log_dir or folder  # worker logs; kept only when the caller names a folder
    emulator_config = EmulatorConfig(
        tokens=frozenset({TOKEN}),
        assistants=frozenset({ASSISTANT}),
        fault_rate=config.fault_rate,
        fault_seed=config.seed,
        hang_seconds=3.0,
        retry_after=1,
        latency=config.latency,
    )
    redis = PrivateRedis(folder)
    redis.start()
    try:
        with Emulator(emulator_config) as emu, scratch_database() as database_url:
            settings = chaos_settings(emu.url, database_url, redis.url, folder / "data")
            _run(config, settings, emu, redis, rng, report, log_dir, say)
    finally:
        redis.kill()
        shutil.rmtree(folder, ignore_errors=True)
    return report


def _run(
    config: ChaosConfig,
    settings: Settings,
    emu: Emulator,
    redis: PrivateRedis,
    rng: random.Random,
    report: ChaosReport,
    log_dir: Path,
    say: Callable[[str], None],
) -> None:
    fleet = Fleet(settings, config, log_dir)
    started = time.monotonic()
    for _ in range(config.workers):
        fleet.start()
    try:
        texts = _submit_all(settings, config.jobs, report)
        say(f"submitted {report.submitted} jobs in {time.monotonic() - started:.1f}s; chaos begins")
        last_fault = _make_chaos(config, settings, fleet, redis, rng, report, say)
        _wait_all_terminal(settings, config.timeout, say)
        report.settle_seconds = time.monotonic() - last_fault
    finally:
        fleet.stop()
    report.total_seconds = time.monotonic() - started
    _count(settings, emu, texts, report)


def _submit_all(settings: Settings, jobs: int, report: ChaosReport) -> dict[str, str]:
    texts = {}
    for n in range(jobs):
        content = f"chaos job {n} of {jobs}"
        try:
            job_id = producer.submit(ASSISTANT, [{"role": "user", "content": content}], settings=settings)
        except NotAnnounced as exc:
            job_id = exc.job_id
            report.not_announced += 1
        texts[job_id] = content
        report.submitted += 1
    return texts


def _make_chaos(
    config: ChaosConfig,
    settings: Settings,
    fleet: Fleet,
    redis: PrivateRedis,
    rng: random.Random,
    report: ChaosReport,
    say: Callable[[str], None],
) -> float:
    """Kill workers every ``kill_every`` seconds, restart Redis empty once midway; returns the
    monotonic time of the last of these."""
    last = time.monotonic()
    redis_at = max(1, config.kills // 2)
    for n in range(1, config.kills + 1):
        time.sleep(config.kill_every * rng.uniform(0.5, 1.5))
        if _pending(settings) == 0:
            say("all jobs finished before the chaos did; stopping the chaos early")
            break
        fleet.kill_one()
        report.kills += 1
        if n == redis_at:
            redis.kill()
            redis.start()
            report.redis_restarts += 1
            say(f"kill {n}: a worker SIGKILLed and Redis restarted empty ({_pending(settings)} jobs not done)")
        else:
            say(f"kill {n}: a worker SIGKILLed and replaced ({_pending(settings)} jobs not done)")
        last = time.monotonic()
    return last


def _pending(settings: Settings) -> int:
    with runtime(settings).transaction() as session:
        query = "SELECT count(*) FROM jobs WHERE status NOT IN ('succeeded', 'failed', 'cancelled')"
        return int(session.execute(text(query)).scalar_one())


def _wait_all_terminal(settings: Settings, timeout: float, say: Callable[[str], None]) -> None:
    deadline, shown = time.monotonic() + timeout, 0.0
    while (pending := _pending(settings)) and time.monotonic() < deadline:
        if time.monotonic() - shown > 10:
            say(f"waiting: {pending} jobs not done")
            shown = time.monotonic()
        time.sleep(0.2)


def _count(settings: Settings, emu: Emulator, texts: dict[str, str], report: ChaosReport) -> None:
    with runtime(settings).transaction() as session:
        rows = session.execute(text("SELECT id, status, answer, error_class FROM jobs")).all()
        results = session.execute(
            text(
                "SELECT job_id, count(*) FROM audit_events WHERE action IN ('job.succeeded', 'job.failed', "
                "'job.cancelled') GROUP BY job_id HAVING count(*) > 1"
            )
        ).all()
        actions = dict(session.execute(text("SELECT action, count(*) FROM audit_events GROUP BY action")).all())
    for job_id, status, stored, error_class in rows:
        if status == "succeeded":
            with runtime(settings).transaction() as session:
                answer = open_text(session, "answer", job_id, stored)
            report.succeeded += 1
            report.foreign_answers += f'you said "{texts[job_id]}"' not in (answer or "")
        elif status == "failed":
            report.failed[error_class or "?"] += 1
        elif status == "cancelled":
            report.cancelled += 1
        else:
            report.lost += 1
    report.multiple_results = len(results)
    # An attempt held back before sending (the fleet began a 429 cooldown after its claim) sent nothing.
    report.held_back = actions.get("attempt.unsent", 0)
    report.attempts_audited = actions.get("attempt.request", 0) - report.held_back
    report.interrupted = actions.get("attempt.interrupted", 0)
    report.redispatched = actions.get("job.redispatched", 0)
    stats = emu.stats()
    report.upstream_requests = int(stats["requests"])  # type: ignore[call-overload]
    report.early_retries = int(stats["early_retries"])  # type: ignore[call-overload]
    report.retry_after_sent = int(stats["retry_after_sent"])  # type: ignore[call-overload]
    report.faults = dict(stats["faults"])  # type: ignore[call-overload]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--kill-every", type=float, default=3.0)
    parser.add_argument("--fault-rate", type=float, default=0.2)
    parser.add_argument("--latency", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    config = ChaosConfig(
        jobs=args.jobs,
        workers=args.workers,
        concurrency=args.concurrency,
        kills=args.kills,
        kill_every=args.kill_every,
        fault_rate=args.fault_rate,
        seed=args.seed,
        latency=args.latency,
    )
    report = run_chaos(config, say=lambda line: print(line, flush=True))
    print()
    print("\n".join(report.lines()))
    must_be_zero = report.lost + report.multiple_results + report.foreign_answers + report.early_retries
    sys.exit(0 if must_be_zero == 0 else 1)


if __name__ == "__main__":
    main()
