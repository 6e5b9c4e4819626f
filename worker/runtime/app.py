"""Celery app: made by ``create_celery_app(settings)`` per process, never at import.

The broker is a doorbell: messages carry only a job id (which is also the task id), results
stay in our database (no Celery result backend), and acks come late so a worker that dies
mid-task leaves its message to be delivered again; the claim step makes that harmless.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

from celery import Celery
from celery.utils.saferepr import saferepr
from kombu import serialization
from kombu.entity import DELIVERY_MODES, Exchange, Queue
from kombu.transport.redis import Channel as RedisChannel

from ..errors import BrokerUnavailable
from ..settings import Settings
from .filebroker import FileTransport

__all__ = ["TASK_NAME", "create_celery_app", "publish", "publish_many", "task_messages", "backlog", "ping_broker"]

log = logging.getLogger(__name__)

#: The one task; its only argument is the job id.
TASK_NAME = "qbgw.run_job"

#: The embedded broker polls its folder this often (kombu's default of 1 s made every round
#: trip take a whole second on this machine).
EMBEDDED_POLL_SECONDS = 0.1

#: Messages per Redis pipeline when publishing many (``publish_many``).
PUBLISH_PIPELINE = 500


def create_celery_app(settings: Settings) -> Celery:
    """A Celery app for ``settings``. It publishes by the task's name (``TASK_NAME``); a worker registers the task
    itself (``execution.tasks.register``), so producers never import the task."""
    app = Celery("qbgw", broker=settings.effective_broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=settings.queue,
        # Interactive jobs and batch jobs wait in separate queues, and workers ask for the
        # interactive one first (queue_order_strategy "priority"), so a batch of thousands
        # never stands in front of a web app's single job.
        task_queues=_queues(settings),
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_default_delivery_mode="persistent",
        task_reject_on_worker_lost=True,
        # One message per free thread: a prefetched message waits for nothing but is lost to
        # the other workers while it sits here.
        worker_prefetch_multiplier=1,
        # After a reconnect with tasks in flight, Celery lowers the prefetch and raises it again from each
        # task's ack callback, which on the threads pool runs in the pool's threads: several of them send
        # basic.qos on the one AMQP connection at once (the consumer's mutex is a no-op in the event loop),
        # and a worker could wedge, silently, until RabbitMQ dropped it for missed heartbeats (3 min). Off:
        # a reconnected worker asks for its full prefetch at once (docs/operations.md).
        worker_enable_prefetch_count_reduction=False,
        worker_concurrency=settings.concurrency,
        worker_pool=settings.pool,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.connect_timeout,
        # The embedded broker: kombu's filesystem transport, with messages that appear in the folder whole.
        broker_transport=FileTransport if settings.is_embedded_broker else None,
        broker_transport_options=_transport_options(settings),
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
    )
    app.qbgw_settings = settings  # read by the task to build this process's runtime
    return app


def _queues(settings: Settings) -> list[Any]:
    """The two queues, each bound to a direct exchange of its name. On RabbitMQ both are durable and every
    message persistent (``task_default_delivery_mode``: Celery's default, stated), so a broker restart
    keeps what waits; a classic queue (docs/operations.md says what a quorum queue would change)."""
    names = settings.queues
    return [
        Queue(name, Exchange(name, durable=True), routing_key=name, durable=True)  # type: ignore[no-untyped-call]
        for name in names
    ]


def _transport_options(settings: Settings) -> dict[str, Any]:
    if settings.is_embedded_broker:
        folder = settings.broker_dir
        # kombu needs the folders to exist, and its control folder defaults to ./control
        # under whatever directory the process happens to run in.
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "queue_order_strategy": "priority",
            "store_processed": False,
            "polling_interval": EMBEDDED_POLL_SECONDS,
        }
    # A message unacknowledged this long is delivered again (Redis). Settings guarantee it
    # exceeds an attempt's lease, and no countdown is longer than a quarter of it. RabbitMQ has no
    # visibility timeout: it delivers again what a closed connection left unacknowledged, and
    # ignores these options (its consumer_timeout must outlast a lease: docs/operations.md).
    if settings.effective_broker_url.startswith(("amqp://", "amqps://", "pyamqp://")):
        # RabbitMQ confirms each publish: without it a message written to a connection the broker has
        # closed (a restart) is lost without an error, and the job waits for the sweeper's grace.
        return {"confirm_publish": True}
    return {
        "visibility_timeout": settings.visibility_timeout,
        "socket_connect_timeout": settings.connect_timeout,
        # A Redis that accepts the connection and then says nothing (hung, or a wrong port's listener) held a
        # publish, and `qbgw health`, for ever: no reply within this is an error (a consumer's BRPOP blocks 1 s).
        "socket_timeout": max(settings.connect_timeout, 2.0),
        "queue_order_strategy": "priority",
    }


def backlog(app: Celery, queue: str, *, unknown_queue: int | None = None) -> int | None:
    """How many messages wait in ``queue`` (None if the broker cannot say). A queue the broker does not
    know (never used, or a Redis wiped since) counts as ``unknown_queue``: 0 for a gauge."""
    try:
        with app.connection_for_read() as connection:
            declared = connection.default_channel.queue_declare(queue=queue, passive=True)
            return int(declared.message_count)
    except Exception as exc:  # any broker trouble: the caller must assume nothing about the backlog
        if "NOT_FOUND" in str(exc) or getattr(exc, "code", None) == 404:
            return unknown_queue
        return None


def ping_broker(app: Celery, *, timeout: float) -> None:
    """Connect to the broker once.

    Raises:
        BrokerUnavailable: no connection within about ``timeout`` seconds (the message names the broker,
            its password hidden).
    """
    with app.connection_for_write() as connection:
        where = connection.as_uri()  # kombu masks a password
        try:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
            connection.default_channel  # noqa: B018 - the filesystem transport "connects" without touching anything
        except Exception as exc:  # kombu's and the transports' errors differ
            raise BrokerUnavailable(f"cannot reach broker {where}: {type(exc).__name__}: {exc}") from exc


def publish(
    app: Celery, job_id: str, *, countdown: float | None = None, slot_at: float | None = None, queue: str | None = None
) -> None:
    """Ring the doorbell for ``job_id``: a message that carries the id and nothing else (but, for a job
    the rate limiter rescheduled, the time of the slot it reserved for it: Unix seconds), in ``queue``
    (None: the interactive one; a batch's jobs go back to the batch queue)."""
    if countdown is None and slot_at is None:  # the common case: the message from the template, as for many
        with app.producer_or_acquire() as producer:
            publish_many(app, [job_id], producer, queue=queue)
        return
    kwargs = {"slot_at": slot_at} if slot_at is not None else None
    app.send_task(TASK_NAME, args=[job_id], kwargs=kwargs, task_id=job_id, countdown=countdown, queue=queue)


def publish_many(app: Celery, job_ids: list[str], producer: Any, *, queue: str | None = None) -> None:
    """Ring the doorbell for many jobs through one ``producer`` (``app.producer_or_acquire()``).

    Builds each message as ``send_task`` does (``task_messages``), without its per-call option resolution,
    declares the queue once, not per message, and sends the messages in pipelines of ``PUBLISH_PIPELINE`` on
    Redis (bench/batch_submit.py measures each difference). Raises the transport's error if the broker fails:
    the messages of earlier pipelines were published, those of the failing one may or may not have been.
    """
    target = app.amqp.queues[queue or app.conf.task_default_queue]
    if len(job_ids) == 1:  # a plain publish: no pipeline to set up
        if _ring_on_redis(app, producer, target, job_ids[0]):
            return
        (message,) = task_messages(app, job_ids)  # (with the template made once, a quarter less CPU than
        app.amqp.send_task_message(producer, TASK_NAME, message, queue=target)  # send_task's)
        return
    declare: list[Any] | None = None  # the first message declares the queue (and its binding)
    # kombu's Producer.batch: one round trip per pipeline instead of one per message on Redis (72% of a
    # batch's acceptance was waiting for LPUSH replies); one by one on transports without batches. After an
    # error the caller leaves all these jobs to the sweeper: a duplicate message is harmless (the claim).
    with producer.batch(max_size=PUBLISH_PIPELINE):
        for message in task_messages(app, job_ids):
            app.amqp.send_task_message(producer, TASK_NAME, message, queue=target, declare=declare)
            declare = []


def _ring_on_redis(app: Celery, producer: Any, queue: Queue, job_id: str) -> bool:
    """Publish ``job_id``'s message on Redis straight through the producer's kombu channel: the message
    ``send_task_message`` sends, made and pushed by the channel itself (``prepare_message``, ``basic_publish``:
    kombu's own format) from a serialized template (:func:`_wire_template`), without the layers above the
    channel (Celery's routing and publish signals, kombu's serializer and its retry wrapper). A publish is on
    the path of every job's latency (``bench/steps.py``). False, with nothing sent, where that does not apply
    (another transport, compression, a producer not connected yet); False after an error too, and the caller
    publishes the usual way, with its retries (a message pushed twice is harmless: the claim)."""
    if not producer.connection.connected:  # the usual publish connects, with its retry policy
        return False
    channel: Any = producer.channel  # (kombu is untyped)
    if not _on_redis(channel) or app.conf.task_compression or queue.exchange.type != "direct":
        return False
    wire = _wire_template(app, queue)
    try:
        declared: set[str] = producer.__dict__.setdefault("_qbgw_declared", set())
        if queue.name not in declared:  # as send_task_message: kombu declares a queue once per connection
            producer.maybe_declare(queue)
            declared.add(queue.name)
        message = channel.prepare_message(
            wire.body.replace(_TEMPLATE_ID, job_id),
            0,
            wire.content_type,
            wire.content_encoding,
            {**wire.headers, "id": job_id, "root_id": job_id, "argsrepr": _argsrepr(app, job_id)},
            {**wire.properties, "correlation_id": job_id},
        )
        # The anonymous exchange, as send_task_message routes to a direct exchange: the queue is the key.
        channel.basic_publish(message, exchange="", routing_key=queue.name)
    except Exception as exc:  # the transport's errors; the usual way retries and reconnects, or raises
        log.debug("job %s: the direct publish failed (%s); publishing the usual way", job_id, exc)
        return False
    return True


def _on_redis(channel: object) -> bool:
    return isinstance(channel, RedisChannel)


class _Wire(NamedTuple):
    """A job's message as the channel takes it, for the template's job id: the serialized body and its type."""

    body: str
    content_type: str
    content_encoding: str
    headers: dict[str, Any]
    properties: dict[str, Any]


def _wire_template(app: Celery, queue: Queue) -> _Wire:
    """:func:`_template` serialized as ``Producer.publish`` serializes it (``task_serializer``), with the
    properties ``send_task_message`` gives it for ``queue`` (its delivery mode); made once per app, process
    and queue."""
    made: tuple[int, dict[str, _Wire]] | None = getattr(app, "_qbgw_wire_templates", None)
    if made is None or made[0] != os.getpid():
        made = (os.getpid(), {})
        app._qbgw_wire_templates = made
    wire = made[1].get(queue.name)
    if wire is None:
        template = _template(app)
        content_type, encoding, body = serialization.dumps(  # type: ignore[no-untyped-call]
            template.body, serializer=app.conf.task_serializer
        )
        mode = queue.exchange.delivery_mode or app.conf.task_default_delivery_mode
        wire = made[1][queue.name] = _Wire(
            body if isinstance(body, str) else body.decode(encoding),
            content_type,
            encoding,
            dict(template.headers),
            {**template.properties, "delivery_mode": DELIVERY_MODES.get(mode, mode)},
        )
    return wire


def task_messages(app: Celery, job_ids: list[str]) -> Iterator[Any]:
    """The task message of each job id, as ``app.amqp.create_task_message`` makes it.

    Every message is the first one with the job id put in its places (Celery's protocol 2 headers ``id``,
    ``root_id`` and ``argsrepr``, the correlation id and the body's args): building each from scratch was
    a third of publishing's time (a safe repr and option resolution per message).
    """
    if not job_ids:
        return
    template = _template(app)
    headers, properties, (_, kwargs, embed) = template.headers, template.properties, template.body
    for job_id in job_ids:
        yield template._replace(
            headers={**headers, "id": job_id, "root_id": job_id, "argsrepr": _argsrepr(app, job_id)},
            properties={**properties, "correlation_id": job_id},
            body=([job_id], kwargs, embed),
        )


def _template(app: Celery) -> Any:
    """The task message every job's is made from: made once per app and process (its ``origin`` header names
    the process), as ``app.amqp.create_task_message`` makes it (the job id in it is replaced per job)."""
    made: tuple[int, Any] | None = getattr(app, "_qbgw_message_template", None)
    if made is None or made[0] != os.getpid():
        made = (os.getpid(), app.amqp.create_task_message(_TEMPLATE_ID, TASK_NAME, [_TEMPLATE_ID], {}))
        app._qbgw_message_template = made
    return made[1]


#: The job id of the template (replaced in every message made from it).
_TEMPLATE_ID = "00000000-0000-0000-0000-000000000000"

#: Characters whose repr is the character itself (a job id is a UUID).
_PLAIN = re.compile(r"[0-9A-Za-z_.:-]+")


def _argsrepr(app: Celery, job_id: str) -> str:
    if _PLAIN.fullmatch(job_id):
        return f"['{job_id}']"
    return str(saferepr([job_id], app.amqp.argsrepr_maxsize))
