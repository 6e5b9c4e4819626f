from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tests.images import png_bytes
from worker.errors import InvalidMessages
from worker.inputs import build_request


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
    request = build_request(None, text=("What is this?",), images=(str(path), "https://x.example/a.jpg"),
                            system="Be brief")  # fmt: skip
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
    with pytest.raises(InvalidMessages, match=message):
        build_request(kwargs.pop("file", None), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("ref", ["http://127.0.0.1/x.png", "ftp://h/x.png", "s3://bucket/x.png", "data:image/png,x"])
def test_an_image_reference_with_a_scheme_is_kept_as_a_url_not_made_a_path(ref: str) -> None:
    assert build_request(None, images=(ref,)).messages[0]["content"][0]["image_url"]["url"] == ref


def test_an_http_image_is_refused_for_its_scheme_not_as_a_path(tmp_path: Path) -> None:
    from worker.errors import InvalidImage
    from worker.images.refs import Policy
    from worker.messages import validate_messages

    request = build_request(None, text=("look",), images=("http://127.0.0.1/x.png",))
    with pytest.raises(InvalidImage) as caught:
        validate_messages(request.messages, Policy(roots=(tmp_path,)))
    assert str(caught.value).startswith(
        "messages[0].content[1].image_url.url: the scheme 'http' is not accepted: an image reference must be an "
        "https:// URL"
    )
