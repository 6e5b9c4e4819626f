from __future__ import annotations

from typing import Any

import pytest

from qbgw.errors import InvalidImage, InvalidMessages
from qbgw.images.refs import Policy, image_urls
from qbgw.messages import validate_assistant_id, validate_messages
from tests.images import data_uri, jpeg_bytes, png_bytes

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


@pytest.mark.parametrize(
    "bad", [None, "", "   ", 42, "a" * 129, "has space", "semi;colon", "65d5f3473d5d68095462165d\n", "a\ud800"]
)
def test_a_bad_assistant_id_is_rejected(bad: Any) -> None:
    with pytest.raises(InvalidMessages, match="smart_chat_assistant_id"):
        validate_assistant_id(bad)


def test_image_urls_lists_every_image_in_order() -> None:
    messages = [user([image("https://a/1.png")]), user("x"), user([image("https://a/2.png"), image(PNG)])]
    assert image_urls(messages) == ["https://a/1.png", "https://a/2.png", PNG]


def deep(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize("name", ["alice", "Dr_Who-2", "a" * 64, "0"])
def test_a_name_is_openais_participant_name(name: str) -> None:
    assert validate_messages([{"role": "user", "content": "hi", "name": name}])


@pytest.mark.parametrize(
    "name",
    [
        123,
        None,
        True,
        {"first": "Ann"},
        ["alice"],
        deep(5000),
        "",
        "a" * 65,
        "has space",
        "alice\n",
        "zoë",
        "a.b",
        "a\ud800",
    ],
)
def test_any_other_name_is_refused_saying_what_a_name_is(name: object) -> None:
    with pytest.raises(InvalidMessages) as caught:
        validate_messages([user("ok"), {"role": "user", "content": "hi", "name": name}])
    assert str(caught.value) == (
        "messages[1].name: must be 1 to 64 letters, digits, _ or - (OpenAI's participant name)"
    )


SECRET = "Patient Ann Example"


@pytest.mark.parametrize(
    ("messages", "where", "index"),
    [
        ([user(f"{SECRET}\ud800")], "messages[0].content", len(SECRET)),
        (
            [user("ok"), user([{"type": "text", "text": f"{SECRET}\udfff tail"}])],
            "messages[1].content[0].text",
            len(SECRET),
        ),
        (
            [user([image(f"https://example.org/{SECRET}\udc80.png")])],
            "messages[0].content[0].image_url.url",
            len(f"https://example.org/{SECRET}"),
        ),
        ([user([image("/srv/scans/\udcff.png")])], "messages[0].content[0].image_url.url", len("/srv/scans/")),
        ([user([image(PNG[:40] + "\ud800" + PNG[40:])])], "messages[0].content[0].image_url.url", 40),
    ],
)
def test_a_lone_surrogate_is_refused_by_field_and_index_without_echoing_the_text(
    messages: list[dict[str, Any]], where: str, index: int
) -> None:
    with pytest.raises(InvalidMessages) as caught:
        validate_messages(messages)
    text = str(caught.value)
    assert text.startswith(f"{where}: not encodable as UTF-8: a lone surrogate (U+")
    assert f"at index {index};" in text
    assert SECRET not in text
    assert "example.org" not in text
    text.encode("utf-8")  # the error itself can be printed


def test_text_up_to_the_limit_is_accepted_and_one_byte_more_is_refused_naming_both() -> None:
    policy = Policy(max_request_bytes=100)
    assert validate_messages([user("x" * 60), user([{"type": "text", "text": "y" * 40}])], policy)
    with pytest.raises(InvalidMessages) as caught:
        validate_messages([user("x" * 60), user([{"type": "text", "text": "y" * 41}])], policy)
    assert str(caught.value) == (
        "messages: 101 bytes of text (data URIs included) is over the request limit of 100 bytes "
        "(QBGW_MAX_REQUEST_BYTES)"
    )


def test_the_limit_counts_utf8_bytes_not_characters() -> None:
    policy = Policy(max_request_bytes=100)
    assert validate_messages([user("é" * 50)], policy)  # 100 bytes
    with pytest.raises(InvalidMessages, match="messages: 102 bytes of text .* limit of 100 bytes"):
        validate_messages([user("é" * 51)], policy)
    with pytest.raises(InvalidMessages, match="messages: 101 bytes of text"):
        validate_messages([user("a" * 97 + "\U0001f600")], policy)  # one 4-byte character


def test_the_limit_counts_names_and_urls_and_is_checked_before_an_image_is_decoded() -> None:
    policy = Policy(max_request_bytes=100)
    with pytest.raises(InvalidMessages, match="messages: 101 bytes"):
        validate_messages([{"role": "user", "content": "x" * 96, "name": "alice"}], policy)
    not_even_base64 = "data:image/png;base64," + "!" * 200
    with pytest.raises(InvalidMessages, match=r"messages: \d+ bytes of text \(data URIs included\) is over"):
        validate_messages([user([image(not_even_base64)])], policy)


def test_the_default_limit_leaves_room_for_one_50_mb_image_as_base64() -> None:
    assert Policy().max_request_bytes == 72 * 1024 * 1024 > (50 * 1024 * 1024) * 4 // 3


def test_one_test_for_a_lone_surrogate_serves_every_way_in() -> None:
    from qbgw import compat
    from qbgw.api.app import json_object
    from qbgw.errors import InputError
    from qbgw.messages import has_lone_surrogate

    assert has_lone_surrogate("a\ud800b")
    assert has_lone_surrogate("\udfff")
    assert not has_lone_surrogate("a\U0001f600b")
    assert not has_lone_surrogate("")
    with pytest.raises(InputError, match="metadata: 'k' holds a lone UTF-16 surrogate"):
        compat._check_metadata({"k": "v\udc80"})
    with pytest.raises(InputError, match="purpose: must be at most 128 characters of text"):
        compat.list_files(purpose="batch\ud800")
    with pytest.raises(InvalidMessages, match="body: holds a lone UTF-16 surrogate"):
        json_object(b'{"a": {"b": ["\\ud83d"]}}')
    assert json_object(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}


@pytest.mark.parametrize("invisible", ["\u200b", "\u00a0", "\u2028", "\ufeff"])
def test_a_webhook_url_with_an_invisible_character_is_refused(invisible: str) -> None:
    from qbgw.messages import validate_webhook_url

    with pytest.raises(InvalidMessages, match="must not hold spaces, control or invisible characters"):
        validate_webhook_url(f"https://example.com/hook{invisible}")
    assert validate_webhook_url("https://example.com/h%C3%A9") == "https://example.com/h%C3%A9"
