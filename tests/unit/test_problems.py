"""Problem details say what the client needs and nothing of the server's insides."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fastapi.responses import StreamingResponse

from qbgw import errors
from qbgw.api.problems import field_of, from_error


def test_an_unavailable_database_is_a_503_without_the_drivers_words() -> None:
    answer = from_error(errors.StoreUnavailable('database unavailable: connection to server at "10.1.2.3", port 5432'))
    body = json.loads(bytes(answer.body))
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "5"
    assert "10.1.2.3" not in json.dumps(body)
    assert body["type"] == "urn:qbgw:problem:unavailable"


def test_an_input_error_names_its_field() -> None:
    assert field_of("messages[0].content: must be a string") == ("messages[0].content", "must be a string")
    assert field_of("no field here") == (None, "no field here")
    body = json.loads(bytes(from_error(errors.InvalidMessages("custom_id: must be short")).body))
    assert body["errors"] == [{"field": "custom_id", "detail": "must be short"}]


def test_an_integrity_error_says_nothing_of_what_failed() -> None:
    answer = from_error(errors.DecryptionFailed("jobs.answer of 3c5e", "no key k7 in the keyring"))
    assert answer.status_code == 500
    assert b"k7" not in bytes(answer.body)


def test_an_unexpected_error_is_a_500_problem_and_its_words_stay_out_of_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fastapi import APIRouter
    from fastapi.testclient import TestClient

    from qbgw.api.app import create_app
    from qbgw.settings import Settings

    extra = APIRouter()

    @extra.get("/boom")
    async def boom() -> None:
        raise RuntimeError("INSERT INTO jobs ... 'Jane Doe, MRN 12345'")

    @extra.get("/streamed-boom")
    async def streamed_boom() -> StreamingResponse:
        async def lines() -> AsyncIterator[bytes]:
            yield b"first line\n"
            raise RuntimeError("'Jane Doe' in the middle of a stream")

        return StreamingResponse(lines())

    client = TestClient(create_app(Settings(data_dir=tmp_path), routers=(extra,)), raise_server_exceptions=False)
    with caplog.at_level(logging.DEBUG):
        answer = client.get("/boom")
        assert answer.status_code == 500
        assert answer.json()["type"] == "urn:qbgw:problem:internal"
        assert "Jane" not in answer.text
        cut = client.get("/streamed-boom")  # begun: cut short, never a second answer
        assert cut.status_code == 200
        assert cut.content.startswith(b"first line")
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "unexpected RuntimeError answering GET /boom" in logged
    assert "unexpected RuntimeError answering GET /streamed-boom" in logged
    assert "Jane" not in logged
