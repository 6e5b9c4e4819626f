"""Batch lines: both line formats, every problem named with its line number, all or nothing unless
invalid lines are skipped; the image shorthand; the progress line."""

from __future__ import annotations

import json
import pickle
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import pytest

from qbgw.batches.input import BatchLine, image_lines, parse_lines, read_lines
from qbgw.batches.views import BatchView
from qbgw.cli.batch import parse_window
from qbgw.cli.progress import Progress, line
from qbgw.errors import InvalidBatch
from qbgw.images.refs import Policy
from qbgw.store.batches import BatchStatus
from tests.images import data_uri, png_bytes

ASSISTANT = "65d5f3473d5d68095462165d"
HELLO = [{"role": "user", "content": "Hello"}]


def ours(custom_id: str, **extra: Any) -> str:
    return json.dumps({"custom_id": custom_id, "smart_chat_assistant_id": ASSISTANT, "messages": HELLO, **extra})


def openai(custom_id: str, body: dict[str, Any] | None = None, **extra: Any) -> str:
    default = {"smart_chat_assistant_id": ASSISTANT, "messages": HELLO}
    line = {"custom_id": custom_id, "method": "POST", "url": "/ai/ai_extensions/ai_gateway", "body": body or default}
    return json.dumps({**line, **extra})


def chat(custom_id: str, **params: Any) -> str:
    """A line written for OpenAI's chat completions (model: the assistant's id)."""
    body = {"model": ASSISTANT, "messages": HELLO, **params}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def parse(lines: list[Any], *, default: str | None = None, skip: bool = False, roots: tuple[Path, ...] = ()) -> Any:
    return parse_lines(lines, default_assistant=default, policy=Policy(roots=roots), skip_invalid=skip)


def test_both_line_formats_give_the_same_job() -> None:
    parsed = parse([ours("a"), openai("b")])
    assert parsed.problems == []
    assert parsed.lines == [BatchLine(1, "a", ASSISTANT, HELLO), BatchLine(2, "b", ASSISTANT, HELLO)]


def test_a_chat_completions_line_maps_model_to_the_assistant_and_takes_the_harmless_defaults() -> None:
    parsed = parse([chat("a"), chat("b", n=1, stream=False, temperature=None)])
    assert parsed.lines == [BatchLine(1, "a", ASSISTANT, HELLO), BatchLine(2, "b", ASSISTANT, HELLO)]


def test_an_endpoint_holds_every_line_to_its_url() -> None:
    with pytest.raises(InvalidBatch) as caught:
        parse_lines([chat("a"), openai("b")], default_assistant=None, policy=Policy(), endpoint="/v1/chat/completions")
    assert [n for n, _ in caught.value.problems] == [2]
    assert caught.value.problems[0][1].startswith("url: '/ai/ai_extensions/ai_gateway'; every line of this batch")


def test_a_line_without_an_assistant_uses_the_default_and_without_a_default_is_invalid() -> None:
    bare = json.dumps({"custom_id": "a", "messages": HELLO})
    body_only = openai("b", {"messages": HELLO})
    assert [x.assistant_id for x in parse([bare, body_only], default="default-1").lines] == ["default-1"] * 2
    with pytest.raises(InvalidBatch) as caught:
        parse([bare])
    assert caught.value.problems == (
        (1, "smart_chat_assistant_id: required (the line has none, and no default was given)"),
    )


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("{oops", "not valid JSON: Expecting property name enclosed in double quotes at column 2"),
        ("[1, 2]", "must be a JSON object, got list"),
        (json.dumps({"smart_chat_assistant_id": ASSISTANT, "messages": HELLO}), "custom_id: required"),
        (ours(""), "custom_id: must be a non-empty string"),
        (ours("x" * 256), "custom_id: must be a non-empty string of at most 255 characters"),
        (ours("c", messages=[{"role": "doctor", "content": "x"}]), "messages[0].role: 'doctor' is not one of"),
        (ours("c", messages=[]), "messages: required, a non-empty list"),
        (ours("c", model="gpt-4o"), "unknown field(s) model"),
        (openai("c", method="GET"), "method: 'GET'; only POST is accepted"),
        (openai("c", url="/v1/embeddings"), "url: '/v1/embeddings'; only /ai/ai_extensions/ai_gateway or /v1/chat"),
        (openai("c", url="/v1/chat/completions"), "body.smart_chat_assistant_id: not supported by the gateway"),
        (chat("c", temperature=0.2), "body.temperature: not supported by the gateway"),
        (chat("c", n=2), "body.n: only 1 is supported by the gateway, got 2"),
        (chat("c", model=None), "body.model: required, the Smart Chat assistant's id"),
        (
            openai("c", {"messages": HELLO, "model": "gpt-4o", "smart_chat_assistant_id": ASSISTANT}),
            "body: unknown field(s) model; accepted: messages, smart_chat_assistant_id",
        ),
        (json.dumps({"custom_id": "c", "url": "/ai/ai_extensions/ai_gateway"}), "body: required, an object"),
        (ours("c", smart_chat_assistant_id="bad id!"), "smart_chat_assistant_id: must be at most 128 characters"),
        # an OpenAI line's request is its body: its fields are named inside it
        (chat("c", model="bad id!"), "body.model: must be at most 128 characters"),
        (chat("c", messages=[{"role": "doctor", "content": "x"}]), "body.messages[0].role: 'doctor' is not one of"),
        (chat("c", messages=[]), "body.messages: required, a non-empty list"),
        (
            openai("c", {"smart_chat_assistant_id": "bad id!", "messages": HELLO}),
            "body.smart_chat_assistant_id: must be at most",
        ),
        (
            openai("c", {"smart_chat_assistant_id": ASSISTANT, "messages": [{"role": "user"}]}),
            "body.messages[0].content: must be a string or a non-empty list of parts",
        ),
        (openai("c", {"messages": HELLO}), "body.smart_chat_assistant_id: required (the line has none"),
        (
            chat(
                "c", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/x.png"}}]}]
            ),
            "body.messages[0].content[0].image_url.url: local files are not allowed",
        ),
        (
            ours(
                "c", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/x.png"}}]}]
            ),
            "messages[0].content[0].image_url.url: local files are not allowed",
        ),
    ],
)
def test_each_kind_of_bad_line_is_named_with_its_line_number_and_nothing_passes(bad: str, reason: str) -> None:
    with pytest.raises(InvalidBatch) as caught:
        parse([ours("first"), "", bad, ours("last")])
    assert len(caught.value.problems) == 1
    number, text = caught.value.problems[0]
    assert number == 3
    assert reason in text
    assert f"line 3: {text}" in str(caught.value)
    assert "1 of 3 line(s) invalid; nothing was stored" in str(caught.value)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (
            '{"custom_id": "c", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}",
            "not valid JSON for a request: nested too deeply to parse",
        ),
        ("[" * 100_000, "not valid JSON for a request: nested too deeply to parse"),
        ('{"custom_id": ' + "1" * 5000 + "}", "not valid JSON for a request: a number too long to read"),
        (
            ours("c", messages=[{"role": "user", "content": "hi", "name": [[["x"]]]}]),
            "messages[0].name: must be 1 to 64 letters, digits, _ or -",
        ),
        (json.dumps({"custom_id": 42, "messages": HELLO}), "custom_id: must be a string, got int"),
        (
            json.dumps({"custom_id": "c", "smart_chat_assistant_id": ["a"], "messages": HELLO}),
            "smart_chat_assistant_id: must be a string, got list",
        ),
        (
            openai("c", {"messages": HELLO, "smart_chat_assistant_id": 5}),
            "body.smart_chat_assistant_id: must be a string, got int",
        ),
        (openai("c", method=["POST"]), "method: must be a string, got list"),
        (ours("c\udc80"), "custom_id: not encodable as UTF-8: a lone surrogate (U+DC80) at index 1"),
        (ours("c", messages=[{"role": "user", "content": "ok \ud800"}]), "messages[0].content: not encodable as UTF-8"),
        (
            ours(
                "c",
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": data_uri("gif", png_bytes(2, 2))}}],
                    }
                ],
            ),
            "image_url.url: data uri declares 'image/gif'",
        ),
        (ours("c", smart_chat_assistant_id=ASSISTANT + "\n"), "smart_chat_assistant_id: must be at most 128"),
    ],
)
def test_a_line_that_used_to_crash_or_pass_is_that_lines_problem(bad: str, reason: str) -> None:
    with pytest.raises(InvalidBatch) as caught:
        parse([ours("first"), bad, ours("last")])
    assert [n for n, _ in caught.value.problems] == [2]
    assert reason in caught.value.problems[0][1]


def test_the_same_field_rule_as_a_single_submit_file_names_unknown_fields_and_the_accepted_ones() -> None:
    with pytest.raises(InvalidBatch) as caught:
        parse([ours("a", temperature=0, model="gpt-4o")])
    assert caught.value.problems == (
        (1, "unknown field(s) model, temperature; accepted: custom_id, messages, smart_chat_assistant_id, subject"),
    )


def test_a_line_over_the_request_limit_is_refused_before_it_is_parsed() -> None:
    line = ours("big", messages=[{"role": "user", "content": "x" * 500}])
    with pytest.raises(InvalidBatch) as caught:
        parse_lines([ours("ok"), line], default_assistant=None, policy=Policy(max_request_bytes=200))
    assert caught.value.problems == (
        (2, f"the line's {len(line)} characters are over the request limit of 200 bytes (QBGW_MAX_REQUEST_BYTES)"),
    )
    big = [{"role": "user", "content": "x" * 500}]
    parsed = [{"custom_id": "big", "smart_chat_assistant_id": ASSISTANT, "messages": big}]
    with pytest.raises(InvalidBatch, match="messages: 500 bytes of text .* limit of 200 bytes"):
        parse_lines(parsed, default_assistant=None, policy=Policy(max_request_bytes=200))  # objects: by their text


SEPARATORS = ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]


def test_json_lines_split_at_line_feeds_only_so_line_numbers_stay_true(tmp_path: Path) -> None:
    rows = [ours("first")]  # then each character raw inside a JSON string (json.dumps would escape it)
    for n, char in enumerate(SEPARATORS):
        rows.append(ours(f"in-{n}", messages=[{"role": "user", "content": "before@after"}]).replace("@", char))
    path = tmp_path / "in.jsonl"
    path.write_bytes(("\r\n".join(rows[:3]) + "\n" + "\n".join(rows[3:]) + "\n").encode())
    lines = read_lines(path)
    assert len(lines) == 1 + len(SEPARATORS)
    assert lines == rows
    parsed = parse(lines, skip=True)
    # U+2028, U+2029 and U+0085 may stand raw in a JSON string; control characters may not (RFC 8259).
    assert [x.custom_id for x in parsed.lines] == ["first", "in-0", "in-1", "in-2"]
    assert parsed.lines[1].messages[0]["content"] == "before\u2028after"
    assert [n for n, _ in parsed.problems] == [5, 6, 7, 8, 9]
    assert all("Invalid control character" in reason for _, reason in parsed.problems)


def test_a_duplicate_custom_id_names_the_line_it_repeats() -> None:
    with pytest.raises(InvalidBatch) as caught:
        parse([ours("a"), ours("b"), ours("a")])
    assert caught.value.problems == ((3, "custom_id 'a' repeats line 1"),)


def test_skip_invalid_keeps_the_valid_lines_and_reports_the_others() -> None:
    parsed = parse([ours("a"), "{", ours("b", messages=[{"role": "doctor", "content": "x"}]), ours("c")], skip=True)
    assert [x.custom_id for x in parsed.lines] == ["a", "c"]
    assert [n for n, _ in parsed.problems] == [2, 3]
    assert "'doctor' is not one of" in parsed.problems[1][1]


@pytest.mark.parametrize("lines", [[], ["", "  "], ["{", "[]"]])
def test_a_batch_with_no_valid_line_is_rejected_even_when_skipping(lines: list[str]) -> None:
    with pytest.raises(InvalidBatch, match="nothing was stored"):
        parse(lines, skip=True)


def test_the_error_lists_twenty_problems_and_counts_the_rest_and_survives_pickle() -> None:
    with pytest.raises(InvalidBatch) as caught:
        parse(["{"] * 25 + [ours("ok")])
    error = caught.value
    assert len(error.problems) == 25
    assert "line 20:" in str(error)
    assert "line 21:" not in str(error)
    assert "... and 5 more" in str(error)
    back = pickle.loads(pickle.dumps(error))
    assert back.problems == error.problems
    assert str(back) == str(error)


def test_image_shorthand_makes_one_line_per_file_named_by_the_file(tmp_path: Path) -> None:
    for name in ("b.png", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(png_bytes(4, 4))
    lines = image_lines(str(tmp_path / "*.png"), "Describe {name} ({stem})")
    assert [x["custom_id"] for x in lines] == ["a.png", "b.png"]
    part = lines[0]["messages"][0]["content"]
    assert part[0]["text"] == "Describe a.png (a)"
    assert part[1]["image_url"]["url"] == str(tmp_path / "a.png")
    assert [x["custom_id"] for x in image_lines(str(tmp_path), "x")] == ["a.png", "b.png"]  # a folder: all of it
    assert len(parse(lines, default=ASSISTANT, roots=(tmp_path,)).lines) == 2
    with pytest.raises(InvalidBatch) as outside:
        parse(lines, default=ASSISTANT, roots=(tmp_path / "elsewhere",))
    assert "is not under an allowed root" in outside.value.problems[0][1]
    with pytest.raises(InvalidBatch, match="no .png, .jpg, .jpeg or .pdf file matches"):
        image_lines(str(tmp_path / "*.jpg"), "x")


@pytest.mark.parametrize(
    ("text", "seconds"), [("24h", 86400), ("90m", 5400), ("2d", 172800), ("30", 30), ("0.5s", 0.5)]
)
def test_windows_are_durations(text: str, seconds: float) -> None:
    assert parse_window(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["soon", "0h", "-1s", ""])
def test_a_bad_window_is_a_usage_error(text: str) -> None:
    with pytest.raises(click.BadParameter):
        parse_window(text)


def view(status: BatchStatus, succeeded: int, failed: int, cancelled: int, pending: int) -> BatchView:
    now = datetime(2026, 11, 25, tzinfo=UTC)
    total = succeeded + failed + cancelled + pending
    return BatchView(
        id="b1",
        status=status,
        actor="t",
        assistant_id=None,
        total=total,
        skipped=0,
        succeeded=succeeded,
        failed=failed,
        cancelled=cancelled,
        pending=pending,
        created_at=now,
        in_progress_at=now,
        completed_at=None,
        cancelled_at=None,
        expired_at=None,
        expires_at=now,
    )


@pytest.mark.parametrize(
    ("batch", "summary"),
    [
        (view(BatchStatus.COMPLETED, 50, 0, 0, 0), "completed: all 50 succeeded"),
        (view(BatchStatus.COMPLETED, 47, 3, 0, 0), "completed with 3 failures (47 succeeded)"),
        (view(BatchStatus.COMPLETED, 48, 1, 1, 0), "completed with 1 failure and 1 cancelled (48 succeeded)"),
        (
            view(BatchStatus.IN_PROGRESS, 20, 2, 0, 28),
            "in_progress: 22 of 50 done (20 succeeded, 2 failed, 0 cancelled), 28 pending",
        ),
        (view(BatchStatus.EXPIRED, 10, 0, 39, 1), "expired: 10 succeeded, 0 failed, 39 cancelled, 1 still finishing"),
    ],
)
def test_a_completed_batch_with_failures_never_reads_as_a_plain_success(batch: BatchView, summary: str) -> None:
    assert batch.summary == summary
    assert batch.all_succeeded is (summary == "completed: all 50 succeeded")


def test_progress_is_a_bar_on_a_terminal_and_a_line_every_few_seconds_elsewhere() -> None:
    import io

    clock = iter([0.0, 2.0, 4.0, 6.0])
    out = io.StringIO()
    progress = Progress(out, tty=False, every=5.0, clock=lambda: next(clock))
    for done in (0, 10, 20):
        progress(view(BatchStatus.IN_PROGRESS, done, 0, 0, 100 - done))
    progress(view(BatchStatus.COMPLETED, 100, 0, 0, 0))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "\r" not in out.getvalue()
    assert lines[1] == "batch b1: completed: 100/100 done, 0 failed, 16.7/s"
    bar = line(view(BatchStatus.IN_PROGRESS, 30, 3, 0, 67), 10.0, bar=True)
    assert bar == "[##########....................] 33/100 done, 3 failed, 10.0/s, ~7s left"


def test_csv_cells_a_spreadsheet_would_run_are_quoted() -> None:
    from qbgw.batches.export import spreadsheet_cell

    for formula in ('=HYPERLINK("http://evil","x")', "+1+1", "-2", "@SUM(1)", "\t=1", "\r=1"):
        assert spreadsheet_cell(formula) == "'" + formula
    for plain in ("visit-0001", "a=b", "", "'quoted"):
        assert spreadsheet_cell(plain) == plain
    assert spreadsheet_cell(-1) == -1  # a number is a number
    assert spreadsheet_cell(None) is None


def test_a_line_that_is_not_utf8_is_that_lines_problem_and_a_bom_is_no_problem(tmp_path: Path) -> None:
    from qbgw.batches.input import read_lines

    good = ours("a").encode()
    bad = ours("b", messages=[{"role": "user", "content": "caf"}]).encode().replace(b"caf", b"caf\xe9")
    (tmp_path / "latin1.jsonl").write_bytes(good + b"\n" + bad + b"\n" + ours("c").encode() + b"\n")
    with pytest.raises(InvalidBatch) as caught:
        parse(read_lines(tmp_path / "latin1.jsonl"))
    assert len(caught.value.problems) == 1
    number, reason = caught.value.problems[0]
    assert number == 2
    assert reason.startswith("not UTF-8 text: the byte 0xE9 at column ")
    assert len(parse(read_lines(tmp_path / "latin1.jsonl"), skip=True).lines) == 2
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b"\r\n" + ours("c").encode() + b"\r\n")
    assert [line.custom_id for line in parse(read_lines(tmp_path / "bom.jsonl")).lines] == ["a", "c"]


def test_a_line_that_names_a_key_twice_is_refused_by_its_number() -> None:
    twice = ours("b")[:-1] + ', "custom_id": "c"}'
    with pytest.raises(InvalidBatch) as caught:
        parse([ours("a"), twice, ours("d")])
    assert [n for n, _ in caught.value.problems] == [2]
    assert "the key 'custom_id' appears twice in one object; give each key once" in caught.value.problems[0][1]
    assert [x.custom_id for x in parse([ours("a"), twice, ours("d")], skip=True).lines] == ["a", "d"]
