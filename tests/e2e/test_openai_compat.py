"""The OpenAI-compatible endpoints of ``qbgw serve`` driven by the official ``openai`` Python SDK, against a real
server and a real worker, on both stacks: a 200-line batch of text and image lines (some failed permanently by
the emulator) from an uploaded file to its output and error files, a batch cancelled midway, a chat completion
with an image, refused parameters, validation at create time, and a file invisible to another key."""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from qbgw import queries
from qbgw.settings import Settings
from qbgw.store.reads import AuditFilter
from tests.conftest import ASSISTANT
from tests.e2e.api_server import Server, start_server
from tests.images import data_uri, png_bytes

WIDTH, HEIGHT = 64, 48


@pytest.fixture
def server(stack: Settings, tmp_path: Path, worker_process: Callable[..., Any]) -> Iterator[Server]:
    worker_process(stack)
    running = start_server(stack, tmp_path)
    yield running
    running.close()


def sdk(server: Server, who: str) -> OpenAI:
    return OpenAI(api_key=server.keys[who], base_url=server.url + "/v1", max_retries=0, timeout=120)


def chat_line(custom_id: str, content: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": ASSISTANT, "messages": [{"role": "user", "content": content}]},
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def two_hundred() -> tuple[bytes, set[str], set[str]]:
    """200 lines: every 10th an image, every 25th (from the 7th) failed permanently by the emulator (HTTP 400)."""
    image = data_uri("png", png_bytes(WIDTH, HEIGHT))
    lines, failing, images = [], set(), set()
    for i in range(200):
        custom_id = f"req-{i:03d}"
        text = f"Summarise note {i}."
        if i % 25 == 7:
            text = "[[emulator:fail=400]] " + text
            failing.add(custom_id)
        content: Any = text
        if i % 10 == 0:
            content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": image}}]
            images.add(custom_id)
        lines.append(chat_line(custom_id, content))
    return jsonl(lines), failing, images


def poll(client: OpenAI, batch_id: str, until: set[str], timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.5)


def lines_of(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_200_line_batch_from_upload_to_output_and_error_files(server: Server) -> None:
    client = sdk(server, "sub")
    content, failing, images = two_hundred()
    uploaded = client.files.create(file=("notes.jsonl", content), purpose="batch")
    assert uploaded.object == "file"
    assert uploaded.bytes == len(content)
    assert uploaded.purpose == "batch"
    assert uploaded.filename == "notes.jsonl"
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"project": "notes"},
    )
    assert batch.object == "batch"
    assert batch.id.startswith("batch_")
    assert batch.input_file_id == uploaded.id
    assert batch.metadata == {"project": "notes"}
    assert batch.status in ("validating", "in_progress", "completed")
    done = poll(client, batch.id, {"completed", "failed", "expired", "cancelled"})
    assert done.status == "completed"
    # A batch that completed with failures says so in its counts.
    assert done.request_counts.total == 200
    assert done.request_counts.failed == len(failing)
    assert done.request_counts.completed == 200 - len(failing)
    assert done.completed_at is not None
    assert done.in_progress_at is not None
    assert done.completed_at >= done.in_progress_at >= done.created_at
    assert done.output_file_id
    assert done.error_file_id
    made = client.files.retrieve(done.output_file_id)
    assert made.purpose == "batch_output"
    assert made.bytes is None  # made when read (docs/openai.md)
    with pytest.raises(openai.BadRequestError, match="made from its results when read"):
        client.files.delete(done.output_file_id)
    output = lines_of(client.files.content(done.output_file_id).text)
    errors = lines_of(client.files.content(done.error_file_id).text)
    by_id = {line["custom_id"]: line for line in output + errors}
    assert len(output) + len(errors) == 200
    assert set(by_id) == {f"req-{i:03d}" for i in range(200)}
    assert {line["custom_id"] for line in errors} == failing
    for line in output:
        assert line["error"] is None
        assert line["id"].startswith("batch_req_")
        response = line["response"]
        assert response["status_code"] == 200
        body = response["body"]
        assert body["object"] == "chat.completion"
        assert body["model"] == ASSISTANT
        answer = body["choices"][0]["message"]["content"]
        number = int(line["custom_id"].split("-")[1])
        assert f"Summarise note {number}." in answer, answer
        assert (f"Image 1: png {WIDTH}x{HEIGHT}." in answer) == (line["custom_id"] in images), answer
        # The request id is the qbgw job, whose trail names the key.
        trail = queries.job_events(response["request_id"], settings=server.settings)
        assert ("job.submitted", "key:sub") in {(e.action, e.actor) for e in trail}
    for line in errors:
        assert line["response"]["status_code"] == 400, line
        assert line["response"]["body"]["error"]["message"], line
    # The list pages through the key's batches.
    listed = client.batches.list(limit=5)
    assert [b.id for b in listed.data] == [batch.id]
    # Reading the file and the results was audited with the key's principal.
    reads = queries.audit_query(AuditFilter(action="file.read"), settings=server.settings)
    assert {e.actor for e in reads} == {"key:sub"}
    # Each file read (and audited) its own jobs only: every job once, the failed ones by the error file.
    results = queries.audit_query(AuditFilter(action="result.read", actor="key:sub"), settings=server.settings)
    read = Counter(e.job_id for e in results)
    assert sorted(read.values()) == [1] * 200, read.most_common(3)
    assert {e.job_id for e in results if e.outcome == "failed"} == {line["response"]["request_id"] for line in errors}
    # Once purged, every line of both files keeps its ids and says so (the error file kept a stripped response).
    from datetime import timedelta

    from qbgw.admin import purge_phi

    purge_phi(older_than=timedelta(seconds=0), actor="retention", settings=server.settings)
    for file_id, before in ((done.output_file_id, output), (done.error_file_id, errors)):
        after = lines_of(client.files.content(file_id).text)
        assert [(line["id"], line["custom_id"]) for line in after] == [(b["id"], b["custom_id"]) for b in before]
        assert {line["error"]["code"] for line in after} == {"purged"}
        assert all(line["response"] is None for line in after)


def test_a_batch_cancelled_midway(server: Server) -> None:
    client = sdk(server, "sub")
    lines = [chat_line(f"slow-{i:02d}", f"[[emulator:sleep=0.5]] note {i}") for i in range(60)]
    uploaded = client.files.create(file=("slow.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    poll(client, batch.id, {"in_progress"}, timeout=60)
    time.sleep(1.5)
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    assert cancelled.cancelling_at is not None
    done = poll(client, batch.id, {"cancelled"}, timeout=120)
    counts = done.request_counts
    assert counts.total == 60
    assert 0 < counts.failed <= 60  # the requests not run are counted as failed (batch_cancelled)
    assert counts.completed + counts.failed == 60
    assert done.error_file_id is not None
    errors = lines_of(client.files.content(done.error_file_id).text)
    assert len(errors) == counts.failed
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    answered: list[dict[str, Any]] = []
    if done.output_file_id is not None:
        answered = lines_of(client.files.content(done.output_file_id).text)
    assert len(answered) == counts.completed
    assert {line["custom_id"] for line in errors + answered} == {f"slow-{i:02d}" for i in range(60)}


def test_a_chat_completion_with_an_image_and_the_job_in_a_header(server: Server) -> None:
    client = sdk(server, "sub")
    image = data_uri("png", png_bytes(WIDTH, HEIGHT))
    raw = client.chat.completions.with_raw_response.create(
        model=ASSISTANT,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe this scan."},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            }
        ],
    )
    job_id = raw.headers["x-qbgw-job-id"]
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == ASSISTANT
    answer = completion.choices[0].message.content
    assert answer is not None
    assert f"Image 1: png {WIDTH}x{HEIGHT}." in answer
    assert 'you said "Describe this scan."' in answer
    assert completion.choices[0].finish_reason == "stop"
    trail = {(e.action, e.actor) for e in queries.job_events(job_id, include_reads=True, settings=server.settings)}
    assert ("job.submitted", "key:sub") in trail
    assert ("result.read", "key:sub") in trail
    # A request the emulator fails permanently: the gateway's status, not retried by the SDK.
    with pytest.raises(openai.BadRequestError) as failed:
        client.chat.completions.create(
            model=ASSISTANT, messages=[{"role": "user", "content": "[[emulator:fail=400]] hi"}]
        )
    assert failed.value.response.headers["x-should-retry"] == "false"
    assert failed.value.response.headers["x-qbgw-job-id"]
    # The gateway's 405 (its AI feature is off) is no method of this endpoint: a 502 that says what came back.
    with pytest.raises(openai.InternalServerError) as off:
        client.chat.completions.create(
            model=ASSISTANT, messages=[{"role": "user", "content": "[[emulator:fail=405]] hi"}]
        )
    assert off.value.status_code == 502
    assert "Allow" not in off.value.response.headers


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"temperature": 0.2}, "temperature"), ({"stream": True}, "stream"), ({"n": 2}, "n"), ({"tools": []}, "tools")],
)
def test_a_parameter_the_gateway_cannot_honour_is_refused_by_name(
    server: Server, extra: dict[str, Any], param: str
) -> None:
    client = sdk(server, "sub")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=ASSISTANT,
            messages=[{"role": "user", "content": "hi"}],
            **extra,  # type: ignore[arg-type]
        )
    assert refused.value.param == param
    assert refused.value.code in ("unsupported_parameter", "invalid_value")
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["type"] == "invalid_request_error"
    assert queries.audit_query(AuditFilter(action="job.submitted"), settings=server.settings) == []


def test_every_line_is_validated_when_the_batch_is_created(server: Server) -> None:
    client = sdk(server, "sub")
    good = chat_line("a", "hi")
    hot = {**chat_line("b", "hi"), "body": {**chat_line("b", "hi")["body"], "temperature": 1}}
    gateway = {"custom_id": "c", "url": "/ai/ai_extensions/ai_gateway", "body": {"messages": []}}
    uploaded = client.files.create(file=("bad.jsonl", jsonl([good, good, hot, gateway])), purpose="batch")
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["code"] == "invalid_batch"
    problems = {(line["line"], line["param"]) for line in error["lines"]}
    assert problems == {(2, None), (3, "body.temperature"), (4, "url")}, error["lines"]
    assert "line 3: body.temperature" in error["message"]
    assert client.batches.list().data == []  # nothing was stored
    with pytest.raises(openai.BadRequestError) as wrong:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    assert wrong.value.param == "endpoint"


def test_a_file_of_one_key_is_invisible_to_another(server: Server) -> None:
    owner, other = sdk(server, "sub"), sdk(server, "sub2")
    uploaded = owner.files.create(file=("mine.jsonl", jsonl([chat_line("a", "hi")])), purpose="batch")
    for call in (
        lambda: other.files.retrieve(uploaded.id),
        lambda: other.files.content(uploaded.id),
        lambda: other.files.delete(uploaded.id),
        lambda: other.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError) as missing:
            call()
        assert isinstance(missing.value.body, dict)
        assert missing.value.body["code"] == "not_found"
    assert [f.id for f in other.files.list().data] == []
    assert [f.id for f in owner.files.list().data] == [uploaded.id]
    batch = owner.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(batch.id)
    assert other.batches.list().data == []
    # A reader reads every file; an auditor sees metadata only, never the content nor the name.
    reader, auditor = sdk(server, "reader"), sdk(server, "auditor")
    assert reader.files.content(uploaded.id).content == jsonl([chat_line("a", "hi")])
    seen = auditor.files.retrieve(uploaded.id)
    assert (seen.id, seen.filename) == (uploaded.id, None)
    with pytest.raises(openai.PermissionDeniedError):
        auditor.files.content(uploaded.id)
    with pytest.raises(openai.PermissionDeniedError):
        reader.files.create(file=("x.jsonl", b"{}\n"), purpose="batch")
    # The owner deletes it: content and name are erased, and the id is gone.
    assert owner.files.delete(uploaded.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        owner.files.content(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        owner.files.delete(uploaded.id)


def test_qbgw_batches_and_openai_batches_share_the_path(server: Server) -> None:
    """POST /v1/batches with a JSON Lines body is qbgw's own batch; GET answers each in its own shape."""
    line = {"custom_id": "n1", "smart_chat_assistant_id": ASSISTANT, "messages": [{"role": "user", "content": "hi"}]}
    native = server.client("sub").post("/v1/batches", content=json.dumps(line) + "\n")
    assert native.status_code == 202, native.text
    assert server.client("sub").get(f"/v1/batches/{native.json()['id']}").json()["total"] == 1
    unknown = server.client("sub").get("/v1/batches/batch_" + "0" * 32)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "not_found"
    # A part of the upload the server would not honour is refused by name, not dropped.
    extra = server.client("sub").post(
        "/v1/files",
        files={"file": ("a.jsonl", b"{}\n")},
        data={"purpose": "batch", "expires_after[anchor]": "created_at"},
    )
    assert extra.status_code == 400
    assert extra.json()["error"]["param"] == "expires_after[anchor]"
    # An upload declared over the limit is refused before its body is read (413, in OpenAI's shape).
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + server.keys["sub"].encode() + b"\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 300000000\r\n\r\n"
        )
        answer = b""
        while b"}}" not in answer:  # the body's JSON ends the answer
            chunk = raw.recv(65536)
            assert chunk, answer
            answer += chunk
    head, _, body = answer.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413"), head
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    nobody = httpx.get(server.url + "/v1/files", timeout=10)
    assert nobody.status_code == 401
    assert nobody.json()["error"]["type"] == "authentication_error"


def test_answers_made_before_an_openai_handler_runs_have_openais_shape_too(server: Server) -> None:
    """A key refused, a parameter of the wrong type, a method or a path the dialect does not have: OpenAI's error
    shape on its paths (docs/openai.md), not a problem detail."""
    sub = server.client("sub")
    for answer, status, kind in (
        (server.client(None, source="127.0.4.1").get("/v1/files?limit=null"), 401, "authentication_error"),
        (sub.get("/v1/files?limit=abc"), 400, "invalid_request_error"),
        (sub.patch("/v1/chat/completions"), 405, "invalid_request_error"),
        (sub.get("/v1/files/x/y"), 404, "invalid_request_error"),
        (sub.get(f"/v1/batches/batch_{'0' * 32}/nothing"), 404, "invalid_request_error"),
    ):
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"].startswith("application/json"), answer.headers
        assert answer.json()["error"]["type"] == kind, answer.text
        assert answer.json()["error"]["message"]
    assert sub.get("/v1/files?limit=abc").json()["error"]["param"] == "limit"
    assert "POST" in sub.patch("/v1/chat/completions").headers["allow"]
    # qbgw's own paths keep their problem details
    assert sub.get("/v1/jobs/x/y").headers["content-type"].startswith("application/problem+json")


def test_every_role_against_the_openai_endpoints(server: Server) -> None:
    """Expected status per principal, for a file and a finished batch of "sub" (sub2: another submitter)."""
    client = sdk(server, "sub")
    uploaded = client.files.create(file=("m.jsonl", jsonl([chat_line("a", "hi")])), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = poll(client, batch.id, {"completed"})
    other = client.files.create(file=("n.jsonl", jsonl([chat_line("b", "hi")])), purpose="batch")
    who = ("sub", "sub2", "reader", "auditor", "admin")
    matrix: list[tuple[str, str, tuple[int, ...]]] = [
        ("GET", "/v1/files", (200, 200, 200, 200, 200)),
        ("GET", f"/v1/files/{uploaded.id}", (200, 404, 200, 200, 200)),
        ("GET", f"/v1/files/{uploaded.id}/content", (200, 404, 200, 403, 403)),
        ("GET", f"/v1/files/{done.output_file_id}/content", (200, 404, 200, 403, 403)),
        ("GET", "/v1/batches", (200, 200, 200, 200, 200)),
        ("GET", f"/v1/batches/{batch.id}", (200, 404, 200, 200, 200)),
        ("POST", f"/v1/batches/{batch.id}/cancel", (200, 404, 403, 403, 200)),  # an ended batch stays as it was
        ("POST", "/v1/batches", (200, 404, 403, 403, 403)),  # from sub's file: sub2's does not exist for it
        ("POST", "/v1/chat/completions", (200, 200, 403, 403, 403)),
        ("POST", "/v1/files", (200, 200, 403, 403, 403)),
        ("DELETE", f"/v1/files/{other.id}", (200, 404, 403, 403, 404)),  # admin after sub: deleted already
    ]
    seen, expected = {}, {}
    for method, path, codes in matrix:
        for name, code in zip(who, codes, strict=True):
            http = server.client(name)
            if path == "/v1/batches" and method == "POST":
                answer = http.post(path, json={"input_file_id": other.id, "endpoint": "/v1/chat/completions"})
            elif path == "/v1/chat/completions":
                answer = http.post(path, json={"model": ASSISTANT, "messages": [{"role": "user", "content": "hi"}]})
            elif path == "/v1/files" and method == "POST":
                answer = http.post(path, files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "batch"})
            else:
                answer = http.request(method, path)
            seen[(method, path, name)] = answer.status_code
            expected[(method, path, name)] = code
            if answer.status_code >= 400:
                assert set(answer.json()["error"]) >= {"message", "type", "param", "code"}, answer.text
    assert seen == expected
    assert client.batches.retrieve(batch.id).status == "completed"


def test_a_page_after_an_unknown_or_another_key_s_cursor_is_a_404_not_the_first_page(server: Server) -> None:
    with sdk(server, "sub") as client, sdk(server, "sub2") as other:
        mine = client.files.create(file=("a.jsonl", b'{"custom_id": "a"}\n'), purpose="batch")
        theirs = other.files.create(file=("b.jsonl", b'{"custom_id": "b"}\n'), purpose="batch")
        assert [f.id for f in client.files.list(after=mine.id).data] == []  # a known cursor: the page after it
        for cursor in ("file-" + "0" * 24, theirs.id):
            with pytest.raises(openai.NotFoundError) as unknown:
                client.files.list(after=cursor)
            assert unknown.value.param == "after"
        with pytest.raises(openai.NotFoundError) as unknown:
            client.batches.list(after="batch_" + "0" * 32)
        assert unknown.value.param == "after"
        with pytest.raises(openai.NotFoundError) as unknown:  # the field that named it
            client.batches.create(input_file_id=theirs.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert unknown.value.param == "input_file_id"
    no_purpose = server.client("sub").post("/v1/files", files={"file": ("c.jsonl", b"{}\n")})
    assert no_purpose.status_code == 400, no_purpose.text
    assert no_purpose.json()["error"]["message"].startswith("purpose: required")
