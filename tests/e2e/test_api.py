"""``qbgw serve`` over a real socket, with a real worker, on both stacks: the jobs API, long-polls woken by
the database, every role against every endpoint, audit actors proven by the key, and bad input."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from qbgw import access, queries
from qbgw.settings import Secret, Settings
from qbgw.store.reads import AuditFilter
from tests.conftest import ASSISTANT, as_owner, wait_until
from tests.e2e.api_server import Server, start_server
from tests.images import data_uri, png_bytes

JOB = {"assistant_id": ASSISTANT, "messages": [{"role": "user", "content": "What is a normal resting heart rate?"}]}
#: A line of a batch body (the batch format's own field names).
LINE = {"smart_chat_assistant_id": ASSISTANT, "messages": JOB["messages"]}


#: The blind index key of subjects (PostgreSQL needs one given; the embedded default would make its own).
SUBJECT_KEY = Secret("e2e-subject-key-" + "q" * 32)


@pytest.fixture
def server(stack: Settings, tmp_path: Path, worker_process: Callable[..., Any]) -> Iterator[Server]:
    stack = stack.with_(subject_key=SUBJECT_KEY)
    worker_process(stack)
    running = start_server(stack, tmp_path)
    yield running
    running.close()


def submit(server: Server, who: str = "sub", body: dict[str, Any] | None = None) -> str:
    answer = server.client(who).post("/v1/jobs", json=body or JOB)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def finished(server: Server, job_id: str, who: str = "sub") -> dict[str, Any]:
    answer = server.client(who).get(f"/v1/jobs/{job_id}", params={"wait": 30})
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()
    assert data["done"], data
    return data


def test_submit_long_poll_and_read_the_result(server: Server) -> None:
    client = server.client("sub")
    answer = client.post("/v1/jobs", json={**JOB, "custom_id": "visit-1"})
    assert answer.status_code == 202
    job_id = answer.json()["id"]
    assert answer.headers["location"] == f"/v1/jobs/{job_id}"
    status = finished(server, job_id)
    assert status["status"] == "succeeded"
    assert status["custom_id"] == "visit-1"
    assert "answer" not in status  # the status never carries PHI
    assert "error" not in status
    result = client.get(f"/v1/jobs/{job_id}/result")
    assert result.status_code == 200
    assert "normal resting heart rate" in result.json()["answer"]


def test_a_result_before_the_end_is_a_409_and_reads_nothing(server: Server) -> None:
    client = server.client("sub")
    slow = {**JOB, "messages": [{"role": "user", "content": "take your time [[emulator:sleep=3x1]]"}]}
    job_id = client.post("/v1/jobs", json=slow).json()["id"]
    early = client.get(f"/v1/jobs/{job_id}/result")
    assert early.status_code == 409, early.text
    assert early.json()["type"].endswith("not-finished")
    assert server.client("sub2").get(f"/v1/jobs/{job_id}/result").status_code == 404  # not its: no 409
    assert finished(server, job_id)["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{job_id}/result").status_code == 200
    trail = queries.job_events(job_id, include_reads=True, settings=server.settings)
    assert [e.actor for e in trail if e.action == "result.read"] == ["key:sub"]


def test_a_result_can_be_waited_for_in_one_request(server: Server) -> None:
    """``GET /result?wait=`` answers once the job ends (woken by the database), or 409 at its deadline; another
    principal's job is a 404 at once, not after the wait; a wait that ended without the answer reads nothing."""
    client = server.client("sub")
    # The call takes 6 s: the 0.3 s wait below must end before the job does, even on a slow machine.
    slow = {**JOB, "messages": [{"role": "user", "content": "take your time [[emulator:sleep=6x1]]"}]}
    job_id = client.post("/v1/jobs", json=slow).json()["id"]
    started = time.monotonic()
    assert server.client("sub2").get(f"/v1/jobs/{job_id}/result", params={"wait": 30}).status_code == 404
    assert time.monotonic() - started < 5  # refused before any wait (of 30 s), and before the job ended
    early = client.get(f"/v1/jobs/{job_id}/result", params={"wait": 0.3})
    assert early.status_code == 409, early.text
    assert early.json()["type"].endswith("not-finished")
    answer = client.get(f"/v1/jobs/{job_id}/result", params={"wait": 30})
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "succeeded"
    assert answer.json()["answer"]
    trail = queries.job_events(job_id, include_reads=True, settings=server.settings)
    assert [e.actor for e in trail if e.action == "result.read"] == ["key:sub"]  # the one that got it
    for wait in (-1, 61, "soon"):
        refused = client.get(f"/v1/jobs/{job_id}/result", params={"wait": wait})
        assert refused.status_code in (400, 422), refused.text
        assert "wait" in refused.text


def test_concurrent_posts_each_get_their_own_job(server: Server) -> None:
    """Concurrent POSTs are stored in groups (qbgw.api.intake): each still gets its own job, answer and event."""
    posts = 24
    answers: list[Any] = [None] * posts
    start = threading.Barrier(posts)
    # Made here, once each: the threads share them (an httpx.Client is thread-safe), and none is left unclosed.
    clients = {who: server.client(who) for who in ("sub", "sub2")}

    def post(n: int) -> None:
        client = clients["sub" if n % 2 else "sub2"]
        start.wait()
        answers[n] = client.post("/v1/jobs", json={**JOB, "custom_id": f"together-{n}"})

    threads = [threading.Thread(target=post, args=(n,)) for n in range(posts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [a.status_code for a in answers] == [202] * posts, [a.text for a in answers if a.status_code != 202]
    ids = [a.json()["id"] for a in answers]
    assert len(set(ids)) == posts
    assert [a.json()["custom_id"] for a in answers] == [f"together-{n}" for n in range(posts)]
    for n, job_id in enumerate(ids):
        owner = "sub" if n % 2 else "sub2"
        assert finished(server, job_id, who=owner)["custom_id"] == f"together-{n}"
        trail = queries.job_events(job_id, settings=server.settings)
        assert [(e.action, e.actor) for e in trail if e.action == "job.submitted"] == [
            ("job.submitted", f"key:{owner}")
        ]


def test_every_audit_event_a_request_causes_has_the_key_as_actor(server: Server) -> None:
    job_id = submit(server, "sub")
    finished(server, job_id)
    assert server.client("reader").get(f"/v1/jobs/{job_id}/result").status_code == 200
    trail = queries.job_events(job_id, include_reads=True, settings=server.settings)
    actors = {(e.action, e.actor) for e in trail}
    assert ("job.submitted", "key:sub") in actors
    assert ("result.read", "key:reader") in actors
    listed = server.client("auditor").get("/v1/audit/events", params={"action": "audit.queried", "limit": 5})
    assert listed.status_code == 200
    mine = queries.audit_query(AuditFilter(action="audit.queried"), settings=server.settings)
    assert any(e.actor == "key:auditor" for e in mine)


def test_a_long_poll_is_woken_by_the_database(server: Server, stack: Settings) -> None:
    """The answer comes when the job ends, not at the next recheck: on PostgreSQL a NOTIFY wakes the wait (a
    recheck would come after 5 s); on SQLite the bounded poll re-reads within 0.5 s."""
    job_id = submit(server)
    started = time.monotonic()
    data = finished(server, job_id)
    assert data["status"] == "succeeded"
    assert time.monotonic() - started < 4.5


def test_a_long_poll_ends_at_its_deadline_with_the_current_status(server: Server) -> None:
    slow = {**JOB, "messages": [{"role": "user", "content": "[[emulator:sleep=3]] please"}]}
    job_id = submit(server, body=slow)
    answer = server.client("sub").get(f"/v1/jobs/{job_id}", params={"wait": 0.5})
    assert answer.status_code == 200
    assert answer.json()["done"] is False


# ---- the role matrix: every role against every endpoint ----

R = ("sub", "sub2", "reader", "auditor", "admin")


def _row(*codes: int) -> dict[str, int]:
    return dict(zip(R, codes, strict=True))


#: endpoint -> what each principal gets, for a finished job submitted by "sub". sub2 is another submitter:
#: "sub"'s job does not exist for it (404, not 403).
MATRIX: list[tuple[str, str, dict[str, int]]] = [
    ("POST", "/v1/jobs", _row(202, 202, 403, 403, 403)),
    ("GET", "/v1/jobs/{job}", _row(200, 404, 200, 200, 200)),
    ("GET", "/v1/jobs/{job}/result", _row(200, 404, 200, 403, 403)),
    ("GET", "/v1/jobs/{job}/events", _row(200, 404, 403, 200, 200)),
    ("POST", "/v1/jobs/{job}/cancel", _row(409, 404, 403, 403, 409)),  # it succeeded: nothing to cancel
    ("POST", "/v1/jobs/{job}/replay", _row(403, 403, 403, 403, 409)),  # it did not fail: nothing to replay
    ("GET", "/v1/audit/events", _row(403, 403, 403, 200, 403)),
    ("POST", "/v1/audit/verify", _row(403, 403, 403, 200, 200)),
    ("POST", "/v1/audit/access-report", _row(403, 403, 403, 200, 403)),
    ("GET", "/v1/batches/{batch}", _row(200, 404, 200, 200, 200)),
    ("GET", "/v1/batches/{batch}/results", _row(200, 404, 200, 403, 403)),
    ("POST", "/v1/batches", _row(202, 202, 403, 403, 403)),
]


def test_every_role_against_every_endpoint(server: Server) -> None:
    job_id = submit(server, "sub")
    finished(server, job_id)
    lines = "".join(json.dumps({"custom_id": f"c{i}", **LINE}) + "\n" for i in range(2))
    batch = server.client("sub").post("/v1/batches", content=lines)
    assert batch.status_code == 202, batch.text
    batch_id = batch.json()["id"]
    seen: dict[tuple[str, str, str], int] = {}
    expected: dict[tuple[str, str, str], int] = {}
    for row, (method, path, codes) in enumerate(MATRIX):
        url = path.format(job=job_id, batch=batch_id)
        for who, code in codes.items():
            if method == "POST" and path == "/v1/jobs":
                answer = server.client(who).post(url, json=JOB)
            elif method == "POST" and path == "/v1/batches":
                answer = server.client(who).post(url, content=lines)
            elif path == "/v1/audit/access-report":
                answer = server.client(who).post(url, json={"subject": "MRN-MATRIX"})
            else:
                answer = server.client(who).request(method, url)
            seen[(method, path, who)] = answer.status_code
            expected[(method, path, who)] = code
            if answer.status_code >= 400:
                assert answer.headers["content-type"].startswith("application/problem+json"), (method, path, who)
        for key in (None, "qbgw_0123456789ab_" + "x" * 43, "not-a-key"):
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            answer = server.client(None, source=f"127.0.1.{row + 1}").request(method, url, headers=headers)
            seen[(method, path, str(key))] = answer.status_code
            expected[(method, path, str(key))] = 401
    wrong = {k: (seen[k], v) for k, v in expected.items() if seen[k] != v}
    assert not wrong, f"(got, expected) by (method, path, principal): {wrong}"


def test_expired_and_revoked_keys_are_refused_and_every_refusal_is_audited(server: Server) -> None:
    # Five seconds: the first request must come before the key expires, on a slow machine too.
    row, secret = access.create_key("short", "reader", expires_in=access.parse_duration("5s"), settings=server.settings)
    client = server.client(None, source="127.0.3.1")
    headers = {"Authorization": f"Bearer {secret}"}
    assert client.get("/v1/jobs/none", headers=headers).status_code == 404  # accepted: the job does not exist
    wait_until(lambda: client.get("/v1/jobs/none", headers=headers).status_code == 401, timeout=15, interval=0.5)
    refused = client.get("/v1/jobs/none", headers=headers)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    _, revoked = access.create_key("gone", "reader", settings=server.settings)
    gone_id = revoked.split("_")[1]  # qbgw_<id>_<secret>
    assert client.get("/v1/jobs/none", headers={"Authorization": f"Bearer {revoked}"}).status_code == 404
    access.revoke_key(gone_id, settings=server.settings)
    # A server takes a key it saw for up to 5 s without asking the database again (docs/http-api.md).
    started = time.monotonic()
    wait_until(
        lambda: client.get("/v1/jobs/none", headers={"Authorization": f"Bearer {revoked}"}).status_code == 401,
        timeout=10,
        interval=0.2,
    )
    assert time.monotonic() - started < 5.0 + 2.0
    failures = queries.audit_query(AuditFilter(action="auth.failed"), settings=server.settings)
    reasons = {(e.detail.get("key_id"), e.detail.get("reason")) for e in failures}
    assert (row.id, "expired key") in reasons
    assert (gone_id, "revoked key") in reasons
    for event in failures:
        for presented in (secret, revoked):
            assert presented.split("_", 2)[2] not in json.dumps(event.as_dict())  # never the presented secret


def test_repeated_failures_from_one_source_are_slowed_down(server: Server) -> None:
    client = server.client(None, source="127.0.2.1")
    codes = [
        client.get("/v1/jobs/x", headers={"Authorization": "Bearer qbgw_deadbeef00_" + "y" * 43}).status_code
        for _ in range(11)
    ]
    assert codes[:9] == [401] * 9
    assert codes[9:] == [429, 429]
    slowed = client.get("/v1/jobs/x", headers={"Authorization": "Bearer not-a-key"})
    assert slowed.status_code == 429
    assert int(slowed.headers["retry-after"]) >= 1
    # A key the server knows (it authenticated within 5 s) still passes from that address (users behind one
    # NAT); any other is refused there before the database is asked; other addresses are untouched.
    assert server.client("sub").get("/v1/jobs/x").status_code == 404  # from 127.0.0.1: now known
    assert client.get("/v1/jobs/x", headers={"Authorization": f"Bearer {server.keys['sub']}"}).status_code == 404
    assert client.get("/v1/jobs/x", headers={"Authorization": f"Bearer {server.keys['reader']}"}).status_code == 429
    # a key in constant use keeps passing after its 5 s in the cache: each use counts as an acceptance
    for _ in range(7):
        time.sleep(1)
        assert client.get("/v1/jobs/x", headers={"Authorization": f"Bearer {server.keys['sub']}"}).status_code == 404
    assert server.client(None, source="127.0.2.2").get("/v1/jobs/x").status_code == 401


def test_a_trusted_proxys_forwarded_address_is_the_source(stack: Settings, tmp_path: Path) -> None:
    """With QBGW_TRUSTED_PROXIES, the address a named proxy forwards is the client's (audit events, throttling);
    anyone else's X-Forwarded-For is ignored."""
    server = start_server(stack.with_(trusted_proxies="127.0.3.1"), tmp_path)
    try:
        bad = {"Authorization": "Bearer qbgw_deadbeef00_" + "y" * 43}
        proxy, other = server.client(None, source="127.0.3.1"), server.client(None, source="127.0.3.2")
        # the proxy appends the peer it saw to what the client sent: the last address is the one believed
        forwarded = {**bad, "X-Forwarded-For": "198.51.100.9, 203.0.113.7"}
        assert proxy.get("/v1/jobs/x", headers=forwarded).status_code == 401
        assert other.get("/v1/jobs/x", headers={**bad, "X-Forwarded-For": "198.51.100.10"}).status_code == 401
        sources = [
            e.detail["source"] for e in queries.audit_query(AuditFilter(action="auth.failed"), settings=server.settings)
        ]
        assert sources[-2:] == ["203.0.113.7", "127.0.3.2"]
        # one client behind the proxy slowed down does not slow down the proxy's other clients
        codes = [proxy.get("/v1/jobs/x", headers=forwarded).status_code for _ in range(10)]
        assert codes[-1] == 429
        assert proxy.get("/v1/jobs/x", headers={**bad, "X-Forwarded-For": "203.0.113.8"}).status_code == 401
    finally:
        server.close()


def test_verify_names_the_tampered_event_in_words(
    stack: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    server = start_server(stack, tmp_path)
    try:
        assert server.client("sub").post("/v1/jobs", json=JOB).status_code == 202
        postgres = stack.effective_database_url.startswith("postgresql")
        owner = str(request.getfixturevalue("pg").owner) if postgres else stack.effective_database_url
        with as_owner(owner) as db:
            seq = db.execute(text("SELECT max(seq) FROM audit_events WHERE action = 'job.submitted'")).scalar_one()
            db.execute(text("UPDATE audit_events SET actor = 'nobody' WHERE seq = :seq"), {"seq": seq})
        found = server.client("auditor").post("/v1/audit/verify").json()
        assert found["ok"] is False
        assert found["problem"]["seq"] == seq
        assert found["problem"]["detail"].startswith(f"event seq {seq} was altered")
    finally:
        server.close()


def test_a_lone_surrogate_or_a_nul_is_refused_by_name_and_nothing_is_stored(server: Server) -> None:
    """JSON may escape half of a UTF-16 pair ("\\ud800"): it is no Unicode text, so it could be stored and then never
    be sent; each way in refuses it (422 here, OpenAI's 400 on its paths) before anything is stored."""

    def raw(body: dict[str, Any]) -> bytes:
        return json.dumps(body).encode()  # ensure_ascii: the surrogate travels as its escape

    headers = {"Content-Type": "application/json"}
    jobs_before = len(queries.audit_query(AuditFilter(action="job.submitted"), settings=server.settings))
    for who, path, body in (
        ("sub", "/v1/jobs", {**JOB, "custom_id": "c\ud800"}),
        ("sub", "/v1/jobs", {**JOB, "\udfff": 1}),
        ("auditor", "/v1/audit/access-report", {"subject": "MRN-1\ud800"}),
    ):
        answer = server.client(who).post(path, content=raw(body), headers=headers)
        assert answer.status_code == 422, answer.text
        assert "lone UTF-16 surrogate" in answer.json()["errors"][0]["detail"]
    uploaded = server.client("sub").post("/v1/files", files={"file": ("in.jsonl", b"{}\n")}, data={"purpose": "batch"})
    file_id = uploaded.json().get("id", "file-x")
    for path, body in (
        ("/v1/batches", {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "metadata": {"k": "\ud800"}}),
        ("/v1/batches", {"input_file_id": "file-\ud800", "endpoint": "/v1/chat/completions"}),
        ("/v1/chat/completions", {"model": ASSISTANT, "messages": JOB["messages"], "\ud800": 1}),
    ):
        answer = server.client("sub").post(path, content=raw(body), headers=headers)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["type"] == "invalid_request_error"
        assert "surrogate" in answer.json()["error"]["message"]
    for query in ("purpose=%00", "after=%00", "after=x%01y"):
        answer = server.client("sub").get(f"/v1/files?{query}")
        assert answer.status_code == 400, answer.text
        assert "without control characters" in answer.json()["error"]["message"]
    assert server.client("sub").get("/v1/batches?limit=100").status_code == 200
    jobs_after = len(queries.audit_query(AuditFilter(action="job.submitted"), settings=server.settings))
    assert jobs_after == jobs_before


def test_a_key_given_twice_is_refused_in_both_dialects_and_nothing_is_stored(server: Server) -> None:
    """JSON lets an object name a key twice and leaves which counts to the parser: a proxy or a log that took the
    first value would have read another request than the one qbgw ran."""
    headers = {"Content-Type": "application/json"}
    jobs_before = len(queries.audit_query(AuditFilter(action="job.submitted"), settings=server.settings))
    body = json.dumps(JOB)[:-1] + ', "assistant_id": "another"}'
    answer = server.client("sub").post("/v1/jobs", content=body.encode(), headers=headers)
    assert answer.status_code == 422, answer.text
    assert "the key 'assistant_id' appears twice in one object" in answer.json()["errors"][0]["detail"]
    inner = json.dumps({"model": ASSISTANT, "messages": [{"role": "user", "content": "a"}]})
    inner = inner.replace('"content": "a"', '"content": "a", "content": "b"')
    answer = server.client("sub").post("/v1/chat/completions", content=inner.encode(), headers=headers)
    assert answer.status_code == 400, answer.text
    assert "the key 'content' appears twice" in answer.json()["error"]["message"]
    jobs_after = len(queries.audit_query(AuditFilter(action="job.submitted"), settings=server.settings))
    assert jobs_after == jobs_before


def test_an_encoded_slash_stays_in_its_segment(server: Server) -> None:
    """``%2F`` is a character of the segment it is in (RFC 3986): ``/v1/jobs/ID%2Fresult`` names no job, and
    reads nothing, rather than routing to ID's result as the servers' decoded path did."""
    job_id = submit(server)
    assert finished(server, job_id)["status"] == "succeeded"
    for path in (f"/v1/jobs/{job_id}%2Fresult", f"/v1/jobs/{job_id}%2fresult", f"/v1%2Fjobs/{job_id}"):
        answer = server.client("sub").get(path)
        assert answer.status_code == 404, (path, answer.text)
    assert server.client("sub").get(f"/v1/jobs/{job_id}/result").status_code == 200  # the real path still reads
    assert server.client("sub").get(f"/v1/jobs/{job_id[:4]}%{ord(job_id[4]):02X}{job_id[5:]}").status_code == 200
    trail = queries.job_events(job_id, include_reads=True, settings=server.settings)
    assert [e.actor for e in trail if e.action == "result.read"] == ["key:sub"]


def test_a_webhook_urls_token_stays_out_of_the_access_log(server: Server) -> None:
    secret = "WEBHOOK-SECRET-42"
    query = "assistant_id=" + ASSISTANT + "&webhook_url=https%3A%2F%2Fhooks.example.org%2Fq%3Ftoken%3D" + secret
    server.client("sub").post(f"/v1/batches?{query}", content=json.dumps({"custom_id": "w", **LINE}) + "\n")
    server.client("sub").get(f"/v1/jobs/x?WEBHOOK_URL=https%3A%2F%2Fh.example.org%2F{secret}&a=b")
    # The name as the server decodes it: webhook%5Furl is webhook_url (and was taken as the batch's webhook).
    encoded = "webhook%5Furl=https%3A%2F%2Fhooks.example.org%2Fq%3Ftoken%3D" + secret
    answer = server.client("sub").post(f"/v1/batches?{encoded}", content=json.dumps({"custom_id": "e", **LINE}) + "\n")
    assert answer.status_code == 202, answer.text
    wait_until(lambda: server.log.read_text(errors="replace").lower().count("=[redacted]") >= 3)
    log = server.log.read_text(errors="replace")
    assert "webhook%5Furl=[redacted]" in log
    assert secret not in log
    assert "&a=b" in log  # the rest of the line stays


def test_a_long_poll_whose_client_hung_up_stops_and_the_server_stops_on_sigterm(
    stack: Settings, tmp_path: Path
) -> None:
    """No worker runs: the chat completion would wait its 600 s. The client hangs up; the server stops waiting (it
    would otherwise hold SIGTERM's shutdown until then) and reads nothing for no one."""
    server = start_server(stack, tmp_path)
    try:
        host, port = server.url.removeprefix("http://").split(":")
        body = json.dumps({"model": ASSISTANT, "messages": JOB["messages"]}).encode()
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {server.keys['sub']}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            wait_until(lambda: bool(queries.audit_query(AuditFilter(action="job.submitted"), settings=stack)))
        time.sleep(6.5)  # the wait looks for a hang-up at least every 5 s
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == -signal.SIGTERM  # uvicorn ends by the signal it caught
        # nothing left to wait for: not the 10 s grace a request still waiting (for 600 s) would take
        assert time.monotonic() - started < 6
        assert queries.audit_query(AuditFilter(action="result.read"), settings=stack) == []
    finally:
        server.close()


def test_a_405_names_every_method_of_the_path_and_times_are_not_numbers(server: Server) -> None:
    sub = server.client("sub")
    assert set(sub.put("/v1/batches").headers["allow"].split(", ")) == {"GET", "POST"}
    assert set(sub.put("/v1/files").headers["allow"].split(", ")) == {"GET", "POST"}
    assert set(sub.put(f"/v1/files/file-{'0' * 24}").headers["allow"].split(", ")) == {"GET", "DELETE"}
    for since in ("0.0", "1700000000", "1e9"):  # (some refused by the parameter's type first)
        refused = server.client("auditor").get(f"/v1/audit/events?since={since}")
        assert refused.status_code == 422, refused.text
    unix = server.client("auditor").get("/v1/audit/events?since=1700000000").json()
    assert "not a number" in unix["errors"][0]["detail"]
    assert server.client("auditor").get("/v1/audit/events?since=2026-01-01T00:00:00Z").status_code == 200


# ---- bad input: problem details naming the field ----


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"assistant_id": ASSISTANT}, "messages", "required"),
        ({"messages": JOB["messages"]}, "assistant_id", "required"),
        ({**JOB, "assistant_id": "a b"}, "assistant_id", "letters, digits"),
        ({"smart_chat_assistant_id": 5, "messages": JOB["messages"]}, "smart_chat_assistant_id", "required"),
        ({**JOB, "smart_chat_assistant_id": "another"}, "smart_chat_assistant_id", "differs from assistant_id"),
        ({**JOB, "custom_id": "   "}, "custom_id", "non-empty"),
        ({**JOB, "temperature": 0.2}, "temperature", "not a field of a job"),
        ({**JOB, "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "must be"),
        ({**JOB, "custom_id": ""}, "custom_id", "non-empty"),
        ({**JOB, "subject": " "}, "subject", "non-empty"),
        ({**JOB, "subject": "M" * 256}, "subject", "at most 255 characters"),
        ({**JOB, "subject": "MRN\u000742"}, "subject", "U+0007"),
        ({**JOB, "subject": 42}, "subject", "got int"),
        (
            {
                **JOB,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}],
            },
            None,
            "",
        ),
    ],
)
def test_bad_jobs_get_problem_details_naming_the_field(
    server: Server, body: dict[str, Any], field: str | None, says: str
) -> None:
    before = len(queries.audit_query(AuditFilter(action="job.submitted"), settings=server.settings))
    answer = server.client("sub").post("/v1/jobs", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    problem = answer.json()
    assert problem["status"] == 422
    assert problem["type"].startswith("urn:qbgw:problem:")
    if field is not None:
        assert problem["errors"][0]["field"] == field
        assert says in problem["errors"][0]["detail"]
    after = len(queries.audit_query(AuditFilter(action="job.submitted"), settings=server.settings))
    assert after == before  # nothing was stored


def test_bodies_that_are_not_json_objects_or_too_large(server: Server) -> None:
    client = server.client("sub")
    assert client.post("/v1/jobs", content=b"{nope").json()["errors"][0]["field"] == "body"
    assert client.post("/v1/jobs", json=[1, 2]).status_code == 422
    huge = b"x" * (server.settings.max_request_bytes + 70_000)
    answer = client.post("/v1/jobs", content=huge)
    assert answer.status_code == 413
    assert "at most" in answer.json()["detail"]
    assert client.get("/v1/jobs/x", params={"wait": 600}).status_code == 422
    assert client.get("/v1/jobs/x", params={"wait": "soon"}).json()["errors"][0]["field"] == "wait"
    # Without a valid key, a malformed parameter says nothing about parameters: 401 first.
    stranger = server.client(None, source="127.0.5.1")
    assert stranger.get("/v1/jobs/x", params={"wait": "soon"}).status_code == 401
    assert stranger.get("/v1/audit/events", params={"limit": "ten"}).status_code == 401
    # Found by review: each of these was a raw database error, a 500 with the SQL in the server's log.
    assert client.post("/v1/jobs", json={**JOB, "custom_id": "a\u0000b"}).json()["errors"][0]["field"] == "custom_id"
    assert client.get("/v1/jobs/a%00b").status_code == 404
    auditor = server.client("auditor")
    assert auditor.get("/v1/audit/events", params={"after_seq": 10**30}).status_code == 422
    assert auditor.get("/v1/audit/events", params={"actor": "a\u0000"}).json()["errors"][0]["field"] == "actor"
    nul_line = json.dumps({"custom_id": "a\u0000", **LINE}) + "\n"
    assert client.post("/v1/batches", content=nul_line).status_code == 422
    assert "Exception in ASGI application" not in server.log.read_text()
    window = client.post("/v1/batches", params={"completion_window": "999999w"}, content=b'{"custom_id": "a"}\n')
    assert window.status_code == 422
    assert window.json()["errors"][0]["field"] == "completion_window"


def test_an_idempotency_key_is_per_principal(server: Server) -> None:
    first = server.client("sub").post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "order-7"})
    again = server.client("sub").post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "order-7"})
    other = server.client("sub2").post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "order-7"})
    assert first.json()["id"] == again.json()["id"]
    assert other.json()["id"] != first.json()["id"]  # never another principal's job
    changed = server.client("sub").post(
        "/v1/jobs",
        json={**JOB, "messages": [{"role": "user", "content": "another question"}]},
        headers={"Idempotency-Key": "order-7"},
    )
    assert changed.status_code == 409
    assert "'order-7'" in changed.json()["detail"]  # the key the client sent, not the one stored for it
    assert "api:" not in changed.json()["detail"]


def test_an_image_job_and_a_batch_through_the_api(server: Server) -> None:
    client = server.client("sub")
    image = {
        "assistant_id": ASSISTANT,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe."},
                    {"type": "image_url", "image_url": {"url": data_uri("png", png_bytes(32, 32))}},
                ],
            }
        ],
    }
    job_id = submit(server, body=image)
    assert finished(server, job_id)["status"] == "succeeded"
    lines = "".join(json.dumps({"custom_id": f"line-{i}", **LINE}) + "\n" for i in range(3))
    created = client.post("/v1/batches", content=lines)
    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/v1/batches/{batch_id}").json()["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    results = client.get(f"/v1/batches/{batch_id}/results")
    rows = [json.loads(line) for line in results.text.splitlines()]
    assert sorted(r["custom_id"] for r in rows) == ["line-0", "line-1", "line-2"]
    many = "".join(json.dumps({"custom_id": f"m-{i:03d}", **LINE}) + "\r\n" for i in range(205))  # CRLF lines too
    big = client.post("/v1/batches", content=many.encode())
    assert big.status_code == 202, big.text
    as_csv = client.get(f"/v1/batches/{big.json()['id']}/results", params={"format": "csv"}).text.splitlines()
    assert as_csv[0].startswith("custom_id")  # one header, then a row per job, sent in chunks of 200
    assert [row.split(",")[0] for row in as_csv[1:]] == [f"m-{i:03d}" for i in range(205)]
    as_jsonl = client.get(f"/v1/batches/{big.json()['id']}/results").text.splitlines()
    assert len(as_jsonl) == 205
    assert client.post("/v1/batches", content=b"\xff\xfe{}\n").json()["type"].endswith("invalid-batch")
    bad = client.post("/v1/batches", content='{"custom_id": "a"}\nnot json\n')
    assert bad.status_code == 422
    assert {e["line"] for e in bad.json()["errors"]} == {1, 2}


def test_health_ready_and_the_openapi_document(server: Server) -> None:
    client = server.client(None, source="127.0.4.1")
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert {c["name"] for c in ready.json()["checks"]} == {"database", "broker"}
    spec = client.get("/openapi.json").json()
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result", "/v1/audit/events", "/v1/batches"):
        assert path in spec["paths"]
    assert client.get("/docs").status_code == 200


def _operation(spec: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    for template, operations in spec["paths"].items():
        if re.fullmatch(re.sub(r"\\{[a-z_]+\\}", "[^/]+", re.escape(template)), path) and method in operations:
            found: dict[str, Any] = operations[method]
            return found
    raise AssertionError(f"{method.upper()} {path}: not in the OpenAPI document")


def _shape(spec: dict[str, Any], node: Any, strict: bool = True) -> Any:
    """``node`` with its $refs to the document's components put in place, and (``strict``) no property an
    object's schema does not name: a key the server sends that the document does not declare is found."""
    if isinstance(node, list):
        return [_shape(spec, item, strict) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _shape(spec, spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]], strict)
    shaped = {key: _shape(spec, value, strict and key != "allOf") for key, value in node.items()}
    if strict and "properties" in node:
        shaped.setdefault("additionalProperties", False)
    return shaped


def _conforms(spec: dict[str, Any], method: str, path: str, answer: httpx.Response) -> None:
    """The answer's JSON body is what its operation's schema, for its status and content type, says."""
    from jsonschema import Draft202012Validator

    declared = _operation(spec, method, path)["responses"][str(answer.status_code)]
    kind = answer.headers["content-type"].split(";")[0]
    schema = declared["content"][kind].get("schema")
    assert schema, f"{method.upper()} {path} {answer.status_code}: no schema for {kind}"
    errors = list(Draft202012Validator(_shape(spec, schema)).iter_errors(answer.json()))
    assert not errors, f"{method.upper()} {path} {answer.status_code}: {[e.message for e in errors][:5]}"


def test_every_answer_is_described_by_the_openapi_document(server: Server) -> None:
    """Successes and refusals of every kind, each checked against its operation in /openapi.json: the status is
    declared, with the content type the server sent (a problem detail, OpenAI's error, JSON Lines, CSV)."""
    spec = server.client(None).get("/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(spec)  # FastAPI's 422, which the server never sends
    job_id = submit(server)
    finished(server, job_id)
    batch = server.client("sub").post("/v1/batches", content=json.dumps({"custom_id": "d1", **LINE}) + "\n")
    assert batch.status_code == 202, batch.text
    batch_id = batch.json()["id"]
    unknown = "00000000-0000-4000-8000-000000000000"
    sub, reader, auditor, nobody = (server.client(who) for who in ("sub", "reader", "auditor", None))
    seen: list[tuple[str, str, httpx.Response]] = [
        ("post", "/v1/jobs", nobody.post("/v1/jobs", json=JOB)),
        ("post", "/v1/jobs", sub.post("/v1/jobs", json={"messages": JOB["messages"]})),
        ("get", f"/v1/jobs/{job_id}", sub.get(f"/v1/jobs/{job_id}", params={"wait": "soon"})),
        ("get", f"/v1/jobs/{unknown}", sub.get(f"/v1/jobs/{unknown}")),
        ("get", f"/v1/jobs/{job_id}/result", sub.get(f"/v1/jobs/{job_id}/result")),
        ("post", f"/v1/jobs/{job_id}/cancel", reader.post(f"/v1/jobs/{job_id}/cancel")),
        ("post", f"/v1/jobs/{job_id}/replay", server.client("admin").post(f"/v1/jobs/{job_id}/replay")),
        ("get", f"/v1/batches/{batch_id}/results", sub.get(f"/v1/batches/{batch_id}/results")),
        ("get", f"/v1/batches/{batch_id}/results", sub.get(f"/v1/batches/{batch_id}/results?format=csv")),
        ("get", "/v1/batches/batch_123", sub.get("/v1/batches/batch_123")),
        ("get", "/v1/batches/batch_" + "0" * 32, sub.get("/v1/batches/batch_" + "0" * 32)),
        ("get", "/v1/audit/events", auditor.get("/v1/audit/events", params={"limit": 0})),
        ("post", "/v1/audit/access-report", auditor.post("/v1/audit/access-report", content=b"x" * 70000)),
        ("get", "/v1/files", sub.get("/v1/files", params={"limit": "ten"})),
        ("get", "/v1/files", sub.get("/v1/files", params={"limit": 0})),
        ("get", "/v1/files", reader.get("/v1/files")),
    ]
    statuses = set()
    for method, path, answer in seen:
        declared = _operation(spec, method, path)["responses"]
        status = str(answer.status_code)
        assert status in declared, f"{method.upper()} {path}: {status} is not declared ({sorted(declared)})"
        kind = answer.headers["content-type"].split(";")[0]
        assert kind in declared[status]["content"], f"{method.upper()} {path} {status}: {kind} is not declared"
        statuses.add(status)
        openai_success = "openai" in _operation(spec, method, path).get("tags", ()) and answer.is_success
        if kind.endswith("json") and not openai_success:  # (OpenAI's own shapes: the SDK's tests parse them)
            _conforms(spec, method, path, answer)
    assert statuses >= {"200", "400", "401", "403", "404", "409", "413", "422"}, statuses
    # Every JSON success of qbgw's dialect has the shape the document gives it.
    admin = server.client("admin")
    failed = submit(server, "sub", {**JOB, "messages": [{"role": "user", "content": "[[emulator:fail=400]] no"}]})
    finished(server, failed)
    slow = {**JOB, "custom_id": "c-1", "messages": [{"role": "user", "content": "[[emulator:sleep=5]] wait"}]}
    waiting = sub.post("/v1/jobs", json=slow, headers={"Idempotency-Key": "idem-shape-1"})  # still there to cancel
    cancelled = sub.post(f"/v1/jobs/{waiting.json()['id']}/cancel")
    skipped = sub.post(
        "/v1/batches", params={"skip_invalid": "true"}, content=json.dumps({"custom_id": "s1", **LINE}) + "\n{}\n"
    )
    successes: list[tuple[str, str, httpx.Response]] = [
        ("get", "/readyz", nobody.get("/readyz")),
        ("post", "/v1/jobs", sub.post("/v1/jobs", json=JOB)),
        ("post", "/v1/jobs", waiting),
        ("get", f"/v1/jobs/{job_id}", sub.get(f"/v1/jobs/{job_id}")),
        ("get", f"/v1/jobs/{job_id}/result", sub.get(f"/v1/jobs/{job_id}/result")),
        ("get", f"/v1/jobs/{failed}/result", sub.get(f"/v1/jobs/{failed}/result")),
        ("post", f"/v1/jobs/{waiting.json()['id']}/cancel", cancelled),
        ("get", f"/v1/jobs/{job_id}/events", sub.get(f"/v1/jobs/{job_id}/events")),
        ("post", f"/v1/jobs/{failed}/replay", admin.post(f"/v1/jobs/{failed}/replay")),
        ("post", "/v1/batches", batch),
        ("post", "/v1/batches", skipped),
        ("get", f"/v1/batches/{batch_id}", sub.get(f"/v1/batches/{batch_id}")),
        ("post", f"/v1/batches/{batch_id}/cancel", sub.post(f"/v1/batches/{batch_id}/cancel")),
        ("get", "/v1/audit/events", auditor.get("/v1/audit/events", params={"limit": 2})),
        ("post", "/v1/audit/verify", admin.post("/v1/audit/verify")),
        ("post", "/v1/audit/access-report", auditor.post("/v1/audit/access-report", json={"subject": "MRN-SHAPE"})),
    ]
    for method, path, answer in successes:
        assert answer.status_code in (200, 202), (method, path, answer.text)
        _conforms(spec, method, path, answer)
    assert [s.json()["problems"] for m, p, s in successes if p == "/v1/batches"][1][0]["line"] == 2
    # A batch id that is not an OpenAI one (batch_ and 32 hex digits) is qbgw's: a problem detail.
    assert sub.get("/v1/batches/batch_123").headers["content-type"].startswith("application/problem+json")
    # Both names of the assistant, the same id (or one null), are one job.
    both = sub.post("/v1/jobs", json={**JOB, "smart_chat_assistant_id": ASSISTANT})
    assert both.status_code == 202, both.text
    null = sub.post("/v1/jobs", json={**LINE, "assistant_id": None})
    assert null.status_code == 202, null.text


# ---- subjects and the access report ----

SUBJECT = "MRN-E2E-5521"


def test_an_auditor_gets_the_access_report_of_a_subject_and_the_subject_stays_out_of_logs(server: Server) -> None:
    job_id = submit(server, "sub", {**JOB, "subject": SUBJECT, "custom_id": "visit-7"})
    line = json.dumps({"custom_id": "b1", **LINE, "subject": f" {SUBJECT} "}) + "\n"
    batch = server.client("sub").post("/v1/batches", content=line)
    assert batch.status_code == 202, batch.text
    finished(server, job_id)
    assert server.client("reader").get(f"/v1/jobs/{job_id}/result").status_code == 200
    auditor = server.client("auditor")
    answer = auditor.post("/v1/audit/access-report", json={"subject": SUBJECT})
    assert answer.status_code == 200, answer.text
    assert answer.headers["qbgw-chain-ok"] == "true"
    report = answer.json()
    assert report["chain_ok"] is True, report["chain_detail"]
    assert SUBJECT not in answer.text
    assert len(report["jobs"]) == 2
    first = next(j for j in report["jobs"] if j["job_id"] == job_id)
    assert first["submitted_by"] == "key:sub"
    assert first["readers"] == ["key:reader"]
    assert first["disclosures"] == 1
    kinds = {(r["kind"], r["actor"]) for r in report["rows"] if r["job_id"] == job_id}
    assert {("job.submitted", "key:sub"), ("result.read", "key:reader")} <= kinds
    assert any(kind == "attempt.request" for kind, _ in kinds)
    for fmt, media in (("csv", "text/csv"), ("jsonl", "application/jsonl"), ("html", "text/html")):
        rendered = auditor.post("/v1/audit/access-report", json={"subject": SUBJECT, "format": fmt})
        assert rendered.status_code == 200, rendered.text
        assert rendered.headers["content-type"].startswith(media)
        assert rendered.headers["qbgw-chain-ok"] == "true"  # a CSV file has no place for chain_ok
        assert job_id in rendered.text
        assert SUBJECT not in rendered.text
    later = auditor.post("/v1/audit/access-report", json={"subject": SUBJECT, "from": "2999-01-01T00:00:00Z"})
    assert later.json()["jobs"] == []
    for who in ("sub", "reader", "admin"):
        refused = server.client(who).post("/v1/audit/access-report", json={"subject": SUBJECT})
        assert refused.status_code == 403
    ran = queries.audit_query(AuditFilter(action="audit.access_report"), settings=server.settings)
    assert {e.actor for e in ran} == {"key:auditor"}
    assert all(e.subject_index == report["subject_index"] for e in ran)
    assert SUBJECT not in server.log.read_text(encoding="utf-8", errors="replace")


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({}, "subject", "must be a non-empty string"),
        ({"subject": ""}, "subject", "got an empty one"),
        ({"subject": "A\u0000B"}, "subject", "U+0000"),
        ({"subject": "M" * 300}, "subject", "got 300 characters"),
        ({"subject": "MRN-1", "from": "yesterday"}, "from", "ISO 8601"),
        ({"subject": "MRN-1", "format": "pdf"}, "format", "json, jsonl, csv, html"),
        ({"subject": "MRN-1", "format": ["json"]}, "format", "json, jsonl, csv, html"),
        ({"subject": "MRN-1", "format": {}}, "format", "json, jsonl, csv, html"),
        ({"subject": "MRN-1", "format": 0}, "format", "json, jsonl, csv, html"),
        ({"subject": "MRN-1", "patient": "x"}, "patient", "not a field of a report"),
    ],
)
def test_a_bad_access_report_request_names_the_field(
    server: Server, body: dict[str, Any], field: str, says: str
) -> None:
    answer = server.client("auditor").post("/v1/audit/access-report", json=body)
    assert answer.status_code == 422, answer.text
    problem = answer.json()
    assert problem["errors"][0]["field"] == field
    assert says in problem["errors"][0]["detail"]


def test_without_a_subject_key_postgres_refuses_subjects_clearly(stack: Settings, tmp_path: Path) -> None:
    running = start_server(stack, tmp_path)  # the stack's own settings: no QBGW_SUBJECT_KEY
    try:
        answer = running.client("sub").post("/v1/jobs", json={**JOB, "subject": SUBJECT})
        report = running.client("auditor").post("/v1/audit/access-report", json={"subject": SUBJECT})
        if stack.database_url:
            for refused in (answer, report):
                assert refused.status_code == 500, refused.text
                assert refused.json()["type"].endswith("subjects-unconfigured")
                assert "QBGW_SUBJECT_KEY" in refused.json()["detail"]
            assert queries.audit_query(AuditFilter(action="job.submitted"), settings=stack) == []
        else:  # the embedded default keeps a key of its own
            assert answer.status_code == 202, answer.text
            assert report.status_code == 200, report.text
            assert len(report.json()["jobs"]) == 1
    finally:
        running.close()
