"""Block sealing (QBGW_AUDIT_SEAL=block, PostgreSQL): a transaction's audit events are staged with its change,
without the chain head's lock, and chained later in blocks; nothing is lost, nothing is chained twice, the
application role cannot remove a staged event, and readers see the whole chain."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import DBAPIError

from qbgw import admin, producer, queries, reports
from qbgw.audit import events as audit
from qbgw.errors import ConfigError
from qbgw.execution.sealer import Sealer
from qbgw.execution.tasks import run_attempt
from qbgw.runtime.locator import runtime
from qbgw.settings import Secret, Settings
from qbgw.store import chain, reads, subjects
from qbgw.store.models import AuditEvent, AuditPending
from tests.conftest import ASSISTANT, wait_until

BLOCK = pytest.mark.parametrize("backend", ["postgres-block"])


def counts(settings: Settings) -> tuple[int, int]:
    """(events chained, transactions staged), read without chaining what is staged."""
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as connection:
            chained = connection.scalar(select(func.count()).select_from(AuditEvent)) or 0
            staged = connection.scalar(select(func.count()).select_from(AuditPending)) or 0
    finally:
        engine.dispose()
    return chained, staged


def note(settings: Settings, actor: str, n: int = 1) -> None:
    with runtime(settings).transaction() as session:
        for _ in range(n):
            audit.record(session=session, action=audit.Action.AUDIT_QUERIED, job_id=None, actor=actor, detail={})


@BLOCK
def test_events_are_staged_at_commit_and_chained_by_chain_staged(settings: Settings) -> None:
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": "staged"}], settings=settings)
    run_attempt(runtime(settings), job_id)
    chained, staged = counts(settings)
    assert chained == 0  # no commit took the head's lock
    assert staged >= 3  # submitted; the claim's request; the outcome (each transaction one row)
    with runtime(settings).transaction() as session:
        sealed = chain.chain_staged(session)
    assert sealed is not None
    assert sealed.first == 1
    assert counts(settings) == (sealed.last, 0)
    actions = [e.action for e in queries.job_events(job_id, settings=settings)]
    assert actions[0] == "job.submitted"
    assert actions[-1] == "job.succeeded"
    assert admin.verify_log(settings=settings).ok


@BLOCK
def test_readers_see_what_was_staged_without_waiting_for_a_sealer(settings: Settings) -> None:
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": "read me"}], settings=settings)
    assert [e.action for e in queries.job_events(job_id, settings=settings)] == ["job.submitted"]
    found = queries.audit_query(queries.AuditFilter(job_id=job_id), settings=settings)
    assert [e.action for e in found] == ["job.submitted"]


def head_is_free(owner_url: str) -> bool:
    """Whether another transaction could take the chain head's lock now (NOWAIT: refused at once if held)."""
    engine = create_engine(owner_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("SELECT 1 FROM audit_chain_head WHERE id = 1 FOR UPDATE NOWAIT"))
    except DBAPIError as exc:
        if "could not obtain lock" in str(exc):
            return False
        raise
    finally:
        engine.dispose()
    return True


#: Readers of the chain: (what to run inside the reader's transaction, after its reads; the read itself, which
#: says whether it saw the job's staged ``job.submitted``).
READERS: dict[str, tuple[tuple[Any, str], Callable[[Settings, str], bool]]] = {
    "audit query": (
        (reads, "query_audit"),
        lambda s, job: (
            [e.action for e in queries.audit_query(queries.AuditFilter(job_id=job), settings=s)] == ["job.submitted"]
        ),
    ),
    "job trail": (
        (reads, "job_trail"),
        lambda s, job: [e.action for e in queries.job_events(job, settings=s)] == ["job.submitted"],
    ),
    "access report": (
        (subjects, "last_verification"),
        lambda s, job: [r["kind"] for r in reports.access_report("MRN-1", settings=s).rows()] == ["job.submitted"],
    ),
    "anchor": ((admin, "write_anchor"), lambda s, job: admin.anchor_now(settings=s).seq == 1),
    "verification": ((chain, "verify"), lambda s, job: admin.verify_log(settings=s).events == 1),
}


@BLOCK
@pytest.mark.parametrize("reader", list(READERS))
def test_a_reader_chains_staged_events_in_a_transaction_of_their_own_and_never_holds_the_head(
    settings: Settings, owner_url: str, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    # Before: the reader chained them in its own transaction, so the head stayed locked (every writer of the
    # fleet waiting) until the read (a long audit query, a report) ended.
    keyed = settings.with_(subject_key=Secret("s" * 40))
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": "about"}], subject="MRN-1", settings=keyed)
    assert counts(keyed) == (0, 1)
    (module, name), read = READERS[reader]
    inner = getattr(module, name)
    during: list[tuple[bool, tuple[int, int]]] = []

    def probed(*args: Any, **kwargs: Any) -> Any:
        result = inner(*args, **kwargs)
        during.append((head_is_free(owner_url), counts(keyed)))  # the reader's transaction is still open
        return result

    monkeypatch.setattr(module, name, probed)
    assert read(keyed, job_id)  # what was staged before the read is in it
    assert during == [(True, (1, 0))]  # chained and committed before; the head free while the reader reads


@BLOCK
def test_a_rolled_back_transaction_stages_nothing(settings: Settings) -> None:
    def fail() -> None:
        with runtime(settings).transaction() as session:
            audit.record(session=session, action=audit.Action.AUDIT_QUERIED, job_id=None, actor="gone", detail={})
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        fail()
    assert counts(settings) == (0, 0)


@BLOCK
@pytest.mark.parametrize("statement", ["DELETE FROM audit_pending", "UPDATE audit_pending SET events = '[]'"])
def test_the_application_role_cannot_remove_or_change_a_staged_event(settings: Settings, statement: str) -> None:
    note(settings, "kept")
    engine = create_engine(settings.database_url)  # the application role, as every worker connects
    try:
        with pytest.raises(DBAPIError, match="permission denied|never changed"), engine.begin() as connection:
            connection.execute(text(statement))
    finally:
        engine.dispose()
    assert counts(settings) == (0, 1)
    assert [e.actor for e in queries.audit_query(settings=settings)][0] == "kept"


@BLOCK
def test_a_fleet_of_both_modes_writing_at_once_makes_one_intact_chain(settings: Settings) -> None:
    # Writers in block mode and in commit mode at the same time, a sealer running: every event chained once.
    commit_mode = settings.with_(audit_seal="commit")
    sealer = Sealer(settings.with_(audit_seal_interval=0.01)).start()
    errors: list[BaseException] = []

    def write(s: Settings, name: str) -> None:
        try:
            for _ in range(25):
                note(s, name, n=2)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(s, f"w{i}")) for i, s in enumerate([settings, commit_mode] * 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sealer.stop()  # a last run: what was staged before is chained
    assert errors == []
    assert counts(settings) == (8 * 25 * 2, 0)
    with runtime(settings).transaction() as session:
        seqs = session.scalars(select(AuditEvent.seq).order_by(AuditEvent.seq)).all()
    assert seqs == list(range(1, 401))
    report = admin.verify_log(settings=settings)
    assert report.ok
    assert report.events == 400


@BLOCK
def test_the_sealer_thread_chains_staged_events_within_its_interval(settings: Settings) -> None:
    quick = settings.with_(audit_seal_interval=0.05)
    sealer = Sealer(quick).start()
    try:
        note(quick, "sealed by the thread", n=3)
        wait_until(lambda: counts(quick) == (3, 0), timeout=10)
    finally:
        sealer.stop()


def test_block_sealing_is_refused_on_sqlite(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="AUDIT_SEAL=block needs PostgreSQL"):
        Settings(data_dir=tmp_path, audit_seal="block")
    with pytest.raises(ConfigError, match="AUDIT_SEAL must be one of commit, block"):
        Settings(data_dir=tmp_path, audit_seal="later")


@BLOCK
def test_a_subjects_blind_index_is_staged_chained_and_covered_by_the_hash(settings: Settings, owner_url: str) -> None:
    from qbgw.settings import Secret
    from tests.conftest import as_owner

    keyed = settings.with_(subject_key=Secret("s" * 40))
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": "about"}], subject="MRN-1", settings=keyed)
    run_attempt(runtime(keyed), job_id)
    index = runtime(keyed).subject_key.index("MRN-1")
    assert {e.subject_index for e in queries.job_events(job_id, settings=keyed)} == {index}
    assert admin.verify_log(settings=keyed).ok
    with as_owner(owner_url) as db:
        db.execute(text("UPDATE audit_events SET subject_index = :x WHERE seq = 1"), {"x": "0" * 64})
    report = admin.verify_log(settings=keyed)
    assert not report.ok
    assert report.problem is not None
    assert report.problem.seq == 1
