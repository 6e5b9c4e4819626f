"""The console's pages: a Starlette app mounted at ``/console`` by :func:`qbgw.api.create_app`.

Who is asking is a session (:mod:`qbgw.users`), never an API key: a request that presents one is refused. Every
page view is audited with the user as actor (``console.viewed``) in the transaction that checks the session; a
form posted without its CSRF token, a role without the right, are refused and audited (``console.refused``).
Every answer carries a strict Content-Security-Policy: the pages use only the app's own CSS and script.
"""

from __future__ import annotations

import csv
import hmac
import io
import json
import logging
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import admin, errors, queries, reports, users
from ..access import Role
from ..audit.anchors import read_anchors
from ..audit.events import Action, AuditRecord
from ..batches.export import spreadsheet_cell
from ..lifecycle import utcnow
from ..settings import Settings
from ..store.reads import AuditFilter
from . import charts, stats

__all__ = ["create_console", "COOKIE", "PRE_COOKIE", "SECURITY_HEADERS", "ACCESS_REPORT_WIRED"]

log = logging.getLogger(__name__)

#: The session cookie (its value: the session's token) and the sign-in form's CSRF cookie.
COOKIE, PRE_COOKIE = "qbgw_console", "qbgw_console_pre"
PREFIX = "/console"
#: Every answer of the console carries these.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
#: The static files served (from the package, never from elsewhere), with their types.
STATIC = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}
#: The periods the dashboard offers.
PERIODS = {"6h": timedelta(hours=6), "24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}
#: Events per page of a search, and at most in an export.
PAGE, MAX_EXPORT = 50, 100_000
#: The access report (issue 18, items 1-2) is built elsewhere: its page stays unlinked until it is wired here.
ACCESS_REPORT_WIRED = True
#: Who may open what (deny by default). Readers read answers, auditors the trail, admins operate.
PAGES: dict[str, frozenset[Role]] = {
    "dashboard": frozenset({Role.AUDITOR, Role.READER, Role.ADMIN}),
    "events": frozenset({Role.AUDITOR}),
    "export": frozenset({Role.AUDITOR}),
    "job": frozenset({Role.AUDITOR, Role.READER, Role.ADMIN}),
    "trail": frozenset({Role.AUDITOR, Role.ADMIN}),
    "reveal": frozenset({Role.READER}),
    "chain": frozenset({Role.AUDITOR, Role.ADMIN}),
    "access-report": frozenset({Role.AUDITOR}),
}
_ID = re.compile(r"^[0-9A-Za-z-]{1,64}$")
_FILTERS = ("job_id", "batch_id", "assistant_id", "actor", "action", "outcome")


class Answer(Exception):
    """A page decided before its handler's end: a redirect to sign in, a refusal."""

    def __init__(self, response: Response) -> None:
        self.response = response


@dataclass
class _Verification:
    """The background "verify now" of this server process."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    state: str = "idle"  # idle, running, done, error
    checked: int = 0
    total: int = 0
    started_at: datetime | None = None
    by: str = ""
    ok: bool | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "checked": self.checked,
            "total": self.total,
            "ok": self.ok,
            "detail": self.detail,
            "started_at": None if self.started_at is None else self.started_at.isoformat(),
            "by": self.by,
        }


class _Sources:
    """Failed sign-ins per source address (per server process): past the limit, the address is refused."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def locked(self, source: str) -> bool:
        with self._lock:
            times = self._seen.get(source)
            now = time.monotonic()
            while times and times[0] < now - self.window:
                times.popleft()
            return times is not None and len(times) >= self.limit

    def add(self, source: str) -> None:
        with self._lock:
            if len(self._seen) > 100_000:
                self._seen.clear()
            self._seen.setdefault(source, deque(maxlen=self.limit)).append(time.monotonic())


@dataclass
class _Console:
    settings: Settings
    templates: Environment
    sources: _Sources
    verification: _Verification


def _c(request: Request) -> _Console:
    console: _Console = request.app.state.console
    return console


def _source(request: Request) -> str:
    return request.client.host if request.client else ""


# ---- answers ----


def _render(request: Request, template: str, status: int = 200, **values: Any) -> HTMLResponse:
    console = _c(request)
    values.setdefault("signed", None)
    values.setdefault("idle", int(console.settings.console_idle_timeout))
    values["idle_text"] = _minutes(console.settings.console_idle_timeout)
    values["pages"] = PAGES
    values["access_report_wired"] = ACCESS_REPORT_WIRED
    html = console.templates.get_template(template).render(**values)
    return HTMLResponse(html, status_code=status)


def _refused(
    request: Request, status: int, title: str, detail: str, signed: users.Signed | None = None
) -> HTMLResponse:
    return _render(request, "refused.html", status, title=title, detail=detail, signed=signed)


def _to_sign_in(reason: str) -> RedirectResponse:
    answer = RedirectResponse(f"{PREFIX}/login" + (f"?ended={reason}" if reason in ("idle", "signed out") else ""), 303)
    answer.delete_cookie(COOKIE, path=PREFIX)
    return answer


async def _note_refusal(request: Request, actor: str, reason: str) -> None:
    detail = {"reason": reason, "method": request.method, "path": request.url.path[:200], "source": _source(request)}
    await run_in_threadpool(users.note, Action.CONSOLE_REFUSED, actor, detail, settings=_c(request).settings)


async def _signed(
    request: Request, page: str, *, detail: dict[str, Any] | None = None, job_id: str | None = None, view: bool = True
) -> users.Signed:
    """The signed-in user, allowed on ``page``; the view is audited (unless ``view`` is False). Raises Answer."""
    token = request.cookies.get(COOKIE)
    try:
        signed = await run_in_threadpool(
            users.current,
            token,
            page=page if view else None,
            detail=detail,
            job_id=job_id,
            roles=PAGES[page],
            settings=_c(request).settings,
        )
    except users.SessionEnded as ended:
        raise Answer(_to_sign_in(ended.reason)) from None
    if signed.role not in PAGES[page]:
        await _note_refusal(request, signed.actor, f"role {signed.role.value} may not open {page}")
        raise Answer(
            _refused(
                request,
                403,
                "Not for your role",
                _ROLE_REFUSALS.get((page, signed.role), f"The {signed.role.value} role may not open this page."),
                signed,
            )
        )
    return signed


_ROLE_REFUSALS = {
    ("reveal", Role.AUDITOR): "An auditor never sees message text or answers: the audit trail holds digests and "
    "sizes only. A user with the reader role can reveal an answer, and that is audited.",
    ("reveal", Role.ADMIN): "An admin does not read answers. A user with the reader role can, and that is audited.",
}


async def _form(request: Request) -> dict[str, str]:
    """A urlencoded form body (at most 64 KiB), one value per name."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > 65536:
            raise Answer(_refused(request, 413, "Too large", "A console form is at most 64 KiB."))
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError):
        parsed = {}
    return {name: values[0] for name, values in parsed.items()}


async def _checked_form(request: Request, signed: users.Signed) -> dict[str, str]:
    """The form of a signed-in user's POST, refused (403, audited) without its CSRF token."""
    form = await _form(request)
    if not hmac.compare_digest(form.get("csrf", ""), signed.csrf):
        await _note_refusal(request, signed.actor, "missing or wrong CSRF token")
        raise Answer(_csrf_refused(request, signed))
    return form


def _csrf_refused(request: Request, signed: users.Signed | None) -> HTMLResponse:
    return _refused(
        request,
        403,
        "This form was refused",
        "It did not carry the console's security token (CSRF): it was not sent from a console page, or the page "
        "was too old. Nothing was done. Go back, reload the page and try again.",
        signed,
    )


# ---- sign in and out ----


async def login_page(request: Request) -> Response:
    pre = request.cookies.get(PRE_COOKIE) or secrets.token_urlsafe(24)
    ended = request.query_params.get("ended")
    notice = {
        "idle": f"You were signed out after {_minutes(_c(request).settings.console_idle_timeout)} without activity.",
        "signed out": "You are signed out.",
    }.get(ended or "")
    answer = _render(request, "login.html", csrf=pre, notice=notice, error=None, name="")
    _set_cookie(request, answer, PRE_COOKIE, pre)
    return answer


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.3g} minutes" if seconds >= 120 else f"{seconds:.3g} seconds"


def _set_cookie(request: Request, answer: Response, name: str, value: str) -> None:
    secure = request.url.scheme == "https" or _c(request).settings.console_behind_tls
    answer.set_cookie(name, value, path=PREFIX, httponly=True, samesite="strict", secure=secure)


async def login(request: Request) -> Response:
    form = await _form(request)
    pre = request.cookies.get(PRE_COOKIE, "")
    source = _source(request)
    settings = _c(request).settings
    if not pre or not hmac.compare_digest(form.get("csrf", ""), pre):
        await _note_refusal(request, "anonymous", "sign-in without its CSRF token")
        return _csrf_refused(request, None)
    name = form.get("name", "").strip()
    sources = _c(request).sources
    if sources.locked(source):
        detail = {"user": name[:64], "reason": "source locked", "source": source}
        await run_in_threadpool(users.note, Action.CONSOLE_SIGNIN_FAILED, "anonymous", detail, settings=settings)
        return _login_failed(request, pre, name, "Too many failed sign-ins from this computer: try again later.")
    try:
        signed = await run_in_threadpool(
            users.sign_in, name, form.get("password", ""), source=source, settings=settings
        )
    except users.SignInRefused:
        sources.add(source)
        # One answer for every refusal (the audit event keeps the reason): telling a locked or disabled user
        # so would tell anyone which names exist.
        message = (
            "The user name or password is not right, or the user is disabled, or locked after repeated failed "
            f"sign-ins (a locked user can sign in again after {_minutes(settings.console_lockout)}, or an "
            "administrator can reset the password)."
        )
        return _login_failed(request, pre, name, message)
    answer = RedirectResponse(f"{PREFIX}/", 303)
    _set_cookie(request, answer, COOKIE, signed.token)
    answer.delete_cookie(PRE_COOKIE, path=PREFIX)
    return answer


def _login_failed(request: Request, pre: str, name: str, message: str) -> HTMLResponse:
    return _render(request, "login.html", 401, csrf=pre, notice=None, error=message, name=name)


async def logout(request: Request) -> Response:
    signed = await _signed(request, "dashboard", view=False)
    await _checked_form(request, signed)
    await run_in_threadpool(users.sign_out, signed.token, settings=_c(request).settings)
    return _to_sign_in("signed out")


# ---- pages ----


def _period(request: Request) -> tuple[str, datetime, datetime]:
    chosen = request.query_params.get("period", "24h")
    if chosen not in PERIODS:
        chosen = "24h"
    until = utcnow().replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    return chosen, until - PERIODS[chosen], until


async def dashboard(request: Request) -> Response:
    chosen, since, until = _period(request)
    signed = await _signed(request, "dashboard", detail={"period": chosen})
    board = await run_in_threadpool(stats.dashboard, since, until, settings=_c(request).settings)
    outcomes = ("succeeded", "failed", "cancelled")
    statuses = sorted(board.statuses.items(), key=lambda kv: (kv[0] == "no answer", kv[0]))
    return _render(
        request,
        "dashboard.html",
        signed=signed,
        board=board,
        period=chosen,
        periods=list(PERIODS),
        jobs_chart=charts.stacked_bars("Jobs per hour by outcome", board.hours, outcomes),
        status_chart=charts.bars("Attempts by upstream status", statuses, charts.HALF),
        latency_chart=charts.lines(
            "Attempt latency percentiles per hour", board.latency, ("p50", "p90", "p99"), charts.HALF
        ),
    )


def _when(text: str, name: str) -> datetime | None:
    """A time from a form: ISO 8601, or a datetime-local value (read as UTC)."""
    text = text.strip()
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise errors.InputError(f"{name}: {text!r} is not a time; use 2026-12-05T10:00 (UTC) or ISO 8601") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def _filter(params: dict[str, str], limit: int) -> AuditFilter:
    values: dict[str, Any] = {}
    for name in _FILTERS:
        value = params.get(name, "").strip()
        if len(value) > 255 or re.search(r"[\x00-\x1f\x7f]", value):
            raise errors.InputError(f"{name}: at most 255 characters, without control characters")
        values[name] = value or None
    after = params.get("after_seq", "").strip()
    if after and not (after.isdigit() and int(after) < 2**63):
        raise errors.InputError(f"after_seq: must be a seq (a whole number), got {after[:40]!r}")
    return AuditFilter(
        **values,
        since=_when(params.get("since", ""), "since"),
        until=_when(params.get("until", ""), "until"),
        after_seq=int(after) if after else None,
        limit=limit,
    )


def _params(request: Request) -> dict[str, str]:
    names = (*_FILTERS, "since", "until", "after_seq")
    return {n: request.query_params.get(n, "")[:300] for n in names}


def _shown(params: dict[str, str]) -> dict[str, str]:
    """A search's filters for its page-view event (no PHI in any of them: ids, actors, actions, times)."""
    return {k: v for k, v in params.items() if v}


async def events(request: Request) -> Response:
    params = _params(request)
    signed = await _signed(request, "events", detail={"filters": _shown(params)})
    try:
        query = _filter(params, PAGE)
    except errors.InputError as exc:
        return _render(request, "events.html", 400, signed=signed, params=params, found=[], error=str(exc), more=None)
    found = await run_in_threadpool(queries.audit_query, query, reader=signed.actor, settings=_c(request).settings)
    more = None
    if len(found) == PAGE:
        more = urlencode({**_shown(params), "after_seq": found[-1].seq})
    exports = urlencode({k: v for k, v in _shown(params).items() if k != "after_seq"})
    return _render(
        request, "events.html", signed=signed, params=params, found=found, error=None, more=more, exports=exports
    )


async def export(request: Request) -> Response:
    kind = request.path_params["kind"]
    if kind not in ("csv", "jsonl"):
        return Response("not found", 404, media_type="text/plain")
    params = _params(request)
    signed = await _signed(request, "export", detail={"format": kind, "filters": _shown(params)})
    try:
        query = _filter({**params, "after_seq": ""}, MAX_EXPORT)
    except errors.InputError as exc:
        return _refused(request, 400, "The export's filters are not accepted", str(exc), signed)
    found = await run_in_threadpool(
        queries.audit_query, query, export=True, reader=signed.actor, settings=_c(request).settings
    )
    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    media = "text/csv; charset=utf-8" if kind == "csv" else "application/jsonl"
    return StreamingResponse(
        _csv(found) if kind == "csv" else (json.dumps(e.as_dict(), sort_keys=True) + "\n" for e in found),
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="qbgw-audit-{stamp}.{kind}"'},
    )


def _csv(found: list[AuditRecord]) -> Iterator[str]:
    names = list(AuditRecord.__dataclass_fields__)
    for start in range(0, max(1, len(found)), 500):
        out = io.StringIO()
        writer = csv.writer(out)
        if start == 0:
            writer.writerow(names)
        for e in found[start : start + 500]:
            row = e.as_dict()
            row["detail"] = json.dumps(row["detail"], sort_keys=True) if row["detail"] else ""
            writer.writerow(["" if row[n] is None else spreadsheet_cell(row[n]) for n in names])
        yield out.getvalue()


async def job_lookup(request: Request) -> Response:
    job_id = request.query_params.get("id", "").strip()
    if _ID.match(job_id):
        return RedirectResponse(f"{PREFIX}/jobs/{job_id}", 303)
    signed = await _signed(request, "job", detail={"lookup": True})
    return _render(request, "job.html", signed=signed, job=None, batch_id=None, trail=None, error=None)


async def job(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    plausible = bool(_ID.match(job_id))
    signed = await _signed(request, "job", detail={"job_id": job_id[:64]}, job_id=job_id if plausible else None)
    settings = _c(request).settings
    try:
        if not plausible:
            raise errors.JobNotFound(job_id[:64])
        view, batch_id = await run_in_threadpool(queries.job_metadata, job_id, settings=settings)
    except errors.JobNotFound:
        error = "No job has this id."
        return _render(request, "job.html", 404, signed=signed, job=None, batch_id=None, trail=None, error=error)
    trail = None
    if signed.role in PAGES["trail"]:
        trail = await run_in_threadpool(
            queries.job_events, job_id, include_reads=True, reader=signed.actor, settings=settings
        )
    return _render(request, "job.html", signed=signed, job=view, batch_id=batch_id, trail=trail, error=None)


async def reveal(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    signed = await _signed(request, "reveal", view=False)
    await _checked_form(request, signed)
    if not _ID.match(job_id):
        return _refused(request, 404, "Not found", "No job has this id.", signed)
    try:  # the read itself is the audit event: result.read with the user as reader
        view = await run_in_threadpool(queries.get_job, job_id, reader=signed.actor, settings=_c(request).settings)
    except errors.JobNotFound:
        return _refused(request, 404, "Not found", "No job has this id.", signed)
    return _render(request, "answer.html", signed=signed, job=view)


async def chain_page(request: Request) -> Response:
    signed = await _signed(request, "chain")
    settings = _c(request).settings
    state = await run_in_threadpool(stats.chain_state, settings=settings)
    anchors = read_anchors(settings.anchor_path)
    newest = max(anchors, key=lambda a: a.timestamp(), default=None)
    age = None if newest is None else max(0.0, time.time() - newest.timestamp())
    return _render(
        request,
        "chain.html",
        signed=signed,
        state=state,
        anchors=len(anchors),
        newest=newest,
        age=None if age is None else _age(age),
        stale=age is not None and age > max(3 * settings.audit_anchor_seconds, 3600),
        verification=_c(request).verification.as_dict(),
    )


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


async def verify_now(request: Request) -> Response:
    signed = await _signed(request, "chain", view=False)
    await _checked_form(request, signed)
    console = _c(request)
    check = console.verification
    with check.lock:
        if check.state != "running":
            check.state, check.checked, check.total, check.ok, check.detail = "running", 0, 0, None, ""
            check.started_at, check.by = utcnow(), signed.actor
            threading.Thread(target=_verify, args=(console, signed.actor), daemon=True, name="console-verify").start()
    return RedirectResponse(f"{PREFIX}/chain", 303)


def _verify(console: _Console, actor: str) -> None:
    check = console.verification

    def progress(checked: int, total: int) -> None:
        check.checked, check.total = checked, total

    try:
        report = admin.verify_log(reader=actor, progress=progress, settings=console.settings)
        check.ok = report.ok
        check.detail = "" if report.problem is None else f"seq {report.problem.seq}: {report.problem}"
        check.state = "done"
    except Exception as exc:  # the page shows it; the server goes on
        log.error("console verification failed: %s", type(exc).__name__)
        check.state, check.detail = "error", f"the verification could not run ({type(exc).__name__})"


async def verify_progress(request: Request) -> Response:
    await _signed(request, "chain", view=False)
    return JSONResponse(_c(request).verification.as_dict())


async def access_report(request: Request) -> Response:
    """The access report for a subject (``qbgw.reports.access_report``): auditors only; running it is audited
    by the report itself (``audit.access_report``, with the blind index, never the subject)."""
    if request.method == "GET":
        signed = await _signed(request, "access-report")
        return _render(request, "access_report.html", signed=signed, report=None, error=None)
    # The subject is PHI: it travels in the body only, and is never written to the page-view event.
    # Not a view: the report audits itself once it runs (a POST refused for its CSRF token leaves only the refusal).
    signed = await _signed(request, "access-report", view=False)
    form = await _checked_form(request, signed)
    subject = form.get("subject", "")
    if not subject.strip():
        error = "Give the subject (the patient's record number or reference)."
        return _render(request, "access_report.html", 400, signed=signed, report=None, error=error)
    try:
        start, end = _when(form.get("start", ""), "start"), _when(form.get("end", ""), "end")
        report = await run_in_threadpool(
            reports.access_report, subject, start=start, end=end, actor=signed.actor, settings=_c(request).settings
        )
    except errors.InputError as exc:  # names the field; never quotes the subject
        return _render(request, "access_report.html", 400, signed=signed, report=None, error=str(exc))
    except errors.SubjectKeyMissing:
        error = "Subjects are not configured on this server (QBGW_SUBJECT_KEY): there is nothing to report."
        return _render(request, "access_report.html", 503, signed=signed, report=None, error=error)
    return _render(request, "access_report.html", signed=signed, report=report, error=None)


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC:
        return Response("not found", 404, media_type="text/plain")
    body = resources.files("qbgw.console").joinpath("static", name).read_bytes()
    return Response(body, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})


# ---- the app ----


async def _headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    if request.headers.get("authorization"):  # the console takes people, not programs
        await _note_refusal(request, "anonymous", "an Authorization header (the console does not accept API keys)")
        answer: Response = _refused(
            request,
            403,
            "The console does not accept API keys",
            "Sign in with a user name and password (qbgw users create). API keys are for the HTTP API under /v1.",
        )
    else:
        try:
            answer = await call_next(request)
        except Answer as decided:
            answer = decided.response
    for name, value in SECURITY_HEADERS.items():
        answer.headers[name] = value
    if "cache-control" not in answer.headers:
        answer.headers["Cache-Control"] = "no-store"
    return answer


async def _answer(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, Answer)  # noqa: S101 - registered for Answer only
    return exc.response


async def _input(request: Request, exc: Exception) -> Response:
    return _refused(request, 400, "Not accepted", str(exc))


def create_console(settings: Settings) -> Starlette:
    """The console's app, to mount at ``/console``."""
    templates = Environment(
        loader=PackageLoader("qbgw.console", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    templates.filters["utc"] = lambda when: "" if when is None else when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    templates.filters["ms"] = lambda v: "–" if v is None else f"{v:,.0f} ms"
    templates.globals["prefix"] = PREFIX
    routes = [
        Route("/", dashboard),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/events", events),
        Route("/events.{kind:str}", export),
        Route("/jobs", job_lookup),
        Route("/jobs/{job_id:str}", job),
        Route("/jobs/{job_id:str}/reveal", reveal, methods=["POST"]),
        Route("/chain", chain_page),
        Route("/chain/verify", verify_now, methods=["POST"]),
        Route("/chain/progress.json", verify_progress),
        Route("/access-report", access_report, methods=["GET", "POST"]),
        Route("/static/{name:str}", static),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=_headers)],
        exception_handlers={Answer: _answer, errors.InputError: _input},
    )
    limit = settings.console_max_failures * 4  # a source may mistype several users' names
    app.state.console = _Console(settings, templates, _Sources(limit, settings.console_lockout), _Verification())
    return app
