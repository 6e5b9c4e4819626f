"""The audit page's hash formula is the specification: its reference block (docs/audit.md, "Checking the chain
without qbgw"), run as an auditor would run it (plain Python over rows read with the bare driver, no qbgw),
reproduces every ``row_hash`` of real chains qbgw wrote, on SQLite and PostgreSQL, in formats v3, v2 and v1."""

from __future__ import annotations

import re
import sqlite3
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from sqlalchemy import make_url, text

from qbgw import admin, producer
from qbgw.audit import events as audit
from qbgw.control import cancel, cancel_batch
from qbgw.execution.tasks import run_attempt
from qbgw.producer import submit_batch
from qbgw.queries import get_job
from qbgw.runtime.locator import runtime
from qbgw.settings import Secret, Settings
from tests.conftest import ASSISTANT, ROOT, as_owner

SPEC = ROOT / "docs" / "audit.md"
HEADING = "## Checking the chain without qbgw"


def spec_block() -> str:
    """The first python block after the audit page's heading: what an auditor would copy."""
    page = SPEC.read_text(encoding="utf-8")
    assert HEADING in page, "docs/audit.md lost its reference implementation of the audit hashes"
    block = re.search(r"```python\n(.*?)```", page[page.index(HEADING) :], re.S)
    assert block is not None, "no python block after the heading"
    return block.group(1)


def spec_reference() -> dict[str, Any]:
    """The reference block, executed."""
    namespace: dict[str, Any] = {}
    exec(compile(spec_block(), "docs/audit.md", "exec"), namespace)  # noqa: S102 - the docs' own code
    return namespace


def raw_rows(url: str) -> list[dict[str, Any]]:
    """Every audit event, read with the database's own driver as an auditor would, not through qbgw."""
    parsed = make_url(url)
    query = "SELECT * FROM audit_events ORDER BY seq"
    if parsed.get_backend_name() == "sqlite":
        connection = sqlite3.connect(str(parsed.database))
        connection.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in connection.execute(query)]
        finally:
            connection.close()
    conninfo = {"host": parsed.host, "port": parsed.port, "user": parsed.username, "dbname": parsed.database}
    with psycopg.connect(**{k: v for k, v in conninfo.items() if v is not None}, row_factory=dict_row) as pg:
        return list(pg.execute(query))


def write_a_varied_chain(settings: Settings) -> None:
    """Events with every kind of column: nulls and numbers, detail, a batch, a token fingerprint, non-ASCII and
    characters JSON escapes."""
    done = producer.submit(
        ASSISTANT, [{"role": "user", "content": "Hi"}], actor='Zoë — клиника "7"\\', settings=settings
    )
    run_attempt(runtime(settings), done)
    get_job(done, reader="nurse ü", settings=settings)
    failed = producer.submit(ASSISTANT, [{"role": "user", "content": "[[emulator:fail=400]]"}], settings=settings)
    run_attempt(runtime(settings), failed)
    waiting = producer.submit(ASSISTANT, [{"role": "user", "content": "later"}], settings=settings)
    cancel(waiting, actor="operator", settings=settings)
    batch = submit_batch(
        ['{"custom_id": "a", "messages": [{"role": "user", "content": "q"}]}'],
        assistant_id=ASSISTANT,
        settings=settings,
    )
    cancel_batch(batch.id, actor="operator", settings=settings)
    keyed = settings.with_(subject_key=Secret("s" * 40))  # a job about a subject: its events carry its index
    about = producer.submit(ASSISTANT, [{"role": "user", "content": "Hi"}], subject="MRN 7", settings=keyed)
    run_attempt(runtime(keyed), about)
    with runtime(settings).transaction() as session:
        audit.record(
            session=session,
            action=audit.Action.AUDIT_QUERIED,
            job_id=None,
            actor="auditor",
            detail={"note": "ünïcode \u2028 and \x01", "n": 1.5, "nested": {"b": [1, None]}},
        )


def test_the_specification_reproduces_every_row_hash_of_a_real_chain(settings: Settings) -> None:
    reference = spec_reference()
    write_a_varied_chain(settings)
    rows = raw_rows(settings.effective_database_url)
    assert len(rows) >= 15
    assert {row["action"] for row in rows} >= {"batch.created", "job.failed", "job.cancelled"}
    prev = reference["GENESIS"]
    for row in rows:
        assert reference["row_hash_v3"](prev, row) == row["row_hash"], f"event seq {row['seq']}"
        prev = row["row_hash"]
    assert reference["first_bad_seq"](rows) is None
    forged = [dict(row) for row in rows]
    forged[6]["actor"] = "someone else"
    assert reference["first_bad_seq"](forged) == rows[6]["seq"]
    indexed = [n for n, row in enumerate(rows) if row["subject_index"] is not None]
    assert len(indexed) >= 4  # the subject's job.submitted, attempt.request, attempt.response, job.succeeded
    forged = [dict(row) for row in rows]
    forged[indexed[1]]["subject_index"] = "0" * 64
    assert reference["first_bad_seq"](forged) == rows[indexed[1]]["seq"]
    forged[indexed[1]]["subject_index"] = None  # dropped: caught too
    assert reference["first_bad_seq"](forged) == rows[indexed[1]]["seq"]
    assert admin.verify_log(settings=settings).ok  # and qbgw agrees


def test_the_specification_reproduces_formats_v1_and_v2_before_their_boundaries(
    settings: Settings, owner_url: str
) -> None:
    reference = spec_reference()
    write_a_varied_chain(settings)
    v2_from, v3_from = 4, 8
    with as_owner(owner_url) as db:  # rewrite the first events as formats v1 and v2 made them (qbgw's own code)
        chained = _rechain(db, v2_from, v3_from)
        db.execute(
            text("UPDATE audit_chain_head SET row_hash = :h, v2_from = :a, v3_from = :b"),
            {"h": chained, "a": v2_from, "b": v3_from},
        )
    rows = raw_rows(settings.effective_database_url)
    assert reference["first_bad_seq"](rows, v2_from=v2_from, v3_from=v3_from) is None
    assert reference["first_bad_seq"](rows) == 1  # read as v3, the older events fail
    assert reference["first_bad_seq"](rows, v2_from=v2_from, v3_from=v2_from) == v2_from  # v2 ones read as v3 fail
    assert admin.verify_log(settings=settings).ok


def _rechain(db: Any, v2_from: int, v3_from: int) -> str:
    """Rehash events before ``v2_from`` in format v1, those before ``v3_from`` in v2, relink the rest in v3."""
    from qbgw.store.models import AuditEvent

    table = AuditEvent.__table__
    prev = "0" * 64
    for row in db.execute(table.select().order_by(table.c.seq)).mappings().all():
        values = dict(row)
        if row["seq"] >= v3_from:
            row_hash = audit.chain_hash(prev, values)
        else:
            row_hash = audit.chain_hash_v2(prev, values) if row["seq"] >= v2_from else audit.chain_hash_v1(prev, values)
        db.execute(table.update().where(table.c.seq == row["seq"]).values(prev_hash=prev, row_hash=row_hash))
        prev = row_hash
    return prev


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_specification_that_drifts_from_the_code_fails(settings: Settings) -> None:
    """The check above is not vacuous: the formula as it once stood (no 0x00 after the tag) fails."""
    reference = spec_reference()
    write_a_varied_chain(settings)
    rows = raw_rows(settings.effective_database_url)
    block = spec_block()
    assert 'b"qbgw-audit-v3-content\\x00"' in block
    drifted: dict[str, Any] = {}
    exec(block.replace('b"qbgw-audit-v3-content\\x00"', 'b"qbgw-audit-v3-content"'), drifted)  # noqa: S102
    assert drifted["first_bad_seq"](rows) == 1
    assert reference["first_bad_seq"](rows) is None
