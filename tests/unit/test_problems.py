"""Problem details say what the client needs and nothing of the server's insides."""

from __future__ import annotations

import json

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
