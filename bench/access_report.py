"""The access report at scale: a subject's report over 100,000 jobs of which 50 concern it (goal: under a second),
beside an unindexed scan in the same run.

Loads N jobs into a scratch database through the real schema (``alembic upgrade head``): each job row with its
payload and subject encrypted as the product encrypts them and the subject's blind index, and each job's events
(``job.submitted``, ``attempt.request``, ``attempt.response``, ``job.succeeded``, ``result.read``) carrying it,
chained with the product's own hashes (format v3), the head row moved on, and a signed anchor every 1,000 events
as the product writes them. Every job is about some patient (one of N/5); 50 are about the one reported on, spread
over the whole period. Then, the median of several runs of each:

1. ``qbgw.access_report`` (the blind index looked up, the jobs and their events read by index, the chain checked
   over the report's period by index: the shown events recomputed and linked, no event missing, the signed anchors
   matched; and the ``audit.access_report`` event sealed and committed), for the whole period and for one day;
2. the unindexed scan a deployment without a blind index would need: decrypt every job's subject to find the
   subject's jobs, then read their events by job id (the chain walk not included).

    .venv/bin/python -m bench.access_report                         # 100,000 jobs, PostgreSQL and SQLite
    .venv/bin/python -m bench.access_report --backend sqlite --jobs 20000 --runs 3

PostgreSQL on 127.0.0.1:5432 (QBGW_TEST_PG_URL overrides the admin URL): a scratch database qbgw_bench_<hex>,
dropped WITH (FORCE) at the end, ANALYZEd after loading. SQLite is a file in a temp dir.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import secrets
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert, select, text, update

from qbgw import access_report, admin
from qbgw.audit import anchors as integrity
from qbgw.audit import events as audit
from qbgw.audit.crypto import Keyring, aad_for
from qbgw.audit.subjects import SubjectKey
from qbgw.runtime.locator import reset as reset_runtimes
from qbgw.settings import Secret, Settings
from qbgw.store import db, schema
from qbgw.store.models import GENESIS, AuditChainHead, AuditEvent, Job

PG_ADMIN = os.environ.get("QBGW_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
SUBJECT = "MRN-0042-BENCH"
ABOUT = 50
DAYS = 30
ANCHOR_EVERY = 1000
BATCH = 5000
SEED = 20261205


def _settings(url: str, where: Path) -> Settings:
    return Settings(
        data_dir=where,
        database_url=url,
        encryption_keys=Secret("kbench:" + base64.b64encode(secrets.token_bytes(32)).decode()),
        subject_key=Secret(secrets.token_hex(32)),
        anchor_key=Secret(secrets.token_hex(32)),
        actor="bench-auditor",
    )


def _events(job_id: str, index: str, t0: datetime, rng: random.Random) -> list[dict[str, Any]]:
    worker, producer = f"worker-{rng.randint(1, 8)}", f"intake-{rng.randint(1, 40)}"
    assistant = "65d5f3473d5d68095462165d"
    common = {"job_id": job_id, "assistant_id": assistant, "subject_index": index}
    made = [
        audit.event(action=audit.Action.SUBMITTED, actor=producer, request=(secrets.token_hex(32), 900), **common),
        audit.event(action=audit.Action.ATTEMPT_REQUEST, actor=worker, attempt=1, request=("0" * 64, 950), **common),
        audit.event(
            action=audit.Action.ATTEMPT_RESPONSE,
            actor=worker,
            attempt=1,
            outcome="answer",
            http_status=200,
            latency_ms=rng.randint(300, 4000),
            response=(secrets.token_hex(32), 1200),
            **common,
        ),
        audit.event(action=audit.Action.SUCCEEDED, actor=worker, attempt=1, outcome="succeeded", **common),
        audit.event(action=audit.Action.RESULT_READ, actor=producer, outcome="succeeded", **common),
    ]
    for n, made_event in enumerate(made):
        made_event["occurred_at"] = t0 + timedelta(milliseconds=n * 500)
    return made


class Loader:
    """Jobs and their chained events, in batches, as the product writes them."""

    def __init__(self, settings: Settings, jobs: int) -> None:
        self.settings, self.jobs = settings, jobs
        self.keyring = Keyring.from_spec(settings.encryption_keys.reveal())
        self.key = SubjectKey(settings.subject_key.reveal().encode())
        rng = random.Random(SEED)
        self.rng = rng
        self.about = set(rng.sample(range(jobs), ABOUT))
        self.seq, self.prev = 0, GENESIS
        self.start = datetime.now(UTC) - timedelta(days=DAYS)

    def batches(self) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
        step = timedelta(days=DAYS) / self.jobs
        jobs: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        for n in range(self.jobs):
            subject = SUBJECT if n in self.about else f"MRN-{self.rng.randint(1, self.jobs // 5):07d}"
            job_id, t0 = str(uuid.UUID(int=self.rng.getrandbits(128), version=4)), self.start + step * n
            index = self.key.index(subject)
            jobs.append(self._job(job_id, subject, index, t0))
            for made in _events(job_id, index, t0, self.rng):
                events.append(self._chain(made))
            if len(jobs) >= BATCH:
                yield jobs, events
                jobs, events = [], []
        if jobs:
            yield jobs, events

    def _job(self, job_id: str, subject: str, index: str, t0: datetime) -> dict[str, Any]:
        payload = json.dumps({"messages": [{"role": "user", "content": "Summarise the visit note."}]})
        return {
            "id": job_id,
            "status": "succeeded",
            "assistant_id": "65d5f3473d5d68095462165d",
            "payload": self.keyring.encrypt(payload, aad=aad_for("jobs", "payload", job_id)),
            "payload_digest": "0" * 64,
            "actor": "intake",
            "attempts": 1,
            "max_attempts": 5,
            "faults": 0,
            "created_at": t0,
            "updated_at": t0,
            "finished_at": t0,
            "subject": self.keyring.encrypt(subject, aad=aad_for("jobs", "subject", job_id)),
            "subject_index": index,
        }

    def _chain(self, made: dict[str, Any]) -> dict[str, Any]:
        self.seq += 1
        made["seq"], made["prev_hash"] = self.seq, self.prev
        made["row_hash"] = self.prev = audit.chain_hash(self.prev, made)
        if self.seq % ANCHOR_EVERY == 0:
            integrity.write_anchor(self.settings, self.seq, self.prev)
        return made


def load(settings: Settings, jobs: int) -> float:
    url = settings.effective_database_url
    schema.upgrade(url)
    engine = db.make_engine(url)
    loader = Loader(settings, jobs)
    started = time.perf_counter()
    try:
        for job_rows, event_rows in loader.batches():
            with engine.begin() as connection:
                connection.execute(insert(Job.__table__), job_rows)
                connection.execute(insert(AuditEvent.__table__), event_rows)
        last_at = loader.start + timedelta(days=DAYS)
        with engine.begin() as connection:  # the head is a cache the product's seal locks and moves on
            connection.execute(
                update(AuditChainHead)
                .where(AuditChainHead.id == 1)
                .values(seq=loader.seq, row_hash=loader.prev, last_at=last_at)
            )
        integrity.write_anchor(settings, loader.seq, loader.prev)
        if engine.dialect.name == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.execute(text("ANALYZE"))
    finally:
        engine.dispose()
    return time.perf_counter() - started


def unindexed(settings: Settings) -> int:
    """Find the subject's jobs without the blind index: decrypt every job's subject; then read their events."""
    keyring = Keyring.from_spec(settings.encryption_keys.reveal())
    engine = db.make_engine(settings.effective_database_url)
    try:
        with engine.connect() as connection:
            found = [
                job_id
                for job_id, sealed in connection.execute(select(Job.id, Job.subject))
                if sealed and keyring.decrypt(sealed, aad=aad_for("jobs", "subject", job_id)) == SUBJECT
            ]
            rows = connection.execute(select(AuditEvent).where(AuditEvent.job_id.in_(found))).all()
        return len(rows)
    finally:
        engine.dispose()


def _median(work: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@contextmanager
def scratch(backend: str, where: Path) -> Iterator[str]:
    if backend == "sqlite":
        try:
            yield f"sqlite:///{where / 'bench.db'}"
        finally:
            reset_runtimes()
        return
    name = f"qbgw_bench_{secrets.token_hex(4)}"
    server = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with server.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        reset_runtimes()
        with server.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        server.dispose()


def run(backend: str, jobs: int, runs: int) -> None:
    where = Path(tempfile.mkdtemp(prefix="qbgw-bench-report-"))
    try:
        with scratch(backend, where) as url:
            settings = _settings(url, where)
            seconds = load(settings, jobs)
            print(f"[{backend}] loaded {jobs:,} jobs, {jobs * 5:,} chained events in {seconds:.1f}s")
            report = access_report(SUBJECT, settings=settings)
            assert len(report.jobs) == ABOUT, len(report.jobs)
            assert report.chain_ok, report.chain_detail
            day_start = datetime.now(UTC) - timedelta(days=DAYS // 2)
            day = access_report(SUBJECT, start=day_start, end=day_start + timedelta(days=1), settings=settings)
            whole = _median(lambda: access_report(SUBJECT, settings=settings), runs)
            one_day = _median(
                lambda: access_report(SUBJECT, start=day_start, end=day_start + timedelta(days=1), settings=settings),
                runs,
            )
            scan = _median(lambda: unindexed(settings), runs)
            events = len(report.rows())
            walk = _median(lambda: admin.verify_log(settings=settings), 1)
            print(f"[{backend}] access report, whole period ({ABOUT} jobs, {events} events): {whole * 1000:8.0f} ms")
            print(f"[{backend}]   chain: {report.chain_detail}")
            print(f"[{backend}] access report, one day ({len(day.jobs)} job(s)): {one_day * 1000:8.0f} ms")
            print(f"[{backend}] unindexed scan (decrypt {jobs:,} subjects, read events): {scan * 1000:8.0f} ms")
            print(f"[{backend}] for scale, qbgw audit verify (the full walk): {walk * 1000:8.0f} ms")
    finally:
        shutil.rmtree(where, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("postgres", "sqlite", "both"), default="both")
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    for backend in ("postgres", "sqlite") if args.backend == "both" else (args.backend,):
        run(backend, args.jobs, args.runs)


if __name__ == "__main__":
    main()
