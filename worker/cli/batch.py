"""CLI for batches: ``qbgw batch submit|status|wait|list|cancel|results``.

Registered on the main ``qbgw`` group by ``qbgw.cli``; each command is a few lines over
``qbgw.batches`` / ``qbgw.batches.export``. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from datetime import timedelta
from typing import Any

import click

from ..batches import export as batch_export
from ..batches import input as batch_input
from ..control import cancel_batch
from ..errors import InvalidBatch, InvalidMessages
from ..producer import batch_window, submit_batch
from ..queries import batch_results as read_batch_results
from ..queries import get_batch, list_batches, wait_for_batch
from .kit import EXIT, handled, load_settings
from .progress import Progress

__all__ = ["batch", "parse_window"]

UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_window(value: str) -> timedelta:
    """``24h``, ``90m``, ``2d``, ``3600s`` or plain seconds."""
    number, unit = (value[:-1], value[-1]) if value[-1:] in UNITS else (value, "s")
    try:
        seconds = float(number) * UNITS[unit]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a duration like 24h, 90m, 2d or 3600s") from None
    if not math.isfinite(seconds):
        raise click.BadParameter(f"{value!r} is not a duration like 24h, 90m, 2d or 3600s")
    try:
        return batch_window(seconds)
    except InvalidMessages as exc:
        raise click.BadParameter(f"{value!r}: {str(exc).removeprefix('window: ')}") from None


@click.group()
def batch() -> None:
    """Batches: many jobs from a JSON Lines file (or a folder of images), followed and exported together."""


@batch.command("submit")
@click.argument("file", required=False, type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--images", help="A folder or glob of .png/.jpg/.jpeg/.pdf files: one job each (custom_id = file name).")
@click.option("--prompt", help='With --images: the user text, e.g. "Describe {name}" ({name}, {stem}, {path}).')
@click.option("--assistant", "-a", help="smart_chat_assistant_id of lines without one (default QBGW_ASSISTANT_ID).")
@click.option(
    "--window",
    default="24h",
    show_default=True,
    callback=lambda _ctx, _param, value: parse_window(value),
    help="Jobs not finished by then are cancelled (at most 365d).",
)
@click.option("--skip-invalid", is_flag=True, help="Submit the valid lines and report the invalid ones.")
@click.option("--actor", help="Who is submitting, for the audit trail.")
@click.option("--wait", "wait_", is_flag=True, help="Then wait for the batch, showing progress.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after this many seconds.")
@handled
def batch_submit(
    file: str | None,
    images: str | None,
    prompt: str | None,
    assistant: str | None,
    window: timedelta,
    skip_invalid: bool,
    actor: str | None,
    wait_: bool,
    timeout: float | None,
) -> None:
    """Validate every line of FILE (JSON Lines; '-' for stdin), store the jobs, queue them; prints the batch id.

    A line is {"custom_id", "smart_chat_assistant_id"?, "messages"} or OpenAI's batch shape
    {"custom_id", "method": "POST", "url": "/ai/ai_extensions/ai_gateway", "body": {...}}.
    """
    _check_source(file, images, prompt)
    settings = load_settings()
    source: Any = file if images is None else batch_input.image_lines(images, prompt or "")

    def where(number: int) -> str:  # with --images there are no lines to look at: a problem names its file
        return f"line {number}" if images is None else str(source[number - 1]["custom_id"])

    try:
        view = submit_batch(
            source,
            assistant_id=assistant,
            window=window,
            skip_invalid=skip_invalid,
            actor=actor,
            settings=settings,
        )
    except InvalidBatch as exc:
        if images is None:
            raise
        named = tuple((n, f"{where(n)}: {reason}") for n, reason in exc.problems)
        raise InvalidBatch(exc.message, named) from None
    for number, reason in view.problems:
        click.echo(f"skipped {where(number)}: {reason}", err=True)
    click.echo(view.id)
    click.echo(_stored(view), err=True)
    if wait_:
        _wait(view.id, timeout)


def _check_source(file: str | None, images: str | None, prompt: str | None) -> None:
    if file is None and images is None:
        raise click.UsageError("give a JSON Lines FILE or --images (with --prompt)")
    if file is not None and images is not None:
        raise click.UsageError("give a JSON Lines FILE or --images (with --prompt), not both")
    if images is not None and not prompt:
        raise click.UsageError("--images needs --prompt")
    if prompt is not None and images is None:
        raise click.UsageError("--prompt goes with --images (a FILE's lines carry their own messages)")


def _stored(view: Any) -> str:
    skipped = f"{len(view.problems)} invalid line(s) skipped"
    if view.cancelled:  # cancelled (or expired) while it was being stored: its jobs were stored cancelled
        return (
            f"batch {view.id}: {view.total} job(s) stored, {view.cancelled} of them cancelled: the batch was "
            f"{view.status} while it was being stored; {skipped}"
        )
    return f"batch {view.id}: {view.total} job(s) queued, {skipped}"


@batch.command("status")
@click.argument("batch_id")
@handled
def batch_status(batch_id: str) -> None:
    """Show a batch's status, counts and timestamps (JSON, with a one-line summary)."""
    click.echo(json.dumps(get_batch(batch_id, settings=load_settings()).as_dict(), indent=2))


@batch.command("wait")
@click.argument("batch_id")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds (exit 6).")
@handled
def batch_wait(batch_id: str, timeout: float | None) -> None:
    """Wait for a batch, with progress on stderr; prints its summary.

    Exits 0 if every job succeeded, 1 if some failed or were cancelled, 6 on timeout.
    """
    _wait(batch_id, timeout)


def _wait(batch_id: str, timeout: float | None) -> None:

    progress = Progress(sys.stderr, tty=sys.stderr.isatty())
    try:
        view = wait_for_batch(batch_id, timeout=timeout, poll=0.5, on_progress=progress, settings=load_settings())
    finally:
        progress.close()
    click.echo(f"batch {view.id} {view.summary}")
    if not view.all_succeeded:
        sys.exit(EXIT["job_failed"])


@batch.command("list")
@click.option("--limit", type=click.IntRange(min=1, max=100_000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@handled
def batch_list(limit: int, as_json: bool) -> None:
    """Recent batches, newest first."""
    for view in list_batches(limit=limit, settings=load_settings()):
        if as_json:
            click.echo(json.dumps(view.as_dict()))
        else:
            click.echo(f"{view.id}  {view.created_at.isoformat(timespec='seconds')}  {view.summary}")


@batch.command("cancel")
@click.argument("batch_id")
@click.option("--actor", help="Who is cancelling, for the audit trail.")
@handled
def batch_cancel(batch_id: str, actor: str | None) -> None:
    """Cancel every job not finished yet (running ones when their attempt ends); results so far are kept."""
    view = cancel_batch(batch_id, actor=actor, settings=load_settings())
    click.echo(f"batch {view.id} {view.summary}")


@batch.command("results")
@click.argument("batch_id")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("--failed-only", is_flag=True, help="Failed and cancelled jobs as input lines, to submit again.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), help="Write here, not to stdout.")
@click.option("--actor", "reader", help="Who is reading, for the audit trail (default QBGW_ACTOR).")
@handled
def batch_results(batch_id: str, fmt: str, failed_only: bool, output: str | None, reader: str | None) -> None:
    """Export one line per job keyed by custom_id: the answer or the error, attempts, timings (audited)."""
    if failed_only and fmt != "jsonl":
        raise click.UsageError("--failed-only writes input lines, which are JSON Lines: drop --format csv")
    write = {"jsonl": batch_export.write_jsonl, "csv": batch_export.write_csv}[fmt]
    if failed_only:
        write = batch_export.write_inputs
    # The file is opened before the results are read: reading them is an audited disclosure, which a path
    # that cannot be written would make for nothing.
    made = output is not None and not os.path.exists(output)
    try:
        opened = click.open_file(output or "-", "w", encoding="utf-8", lazy=False)
    except OSError as exc:
        raise click.BadParameter(f"cannot write {output}: {exc.strerror}", param_hint="'--output'") from None
    try:
        with opened as out:
            results = read_batch_results(batch_id, failed_only=failed_only, reader=reader, settings=load_settings())
            written = write(results, out)
    except BaseException:
        if made and output is not None:
            with contextlib.suppress(OSError):
                os.unlink(output)  # not left behind, empty, by a batch that could not be read
        raise
    if written < len(results):
        click.echo(f"qbgw: {len(results) - written} job(s) left out: their messages were purged", err=True)
