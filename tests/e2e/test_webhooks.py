"""Webhooks end to end on both stacks: a real server, a real worker, a real receiver on a socket. Every
delivery is verified with the standardwebhooks library; a receiver that is down for a while still gets
every event once it is back; failures end as failed and can be redelivered; rotation signs with both."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook

from qbgw import access, control, queries
from qbgw.settings import Settings
from qbgw.store.reads import AuditFilter
from tests.conftest import ASSISTANT, wait_until
from tests.e2e.api_server import Server, free_port, start_server

JOB = {"assistant_id": ASSISTANT, "messages": [{"role": "user", "content": "What is a normal resting heart rate?"}]}


class Receiver:
    """An HTTP receiver on 127.0.0.1:``port`` that records every POST; answers ``status`` (a callable may
    choose per request)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.status: Callable[[], int] = lambda: 204
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.status())
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received]


@pytest.fixture
def hooked(stack: Settings) -> Settings:
    """The stack with webhooks to this machine allowed, and short waits between attempts."""
    return stack.with_(webhooks_development=True, webhook_backoff=0.3)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver().start()
    yield running
    running.stop()


def _server(settings: Settings, tmp_path: Path, worker_process: Callable[..., Any]) -> Server:
    worker_process(settings)
    return start_server(settings, tmp_path)


@pytest.fixture
def server(hooked: Settings, tmp_path: Path, worker_process: Callable[..., Any]) -> Iterator[Server]:
    running = _server(hooked, tmp_path, worker_process)
    yield running
    running.close()


def verify(settings: Settings, name: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The body, verified with the principal's current secret by the standardwebhooks library."""
    secret = access.webhook_secret(name, settings=settings)
    verified: dict[str, Any] = Webhook(secret).verify(body, headers)
    return verified


def test_a_job_end_is_posted_signed_and_without_phi(server: Server, receiver: Receiver) -> None:
    answer = server.client("sub").post("/v1/jobs", json={**JOB, "custom_id": "v-9", "webhook_url": receiver.url})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    wait_until(lambda: len(receiver.received) >= 1, timeout=30)
    headers, body = receiver.received[0]
    event = verify(server.settings, "sub", headers, body)
    assert event["type"] == "job.succeeded"
    assert event["data"] == {"id": job_id, "status": "succeeded", "custom_id": "v-9", "batch_id": None}
    assert b"heart rate" not in body  # no message text, no answer
    assert headers["webhook-id"]

    def attempts() -> list[Any]:  # the attempt is recorded once the receiver's answer is back: a moment after
        return queries.audit_query(AuditFilter(action="webhook.attempt", job_id=job_id), settings=server.settings)

    wait_until(lambda: len(attempts()) >= 1, timeout=10)
    assert [(e.outcome, e.http_status, e.actor) for e in attempts()] == [("delivered", 204, "webhooks")]
    time.sleep(1.5)  # a sweep or two later: still exactly one delivery
    assert len(receiver.received) == 1


def test_a_receiver_down_for_a_while_still_gets_every_event_once_back(
    hooked: Settings, tmp_path: Path, worker_process: Callable[..., Any]
) -> None:
    down = Receiver()  # its port is chosen; nothing listens there yet
    server = _server(hooked, tmp_path, worker_process)
    try:
        ids = []
        for i in range(3):
            answer = server.client("sub").post("/v1/jobs", json={**JOB, "custom_id": f"d{i}", "webhook_url": down.url})
            ids.append(answer.json()["id"])
        queued = server.client("sub").post(
            "/v1/jobs", json={**JOB, "messages": [{"role": "user", "content": "[[emulator:sleep=2]] x"}]}
        )
        assert queued.status_code == 202
        for job_id in ids:
            assert server.client("sub").get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()["done"]

        def refused_twice() -> bool:
            found = queries.audit_query(AuditFilter(action="webhook.attempt"), settings=server.settings)
            return sum(1 for e in found if e.outcome == "pending") >= 6

        wait_until(refused_twice, timeout=30)  # every delivery failed at least twice while it was down
        down.start()
        try:
            wait_until(lambda: len({h["webhook-id"] for h, _ in down.received}) >= 3, timeout=60)
            time.sleep(1.0)
            got = sorted(verify(server.settings, "sub", h, b)["data"]["id"] for h, b in down.received)
            assert got == sorted(ids)  # every event, each once
        finally:
            down.stop()
    finally:
        server.close()


def test_a_batch_end_is_posted(server: Server, receiver: Receiver) -> None:
    lines = "".join(
        json.dumps({"custom_id": f"b{i}", "smart_chat_assistant_id": ASSISTANT, "messages": JOB["messages"]}) + "\n"
        for i in range(2)
    )
    created = server.client("sub").post("/v1/batches", params={"webhook_url": receiver.url}, content=lines)
    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]
    wait_until(lambda: len(receiver.received) >= 1, timeout=60)
    event = verify(server.settings, "sub", *receiver.received[0])
    assert event["type"] == "batch.completed"
    assert event["data"]["id"] == batch_id


def test_a_delivery_that_never_succeeds_fails_and_can_be_redelivered(
    hooked: Settings, tmp_path: Path, worker_process: Callable[..., Any], receiver: Receiver
) -> None:
    # A window that holds two deliveries and their backoff even when the first comes late on a slow machine.
    server = _server(hooked.with_(webhook_retry_window=5.0), tmp_path, worker_process)
    try:
        receiver.status = lambda: 500
        job_id = server.client("sub").post("/v1/jobs", json={**JOB, "webhook_url": receiver.url}).json()["id"]
        wait_until(lambda: bool(queries.failed_webhooks(settings=server.settings)), timeout=30)
        failed = queries.failed_webhooks(settings=server.settings)
        assert [(d.job_id, d.last_status) for d in failed] == [(job_id, 500)]
        assert failed[0].attempts >= 2
        receiver.status = lambda: 200
        again = control.redeliver_webhook(failed[0].id, actor="ops", settings=server.settings)
        assert again.status in ("pending", "delivered")
        wait_until(lambda: receiver.received and receiver.status() == 200 and not _pending(server, job_id), timeout=30)
        events = queries.audit_query(AuditFilter(job_id=job_id), settings=server.settings)
        assert [e.outcome for e in events if e.action == "webhook.attempt"][-1] == "delivered"
        assert any(e.action == "webhook.redelivered" and e.actor == "ops" for e in events)
        with pytest.raises(Exception, match="not failed"):
            control.redeliver_webhook(failed[0].id, settings=server.settings)
    finally:
        server.close()


def _pending(server: Server, job_id: str) -> bool:
    events = queries.audit_query(AuditFilter(job_id=job_id, action="webhook.attempt"), settings=server.settings)
    return not events or events[-1].outcome != "delivered"


def test_a_rotated_secret_signs_with_both_while_they_overlap(server: Server, receiver: Receiver) -> None:
    old = access.webhook_secret("sub", settings=server.settings)
    new = access.webhook_secret("sub", rotate=True, settings=server.settings)
    assert new != old
    server.client("sub").post("/v1/jobs", json={**JOB, "webhook_url": receiver.url})
    wait_until(lambda: len(receiver.received) >= 1, timeout=30)
    headers, body = receiver.received[0]
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers)["type"] == "job.succeeded"


def test_webhook_urls_are_checked_at_submit_and_guarded_when_called(
    stack: Settings, tmp_path: Path, worker_process: Callable[..., Any]
) -> None:
    server = _server(stack.with_(webhook_backoff=0.3), tmp_path, worker_process)  # not development
    try:
        client = server.client("sub")
        plain = client.post("/v1/jobs", json={**JOB, "webhook_url": "http://example.com/hook"})
        assert plain.status_code == 422
        assert plain.json()["errors"][0]["field"] == "webhook_url"
        assert "https://" in plain.json()["errors"][0]["detail"]
        creds = client.post("/v1/jobs", json={**JOB, "webhook_url": "https://u:p@example.com/hook"})
        assert creds.json()["errors"][0]["field"] == "webhook_url"
        # a URL that could only fail when called is refused now, naming what is wrong
        for bad, says in (
            ("https://exa mple.com/", "spaces, control or invisible characters"),
            ("https://example.com/\n", "spaces, control or invisible characters"),
            ("https://a..b/", "is not a host name"),
            ("https://-/", "is not a host name"),
            ("https://ex%00ample.com/", "is not a host name"),
        ):
            refused = client.post("/v1/jobs", json={**JOB, "webhook_url": bad})
            assert refused.status_code == 422, bad
            assert refused.json()["errors"][0]["field"] == "webhook_url"
            assert says in refused.json()["errors"][0]["detail"], refused.text
        # https to a loopback address passes the form check, and the guard refuses it when it is called: failed
        # at once (retrying cannot help), with the reason.
        inside = client.post("/v1/jobs", json={**JOB, "webhook_url": "https://127.0.0.1:9/hook"})
        assert inside.status_code == 202
        wait_until(lambda: bool(queries.failed_webhooks(settings=server.settings)), timeout=30)
        failed = queries.failed_webhooks(settings=server.settings)[0]
        assert failed.attempts == 1
        assert "non-public address" in (failed.last_error or "")
    finally:
        server.close()


def test_a_key_default_webhook_applies_to_jobs_without_one(server: Server, receiver: Receiver) -> None:
    _, secret = access.create_key("hooked", "submitter", webhook_url=receiver.url, settings=server.settings)
    answer = server.client(None).post("/v1/jobs", json=JOB, headers={"Authorization": f"Bearer {secret}"})
    assert answer.status_code == 202
    wait_until(lambda: len(receiver.received) >= 1, timeout=30)
    assert verify(server.settings, "hooked", *receiver.received[0])["data"]["id"] == answer.json()["id"]


def test_an_openai_batch_asks_for_its_webhook_in_the_query(server: Server, receiver: Receiver) -> None:
    """The SDK's body has no webhook field: ``?webhook_url=`` (``extra_query``) asks for the batch's event, as on
    qbgw's own batches; the event names the qbgw batch, whose OpenAI id is ``batch_`` + its hex. The batch's
    metadata (free text, stored as PHI) is shown to the submitter, not to an auditor."""
    from tests.e2e.test_openai_compat import chat_line, jsonl, sdk

    client = sdk(server, "sub")
    uploaded = client.files.create(file=("w.jsonl", jsonl([chat_line("w1", "hi")])), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"ward": "4B"},
        extra_query={"webhook_url": receiver.url},
    )
    wait_until(lambda: len(receiver.received) >= 1, timeout=60)
    headers, body = receiver.received[0]
    event = verify(server.settings, "sub", headers, body)
    assert event["type"] == "batch.completed"
    assert "batch_" + event["data"]["id"].replace("-", "") == batch.id
    assert client.batches.retrieve(batch.id).metadata == {"ward": "4B"}
    assert sdk(server, "auditor").batches.retrieve(batch.id).metadata is None


def test_slow_receivers_hold_at_most_half_of_a_worker_s_threads(
    hooked: Settings, tmp_path: Path, worker_process: Callable[..., Any]
) -> None:
    """Four deliveries to a receiver that answers nothing until the test lets it, on a worker of two threads: one
    thread delivers (the others wait their turn, deferred), the other runs a job at once; before, both threads
    waited out the receiver's 15 s read timeout and the job waited with them."""
    gate = threading.Event()
    open_now, most_open = [0], [0]
    lock = threading.Lock()
    arrived: list[float] = []

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            with lock:
                open_now[0] += 1
                most_open[0] = max(most_open[0], open_now[0])
                arrived.append(time.time())
            gate.wait(30)
            with lock:
                open_now[0] -= 1
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    slow = ThreadingHTTPServer(("127.0.0.1", free_port()), Slow)
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    worker_process(hooked, concurrency=2)
    server = start_server(hooked, tmp_path)
    try:
        url = f"http://127.0.0.1:{slow.server_address[1]}/hook"
        for _ in range(4):
            posted = server.client("sub").post("/v1/jobs", json={**JOB, "webhook_url": url})
            assert posted.status_code == 202, posted.text
        wait_until(lambda: bool(arrived), timeout=60)
        job = server.client("sub").post("/v1/jobs", json=JOB).json()["id"]
        view = server.client("sub").get(f"/v1/jobs/{job}", params={"wait": 30}).json()
        assert view["status"] == "succeeded", view
        finished = queries.get_job(job, settings=server.settings).finished_at
        assert finished is not None
        # Done while the first delivery still waited (well before its 15 s read timeout), and only one was open.
        assert finished.timestamp() < arrived[0] + 10
        assert most_open[0] == 1
        gate.set()
        wait_until(lambda: len(arrived) >= 4, timeout=60)  # the deferred ones are delivered in their turn
        assert most_open[0] == 1
    finally:
        gate.set()
        server.close()
        slow.shutdown()
        slow.server_close()


def test_a_job_s_webhook_url_in_the_query_is_refused_not_ignored(server: Server, receiver: Receiver) -> None:
    answer = server.client("sub").post("/v1/jobs", params={"webhook_url": receiver.url}, json=JOB)
    assert answer.status_code == 422, answer.text
    assert "webhook_url: a job's goes in its JSON body, not the query" in answer.json()["detail"]
