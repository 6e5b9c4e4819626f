"""Which ``POST /v1/jobs`` bodies are validated on the server's event loop: text only (nothing to decode or read
from disk); anything else, valid or not, in a thread (worker/api/app.py)."""

from __future__ import annotations

from typing import Any

import pytest

from qbgw import errors
from qbgw.api.app import _job_body, _text_only


@pytest.mark.parametrize(
    ("messages", "on_loop"),
    [
        ([{"role": "user", "content": "hello"}], True),
        ([{"role": "system", "content": "brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}], True),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///x.png"}}]}], False),
        ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}], False),
        ([{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}], False),
        ([{"role": "user", "content": None}], False),
        ([{"role": "user"}], False),
        (["hello"], False),
        ("hello", False),
        (None, False),
    ],
)
def test_only_text_only_messages_are_validated_on_the_loop(messages: Any, on_loop: bool) -> None:
    assert _text_only({"messages": messages}) is on_loop


def test_a_body_is_a_json_object_of_known_fields() -> None:
    assert _job_body(b'{"assistant_id": "a", "messages": []}') == {"assistant_id": "a", "messages": []}
    with pytest.raises(errors.InvalidMessages, match="not valid JSON"):
        _job_body(b"{")
    with pytest.raises(errors.InvalidMessages, match="must be a JSON object, got list"):
        _job_body(b"[]")
    with pytest.raises(errors.InvalidMessages, match="colour: not a field of a job; a job has assistant_id"):
        _job_body(b'{"colour": "red", "messages": []}')
