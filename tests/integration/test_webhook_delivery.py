"""Webhook delivery's edges, on both databases: a receiver that drips bytes is cut at the total timeout, a late
attempt cannot undo a newer one, a DNS failure is retried, the retry window is used to its end, and an ended
batch is found however many batches still run."""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta

import pytest

from qbgw import access, producer
from qbgw.control import cancel_batch
from qbgw.errors import InputError, InvalidMessages
from qbgw.execution import webhooks
from qbgw.lifecycle import utcnow
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings
from qbgw.store import webhooks as store
from qbgw.store.models import Job, WebhookDelivery
from tests.conftest import ASSISTANT

MESSAGES = [{"role": "user", "content": "x"}]


def _drip_server() -> tuple[int, threading.Event]:
    """A receiver that accepts, then sends one byte of its answer every 0.3 s, for ever."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        for byte in b"HTTP/1.1 200 OK\r\n" * 1000:
            if stop.is_set():
                break
            try:
                conn.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.3)
        conn.close()
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return int(server.getsockname()[1]), stop


def test_a_receiver_that_drips_bytes_is_cut_at_the_total_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    from urllib.parse import urlsplit

    monkeypatch.setattr(webhooks, "TOTAL_TIMEOUT", 1.0)
    port, stop = _drip_server()
    started = time.monotonic()
    try:
        with pytest.raises(webhooks._TooLong):
            webhooks._send(urlsplit(f"http://127.0.0.1:{port}/h"), "127.0.0.1", port, b"{}", {})
    finally:
        stop.set()
    assert time.monotonic() - started < 3.0  # each byte came within the read timeout: only the watchdog ends it


def test_a_receiver_that_never_answers_is_a_read_timeout_not_the_total_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    from urllib.parse import urlsplit

    monkeypatch.setattr(webhooks, "READ_TIMEOUT", 0.5)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    port = silent.getsockname()[1]
    try:
        with pytest.raises(TimeoutError) as caught:
            webhooks._send(urlsplit(f"http://127.0.0.1:{port}/h"), "127.0.0.1", port, b"{}", {})
        assert not isinstance(caught.value, webhooks._TooLong)  # said as "no answer within 5 s ... 15 s to a read"
    finally:
        silent.close()


def _key(settings: Settings, name: str = "web") -> None:
    access.create_key(name, "submitter", settings=settings)


def _delivery(settings: Settings) -> str:
    _key(settings)
    job_id = producer.submit(
        ASSISTANT, MESSAGES, webhook_url="http://127.0.0.1:9/h", actor="key:web", settings=settings
    )
    rt = runtime(settings)
    with rt.transaction() as session:
        session.get(Job, job_id).status = "cancelled"  # type: ignore[union-attr]
    with rt.transaction() as session:
        (delivery_id,) = store.promote(session, now=utcnow(), job_ids=[job_id])
    return str(delivery_id)


def test_an_attempt_that_outlived_its_lease_cannot_undo_a_newer_one(settings: Settings) -> None:
    dev = settings.with_(webhooks_development=True)
    delivery_id = _delivery(dev)
    rt = runtime(dev)
    with rt.transaction() as session:
        first = store.lease(session, delivery_id, now=utcnow(), hold=timedelta(seconds=-1))  # expired at once
        second = store.lease(session, delivery_id, now=utcnow(), hold=timedelta(seconds=60))
    assert first is not None
    assert second is not None
    with rt.transaction() as session:
        done = store.finish(
            session, delivery_id, attempt=2, now=utcnow(), delivered=True, status=200, error=None, retry_at=None
        )
        late = store.finish(
            session,
            delivery_id,
            attempt=1,
            now=utcnow(),
            delivered=False,
            status=None,
            error="ReadTimeout",
            retry_at=utcnow(),
        )
        row = store.get(session, delivery_id)
    assert (done, late) == ("delivered", store.SUPERSEDED)
    assert row is not None
    assert row.status == "delivered"


def test_a_lease_that_ran_out_is_taken_over_without_waiting_the_sweep_grace_again(settings: Settings) -> None:
    """A worker died mid-attempt: the delivery is due again once its lease (60 s) has run out, not 60 s after that
    too (the grace a message gets to arrive applies to when the delivery was due, not to when its lease ends)."""
    dev = settings.with_(webhooks_development=True)
    delivery_id = _delivery(dev)
    rt = runtime(dev)
    grace = timedelta(seconds=60)
    with rt.transaction() as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        row.next_attempt_at = utcnow() - timedelta(minutes=10)  # due long ago; its attempt began 61 s ago
        row.lease_until = utcnow() - timedelta(seconds=1)
    with rt.transaction() as session:
        assert store.due(session, now=utcnow(), grace=grace) == [delivery_id]
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        row.lease_until = utcnow() + timedelta(seconds=5)  # still held
    with rt.transaction() as session:
        assert store.due(session, now=utcnow(), grace=grace) == []
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        row.lease_until, row.next_attempt_at = None, utcnow() - timedelta(seconds=10)  # due 10 s ago: its message
    with rt.transaction() as session:  # may still be on its way
        assert store.due(session, now=utcnow(), grace=grace) == []


def test_a_dns_failure_is_tried_again_not_failed(settings: Settings) -> None:
    _key(settings)
    job_id = producer.submit(
        ASSISTANT, MESSAGES, webhook_url="https://no-such-host.invalid/hook", actor="key:web", settings=settings
    )
    rt = runtime(settings)
    with rt.transaction() as session:
        session.get(Job, job_id).status = "failed"  # type: ignore[union-attr]
    with rt.transaction() as session:
        (delivery_id,) = store.promote(session, now=utcnow(), job_ids=[job_id])
    assert webhooks.deliver(rt, delivery_id) == "pending"
    with rt.transaction() as session:
        row = store.get(session, delivery_id)
    assert row is not None
    assert (row.last_error or "").startswith("DNS:")


def test_the_last_try_is_at_the_end_of_the_window() -> None:
    # Attempt 12 waits 5 * 2**11 s, capped at an hour; with 10 minutes of the window left, the try is then.
    assert webhooks.retry_delay(12, 5.0) == 3600.0


def test_an_ended_batch_is_found_however_many_batches_still_run(settings: Settings) -> None:
    dev = settings.with_(webhooks_development=True)
    _key(dev)
    ids = [
        producer.submit_batch(
            [{"custom_id": "a", "smart_chat_assistant_id": ASSISTANT, "messages": MESSAGES}],
            webhook_url="http://127.0.0.1:9/h",
            actor="key:web",
            settings=dev,
        ).id
        for _ in range(3)
    ]
    cancel_batch(ids[-1], settings=dev)
    with runtime(dev).transaction() as session:
        assert store.waiting_batches(session, limit=1) == [ids[-1]]  # not one of the two still running


def test_a_python_webhook_needs_a_key_principal(settings: Settings) -> None:
    with pytest.raises(InvalidMessages, match="actor"):
        producer.submit(ASSISTANT, MESSAGES, webhook_url="https://hooks.example/h", actor="billing", settings=settings)
    with pytest.raises(InvalidMessages, match="names no key"):  # signed with a secret no receiver was given
        producer.submit(
            ASSISTANT, MESSAGES, webhook_url="https://hooks.example/h", actor="key:nobody", settings=settings
        )
    with pytest.raises(InputError, match="no key was ever made"):
        access.webhook_secret("nobody", settings=settings)
