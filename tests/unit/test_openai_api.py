"""The OpenAI-compatible routes in the OpenAPI document of ``qbgw serve`` (one operation per path and method: the
shared POST /v1/batches documents both bodies), and the chat request rule that refuses parameters by name."""

from __future__ import annotations

import pytest

from qbgw.api import create_app
from qbgw.errors import InvalidMessages
from qbgw.messages import chat_request
from qbgw.settings import Settings


def test_the_openapi_document_has_each_operation_once_with_both_batch_bodies() -> None:
    paths = create_app(Settings()).openapi()["paths"]  # a duplicate operation id would warn: an error here
    for path in ("/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/content", "/v1/chat/completions"):
        assert path in paths, path
    assert set(paths["/v1/files"]) == {"get", "post"}
    assert set(paths["/v1/batches"]) == {"get", "post"}
    assert set(paths["/v1/batches"]["post"]["requestBody"]["content"]) == {"application/jsonl", "application/json"}
    assert paths["/v1/chat/completions"]["post"]["security"] == [{"apiKey": []}]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "a", "messages": [], "temperature": 0}, "temperature"),
        ({"model": "a", "messages": [], "stream": True}, "stream"),
        ({"model": "a", "messages": [], "n": 3}, "n"),
        ({"model": "a", "messages": [], "tools": [], "top_p": 1}, "tools"),
        ({"messages": []}, "model"),
    ],
)
def test_a_chat_request_names_the_first_parameter_refused(body: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidMessages) as caught:
        chat_request(body)
    assert str(caught.value).startswith(f"{field}: ")


def test_a_chat_request_takes_model_messages_and_harmless_defaults() -> None:
    body = {"model": "a1", "messages": [1], "n": 1, "stream": False, "temperature": None}
    assert chat_request(body) == ("a1", [1])
    with pytest.raises(InvalidMessages, match="only 1 is supported"):
        chat_request({"model": "a1", "messages": [1], "n": True})  # a bool is not the number 1


def test_an_expired_batch_is_finalizing_until_its_running_requests_end() -> None:
    """Its files are made once it has ended: a poll that stops at ``expired`` must find them."""
    from types import SimpleNamespace

    from qbgw.api.openai import _status
    from qbgw.store.batches import BatchStatus

    assert _status(SimpleNamespace(status=BatchStatus.EXPIRED, pending=3)) == "finalizing"  # type: ignore[arg-type]
    assert _status(SimpleNamespace(status=BatchStatus.EXPIRED, pending=0)) == "expired"  # type: ignore[arg-type]


def test_a_purged_answer_is_an_error_line_not_an_empty_success() -> None:
    from types import SimpleNamespace

    from qbgw.api.openai import _line
    from qbgw.lifecycle import JobStatus

    purged = SimpleNamespace(job_id="j-1", custom_id="c-1", status=JobStatus.SUCCEEDED, answer=None, purged=True)
    line = _line(purged, "/v1/chat/completions", False)  # type: ignore[arg-type]
    assert line["response"] is None
    assert line["error"]["code"] == "purged"


@pytest.mark.parametrize(
    "body",
    [
        {"model": "a", "messages": []},
        {"model": "a", "messages": [], "n": 1, "stream": False},
        {"model": "a", "messages": [], "temperature": None, "n": None},
        {"model": "a", "messages": [], "temperature": 0},
        {"model": "a", "messages": [], "stream": True},
        {"model": "a", "messages": [], "n": 2},
        {"model": "a", "messages": [], "n": True},
        {"messages": []},
        {"model": 5, "messages": []},
    ],
)
def test_the_documented_chat_body_accepts_what_the_server_accepts(body: dict[str, object]) -> None:
    """/openapi.json's body of a chat completion and the server's rule agree (messages aside: their own check)."""
    from jsonschema import Draft202012Validator

    operation = create_app(Settings()).openapi()["paths"]["/v1/chat/completions"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    documented = Draft202012Validator(schema).is_valid(body)
    try:
        chat_request(body)
        accepted = True
    except InvalidMessages:
        accepted = False
    assert documented == accepted, (body, documented, accepted)
    upload = create_app(Settings()).openapi()["paths"]["/v1/files"]["post"]["requestBody"]["content"]
    assert upload["multipart/form-data"]["schema"]["required"] == ["file", "purpose"]
