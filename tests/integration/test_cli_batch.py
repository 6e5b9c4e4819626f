"""``qbgw batch`` commands through click's runner (in process) on a real SQLite database."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from qbgw.cli.main import EXIT
from qbgw.queries import AuditFilter, audit_query
from qbgw.settings import Settings
from tests.conftest import ASSISTANT
from tests.images import png_bytes
from tests.integration.test_batches import job_ids, lines, run
from tests.integration.test_cli import audit_events, jobs_stored, qbgw


@pytest.fixture
def env(embedded_settings: Settings) -> dict[str, str]:
    return {**embedded_settings.to_env(), "QBGW_ASSISTANT_ID": ASSISTANT}


def write(path: Path, rows: list[str]) -> str:
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_submit_wait_status_and_results(env: dict[str, str], embedded_settings: Settings, tmp_path: Path) -> None:
    submitted = qbgw(env, "batch", "submit", write(tmp_path / "in.jsonl", lines(4, fail=(3,))), "--window", "2h")
    assert submitted.exit_code == 0, submitted.output
    batch_id = submitted.stdout.strip()
    assert "4 job(s) queued, 0 invalid line(s) skipped" in submitted.stderr
    pending = qbgw(env, "batch", "wait", batch_id, "--timeout", "0.2")
    assert pending.exit_code == EXIT["timeout"]
    assert "is still in_progress" in pending.stderr
    run(embedded_settings, batch_id)
    waited = qbgw(env, "batch", "wait", batch_id)
    assert waited.exit_code == EXIT["job_failed"]  # completed with a failure is not a success
    assert waited.stdout.strip() == f"batch {batch_id} completed with 1 failure (3 succeeded)"
    assert "4/4 done, 1 failed" in waited.stderr
    assert "\r" not in waited.stderr
    status = json.loads(qbgw(env, "batch", "status", batch_id).stdout)
    assert (status["status"], status["succeeded"], status["failed"], status["pending"]) == ("completed", 3, 1, 0)
    listed = qbgw(env, "batch", "list").stdout
    assert batch_id in listed
    assert "completed with 1 failure" in listed
    rows = [json.loads(x) for x in qbgw(env, "batch", "results", batch_id).stdout.splitlines()]
    assert [r["status"] for r in rows] == ["succeeded", "succeeded", "succeeded", "failed"]
    table = list(csv.DictReader(io.StringIO(qbgw(env, "batch", "results", batch_id, "--format", "csv").stdout)))
    assert table[3]["custom_id"] == "row-003"
    assert table[3]["http_status"] == "400"


def test_failed_only_output_is_accepted_as_a_new_batch(
    env: dict[str, str], embedded_settings: Settings, tmp_path: Path
) -> None:
    batch_id = qbgw(env, "batch", "submit", write(tmp_path / "in.jsonl", lines(3, fail=(0, 2)))).stdout.strip()
    run(embedded_settings, batch_id)
    retry = tmp_path / "retry.jsonl"
    exported = qbgw(env, "batch", "results", batch_id, "--failed-only", "--output", str(retry), "--actor", "ops-1")
    assert exported.exit_code == 0
    assert len(retry.read_text().splitlines()) == 2
    again = qbgw(env, "batch", "submit", str(retry))
    assert again.exit_code == 0
    assert set(job_ids(embedded_settings, again.stdout.strip())) == {"row-000", "row-002"}
    reads = audit_query(AuditFilter(batch_id=batch_id, actor="ops-1"), settings=embedded_settings)
    assert [e.action for e in reads] == ["result.read", "result.read", "batch.exported"]
    refused = qbgw(env, "batch", "results", batch_id, "--failed-only", "--format", "csv")
    assert refused.exit_code == EXIT["usage"]


def test_an_invalid_batch_exits_3_naming_each_line_and_skip_invalid_reports_them(
    env: dict[str, str], tmp_path: Path
) -> None:
    rows = lines(3)
    rows[1] = "{not json"
    path = write(tmp_path / "bad.jsonl", rows)
    refused = qbgw(env, "batch", "submit", path)
    assert refused.exit_code == EXIT["bad_input"]
    assert refused.stdout == ""
    assert "1 of 3 line(s) invalid; nothing was stored" in refused.stderr
    assert "line 2: not valid JSON" in refused.stderr
    skipped = qbgw(env, "batch", "submit", path, "--skip-invalid")
    assert skipped.exit_code == 0
    assert "skipped line 2: not valid JSON" in skipped.stderr
    assert "2 job(s) queued, 1 invalid line(s) skipped" in skipped.stderr


def test_line_separators_inside_json_strings_do_not_split_a_line(
    env: dict[str, str], embedded_settings: Settings, tmp_path: Path
) -> None:
    rows = lines(5)
    for i, char in ((1, "\u2028"), (2, "\u2029"), (3, "\u0085")):
        rows[i] = json.dumps(
            {"custom_id": f"row-00{i}", "messages": [{"role": "user", "content": f"a{char}b"}]}, ensure_ascii=False
        )
    rows[4] = rows[4].replace("Question", "Question\x0c")  # a raw form feed: invalid JSON, on its own line
    submitted = qbgw(env, "batch", "submit", write(tmp_path / "in.jsonl", rows), "--skip-invalid")
    assert submitted.exit_code == 0, submitted.output
    assert "skipped line 5: not valid JSON: Invalid control character" in submitted.stderr
    assert "4 job(s) queued, 1 invalid line(s) skipped" in submitted.stderr
    assert sorted(job_ids(embedded_settings, submitted.stdout.strip())) == [f"row-00{i}" for i in range(4)]


def test_a_line_nested_too_deeply_exits_3_naming_it_and_stores_nothing(
    env: dict[str, str], embedded_settings: Settings, tmp_path: Path
) -> None:
    rows = lines(3)
    rows[1] = '{"custom_id": "row-001", "messages": ' + "[" * 50_000 + "]" * 50_000 + "}"
    refused = qbgw(env, "batch", "submit", write(tmp_path / "deep.jsonl", rows))
    assert refused.exit_code == EXIT["bad_input"]
    assert refused.stdout == ""
    assert "line 2: not valid JSON for a request: nested too deeply to parse" in refused.stderr
    assert jobs_stored(embedded_settings) == 0
    assert audit_events(embedded_settings) == 0


def test_images_shorthand_submits_one_job_per_file_under_the_roots(
    env: dict[str, str], embedded_settings: Settings, tmp_path: Path
) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a.png", "b.png"):
        (scans / name).write_bytes(png_bytes(8, 6))
    pattern = str(scans / "*.png")
    outside = qbgw(env, "batch", "submit", "--images", pattern, "--prompt", "Describe {name}")
    assert outside.exit_code == EXIT["bad_input"]
    assert "no image roots are configured" in outside.stderr
    rooted = {**env, "QBGW_IMAGE_ROOTS": str(scans)}
    submitted = qbgw(rooted, "batch", "submit", "--images", pattern, "--prompt", "Describe {name}")
    assert submitted.exit_code == 0, submitted.output
    batch_id = submitted.stdout.strip()
    run(embedded_settings.with_(image_roots=str(scans)), batch_id)
    rows = [json.loads(x) for x in qbgw(rooted, "batch", "results", batch_id).stdout.splitlines()]
    assert [r["custom_id"] for r in rows] == ["a.png", "b.png"]
    assert 'you said "Describe a.png"' in rows[0]["answer"]
    assert "png 8x6" in rows[0]["answer"]
    # a bad file is named by its name (there are no lines to look at); a misspelt placeholder is refused
    (scans / "c.png").write_bytes(b"GIF89a" + b"\0" * 20)
    refused = qbgw(rooted, "batch", "submit", "--images", pattern, "--prompt", "Describe {name}")
    assert refused.exit_code == EXIT["bad_input"]
    assert "line 3: c.png: " in refused.stderr
    skipped = qbgw(rooted, "batch", "submit", "--images", pattern, "--prompt", "Describe {name}", "--skip-invalid")
    assert "skipped c.png: " in skipped.stderr
    typo = qbgw(rooted, "batch", "submit", "--images", pattern, "--prompt", "Describe {nam}")
    assert typo.exit_code == EXIT["bad_input"]
    assert "{nam} is not filled in by anything" in typo.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["batch", "status", "nope"], "not_found", "no such batch: nope"),
        (["batch", "cancel", "nope"], "not_found", "no such batch: nope"),
        (["batch", "results", "nope"], "not_found", "no such batch: nope"),
        (["batch", "submit"], "usage", "give a JSON Lines FILE or --images"),
        (["batch", "submit", "--images", "/tmp/*.png"], "usage", "--images needs --prompt"),
        (["batch", "submit", "x.jsonl", "--images", "/tmp/*.png"], "usage", "not both"),
        (["batch", "submit", "x.jsonl", "--prompt", "Describe {name}"], "usage", "--prompt goes with --images"),
        (["batch", "submit", "x.jsonl", "--window", "soon"], "usage", "not a duration"),
    ],
)
def test_batch_errors_have_named_exit_codes(env: dict[str, str], args: list[str], code: str, message: str) -> None:
    result = qbgw(env, *args)
    assert result.exit_code == EXIT[code]
    assert message in result.stderr


def test_cancel_prints_what_is_kept(env: dict[str, str], embedded_settings: Settings, tmp_path: Path) -> None:
    batch_id = qbgw(env, "batch", "submit", write(tmp_path / "in.jsonl", lines(3))).stdout.strip()
    run(embedded_settings, batch_id, ["row-000"])
    cancelled = qbgw(env, "batch", "cancel", batch_id, "--actor", "nurse-7")
    assert cancelled.stdout.strip() == f"batch {batch_id} cancelled: 1 succeeded, 0 failed, 2 cancelled"
    assert qbgw(env, "batch", "wait", batch_id).exit_code == EXIT["job_failed"]


def test_csv_exports_quote_what_a_spreadsheet_would_run(env: dict[str, str], tmp_path: Path) -> None:
    formula = '=HYPERLINK("http://evil.example","x")'
    line = {"custom_id": formula, "smart_chat_assistant_id": ASSISTANT, "messages": [{"role": "user", "content": "x"}]}
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(line) + "\n")
    submitted = qbgw(env, "batch", "submit", str(path), "--actor", "@SUM(1)")
    assert submitted.exit_code == 0, submitted.output
    batch_id = submitted.stdout.strip().splitlines()[-1]
    table = list(csv.DictReader(io.StringIO(qbgw(env, "batch", "results", batch_id, "--format", "csv").stdout)))
    assert table[0]["custom_id"] == "'" + formula
    events = list(csv.DictReader(io.StringIO(qbgw(env, "audit", "--format", "csv", "--batch", batch_id).stdout)))
    assert "'@SUM(1)" in {e["actor"] for e in events}
    assert all(not e["actor"].startswith(("=", "+", "-", "@")) for e in events)


def test_a_bad_window_or_output_path_is_a_usage_error_before_anything_is_stored_or_read(
    env: dict[str, str], embedded_settings: Settings, tmp_path: Path
) -> None:
    path = write(tmp_path / "in.jsonl", lines(1))
    before = jobs_stored(embedded_settings)
    for window in ("nan", "inf", "1e20", "99999999d", "0", "400d"):
        refused = qbgw(env, "batch", "submit", path, "--window", window)
        assert refused.exit_code == EXIT["usage"], (window, refused.output)
        assert "--window" in refused.stderr
    assert jobs_stored(embedded_settings) == before
    batch_id = qbgw(env, "batch", "submit", path).stdout.strip().splitlines()[-1]
    reads = audit_events(embedded_settings)
    nowhere = tmp_path / "no" / "such" / "dir" / "out.jsonl"
    refused = qbgw(env, "batch", "results", batch_id, "-o", str(nowhere))
    assert refused.exit_code == EXIT["usage"], refused.output
    assert "cannot write" in refused.stderr
    assert audit_events(embedded_settings) == reads  # nothing read (nor disclosed) for nothing
    missing = tmp_path / "out.jsonl"
    assert qbgw(env, "batch", "results", "00000000-0000-0000-0000-000000000000", "-o", str(missing)).exit_code != 0
    assert not missing.exists()


def test_the_python_window_is_checked_by_name() -> None:
    from datetime import timedelta

    from qbgw.errors import InvalidMessages
    from qbgw.producer import batch_window

    assert batch_window(60) == timedelta(minutes=1)
    assert batch_window(timedelta(hours=24)) == timedelta(hours=24)
    for bad in ("24h", float("nan"), float("inf"), 1e20, 0, -5, None, True, timedelta(days=400)):
        with pytest.raises(InvalidMessages, match="^window: "):
            batch_window(bad)
