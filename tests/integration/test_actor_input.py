"""An actor or reader that is not a short line of text is refused by name, before anything is stored: the audit
event would hash the value given and store its text (``5`` hashed as a number, stored as ``'5'``), and the
chain would fail verification for good from that event on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import qbgw
from qbgw import admin, control, producer, queries
from qbgw.errors import InputError, JobStateConflict
from qbgw.execution.tasks import run_attempt
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings
from qbgw.store.reads import AuditFilter
from tests.conftest import ASSISTANT

MESSAGES = [{"role": "user", "content": "What is a normal resting heart rate?"}]

#: Each way in that names who acts, with the keyword it takes.
CALLS: list[tuple[str, str, Callable[..., Any]]] = [
    ("submit", "actor", lambda s, j, v: producer.submit(ASSISTANT, MESSAGES, actor=v, settings=s)),
    (
        "submit_batch",
        "actor",
        lambda s, j, v: producer.submit_batch(
            [{"custom_id": "a", "smart_chat_assistant_id": ASSISTANT, "messages": MESSAGES}], actor=v, settings=s
        ),
    ),
    ("cancel", "actor", lambda s, j, v: control.cancel(j, actor=v, settings=s)),
    ("replay", "actor", lambda s, j, v: control.replay(j, actor=v, settings=s)),
    ("get_job", "reader", lambda s, j, v: queries.get_job(j, reader=v, settings=s)),
    ("job_events", "reader", lambda s, j, v: queries.job_events(j, reader=v, settings=s)),
    ("audit_query", "reader", lambda s, j, v: queries.audit_query(AuditFilter(limit=5), reader=v, settings=s)),
    ("verify_log", "reader", lambda s, j, v: admin.verify_log(reader=v, settings=s)),
]


@pytest.mark.parametrize("value", [5, ["a"], "x" * 129, "bell\x07", "lone \ud800", "   "])
@pytest.mark.parametrize(("way", "keyword", "call"), CALLS, ids=[c[0] for c in CALLS])
def test_a_bad_actor_is_refused_by_name_and_the_chain_stays_intact(
    settings: Settings, way: str, keyword: str, call: Callable[..., Any], value: object
) -> None:
    job_id = producer.submit(ASSISTANT, MESSAGES, settings=settings)
    run_attempt(runtime(settings), job_id)
    before = len(queries.audit_query(AuditFilter(limit=1000), reader="t", settings=settings))
    with pytest.raises(InputError) as refused:
        call(settings, job_id, value)
    assert str(refused.value).startswith(f"{keyword}: "), refused.value
    after = queries.audit_query(AuditFilter(limit=1000), reader="t", settings=settings)
    assert len(after) == before + 1  # the count's own query (audit.queried), nothing from the refused call
    assert admin.verify_log(settings=settings).ok


def test_a_good_actor_is_recorded_as_given(settings: Settings) -> None:
    job_id = producer.submit(ASSISTANT, MESSAGES, actor="billing-app", settings=settings)
    run_attempt(runtime(settings), job_id)
    with pytest.raises(JobStateConflict):
        control.replay(job_id, actor="ops-jane", settings=settings)
    qbgw.get_job(job_id, reader="nurse-7", settings=settings)
    trail = queries.audit_query(AuditFilter(job_id=job_id), reader="t", settings=settings)
    actors = {(e.action, e.actor) for e in trail}
    assert {("job.submitted", "billing-app"), ("result.read", "nurse-7")} <= actors
    assert admin.verify_log(settings=settings).ok
