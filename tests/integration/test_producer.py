"""Submitting: validated first, stored, then announced with the job id only."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import func, select

from qbgw import producer
from qbgw.admin import sweep
from qbgw.errors import (
    BrokerUnavailable,
    IdempotencyConflict,
    InvalidImage,
    InvalidMessages,
    NotAnnounced,
    StoreUnavailable,
)
from qbgw.runtime.app import PUBLISH_PIPELINE, TASK_NAME, _ring_on_redis, publish_many, task_messages
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings
from qbgw.store.models import AuditEvent, Job
from tests.conftest import ASSISTANT
from tests.images import png_bytes

PHI = "Patient Zebulon Quartermaine, DOB 1931-02-03"
MESSAGES = [{"role": "user", "content": PHI}]


def counts(settings: Settings) -> tuple[int, int]:
    with runtime(settings).transaction() as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0, session.scalar(
            select(func.count()).select_from(AuditEvent)
        ) or 0


def broker_files(settings: Settings) -> list[bytes]:
    return [p.read_bytes() for p in sorted((settings.broker_dir / "queue").glob("*.msg"))]


def test_a_job_is_stored_then_announced_with_only_its_id(settings: Settings) -> None:
    job_id = producer.submit(ASSISTANT, MESSAGES, custom_id="c-1", settings=settings)
    assert counts(settings) == (1, 1)
    (message,) = broker_files(settings)
    assert job_id.encode() in message
    assert b"Zebulon" not in message
    assert b"Quartermaine" not in message


def test_the_same_idempotency_key_gives_the_same_job(settings: Settings) -> None:
    first = producer.submit(ASSISTANT, MESSAGES, idempotency_key="order-17", settings=settings)
    again = producer.submit(ASSISTANT, MESSAGES, idempotency_key="order-17", settings=settings)
    assert first == again
    assert counts(settings) == (1, 1)
    with pytest.raises(IdempotencyConflict):
        producer.submit(ASSISTANT, [{"role": "user", "content": "else"}], idempotency_key="order-17", settings=settings)


@pytest.mark.parametrize(
    ("assistant", "messages", "kind", "message"),
    [
        ("", MESSAGES, InvalidMessages, "smart_chat_assistant_id: required"),
        (ASSISTANT, [], InvalidMessages, "messages: required"),
        (ASSISTANT, [{"role": "nurse", "content": "x"}], InvalidMessages, "messages[0].role: 'nurse'"),
        (
            ASSISTANT,
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,R0lGODlhAQABAAAAACw="}}
                    ],
                }
            ],
            InvalidImage,
            "not a jpeg or png",
        ),
    ],
)
def test_bad_input_is_refused_and_nothing_is_stored(
    settings: Settings, assistant: str, messages: list[dict[str, Any]], kind: type[Exception], message: str
) -> None:
    with pytest.raises(kind) as caught:
        producer.submit(assistant, messages, settings=settings)
    assert message in str(caught.value)
    assert counts(settings) == (0, 0)
    assert broker_files(settings) == []


def _deep(levels: int) -> object:
    value: object = "x"
    for _ in range(levels):
        value = [value]
    return value


def _image(url: str) -> list[dict[str, Any]]:
    parts = [{"type": "text", "text": PHI}, {"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": parts}]


PNG_AS_GIF = "data:image/gif;base64," + base64.b64encode(png_bytes(4, 4)).decode()


@pytest.mark.parametrize(
    ("assistant", "messages", "keys", "kind", "message"),
    [
        (
            ASSISTANT,
            [{"role": "user", "content": "a\ud800b"}],
            {},
            InvalidMessages,
            "messages[0].content: not encodable as UTF-8: a lone surrogate (U+D800) at index 1",
        ),
        (ASSISTANT, MESSAGES, {"custom_id": "c\udfff"}, InvalidMessages, "custom_id: not encodable as UTF-8"),
        (
            ASSISTANT,
            MESSAGES,
            {"idempotency_key": "\udc80k"},
            InvalidMessages,
            "idempotency_key: not encodable as UTF-8: a lone surrogate (U+DC80) at index 0",
        ),
        (ASSISTANT + "\n", MESSAGES, {}, InvalidMessages, "smart_chat_assistant_id: must be at most 128 characters"),
        (
            ASSISTANT,
            [{"role": "user", "content": "hi", "name": _deep(5000)}],
            {},
            InvalidMessages,
            "messages[0].name: must be 1 to 64 letters",
        ),
        (ASSISTANT, [{"role": "user", "content": "hi", "name": 123}], {}, InvalidMessages, "messages[0].name:"),
        (
            ASSISTANT,
            _image("https://h.example:abc/x.png"),
            {},
            InvalidImage,
            "messages[0].content[1].image_url.url: the port 'abc' of an https URL is not a number from 1 to 65535",
        ),
        (ASSISTANT, _image("https://[::1/x.png"), {}, InvalidImage, "lacks its closing ']'"),
        (ASSISTANT, _image(PNG_AS_GIF), {}, InvalidImage, "data uri declares 'image/gif'"),
        (ASSISTANT, _image("http://127.0.0.1/x.png"), {}, InvalidImage, "the scheme 'http' is not accepted"),
        (
            ASSISTANT,
            [{"role": "user", "content": "x" * 2001}],
            {},
            InvalidMessages,
            "messages: 2001 bytes of text (data URIs included) is over the request limit of 2000 bytes",
        ),
    ],
)
def test_input_that_was_accepted_or_crashed_is_refused_before_anything_is_stored(
    settings: Settings,
    assistant: str,
    messages: list[dict[str, Any]],
    keys: dict[str, str],
    kind: type[Exception],
    message: str,
) -> None:
    limited = settings.with_(max_request_bytes=2000)
    with pytest.raises(kind) as caught:
        producer.submit(assistant, messages, settings=limited, **keys)  # type: ignore[arg-type]
    assert message in str(caught.value)
    assert PHI not in str(caught.value)
    assert counts(settings) == (0, 0)
    assert broker_files(settings) == []


@pytest.mark.parametrize("field", ["custom_id", "idempotency_key"])
def test_an_empty_or_long_key_is_refused(settings: Settings, field: str) -> None:
    for bad in ("", "k" * 256):
        with pytest.raises(InvalidMessages, match=field):
            producer.submit(ASSISTANT, MESSAGES, settings=settings, **{field: bad})  # type: ignore[arg-type]


def test_an_unreachable_database_is_a_clear_error(settings: Settings) -> None:
    down = settings.with_(database_url="postgresql+psycopg://postgres@127.0.0.1:1/qbgw")
    with pytest.raises(StoreUnavailable, match="cannot reach database postgresql"):
        producer.submit(ASSISTANT, MESSAGES, settings=down)
    assert broker_files(down) == []


def test_a_broker_outage_keeps_the_job_and_says_the_sweeper_will_dispatch_it(settings: Settings) -> None:
    down = settings.with_(broker_url="redis://127.0.0.1:1/0")
    with pytest.raises(NotAnnounced, match="is stored, but the broker could not be told") as caught:
        producer.submit(ASSISTANT, MESSAGES, settings=down)
    assert counts(settings) == (1, 1)
    # The sweeper (here on the embedded broker, which is up) publishes it on its first pass.
    report = sweep(settings=settings)
    assert report.dispatched == [caught.value.job_id]
    assert len(broker_files(settings)) == 1


@pytest.mark.timeout(120)
def test_a_broker_that_accepts_and_never_answers_is_an_outage_not_a_hang(settings: Settings) -> None:
    """A Redis that takes the connection and says nothing (hung, or another service's port): the publish waited
    for ever, and so did the web handler that called submit. It is an outage now, within the timeouts."""
    import socket
    import threading

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    try:
        hung = settings.with_(broker_url=f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
        with pytest.raises(NotAnnounced, match="is stored, but the broker could not be told"):
            producer.submit(ASSISTANT, MESSAGES, settings=hung)
        assert held  # it did connect: the silence, not a refusal, was met
    finally:
        stop.set()
        for connection in held:
            connection.close()
        silent.close()


def test_with_require_broker_an_unreachable_broker_stores_nothing(settings: Settings) -> None:
    down = settings.with_(broker_url="redis://127.0.0.1:1/0")
    with pytest.raises(BrokerUnavailable, match="broker redis://127.0.0.1:1/0 unreachable"):
        producer.submit(ASSISTANT, MESSAGES, require_broker=True, settings=down)
    assert counts(settings) == (0, 0)


@pytest.mark.parametrize("backend", ["postgres"])
def test_on_redis_the_message_carries_only_the_job_id(settings: Settings, redis_url: str) -> None:
    on_redis = settings.with_(broker_url=redis_url)
    job_id = producer.submit(ASSISTANT, MESSAGES, settings=on_redis)
    client = redis_lib.Redis.from_url(redis_url)
    try:
        (raw,) = client.lrange(on_redis.queue, 0, -1)
        assert job_id.encode() in raw
        assert b"Zebulon" not in raw
    finally:
        client.delete(on_redis.queue)
        client.close()


def test_on_redis_a_backlog_covers_stale_jobs_though_the_batch_queue_was_never_declared(
    production_settings: Settings,
) -> None:
    # No worker has consumed yet, so Redis knows the interactive queue (the producer declared it) but not the
    # batch queue. A queue Redis does not know holds nothing: the 3 messages waiting cover the 3 jobs, which
    # are slow, not lost; re-publishing them would only double the backlog.
    ids = [producer.submit(ASSISTANT, MESSAGES, settings=production_settings) for _ in range(3)]
    assert sweep(settings=production_settings, grace=0).dispatched == []
    client = redis_lib.Redis.from_url(production_settings.broker_url)
    try:
        assert client.llen(production_settings.queue) == 3
        client.delete(production_settings.queue)  # Redis lost its data: now they are lost
        assert sorted(sweep(settings=production_settings, grace=0).dispatched) == sorted(ids)
        assert client.llen(production_settings.queue) == 3
    finally:
        client.close()


def test_a_batch_of_messages_goes_to_redis_in_pipelines_each_message_whole(production_settings: Settings) -> None:
    # More than two pipelines' worth, so the split between them is crossed; every job id arrives exactly once,
    # in a message Celery's own protocol 2 reader would take (headers and body agree on the id).
    app = runtime(production_settings).celery
    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(2 * PUBLISH_PIPELINE + 17)]
    with app.producer_or_acquire() as shared:
        assert shared.supports_batch_publish
        publish_many(app, ids, shared)
    client = redis_lib.Redis.from_url(production_settings.broker_url)
    try:
        raws = client.lrange(production_settings.queue, 0, -1)
    finally:
        client.close()
    seen = []
    for raw in raws:
        envelope = json.loads(raw)
        args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        assert envelope["headers"]["id"] == envelope["headers"]["root_id"] == args[0]
        assert envelope["headers"]["task"] == TASK_NAME
        assert kwargs == {}
        assert envelope["properties"]["correlation_id"] == args[0]
        seen.append(args[0])
    assert sorted(seen) == ids


def _on_redis(settings: Settings, queue: str) -> list[dict[str, Any]]:
    client = redis_lib.Redis.from_url(settings.broker_url)
    try:
        return [json.loads(raw) for raw in reversed(client.lrange(queue, 0, -1))]  # oldest first
    finally:
        client.close()


def _without_ids(envelope: dict[str, Any], job_id: str) -> dict[str, Any]:
    """The envelope with its job id and its delivery tag (a uuid per message) put aside."""
    text = json.dumps(envelope).replace(job_id, "<job>")
    found = json.loads(text)
    found["body"] = json.loads(base64.b64decode(envelope["body"]).decode().replace(job_id, "<job>"))
    assert found["properties"].pop("delivery_tag")
    return found


@pytest.mark.parametrize("queue", ["interactive", "batch"])
def test_on_redis_a_job_message_is_the_one_celery_itself_would_send(production_settings: Settings, queue: str) -> None:
    # A single job's message is pushed straight through kombu's channel (runtime.app._ring_on_redis): it must
    # be, field for field, the message Celery's send_task_message makes of the same task message and queue.
    app = runtime(production_settings).celery
    name = production_settings.queue if queue == "interactive" else production_settings.effective_batch_queue
    celery_id, direct_id = "11111111-2222-4333-8444-555555555555", "66666666-7777-4888-8999-aaaaaaaaaaaa"
    try:
        with app.producer_or_acquire() as producer:
            (message,) = task_messages(app, [celery_id])
            app.amqp.send_task_message(producer, TASK_NAME, message, queue=app.amqp.queues[name])
            assert _ring_on_redis(app, producer, app.amqp.queues[name], direct_id)  # (not the usual way)
        celery_sent, direct_sent = _on_redis(production_settings, name)
    finally:
        client = redis_lib.Redis.from_url(production_settings.broker_url)
        client.delete(name)
        client.close()
    assert celery_sent["headers"]["id"] == celery_id
    assert direct_sent["headers"]["id"] == direct_id
    assert _without_ids(direct_sent, direct_id) == _without_ids(celery_sent, celery_id)
    assert direct_sent["properties"]["delivery_tag"] != celery_sent["properties"]["delivery_tag"]


def test_on_redis_a_failed_direct_push_publishes_the_usual_way(
    production_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The channel refuses the direct push once (a dropped connection, say): the job's message still goes, through
    # Celery's own publish and its retries.
    from kombu.transport.redis import Channel

    calls: list[str] = []
    real = Channel.basic_publish

    def refuse_once(self: Channel, message: Any, exchange: str, routing_key: str, **kwargs: Any) -> Any:
        calls.append(routing_key)
        if len(calls) == 1:
            raise redis_lib.ConnectionError("connection dropped")
        return real(self, message, exchange, routing_key, **kwargs)

    monkeypatch.setattr(Channel, "basic_publish", refuse_once)
    job_id = producer.submit(ASSISTANT, MESSAGES, settings=production_settings)
    assert len(calls) == 2
    (sent,) = _on_redis(production_settings, production_settings.queue)
    assert sent["headers"]["id"] == job_id


def test_a_producer_not_connected_yet_publishes_the_usual_way_with_its_retry_policy(settings: Settings) -> None:
    # The direct push is only for a producer whose connection is up: connecting is left to the usual publish,
    # whose retry policy bounds it (the direct push would connect with kombu's default retries instead).
    app = runtime(settings.with_(broker_url="redis://127.0.0.1:1/0")).celery
    with app.producer_or_acquire() as producer:
        assert not producer.connection.connected
        assert (
            _ring_on_redis(app, producer, app.amqp.queues[settings.queue], "11111111-2222-4333-8444-555555555555")
            is False
        )
        assert not producer.connection.connected  # it did not try
