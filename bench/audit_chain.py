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
from qbgw.store.chain import SEAL_AND_COMMIT_SQL, seal_argument

#: The unchained copy of audit_events (same columns, no triggers, no head).
PLAIN = "bench_plain_events"
WORK = "bench_chain_work"


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
    done = 0
    with psycopg.connect(dsn) as connection:
        cursor = connection.cursor()
        gate.ready.put(writer)
        gate.go.wait()
        until = gate.start.value + gate.seconds
        while time.monotonic() < until:
            cursor.execute(f"UPDATE {WORK} SET n = n + 1 WHERE id = %s", (writer,))
            cursor.execute(seal if mode == "chain" else plain)
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


def run(dsn: str, mode: str, writers: int, processes: int, seconds: float) -> float:
    """Transactions per second over ``seconds`` with ``writers`` connections in ``processes`` processes."""
    ctx = multiprocessing.get_context("spawn")
    out, gate = ctx.Queue(), Gate(ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0), seconds)
    per = -(-writers // processes)
    procs = [
        ctx.Process(target=_process, args=(dsn, range(p * per, min(writers, (p + 1) * per)), mode, gate, out))
        for p in range(processes)
    ]
    for proc in procs:
        proc.start()
    for _ in range(writers):
        gate.ready.get(timeout=120)
    gate.start.value = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process on the machine
    gate.go.set()
    total = sum(out.get(timeout=seconds + 60) for _ in procs)
    for proc in procs:
        proc.join()
    return total / seconds


class DelayProxy:
    """A TCP forwarder to PostgreSQL that holds every chunk ``delay`` seconds in each direction (order kept,
    bandwidth not limited): the round trip of a database some way off."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.delay, self.target_port, self.port = delay, target_port, 0
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._link, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

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

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


@contextmanager
def distance(delay_ms: float) -> Iterator[int | None]:
    if delay_ms <= 0:
        yield None
        return
    proxy = DelayProxy(5432, delay_ms / 1000)
    try:
        yield proxy.port
    finally:
        proxy.close()


@dataclass
class Row:
    delay_ms: float
    chain: list[float]
    plain: list[float]
    single: list[float]


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
            with distance(delay) as port:
                dsn = _dsn(url, port)
                for _ in range(args.reps):  # interleaved, so both see the same machine
                    row.chain.append(run(dsn, "chain", args.writers, args.processes, args.seconds))
                    row.plain.append(run(dsn, "plain", args.writers, args.processes, args.seconds))
                    row.single.append(run(dsn, "chain", 1, 1, args.seconds))
            rows.append(row)
    print(
        f"\n{args.writers} writers in {args.processes} processes, {args.seconds:g} s each, medians of {args.reps}; "
        "one transaction = UPDATE + one event\n"
    )
    print(
        "added delay each way | chained seals/s | unchained same writes/s | chain / unchained | "
        "1 writer seals/s | fleet jobs/s ceiling (3 seals/job)"
    )
    for row in rows:
        chain, plain, single = (statistics.median(v) for v in (row.chain, row.plain, row.single))
        print(
            f"{row.delay_ms:>17g} ms | {chain:>22,.0f} | {plain:>23,.0f} | {chain / plain:>17.2f} | "
            f"{single:>16,.0f} | {chain / 3:,.0f}"
        )
        print(
            f"{'':>20} runs: chain {', '.join(f'{x:,.0f}' for x in row.chain)}; "
            f"unchained {', '.join(f'{x:,.0f}' for x in row.plain)}"
        )


if __name__ == "__main__":
    main()
