from __future__ import annotations

import io
import json
from pathlib import Path

import click
import pytest

from qbgw.cli.inputs import build_request
from qbgw.errors import InvalidMessages
from tests.images import png_bytes


def test_a_json_list_file_is_the_messages(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"role": "user", "content": "Hi"}]))
    assert build_request(str(path)).messages == [{"role": "user", "content": "Hi"}]


def test_a_gateway_body_file_brings_its_assistant_and_ids(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"smart_chat_assistant_id": "a1", "messages": [], "custom_id": "c"}))
    request = build_request(str(path))
    assert (request.assistant_id, request.custom_id) == ("a1", "c")


def test_stdin_is_read_for_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO('[{"role": "user", "content": "from stdin"}]'))
    assert build_request("-").messages[0]["content"] == "from stdin"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
        ('"just a string"', 'expected a JSON list of messages or an object with "messages"'),
    ],
)
def test_a_bad_file_is_named_with_the_reason(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InvalidMessages, match=message):
        build_request(str(path))


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidMessages, match="cannot read: No such file"):
        build_request(str(tmp_path / "nope.json"))


def test_text_and_images_make_one_user_message(tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    path.write_bytes(png_bytes(3, 2))
    request = build_request(
        None, text=("What is this?",), images=(str(path), "https://x.example/a.jpg"), system="Be brief"
    )
    developer, user = request.messages
    assert developer == {"role": "developer", "content": "Be brief"}
    text, inline, remote = user["content"]
    assert text == {"type": "text", "text": "What is this?"}
    assert inline["image_url"]["url"] == str(path)  # a reference: the worker reads the file, not the producer
    assert remote["image_url"]["url"] == "https://x.example/a.jpg"


def test_a_relative_image_path_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    request = build_request(None, images=("scan.png",))
    assert request.messages[0]["content"][0]["image_url"]["url"] == str(tmp_path / "scan.png")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({}, "nothing to send"), ({"file": "x.json", "text": ("hi",)}, "not both")],
)
def test_ambiguous_or_empty_input_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(click.UsageError, match=message):  # exit 2, as every usage mistake
        build_request(kwargs.pop("file", None), **kwargs)  # type: ignore[arg-type]


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (DEEP, "bad.json: not valid JSON for a request: nested too deeply to parse"),
        ('{"messages": ' + DEEP + "}", "bad.json: not valid JSON for a request: nested too deeply to parse"),
        ('{"messages": [], "custom_id": ' + "9" * 5000 + "}", "bad.json: not valid JSON for a request: a number too"),
    ],
)
def test_json_too_deep_or_too_long_to_parse_is_bad_input_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("bad.json").write_text(content)
    with pytest.raises(InvalidMessages) as caught:
        build_request("bad.json")
    assert str(caught.value).startswith(message)


HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"model": "gpt-4o", "temperature": 0.2},
            "b.json: unknown field(s) model, temperature; accepted: custom_id, "
            "idempotency_key, messages, smart_chat_assistant_id, subject",
        ),
        ({"custom_id": 42}, "b.json: custom_id: must be a string, got int"),
        ({"custom_id": ["a"]}, "b.json: custom_id: must be a string, got list"),
        ({"idempotency_key": {"k": 1}}, "b.json: idempotency_key: must be a string, got dict"),
        ({"smart_chat_assistant_id": 7}, "b.json: smart_chat_assistant_id: must be a string, got int"),
        ({"messages": "Hi"}, "b.json: messages: must be a list, got str"),
    ],
)
def test_a_request_file_with_unknown_or_mistyped_fields_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fields: dict[str, object], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("b.json").write_text(json.dumps({"messages": HI, **fields}))
    with pytest.raises(InvalidMessages) as caught:
        build_request("b.json")
    assert str(caught.value) == message


def test_a_request_file_over_the_limit_is_refused_by_its_size_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_text(json.dumps(HI) + " " * 100)
    with pytest.raises(InvalidMessages) as caught:
        build_request(str(path), max_bytes=100)
    size = path.stat().st_size
    assert str(caught.value) == f"{path}: {size} bytes is over the request limit of 100 bytes (QBGW_MAX_REQUEST_BYTES)"
    assert build_request(str(path), max_bytes=size).messages == HI


def test_stdin_over_the_limit_is_refused_without_reading_all_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    stdin = io.StringIO(json.dumps(HI) + " " * 10_000)
    monkeypatch.setattr("sys.stdin", stdin)
    with pytest.raises(InvalidMessages, match="stdin: more than 100 characters is over the request limit of 100"):
        build_request("-", max_bytes=100)
    assert stdin.tell() <= 101 * 4


@pytest.mark.parametrize("ref", ["http://127.0.0.1/x.png", "ftp://h/x.png", "s3://bucket/x.png", "data:image/png,x"])
def test_an_image_reference_with_a_scheme_is_kept_as_a_url_not_made_a_path(ref: str) -> None:
    assert build_request(None, images=(ref,)).messages[0]["content"][0]["image_url"]["url"] == ref


def test_an_http_image_is_refused_for_its_scheme_not_as_a_path(tmp_path: Path) -> None:
    from qbgw.errors import InvalidImage
    from qbgw.images.refs import Policy
    from qbgw.messages import validate_messages

    request = build_request(None, text=("look",), images=("http://127.0.0.1/x.png",))
    with pytest.raises(InvalidImage) as caught:
        validate_messages(request.messages, Policy(roots=(tmp_path,)))
    assert str(caught.value).startswith(
        "messages[0].content[1].image_url.url: the scheme 'http' is not accepted: an image reference must be an "
        "https:// URL"
    )
