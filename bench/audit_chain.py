"""The audit chain's ceiling: seals per second with many concurrent writers, beside the same writes without
the chain head's lock, on PostgreSQL, here and behind a proxy that adds a delay each way (a managed
database's distance).

Every transaction that writes audit events seals them under the ``audit_chain_head`` row lock, taken by
``qbgw_audit_seal`` and held until the COMMIT has flushed to disk (``synchronous_commit = on``). So the
fleet's seals per second cannot exceed one over that hold time, however many writers there are. This bench
measures that ceiling with the product's own seal (``SELECT qbgw_audit_seal(...); COMMIT``, the query a
worker's commit sends) from ``--writers`` connections spread over ``--processes`` processes (so that the
client's GIL is not what is measured), each transaction first doing one UPDATE of a row of its own (as a
job's transactions do), then sealing one event like an attempt's. Beside it, in the same run, the same
transactions writing the same event row into an unchained copy of ``audit_events`` (no head lock): what
the database allows when nothing serialises the writers.

    .venv/bin/python -m bench.audit_chain                       # 64 writers, 0 and 1 ms each way
    .venv/bin/python -m bench.audit_chain --writers 16 --seconds 3 --delays 0

A job seals 3 times (submitted, the attempt's request, its outcome), so the fleet's jobs/s ceiling is the
seals/s over 3.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from bench.chaos import scratch_database
from qbgw.settings import Secret
from qbgw.store.chain import SEAL_AND_COMMIT_SQL, SEAL_BLOCK, STAGE_AND_COMMIT_SQL, seal_argument

#: The unchained copy of audit_events (same columns, no triggers, no head).
PLAIN = "bench_plain_events"
WORK = "bench_chain_work"
KEY = Secret("kc:" + "C" * 43 + "=")


def _event(writer: int) -> dict[str, object]:
    """An attempt's request event, as a worker stages it (digests and sizes, never content)."""
    return {
        "action": "attempt.request",
        "job_id": str(uuid.uuid4()),
        "batch_id": None,
        "assistant_id": "65d5f3473d5d68095462165d",
        "attempt": 1,
        "actor": f"worker-{writer}",
        "token_fp": "3f2a9c1d7e5b4a60",
        "outcome": None,
        "http_status": None,
        "error_class": None,
        "latency_ms": None,
        "request_digest": "a" * 64,
        "request_bytes": 512,
        "response_digest": None,
        "response_bytes": None,
        "detail": json.dumps({"image_count": 0}),
    }


def _dsn(url: str, port: int | None) -> str:
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    if port is not None:
        dsn = dsn.replace("127.0.0.1:5432", f"127.0.0.1:{port}")
    return dsn


def _writer(dsn: str, writer: int, mode: str, gate: Gate, counts: list[int]) -> None:
    payload = seal_argument([_event(writer)])
    plain = sql.SQL(
        "INSERT INTO {} (action, job_id, assistant_id, attempt, actor, token_fp, request_digest, request_bytes, "
        "detail, occurred_at) SELECT action, job_id, assistant_id, attempt, actor, token_fp, request_digest, "
        "request_bytes, detail, clock_timestamp() FROM jsonb_to_recordset({}::jsonb) AS e(action text, job_id "
        "text, assistant_id text, attempt integer, actor text, token_fp text, request_digest text, request_bytes "
        "integer, detail text); COMMIT"
    ).format(sql.Identifier(PLAIN), sql.Literal(payload))
    seal = SEAL_AND_COMMIT_SQL.format(sql.Literal(payload))
    stage = STAGE_AND_COMMIT_SQL.format(sql.Literal(payload))
    done = 0
    with psycopg.connect(dsn) as connection:
        cursor = connection.cursor()
        gate.ready.put(writer)
        gate.go.wait()
        until = gate.start.value + gate.seconds
        while time.monotonic() < until:
            cursor.execute(f"UPDATE {WORK} SET n = n + 1 WHERE id = %s", (writer,))
            cursor.execute({"chain": seal, "block": stage, "plain": plain}[mode])
            connection.commit()  # the query committed; this only ends psycopg's view of the transaction
            done += 1
    counts[writer] = done


@dataclass
class Gate:
    """Every writer connected before the clock starts (a spawned process takes seconds to import)."""

    ready: Any
    go: Any
    start: Any
    seconds: float


def _process(dsn: str, writers: range, mode: str, gate: Gate, out: Any) -> None:
    counts = [0] * writers.stop
    threads = [threading.Thread(target=_writer, args=(dsn, w, mode, gate, counts)) for w in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put(sum(counts))


@dataclass
class Result:
    """Transactions per second the writers committed, and (block mode) events per second the sealer chained
    while they ran, with what it had left when they stopped (and how long it took to chain it)."""

    committed: float
    chained: float
    backlog: int = 0
    drain_s: float = 0.0


class BlockSealer:
    """The block sealer as a worker runs it (``qbgw_audit_seal_pending``, blocks of ``SEAL_BLOCK``), in a
    thread of this process on its own connection, counting the events it chains."""

    def __init__(self, dsn: str) -> None:
        self.dsn, self.chained, self._stop = dsn, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            while not self._stop.is_set():
                row = connection.execute(
                    "SELECT first_seq, last_seq, sealed_rows FROM qbgw_audit_seal_pending(%s)", (SEAL_BLOCK,)
                ).fetchone()
                if row is not None and row[1] is not None:
                    self.chained += int(row[1]) - int(row[0]) + 1
                if row is None or row[2] < SEAL_BLOCK:
                    self._stop.wait(0.05)  # a worker's sealer waits QBGW_AUDIT_SEAL_INTERVAL (0.2 s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run(dsns: list[str], mode: str, writers: int, processes: int, seconds: float) -> Result:
    """Transactions per second over ``seconds`` with ``writers`` connections in ``processes`` processes (process
    ``p`` connecting to ``dsns[p]``)."""
    dsn = dsns[0]
    ctx = multiprocessing.get_context("spawn")
    out, gate = ctx.Queue(), Gate(ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0), seconds)
    per = -(-writers // processes)
    procs = [
        ctx.Process(target=_process, args=(dsns[p], range(p * per, min(writers, (p + 1) * per)), mode, gate, out))
        for p in range(processes)
    ]
    for proc in procs:
        proc.start()
    for _ in range(writers):
        gate.ready.get(timeout=120)
    sealer = BlockSealer(dsn) if mode == "block" else None
    gate.start.value = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process on the machine
    gate.go.set()
    total = sum(out.get(timeout=seconds + 60) for _ in procs)
    for proc in procs:
        proc.join()
    if sealer is None:
        return Result(total / seconds, total / seconds)
    chained = sealer.chained
    with psycopg.connect(dsn) as connection:
        row = connection.execute("SELECT count(*) FROM audit_pending").fetchone()
    backlog = int(row[0]) if row else 0
    started = time.monotonic()
    while True:  # then the rest, as the sealer would go on doing
        with psycopg.connect(dsn) as connection:
            left = connection.execute("SELECT count(*) FROM audit_pending").fetchone()
        if not left or left[0] == 0:
            break
        time.sleep(0.01)
    sealer.stop()
    return Result(total / seconds, chained / seconds, backlog, time.monotonic() - started)


class DelayProxy:
    """A TCP forwarder to PostgreSQL that holds every chunk ``delay`` seconds in each direction (order kept,
    bandwidth not limited): the round trip of a database some way off. It runs in a process of its own (one
    per writer process: one Python thread forwarding 64 connections was the bottleneck, not the database)."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.delay, self.target_port = delay, target_port

    def serve(self, ports: Any) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        server = loop.run_until_complete(asyncio.start_server(self._link, "127.0.0.1", 0))
        ports.put(server.sockets[0].getsockname()[1])
        loop.run_forever()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    writer.close()
                    return
                wait = due - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((self._loop.time() + self.delay, data))
        finally:
            queue.put_nowait((0.0, b""))
            await sender


def _serve_proxy(target_port: int, delay: float, ports: Any) -> None:
    DelayProxy(target_port, delay).serve(ports)


@contextmanager
def distance(delay_ms: float, count: int) -> Iterator[list[int | None]]:
    """``count`` ports, each a DelayProxy of its own to PostgreSQL (None each: no delay, connect directly)."""
    if delay_ms <= 0:
        yield [None] * count
        return
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    procs = [ctx.Process(target=_serve_proxy, args=(5432, delay_ms / 1000, ports), daemon=True) for _ in range(count)]
    for proc in procs:
        proc.start()
    try:
        yield [ports.get(timeout=60) for _ in procs]
    finally:
        for proc in procs:
            proc.kill()


@dataclass
class Row:
    delay_ms: float
    chain: list[Result]
    block: list[Result]
    plain: list[Result]


def prepare(url: str, writers: int) -> None:
    with psycopg.connect(_dsn(url, None), autocommit=True) as connection:
        connection.execute(f"CREATE TABLE {WORK} (id integer PRIMARY KEY, n bigint NOT NULL DEFAULT 0)")
        connection.execute(f"INSERT INTO {WORK} (id) SELECT generate_series(0, {writers})")
        connection.execute(f"CREATE TABLE {PLAIN} (LIKE audit_events INCLUDING DEFAULTS INCLUDING INDEXES)")
        connection.execute(
            f"ALTER TABLE {PLAIN} ALTER COLUMN seq DROP NOT NULL, ALTER COLUMN prev_hash DROP NOT NULL,"
            " ALTER COLUMN row_hash DROP NOT NULL"
        )
        setting = connection.execute("SHOW synchronous_commit").fetchone()
        fsync = connection.execute("SHOW fsync").fetchone()
        print(f"PostgreSQL synchronous_commit={setting[0] if setting else '?'} fsync={fsync[0] if fsync else '?'}")


def verify(url: str) -> str:
    """The chain the runs built, walked as ``qbgw audit verify`` walks it (no anchors: a scratch database)."""
    from qbgw.audit.verify import check
    from qbgw.runtime.locator import runtime
    from qbgw.settings import Settings
    from qbgw.store import chain

    settings = Settings(database_url=url, encryption_keys=KEY)
    with runtime(settings).transaction() as session:
        rows = chain._rows(session)
        report = check(rows, [], b"", v2_from=1, v3_from=1)
    return f"{report.events:,} events, {'intact' if report.ok else 'BROKEN: ' + str(report.problem)}"


def _m(results: list[Result], what: str) -> float:
    return statistics.median(getattr(r, what) for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--processes", type=int, default=4, help="writer processes (threads split among them)")
    parser.add_argument("--seconds", type=float, default=5.0, help="each measurement's length")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--delays", default="0,1", help="ms added each way between writers and PostgreSQL")
    args = parser.parse_args()
    delays = [float(d) for d in args.delays.split(",")]
    rows = []
    with scratch_database("qbgw_chain") as url:
        prepare(url, args.writers)
        for delay in delays:
            row = Row(delay, [], [], [])
            with distance(delay, args.processes) as ports:
                dsn = [_dsn(url, port) for port in ports]
                for _ in range(args.reps):  # interleaved, so all see the same machine
                    row.chain.append(run(dsn, "chain", args.writers, args.processes, args.seconds))
                    row.block.append(run(dsn, "block", args.writers, args.processes, args.seconds))
                    row.plain.append(run(dsn, "plain", args.writers, args.processes, args.seconds))
            rows.append(row)
        print(f"chain after every run: {verify(url)}")
    print(
        f"\n{args.writers} writers in {args.processes} processes, {args.seconds:g} s each, medians of {args.reps}; "
        "one transaction = UPDATE + one audit event; synchronous_commit on\n"
    )
    print(
        "delay each way | commit seal: seals/s | block: staged/s, chained/s, backlog left, drained in | "
        "unchained writes/s | block / commit | fleet jobs/s (3 seals/job): commit, block"
    )
    for row in rows:
        chain, plain = _m(row.chain, "committed"), _m(row.plain, "committed")
        staged, chained = _m(row.block, "committed"), _m(row.block, "chained")
        backlog, drain = _m(row.block, "backlog"), _m(row.block, "drain_s")
        block = min(staged, chained) if backlog > staged else staged  # a sealer that falls behind caps it
        print(
            f"{row.delay_ms:>11g} ms | {chain:>20,.0f} | {staged:>7,.0f}, {chained:>7,.0f}, {backlog:>6,.0f}, "
            f"{drain:>5.2f} s | {plain:>18,.0f} | {block / chain:>14.1f}x | {chain / 3:,.0f}, {block / 3:,.0f}"
        )
        for name, results in (("commit", row.chain), ("block", row.block), ("unchained", row.plain)):
            print(f"{'':>14} {name} runs: {', '.join(f'{r.committed:,.0f}' for r in results)}")


if __name__ == "__main__":
    main()
