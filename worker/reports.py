"""Reports: the access report of one subject (whom jobs are about), and its renderings. The facade: settings to a
runtime, then ``store.subjects`` finds the subject's jobs and events by its blind index.

The report holds the blind index, never the subject: what it shows can be printed, mailed or kept without
holding the one thing that names the patient. Running it is itself an audit event (``audit.access_report``).
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .audit import events as audit
from .audit.anchors import anchor_key, read_anchors
from .audit.events import AuditRecord
from .audit.verify import VerifyReport
from .batches.export import spreadsheet_cell
from .errors import InvalidMessages
from .lifecycle import utcnow
from .messages import resolve_actor, validate_subject
from .runtime.locator import runtime
from .settings import Settings
from .store import subjects

__all__ = [
    "AccessReport",
    "JobSummary",
    "access_report",
    "render_csv",
    "render_jsonl",
    "render_table",
    "render_html",
    "FORMATS",
]

#: The renderings of a report, by their ``--format`` name.
FORMATS = ("table", "csv", "jsonl", "html")
COLUMNS = ("time", "job_id", "kind", "actor", "detail")


@dataclass(frozen=True)
class JobSummary:
    """One job about the subject: who submitted it and when, where it stands, and what its events say."""

    job_id: str
    submitted_at: datetime
    submitted_by: str
    assistant_id: str
    status: str
    custom_id: str | None
    batch_id: str | None
    purged: bool
    #: Attempts that sent the job to the gateway (``attempt.request``): the disclosures.
    disclosures: int
    #: Reads of its answer or error (``result.read``), and by whom.
    reads: int
    readers: tuple[str, ...]
    #: The job's events in the report's period, oldest first.
    events: tuple[AuditRecord, ...]

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready values (no events: those are the report's rows)."""
        return {
            "job_id": self.job_id,
            "submitted_at": self.submitted_at.isoformat(),
            "submitted_by": self.submitted_by,
            "assistant_id": self.assistant_id,
            "status": self.status,
            "custom_id": self.custom_id,
            "batch_id": self.batch_id,
            "purged": self.purged,
            "disclosures": self.disclosures,
            "reads": self.reads,
            "readers": list(self.readers),
        }


@dataclass(frozen=True)
class AccessReport:
    """Who did what with the jobs about one subject, over [start, end), and whether the chain holds there."""

    subject_index: str
    start: datetime | None
    end: datetime | None
    generated_at: datetime
    actor: str
    jobs: tuple[JobSummary, ...]
    #: Events that belong to no job: earlier access reports of the subject, exports of its jobs' batches.
    other_events: tuple[AuditRecord, ...]
    chain_ok: bool
    chain_detail: str

    def rows(self) -> list[dict[str, str]]:
        """One row per event (the jobs' and the earlier reports'), in chain order: time, job_id, kind (the event's
        action), actor, detail (a sentence of its facts)."""
        events = sorted([e for job in self.jobs for e in job.events] + list(self.other_events), key=lambda e: e.seq)
        return [
            {
                "time": e.occurred_at.isoformat(timespec="seconds"),
                "job_id": e.job_id or "",
                "kind": e.action,
                "actor": e.actor,
                "detail": _detail(e),
            }
            for e in events
        ]


def access_report(
    subject: str,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    actor: str | None = None,
    settings: Settings | None = None,
) -> AccessReport:
    """The access report of ``subject`` over [start, end) (None: open): every job about it, who submitted it and
    when, each attempt that sent it to the gateway, each read of its result, cancellations, replays, purges,
    exports, and the chain's verification over the period. Running it is audited (``audit.access_report``, actor
    ``actor``, carrying the blind index).

    Raises:
        InvalidMessages: the subject is empty, too long or holds a control character; a time has no time zone,
            or ``start`` is not before ``end``.
        SubjectKeyMissing: no subject key is configured (QBGW_SUBJECT_KEY).
        StoreUnavailable: the database cannot be reached.
    """
    rt = runtime(settings)
    index = rt.subject_key.index(validate_subject(subject))
    _check_period(start, end)
    reader = resolve_actor(actor, rt.settings.actor, "auditor")
    anchors, key = read_anchors(rt.settings.anchor_path), anchor_key(rt.settings)
    rt.chain_staged()  # events staged for the block sealer are chained first (committed): the report misses none
    with rt.transaction() as session:
        found = subjects.subject_jobs(session, index)
        events = subjects.subject_events(session, index, found, start=start, end=end)
        shown = [e.seq for e in events]
        verified = subjects.verify_period(session, anchors, key, shown, start=start, end=end)
        last_full = subjects.last_verification(session)
    by_job: dict[str, list[AuditRecord]] = {}
    for e in events:
        by_job.setdefault(e.job_id or "", []).append(e)
    jobs = tuple(_summary(job, tuple(by_job.get(job.job_id, ()))) for job in found)
    listed = [j for j in jobs if j.events or _within(j.submitted_at, start, end)]
    ok = verified.ok and (last_full is None or last_full[1] == "intact")
    detail = _chain_detail(verified, len(shown), last_full)
    report = AccessReport(index, start, end, utcnow(), reader, tuple(listed), tuple(by_job.get("", ())), ok, detail)
    with rt.transaction() as session:
        subjects.record_report(
            session,
            actor=reader,
            subject_index=index,
            intact=ok,
            detail={"from": _iso(start), "to": _iso(end), "jobs": len(listed), "events": len(events)},
        )
    return report


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def _check_period(start: datetime | None, end: datetime | None) -> None:
    for name, when in (("from", start), ("to", end)):
        if when is not None and when.tzinfo is None:
            raise InvalidMessages(f"{name}: must be an aware time (with a time zone, e.g. UTC)")
    if start is not None and end is not None and start >= end:
        raise InvalidMessages("from: must be before to")


def _within(when: datetime, start: datetime | None, end: datetime | None) -> bool:
    return (start is None or when >= start) and (end is None or when < end)


def _summary(job: subjects.SubjectJob, events: tuple[AuditRecord, ...]) -> JobSummary:
    reads = [e for e in events if e.action == audit.Action.RESULT_READ]
    return JobSummary(
        job_id=job.job_id,
        submitted_at=job.created_at,
        submitted_by=job.actor,
        assistant_id=job.assistant_id,
        status=job.status,
        custom_id=job.custom_id,
        batch_id=job.batch_id,
        purged=job.purged,
        disclosures=sum(1 for e in events if e.action == audit.Action.ATTEMPT_REQUEST),
        reads=len(reads),
        readers=tuple(sorted({e.actor for e in reads})),
        events=events,
    )


def _chain_detail(verified: VerifyReport, shown: int, last_full: tuple[datetime, str] | None) -> str:
    full = "never" if last_full is None else f"{last_full[1]} at {last_full[0].isoformat(timespec='seconds')}"
    since = f"last full verification (qbgw audit verify): {full}"
    if verified.problem is not None:
        return f"TAMPERED: {verified.problem.message}; {since}"
    checked = (
        f"{shown} shown event(s) recomputed and linked to their neighbours, none of the period's "
        f"{verified.events} event(s) missing, {verified.anchors} signed anchor(s) checked"
    )
    if last_full is not None and last_full[1] != "intact":
        return f"TAMPERED: {since}; {checked}"
    return f"intact: {checked}; {since}"


_WORDS = {
    "job.submitted": "submitted",
    "attempt.request": "sent to the gateway",
    "attempt.response": "the gateway answered",
    "attempt.error": "the attempt failed",
    "attempt.interrupted": "the attempt was interrupted",
    "attempt.unsent": "held back, not sent",
    "result.read": "result read",
    "job.cancel_requested": "cancel requested",
    "job.cancelled": "cancelled",
    "job.replayed": "replayed",
    "job.purged": "PHI purged",
    "job.succeeded": "succeeded",
    "job.failed": "failed",
    "audit.access_report": "access report run",
}


def _detail(e: AuditRecord) -> str:
    """A sentence of the event's facts (never PHI: the events hold none)."""
    parts = [_WORDS.get(e.action, e.action.replace(".", " ").replace("_", " "))]
    facts = (
        ("assistant", e.assistant_id),
        ("attempt", e.attempt),
        ("http", e.http_status),
        ("outcome", e.outcome),
        ("error", e.error_class),
        ("batch", e.batch_id),
    )
    parts += [f"{name} {value}" for name, value in facts if value not in (None, "")]
    if e.detail.get("custom_id"):
        parts.append(f"custom_id {e.detail['custom_id']}")
    return "; ".join(str(p) for p in parts)


def _summary_fields(report: AccessReport) -> dict[str, Any]:
    return {
        "subject_index": report.subject_index,
        "from": None if report.start is None else report.start.isoformat(),
        "to": None if report.end is None else report.end.isoformat(),
        "generated_at": report.generated_at.isoformat(timespec="seconds"),
        "generated_by": report.actor,
        "jobs": len(report.jobs),
        "chain_ok": report.chain_ok,
        "chain_detail": report.chain_detail,
    }


def render_jsonl(report: AccessReport) -> str:
    """JSON Lines: a first line ``{"report": {...}}`` (the summary and chain status, and ``job_summaries``: each
    job's disclosures and readers), then one line per row."""
    first = {**_summary_fields(report), "job_summaries": [j.as_dict() for j in report.jobs]}
    lines = [json.dumps({"report": first}, ensure_ascii=False)]
    lines += [json.dumps(row, ensure_ascii=False) for row in report.rows()]
    return "\n".join(lines) + "\n"


def render_csv(report: AccessReport) -> str:
    """CSV: a header (time, job_id, kind, actor, detail) and one line per row; the summary and each job's counts
    are in render_jsonl (a job's disclosures are its ``attempt.request`` rows, its reads its ``result.read`` ones)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in report.rows():
        writer.writerow([spreadsheet_cell(row[c]) for c in COLUMNS])
    return out.getvalue()


def render_table(report: AccessReport) -> str:
    """Plain text for a terminal: the summary, then the rows in aligned columns."""
    head = [f"{k}: {v}" for k, v in _summary_fields(report).items()]
    head += [""] + [
        f"job {j.job_id}: submitted {j.submitted_at.isoformat(timespec='seconds')} by {j.submitted_by}, "
        f"{j.status}{' (purged)' if j.purged else ''}, sent {j.disclosures} time(s), read {j.reads} time(s)"
        + (f" by {', '.join(j.readers)}" if j.readers else "")
        for j in report.jobs
    ]
    rows = report.rows()
    widths = {c: max([len(c), *(len(r[c]) for r in rows)]) for c in COLUMNS[:-1]}
    line = "  ".join(c.ljust(widths[c]) for c in COLUMNS[:-1]) + "  detail"
    body = ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS[:-1]) + "  " + r["detail"] for r in rows]
    return "\n".join([*head, "", line, *body, f"({len(rows)} event(s))"]) + "\n"


_CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:2em;color:#111}h1{font-size:20px}
table{border-collapse:collapse;width:100%}th,td{border:1px solid #999;padding:3px 6px;text-align:left;
vertical-align:top}th{background:#eee}.bad{color:#a00;font-weight:bold}.ok{color:#060}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px}dt{font-weight:bold}
@media print{body{margin:0}tr{page-break-inside:avoid}}
"""


def _html_rows(rows: Iterable[dict[str, str]]) -> str:
    e = html.escape
    return "\n".join("<tr>" + "".join(f"<td>{e(row[c])}</td>" for c in COLUMNS) + "</tr>" for row in rows)


def render_html(report: AccessReport) -> str:
    """A printable page, self-contained (inline style, no script, image, font or link to anything) and escaped."""
    e = html.escape
    summary = "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in _summary_fields(report).items())
    status = "ok" if report.chain_ok else "bad"
    jobs = "\n".join(
        "<tr>"
        + "".join(
            f"<td>{e(str(v))}</td>"
            for v in (
                j.job_id,
                j.submitted_at.isoformat(timespec="seconds"),
                j.submitted_by,
                j.assistant_id,
                j.status + (" (purged)" if j.purged else ""),
                j.disclosures,
                ", ".join(j.readers) or "-",
            )
        )
        + "</tr>"
        for j in report.jobs
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>Access report {e(report.subject_index[:12])}</title><style>{_CSS}</style></head>
<body><h1>Access report</h1>
<p class="{status}">Audit chain: {e(report.chain_detail)}</p>
<dl>{summary}</dl>
<h2>Jobs ({len(report.jobs)})</h2>
<table><tr><th>job</th><th>submitted</th><th>by</th><th>assistant</th><th>status</th><th>sent</th><th>read by</th></tr>
{jobs}</table>
<h2>Events</h2>
<table><tr>{"".join(f"<th>{c}</th>" for c in COLUMNS)}</tr>
{_html_rows(report.rows())}</table>
</body></html>
"""
