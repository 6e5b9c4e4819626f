"""Audit log at scale: verify a chain of a million events, and answer filtered audit queries over it.

Loads N realistic, correctly chained audit events into a scratch database (N/5 jobs, each
``job.submitted``, ``attempt.request``, ``attempt.response``, ``job.succeeded`` (or, for 2%,
``job.failed``), ``result.read``), signs one anchor over the last event, then measures, each
beside a baseline taken in the same run:

1. ``worker.integrity.verify`` over the whole chain (requirement: under a minute for 1,000,000
   events), beside the time to merely stream the same rows, to run ``audit.chain_hash`` over rows
   already in memory, and to sha256 as many ~400-byte strings;
2. ``worker.queries.audit_query`` for six filters and two worst-case probes (requirement: well
   under a second), each the median of 5 calls, beside a ``SELECT 1`` round trip and a full
   ``SELECT count(*)`` of the table,
   with each query's plan (EXPLAIN ANALYZE on PostgreSQL, EXPLAIN QUERY PLAN on SQLite).
   Every ``audit_query`` call is itself an audited read: it seals and commits one
   ``audit.queried`` event, and that write is part of what is measured.

    .venv/bin/python -m bench.audit_scale                              # 1,000,000 events, PostgreSQL and SQLite
    .venv/bin/python -m bench.audit_scale --backend postgres           # PostgreSQL only
    .venv/bin/python -m bench.audit_scale --events 100000 --profile    # smaller; cProfile verify too

PostgreSQL on 127.0.0.1:5432 (QBGW_TEST_PG_URL overrides the admin URL): a scratch database
qbgw_bench_<hex> is made and dropped WITH (FORCE) at the end, and ANALYZEd after loading. SQLite
is a file in a temp dir, not ANALYZEd (the product never does). About 3 minutes for both at 1M.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import hashlib
import io
import itertools
import json
import os
import pstats
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import ClauseElement, Executable

from qbgw.audit import anchors as integrity
from qbgw.audit import events as audit
from qbgw.queries import AuditFilter, audit_query
from qbgw.runtime.context import Runtime
from qbgw.runtime.locator import reset as reset_runtimes
from qbgw.runtime.locator import runtime
from qbgw.settings import Secret, Settings
from qbgw.store import chain, db, schema
from qbgw.store.models import GENESIS, AuditChainHead, AuditEvent

PG_ADMIN = os.environ.get("QBGW_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
BATCH = 20_000
SEED = 20261125
DAYS = 30
EVENTS_PER_JOB = 5
#: The columns a loader writes: the chained ones and the two hashes (``id`` is the table's own).
COLUMNS = (*audit.CHAINED, "prev_hash", "row_hash")
#: verify() past this many seconds misses the requirement, and is profiled.
VERIFY_LIMIT = 60.0
PROFILE_EVENTS = 100_000
RUNS = 5
#: (status, error class) of the permanent answers a failed job gets, as worker.gateway.interpret maps them.
PERMANENT = (
    (405, "FeatureDisabled"),
    (400, "UpstreamRejected"),
    (422, "UpstreamRejected"),
    (413, "UpstreamRejected"),
    (401, "AuthenticationFailed"),
    (200, "MalformedResponse"),
)
FAILED_SHARE = 0.02


# --- the events ------------------------------------------------------------------------------------


def _hex(rng: random.Random, bits: int) -> str:
    return f"{rng.getrandbits(bits):0{bits // 4}x}"


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@dataclass(frozen=True)
class World:
    """Who and what the events are about."""

    start: datetime
    producers: list[str]
    readers: list[str]
    workers: list[str]
    assistants: list[str]
    batches: list[str]
    tokens: list[str]

    @classmethod
    def make(cls, rng: random.Random, now: datetime) -> World:
        return cls(
            start=(now - timedelta(days=DAYS)).replace(hour=0, minute=0, second=0, microsecond=0),
            producers=[
                f"{team}-{i:02d}"
                for team in ("intake", "portal", "triage", "radiology", "billing")
                for i in range(1, 9)
            ],
            readers=[f"auditor-{i}" for i in range(1, 6)] + [f"care-team-{i}" for i in range(1, 6)],
            workers=[f"qbgw-worker-{i}:{rng.randint(100, 65000)}" for i in range(1, 9)],
            assistants=[_hex(rng, 96) for _ in range(20)],
            batches=[_uuid(rng) for _ in range(100)],
            tokens=[audit.fingerprint(f"qb-token-{k}") for k in range(3)],
        )


def _event(action: audit.Action, at: datetime, actor: str, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(audit.CHAINED)
    row.update(occurred_at=at, action=str(action), actor=actor, **fields)
    return row


def job_events(rng: random.Random, world: World, job_id: str, t0: datetime, batch_id: str) -> list[dict[str, Any]]:
    """One job's five events, with the fields and values worker.store/tasks/queries give them.

    (No product code sets ``batch_id`` yet; here a batch is a contiguous run of 1% of the jobs,
    submitted together, so a batch's events are clustered in time as a real batch's would be.)"""
    producer, worker = rng.choice(world.producers), rng.choice(world.workers)
    common = {"job_id": job_id, "assistant_id": rng.choice(world.assistants), "batch_id": batch_id}
    messages = rng.choice((1, 1, 2, 2, 3, 4, 6))
    payload = int(rng.lognormvariate(7.5, 1.8)) + 60  # text jobs ~2 KB; image jobs up to megabytes
    detail = {"assistant_id": common["assistant_id"], "custom_id": f"doc-{rng.randint(1, 10**6)}", "messages": messages}
    asked = t0 + timedelta(seconds=rng.uniform(0.02, 1.5))
    answered = asked + timedelta(milliseconds=(latency := int(rng.lognormvariate(7.0, 0.6))))
    failed = rng.random() < FAILED_SHARE
    status, error_class = rng.choice(PERMANENT) if failed else (200, None)
    one = {"attempt": 1, **common}
    return [
        _event(
            audit.Action.SUBMITTED,
            t0,
            producer,
            request_digest=_hex(rng, 256),
            request_bytes=payload,
            detail=json.dumps(detail, sort_keys=True),
            **common,
        ),
        _event(
            audit.Action.ATTEMPT_REQUEST,
            asked,
            worker,
            request_digest=_hex(rng, 256),
            request_bytes=payload + 52,
            token_fp=world.tokens[(t0 - world.start).days * 3 // DAYS],
            **one,
        ),
        _event(
            audit.Action.ATTEMPT_RESPONSE,
            answered,
            worker,
            outcome="permanent" if failed else "answer",
            http_status=status,
            error_class=error_class,
            latency_ms=latency,
            response_digest=_hex(rng, 256),
            response_bytes=rng.randint(80, 400) if failed else rng.randint(300, 6000),
            **one,
        ),
        _event(
            audit.Action.FAILED if failed else audit.Action.SUCCEEDED,
            answered,
            worker,
            outcome="failed" if failed else "succeeded",
            http_status=status,
            error_class=error_class,
            **one,
        ),
        _event(
            audit.Action.RESULT_READ,
            answered + timedelta(seconds=rng.uniform(0.05, 3.0)),
            producer if rng.random() < 0.8 else rng.choice(world.readers),
            outcome="failed" if failed else "succeeded",
            **common,
        ),
    ]


@dataclass
class EventSource:
    """N chained events in batches, exactly as audit.seal chains them: seq 1..N from GENESIS."""

    events: int
    world: World
    rng: random.Random
    last_hash: str = GENESIS
    seconds: float = 0.0  # spent generating and chaining (the rest of a load is the database's)
    job_ids: list[str] = field(default_factory=list)

    def batches(self) -> Iterator[list[dict[str, Any]]]:
        jobs = -(-self.events // EVENTS_PER_JOB)
        step = DAYS * 86_400 / jobs
        seq, prev, batch = 0, GENESIS, []
        started = time.perf_counter()
        for number in range(jobs):
            job_id = _uuid(self.rng)
            self.job_ids.append(job_id)
            t0 = self.world.start + timedelta(seconds=number * step + self.rng.uniform(0, step / 2))
            batch_id = self.world.batches[number * len(self.world.batches) // jobs]
            for row in job_events(self.rng, self.world, job_id, t0, batch_id)[: self.events - seq]:
                seq += 1
                row["seq"], row["prev_hash"] = seq, prev
                row["row_hash"] = prev = audit.chain_hash(prev, row)
                batch.append(row)
            if len(batch) >= BATCH or seq == self.events:
                self.seconds += time.perf_counter() - started
                self.last_hash = prev
                yield batch
                batch, started = [], time.perf_counter()


# --- loading -------------------------------------------------------------------------------------


def load_postgres(engine: Engine, source: EventSource) -> None:
    """COPY the events in (the append-only triggers refuse only UPDATE, DELETE and TRUNCATE)."""
    statement = f"COPY audit_events ({', '.join(COLUMNS)}) FROM STDIN"
    raw = engine.raw_connection()
    try:
        connection: Any = raw.driver_connection
        for batch in source.batches():
            with connection.cursor() as cursor, cursor.copy(statement) as copy:
                for row in batch:
                    copy.write_row([row[name] for name in COLUMNS])
            connection.commit()
    finally:
        raw.close()


def load_sqlite(engine: Engine, source: EventSource) -> None:
    """SQLAlchemy Core executemany, one transaction per batch."""
    for batch in source.batches():
        with engine.begin() as connection:
            connection.execute(insert(AuditEvent.metadata.tables["audit_events"]), batch)


def load(url: str, settings: Settings, events: int, postgres: bool) -> tuple[EventSource, float]:
    """Load the chain, set its head row, sign one anchor over its last event; returns the source and seconds."""
    source = EventSource(events, World.make(random.Random(SEED), datetime.now(UTC)), random.Random(SEED + 1))
    engine = db.make_engine(url)
    started = time.perf_counter()
    try:
        (load_postgres if postgres else load_sqlite)(engine, source)
        with engine.begin() as connection:  # the head row is a cache that audit.seal locks and moves on
            connection.execute(
                update(AuditChainHead).where(AuditChainHead.id == 1).values(seq=events, row_hash=source.last_hash)
            )
        integrity.write_anchor(settings, events, source.last_hash)
        seconds = time.perf_counter() - started
        if postgres:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.execute(text("ANALYZE"))
    finally:
        engine.dispose()
    return source, seconds


# --- scratch databases ---------------------------------------------------------------------------


@contextmanager
def scratch_postgres() -> Iterator[str]:
    name = f"qbgw_bench_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        reset_runtimes()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def scratch_sqlite(where: Path) -> Iterator[str]:
    try:
        yield f"sqlite:///{where / 'bench.db'}"
    finally:
        reset_runtimes()


# --- measuring -----------------------------------------------------------------------------------


def _seconds(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _median_ms(work: Callable[[], object], runs: int = RUNS) -> float:
    return statistics.median(_seconds(work) for _ in range(runs)) * 1000


def _stream(session: Session) -> int:
    """The SELECT verify() runs (chained columns by seq, yield_per 20,000), read but not hashed."""
    columns = [getattr(AuditEvent, name) for name in COLUMNS]
    result = session.execute(select(*columns).order_by(AuditEvent.seq).execution_options(yield_per=20_000))
    try:
        return sum(1 for _ in result.mappings())
    finally:
        result.close()


def _hash_in_memory(rows: list[dict[str, Any]], events: int) -> None:
    prev = GENESIS
    for row in itertools.islice(itertools.cycle(rows), events):
        prev = audit.chain_hash(prev, row)


def _sha256_only(events: int) -> None:
    blobs = [secrets.token_bytes(400) for _ in range(1000)]
    for number in range(events):
        hashlib.sha256(blobs[number % 1000]).hexdigest()


@dataclass
class VerifyFigures:
    events: int = 0
    ok: bool = False
    problem: str = ""
    seconds: float = 0.0
    stream_seconds: float = 0.0
    chain_hash_seconds: float = 0.0
    sha256_seconds: float = 0.0
    profile: str = ""


def measure_verify(rt: Runtime, sample: list[dict[str, Any]], events: int, force_profile: bool) -> VerifyFigures:
    anchors = integrity.read_anchors(rt.settings.anchor_path)
    key = integrity.anchor_key(rt.settings)
    figures = VerifyFigures()
    with rt.transaction() as session:
        report = chain.verify(session, anchors, key)
    figures.events, figures.ok, figures.seconds = report.events, report.ok, report.seconds
    figures.problem = report.problem.message if report.problem else ""
    with rt.transaction() as session:
        figures.stream_seconds = _seconds(lambda: _stream(session))
    figures.chain_hash_seconds = _seconds(lambda: _hash_in_memory(sample, events))
    figures.sha256_seconds = _seconds(lambda: _sha256_only(events))
    if force_profile or figures.seconds > VERIFY_LIMIT:
        figures.profile = profile_verify(rt, min(PROFILE_EVENTS, events))
    return figures


def profile_verify(rt: Runtime, events: int) -> str:
    """cProfile of verify's walk over the first ``events`` events (its own SELECT and loop)."""
    profiler = cProfile.Profile()
    with rt.transaction() as session:
        rows = integrity._rows(session)
        try:
            profiler.runcall(integrity._walk, itertools.islice(rows, events), {})
        finally:
            rows.close()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime")
    out.write(f"cProfile of verify's walk over {events:,} events, top entries by own time:\n")
    stats.print_stats(15)
    return out.getvalue()


class Explain(Executable, ClauseElement):
    """``EXPLAIN ...`` (``EXPLAIN QUERY PLAN`` on SQLite) of a select, its parameters bound as usual."""

    inherit_cache = False

    def __init__(self, statement: Any) -> None:
        self.statement = statement


@compiles(Explain, "postgresql")
def _explain_postgres(element: Explain, compiler: Any, **kw: Any) -> str:
    return "EXPLAIN (ANALYZE, COSTS OFF) " + str(compiler.process(element.statement, **kw))


@compiles(Explain, "sqlite")
def _explain_sqlite(element: Explain, compiler: Any, **kw: Any) -> str:
    return "EXPLAIN QUERY PLAN " + str(compiler.process(element.statement, **kw))


def plan(rt: Runtime, query: AuditFilter) -> list[str]:
    """The plan of the SELECT audit_query runs: its top line and every scan in it."""
    statement = select(AuditEvent).where(*query.where()).order_by(AuditEvent.seq).limit(query.limit)
    with rt.transaction() as session:
        lines = [str(row[-1]).strip() for row in session.execute(Explain(statement))]
    keep = ("Scan", "Filter", "Index Cond", "Recheck", "SCAN", "SEARCH", "TEMP B-TREE", "Sort")
    return lines[:1] + [line for line in lines[1:] if any(word in line for word in keep)]


@dataclass
class QueryFigure:
    name: str
    median_ms: float
    rows: int
    plan: list[str]


def queries(source: EventSource) -> list[tuple[str, AuditFilter]]:
    world, job_id = source.world, source.job_ids[len(source.job_ids) // 2]
    day = world.start + timedelta(days=DAYS // 2)
    until = day + timedelta(days=1)
    return [
        ("one job (job_id)", AuditFilter(job_id=job_id)),
        ("one actor, one day", AuditFilter(actor=world.producers[7], since=day, until=until)),
        ("one action, one day, limit 1000", AuditFilter(action="attempt.response", since=day, until=until)),
        ("one assistant, limit 1000", AuditFilter(assistant_id=world.assistants[3])),
        ("one batch, limit 1000", AuditFilter(batch_id=world.batches[42])),
        ("outcome=permanent, limit 100", AuditFilter(outcome="permanent", limit=100)),
        # Not in the brief's list: the worst case of an unindexed column, a value no event has.
        ("probe: outcome=interrupted (0 stored), limit 100", AuditFilter(outcome="interrupted", limit=100)),
        # ... and of ORDER BY seq LIMIT over a value clustered at the end of the log.
        ("probe: newest batch, limit 1000", AuditFilter(batch_id=world.batches[-1])),
    ]


def measure_queries(rt: Runtime, source: EventSource) -> list[QueryFigure]:
    figures = []
    for name, query in queries(source):
        rows = len(audit_query(query, reader="bench", settings=rt.settings))
        ms = _median_ms(lambda q=query: audit_query(q, reader="bench", settings=rt.settings))  # type: ignore[misc]
        figures.append(QueryFigure(name, ms, rows, plan(rt, query)))
    return figures


def measure_baselines(rt: Runtime) -> tuple[float, float, int]:
    """(ms of a SELECT 1 round trip, ms of SELECT count(*) FROM audit_events, that count)."""
    with rt.transaction() as session:
        one = statistics.median(_seconds(lambda: session.execute(text("SELECT 1")).scalar()) for _ in range(50))
        count = session.execute(text("SELECT count(*) FROM audit_events")).scalar_one()
        scan = _median_ms(lambda: session.execute(text("SELECT count(*) FROM audit_events")).scalar_one())
    return one * 1000, scan, int(count)


# --- one backend, end to end ---------------------------------------------------------------------


@dataclass
class Result:
    backend: str
    events: int
    load_seconds: float = 0.0
    generate_seconds: float = 0.0
    verify: VerifyFigures = field(default_factory=VerifyFigures)
    queries: list[QueryFigure] = field(default_factory=list)
    select_one_ms: float = 0.0
    count_ms: float = 0.0
    count_rows: int = 0


def run_backend(backend: str, events: int, force_profile: bool) -> Result:
    result = Result(backend, events)
    where = Path(tempfile.mkdtemp(prefix=f"qbgw-bench-{backend}-"))
    scratch = scratch_postgres() if backend == "postgres" else scratch_sqlite(where)
    try:
        with scratch as url:
            settings = Settings(
                data_dir=where,
                database_url=url,
                anchor_key=Secret(secrets.token_hex(32)),
                encryption_keys=Secret("kb:" + base64.b64encode(os.urandom(32)).decode()),
            )
            say(f"[{backend}] migrating {db.describe_url(url)}")
            schema.upgrade(url)
            say(f"[{backend}] generating, chaining and loading {events:,} events ...")
            source, result.load_seconds = load(url, settings, events, backend == "postgres")
            result.generate_seconds = source.seconds
            say(
                f"[{backend}] loaded in {result.load_seconds:.1f} s ({source.seconds:.1f} s of it generating "
                f"and chaining); verifying ..."
            )
            rt = runtime(settings)
            sample = next(EventSource(BATCH, source.world, random.Random(SEED + 2)).batches())
            result.verify = measure_verify(rt, sample, events, force_profile)
            say(f"[{backend}] verified in {result.verify.seconds:.1f} s; querying ...")
            result.select_one_ms, result.count_ms, result.count_rows = measure_baselines(rt)
            result.queries = measure_queries(rt, source)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    return result


# --- printing ------------------------------------------------------------------------------------


def say(line: str) -> None:
    print(line, flush=True)


def _rate(events: int, seconds: float) -> str:
    return f"{events / seconds:,.0f}/s" if seconds > 0 else "-"


def print_verify(result: Result) -> None:
    v, n = result.verify, result.events
    verdict = "meets" if v.seconds < VERIFY_LIMIT else "MISSES"
    say(f"\n== {result.backend}: verify {n:,} events (requirement: under {VERIFY_LIMIT:.0f} s) ==")
    say(
        f"  integrity.verify          {v.seconds:8.2f} s  {_rate(v.events, v.seconds):>12}  events={v.events:,}"
        f"  ok={v.ok}  -> {verdict} the requirement"
    )
    if v.problem:
        say(f"  problem: {v.problem}")
    say(
        f"  baseline: stream only     {v.stream_seconds:8.2f} s  {_rate(n, v.stream_seconds):>12}  "
        "(the same SELECT, yield_per 20000, no hashing)"
    )
    say(
        f"  baseline: chain_hash only {v.chain_hash_seconds:8.2f} s  {_rate(n, v.chain_hash_seconds):>12}  "
        "(canonical JSON + sha256 of rows already in memory)"
    )
    say(
        f"  baseline: sha256 only     {v.sha256_seconds:8.2f} s  {_rate(n, v.sha256_seconds):>12}  "
        "(hashlib.sha256 of 400-byte strings)"
    )
    if v.seconds > VERIFY_LIMIT:
        say(f"  verify took {v.seconds:.0f} s: OVER the {VERIFY_LIMIT:.0f} s requirement")
    if v.profile:
        say("\n" + v.profile.rstrip())


def print_queries(result: Result) -> None:
    say(f"\n== {result.backend}: audit_query over {result.count_rows:,} events (requirement: well under 1 s) ==")
    say("  each call is an audited read: it also seals and commits one audit.queried event; median of 5 calls")
    say(f"  baseline: SELECT 1 round trip                    {result.select_one_ms:9.2f} ms")
    say(f"  baseline: SELECT count(*) FROM audit_events      {result.count_ms:9.2f} ms  (a full scan)")
    for q in result.queries:
        say(f"  {q.name:<47}  {q.median_ms:9.2f} ms  rows={q.rows}")
        for line in q.plan:
            say(f"      plan: {line}")


def print_table(results: list[Result]) -> None:
    say("\n== summary ==")
    rows: list[tuple[str, ...]] = [("figure", *(r.backend for r in results))]
    rows.append(("events", *(f"{r.events:,}" for r in results)))
    rows.append(("load (generate+chain+insert), s", *(f"{r.load_seconds:.1f}" for r in results)))
    rows.append(("  of which generate+chain, s", *(f"{r.generate_seconds:.1f}" for r in results)))
    rows.append(("verify, s (limit 60)", *(f"{r.verify.seconds:.2f}" for r in results)))
    rows.append(("verify ok", *(str(r.verify.ok) for r in results)))
    rows.append(("verify events/s", *(_rate(r.verify.events, r.verify.seconds) for r in results)))
    rows.append(("  baseline stream only, s", *(f"{r.verify.stream_seconds:.2f}" for r in results)))
    rows.append(("  baseline chain_hash only, s", *(f"{r.verify.chain_hash_seconds:.2f}" for r in results)))
    rows.append(("  baseline sha256 only, s", *(f"{r.verify.sha256_seconds:.2f}" for r in results)))
    rows.append(("SELECT 1, ms", *(f"{r.select_one_ms:.2f}" for r in results)))
    rows.append(("SELECT count(*), ms", *(f"{r.count_ms:.1f}" for r in results)))
    for number, query in enumerate(results[0].queries if results else []):
        rows.append((f"audit_query {query.name}, ms", *(f"{r.queries[number].median_ms:.1f}" for r in results)))
    width = max(len(row[0]) for row in rows)
    for row in rows:
        say("  " + row[0].ljust(width) + "".join(cell.rjust(14) for cell in row[1:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="audit events to load (default 1,000,000)")
    parser.add_argument("--backend", choices=("postgres", "sqlite", "both"), default="both")
    parser.add_argument("--profile", action="store_true", help="cProfile verify even when it meets the limit")
    args = parser.parse_args(argv)
    if args.events < 1:
        parser.error("--events must be at least 1")
    backends = ("postgres", "sqlite") if args.backend == "both" else (args.backend,)
    say(
        f"audit scale bench: {args.events:,} events on {', '.join(backends)}; {os.cpu_count()} CPUs; "
        f"Python {sys.version.split()[0]}"
    )
    results = []
    for backend in backends:
        result = run_backend(backend, args.events, args.profile)
        print_verify(result)
        print_queries(result)
        results.append(result)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
