"""CLI for auditors and operators: ``qbgw audit``, ``qbgw keys``, ``qbgw purge``.

Registered on the main ``qbgw`` group by ``qbgw.cli``; each command is a few lines over a
library call. Every query and export is itself audited, with ``--actor`` (or QBGW_ACTOR).
"""

from __future__ import annotations

import csv
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from .. import reports
from ..admin import anchor_now, count_by_key, drop_audit_before, purge_phi, rotate_keys, verify_log
from ..audit.anchors import last_anchor
from ..batches.export import spreadsheet_cell
from ..queries import AuditFilter, audit_query
from ..store.reads import MAX_LIMIT
from .kit import handled, load_settings

__all__ = ["audit", "keys", "purge"]

FORMATS = ("table", "jsonl", "csv")
TABLE = ("seq", "occurred_at", "action", "job_id", "attempt", "actor", "outcome", "http_status", "latency_ms")


def _when(value: str | None) -> datetime | None:
    return None if value is None else _time(value)


def _time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 time, e.g. 2026-11-25 or 2026-11-25T18:00:00Z"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _age(value: str) -> timedelta:
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    if len(value) < 2 or value[-1] not in units or not (value[:-1].isascii() and value[:-1].isdigit()):
        raise click.BadParameter(f"{value!r} is not an age like 30d, 12h, 90m or 3600s")
    seconds = int(value[:-1]) * units[value[-1]]
    if seconds > MAX_AGE.total_seconds():
        raise click.BadParameter(f"{value!r} is longer than {MAX_AGE.days} days; give an age up to that")
    return timedelta(seconds=seconds)


#: The longest age an option takes (a hundred years: past it, a date is before any record).
MAX_AGE = timedelta(days=36500)


@click.group(invoke_without_command=True)
@click.option("--job", help="Only this job's events.")
@click.option("--batch", help="Only this batch's events.")
@click.option("--assistant", help="Only events about this assistant id.")
@click.option("--by", "actor", help="Only events by this actor (a producer, worker or reader).")
@click.option("--action", help="Only this action, e.g. attempt.response or result.read.")
@click.option("--outcome", help="Only this outcome, e.g. transient, permanent, succeeded.")
@click.option("--since", help="From this time (ISO 8601, UTC if no zone).")
@click.option("--until", help="Before this time.")
@click.option("--limit", type=click.IntRange(min=1, max=MAX_LIMIT), default=1000, show_default=True)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help="table for reading; jsonl or csv export (audited as an export).",
)
@click.option("--actor", "reader", help="Who is querying, for the audit trail (default QBGW_ACTOR).")
@click.pass_context
@handled
def audit(
    ctx: click.Context,
    job: str | None,
    batch: str | None,
    assistant: str | None,
    actor: str | None,
    action: str | None,
    outcome: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    fmt: str,
    reader: str | None,
) -> None:
    """Query the audit log (and verify it, anchor it: see the subcommands)."""
    if ctx.invoked_subcommand is not None:
        return

    query = AuditFilter(
        job_id=job,
        batch_id=batch,
        assistant_id=assistant,
        actor=actor,
        action=action,
        outcome=outcome,
        since=_when(since),
        until=_when(until),
        limit=limit,
    )
    events = audit_query(query, export=fmt != "table", reader=reader, settings=load_settings())
    _print_events([e.as_dict() for e in events], fmt)
    if len(events) == limit:  # there may be more: said, never cut off silently (stderr: an export stays whole)
        click.echo(
            f"qbgw: {limit} events shown, the --limit; there may be more: raise --limit, or narrow with --since "
            f"(the last shown is seq {events[-1].seq}, at {events[-1].occurred_at.isoformat()})",
            err=True,
        )


@audit.command("verify")
@click.option("--actor", "reader", help="Who is verifying, for the audit trail.")
@handled
def audit_verify(reader: str | None) -> None:
    """Recompute the hash chain and check it against the signed anchors (exit 9 if broken)."""
    settings = load_settings()
    report = verify_log(reader=reader, settings=settings)
    anchors, problem = f"{report.anchors} anchor(s)", report.problem
    if problem is None:
        newest = last_anchor(settings.anchor_path)
        signed = "" if newest is None else f"; the newest signs seq {newest.seq}, at {newest.at}"
        click.echo(f"ok: {report.events} events, chain intact, {anchors} match ({report.seconds:.2f}s){signed}")
        if newest is None and report.events:
            click.echo(
                f"warning: no anchor: nothing outside the database vouches for these events ({settings.anchor_path} "
                "is missing or empty; a worker's sweeper signs the head every QBGW_AUDIT_ANCHOR_SECONDS, "
                "`qbgw audit anchor` at once)",
                err=True,
            )
        return
    click.echo(f"TAMPERED: {problem.message} (checked {report.events} events, {anchors})", err=True)
    sys.exit(9)


@audit.command("access-report")
@click.option(
    "--subject", required=True, help="Whom the jobs are about (a record number); '-' reads it from stdin's first line."
)
@click.option("--from", "start", help="From this time (ISO 8601, UTC if no zone); default: the first event.")
@click.option("--to", "end", help="Before this time; default: now.")
@click.option("--format", "fmt", type=click.Choice(reports.FORMATS), default="table", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False), help="Write the report to this file, not stdout.")
@click.option("--actor", "reader", help="Who is asking, for the audit trail (default QBGW_ACTOR).")
@handled
def audit_access_report(
    subject: str, start: str | None, end: str | None, fmt: str, output: str | None, reader: str | None
) -> None:
    """Every job about a subject: who submitted it, each time it went to the gateway, who read its result,
    cancellations, replays, purges, with the chain's verification over the period (exit 9 if broken). Running it
    is audited (with the subject's blind index, never the subject)."""
    if subject == "-":
        subject = sys.stdin.readline()
    report = reports.access_report(subject, start=_when(start), end=_when(end), actor=reader, settings=load_settings())
    render = {
        "table": reports.render_table,
        "csv": reports.render_csv,
        "jsonl": reports.render_jsonl,
        "html": reports.render_html,
    }[fmt]
    text = render(report)
    if output is None:
        click.echo(text, nl=False)
    else:
        with open(output, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
    if not report.chain_ok:
        click.echo(report.chain_detail, err=True)  # "TAMPERED: ..." already
        sys.exit(9)


@audit.command("anchor")
@handled
def audit_anchor() -> None:
    """Sign the chain's head now and append it to the anchor file."""
    anchor = anchor_now(settings=load_settings())
    click.echo(f"anchored seq {anchor.seq} ({anchor.row_hash[:16]}...) at {anchor.at}")


@audit.command("drop")
@click.option("--before", required=True, help="Drop events that occurred before this time (ISO 8601).")
@click.option("--yes", is_flag=True, help="Confirm: the events are deleted for good.")
@click.option("--actor", help="Who is dropping, for the audit trail.")
@handled
def audit_drop(before: str, yes: bool, actor: str | None) -> None:
    """Drop audit events older than the retention period (needs the database owner)."""
    if not yes:
        raise click.UsageError("dropping audit events cannot be undone: add --yes to confirm")
    dropped = drop_audit_before(before=_time(before), actor=actor or "operator", settings=load_settings())
    if not dropped.events:
        click.echo(f"nothing to drop: no event occurred before {before}")
        return
    click.echo(f"dropped {dropped.events} event(s) through seq {dropped.through_seq}; the chain now starts there")


@click.group()
def keys() -> None:
    """Encryption keys for PHI at rest."""


@keys.command("rotate")
@click.option("--actor", help="Who is rotating, for the audit trail.")
@handled
def keys_rotate(actor: str | None) -> None:
    """Add a new primary key to the keyring file and re-encrypt everything to it (jobs keep running)."""
    rotation = rotate_keys(actor=actor or "operator", settings=load_settings())
    click.echo(
        f"primary key {rotation.old_primary} -> {rotation.new_primary}; "
        f"{rotation.values_reencrypted} value(s) re-encrypted"
    )


@keys.command("status")
@handled
def keys_status() -> None:
    """How many stored values each key encrypts."""
    for key_id, count in sorted(count_by_key(settings=load_settings()).items()):
        click.echo(f"{key_id}\t{count}")


@click.command()
@click.option("--older-than", "older", required=True, help="Age of finished jobs to purge: 30d, 12h, ...")
@click.option("--yes", is_flag=True, help="Confirm an age under a day (it erases what was answered today).")
@click.option("--actor", help="Who is purging, for the audit trail.")
@handled
def purge(older: str, yes: bool, actor: str | None) -> None:
    """Erase the PHI (messages, answers, error texts) of finished jobs older than an age, and uploaded files.

    Job status, timestamps and the audit trail are kept, and the chain still verifies. An age under a day
    (0d erases every finished job's PHI) needs --yes.
    """
    age = _age(older)
    if age < timedelta(days=1) and not yes:
        raise click.UsageError(
            f"--older-than {older} erases the PHI of jobs finished less than a day ago, answers not yet read "
            "included; pass --yes to do that"
        )
    count = purge_phi(older_than=age, actor=actor or "operator", settings=load_settings())
    click.echo(f"purged the PHI of {count} job(s) and file(s)")


def _print_events(rows: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "jsonl":
        for row in rows:
            click.echo(json.dumps(row, ensure_ascii=False))
        return
    if fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else list(TABLE))
        writer.writeheader()
        for row in rows:
            cells = {**row, "detail": json.dumps(row.get("detail") or {})}
            writer.writerow({k: spreadsheet_cell(v) for k, v in cells.items()})
        return
    click.echo("  ".join(f"{c:<{_width(c)}}" for c in TABLE).rstrip())
    for row in rows:
        click.echo("  ".join(f"{_cell(row.get(c)):<{_width(c)}}" for c in TABLE).rstrip())


def _width(column: str) -> int:
    return {"seq": 6, "occurred_at": 26, "action": 20, "job_id": 36, "actor": 24}.get(column, 8)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return str(value)[:26] if isinstance(value, str) and "T" in value else str(value)
