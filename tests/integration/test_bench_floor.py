"""The audited minimal task of bench/ (the floor the performance page holds qbgw's latency against) records
each step of a job once, in the step's own statement, and nothing for a step that found no row."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from bench import minimal_app as floor
from tests.conftest import PgDatabase


@pytest.fixture
def connection(pg: PgDatabase) -> Iterator[psycopg.Connection[Any]]:
    connection = floor.connect(pg.admin)
    for statement in floor.AUDITED_DDL:
        connection.execute(statement)
    try:
        yield connection
    finally:
        for table in (floor.JOBS, floor.AUDIT, floor.HEAD):
            connection.execute(f"DROP TABLE {table}")
        connection.close()


def test_each_step_is_chained_once_and_a_step_without_its_row_records_nothing(
    connection: psycopg.Connection[Any],
) -> None:
    floor.submit_audited(connection, "j-1", "hello")
    claim = {"id": "j-1", "event": "request j-1"}
    assert connection.execute(floor._CLAIM, claim).fetchone() == ("hello",)
    assert connection.execute(floor._CLAIM, claim).fetchone() is None  # a duplicate delivery: not claimed again
    finish = {"answer": "an answer", "done_at": 1.0}
    connection.execute(floor._FINISH, {**finish, "id": "j-1", "event": "response j-1"})
    connection.execute(floor._FINISH, {**finish, "id": "nobody", "event": "response nobody"})
    assert floor.read_audited(connection, "j-1") == "an answer"
    assert floor.read_audited(connection, "nobody") is None
    events = connection.execute(f"SELECT seq, event FROM {floor.AUDIT} ORDER BY seq").fetchall()
    assert events == [(1, "submitted j-1"), (2, "request j-1"), (3, "response j-1"), (4, "read j-1")]
    assert connection.execute(f"SELECT seq FROM {floor.HEAD}").fetchall() == [(4,)]
    # The chain: each event's hash is its predecessor's hash and its text, hashed.
    linked = connection.execute(
        f"SELECT bool_and(a.hash = sha256(coalesce(p.hash, decode('00', 'hex')) || convert_to(a.event, 'UTF8'))) "
        f"FROM {floor.AUDIT} a LEFT JOIN {floor.AUDIT} p ON p.seq = a.seq - 1"
    ).fetchone()
    assert linked == (True,)
