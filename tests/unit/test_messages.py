from __future__ import annotations

from typing import Any

import pytest

from tests.images import data_uri, jpeg_bytes, png_bytes
from worker.errors import InvalidImage, InvalidMessages
from worker.messages import image_urls, validate_assistant_id, validate_messages

PNG = data_uri("png", png_bytes(4, 3))
GIF_AS_PNG = "data:image/png;base64,R0lGODlhAQABAAAAACw="


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.mark.parametrize(
    "messages",
    [
        [user("Hi")],
        [{"role": "developer", "content": "You are helpful"}, user("Hi")],
        [{"role": "system", "content": "s"}, user("q"), {"role": "assistant", "content": "a"}, user("q2")],
        [user([{"type": "text", "text": "What's in this image?"}, image("https://example.org/x.jpg")])],
        [user([{"type": "text", "text": "two"}, image(PNG), image(data_uri("jpeg", jpeg_bytes(9, 5)))])],
        [user([image(PNG) | {"image_url": {"url": PNG, "detail": "low"}}])],
        [{"role": "user", "content": "named", "name": "alice"}],
    ],
)
def test_accepted_shapes(messages: list[dict[str, Any]]) -> None:
    assert validate_messages(messages) is messages


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (None, "messages: required, a non-empty list"),
        ([], "messages: required, a non-empty list"),
        ("Hi", "messages: required, a non-empty list"),
        (["Hi"], "messages[0]: must be an object with role and content, got str"),
        ([{"role": "doctor", "content": "x"}], "messages[0].role: 'doctor' is not one of system, developer, user"),
        ([user("ok"), {"content": "x"}], "messages[1].role: None is not one of"),
        ([user("")], "messages[0].content: must not be empty"),
        ([user(None)], "messages[0].content: must be a string or a non-empty list of parts, got null"),
        ([user([])], "messages[0].content: must be a string or a non-empty list of parts, got list"),
        ([user([{"type": "audio"}])], "messages[0].content[0].type: 'audio' is not one of text, image_url"),
        ([user([{"type": "text"}])], "messages[0].content[0]: a text part is"),
        ([user(["text"])], "messages[0].content[0]: must be an object, got str"),
        ([user([{"type": "image_url", "image_url": "https://x"}])], "messages[0].content[0]: an image part is"),
        ([user([image("")])], "messages[0].content[0].image_url.url: required"),
        ([{"role": "system", "content": [image(PNG)]}], "image parts are accepted in user messages only"),
        ([{"role": "user", "content": "x", "temperature": 1}], "messages[0]: unknown field(s) temperature"),
        ([user([{"type": "image_url", "image_url": {"url": PNG, "detail": "ultra"}}])], ".detail: 'ultra'"),
    ],
)
def test_rejections_name_the_index_and_field(messages: Any, message: str) -> None:
    with pytest.raises(InvalidMessages) as caught:
        validate_messages(messages)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (GIF_AS_PNG, "messages[0].content[1].image_url.url: not a jpeg or png"),
        ("data:image/png;base64,!!!not-base64!!!", "messages[0].content[1].image_url.url:"),
        ("data:text/plain;base64,aGk=", "messages[0].content[1].image_url.url:"),
        ("ftp://host/x.png", "messages[0].content[1].image_url.url: the scheme 'ftp' is not accepted"),
        ("http://host/x.png", "must be an https:// URL"),
        ("/etc/passwd", "local files are not allowed: no image roots are configured"),
    ],
)
def test_inline_images_are_checked_by_their_bytes(url: str, message: str) -> None:
    with pytest.raises(InvalidImage) as caught:
        validate_messages([user([{"type": "text", "text": "look"}, image(url)])])
    assert message in str(caught.value)


@pytest.mark.parametrize("bad", [None, "", "   ", 42, "a" * 129, "has space", "semi;colon"])
def test_a_bad_assistant_id_is_rejected(bad: Any) -> None:
    with pytest.raises(InvalidMessages, match="smart_chat_assistant_id"):
        validate_assistant_id(bad)


def test_image_urls_lists_every_image_in_order() -> None:
    messages = [user([image("https://a/1.png")]), user("x"), user([image("https://a/2.png"), image(PNG)])]
    assert image_urls(messages) == ["https://a/1.png", "https://a/2.png", PNG]
