"""The HTTP front door (``qbgw serve``): the Python API over HTTP, behind API keys and roles.

Every handler is a few lines over a facade call (:mod:`qbgw.producer`, :mod:`qbgw.queries`,
:mod:`qbgw.control`, :mod:`qbgw.admin`), with the authenticated principal as the actor: over HTTP no
caller names itself. Validation is the facade's; this module translates its errors into problem details
(:mod:`qbgw.api.problems`). Blocking facade calls run in the server's thread pool; a long-poll waits on
the event loop, woken by the database (:mod:`qbgw.runtime.waiter`).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import unquote, unquote_plus

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__, access, admin, compat, control, errors, producer, queries, reports
from ..access import PERMISSIONS, Principal
from ..batches import export
from ..batches.input import split_lines
from ..console import create_console
from ..lifecycle import TERMINAL
from ..messages import DuplicateKey, has_lone_surrogate, unique_keys, validate_assistant_id, validate_key
from ..ops.health import check_health
from ..runtime.context import Runtime
from ..runtime.locator import runtime
from ..runtime.waiter import JobWaiter
from ..settings import Settings
from ..store.jobs import NewJob
from ..store.reads import AuditFilter, Expect, JobView
from .document import describe_errors, request_body
from .intake import Intake
from .problems import NOT_FOUND, from_error, problem
from .shapes import describe_successes

__all__ = ["create_app", "MAX_BATCH_BODY", "MAX_WAIT", "FAILURE_WINDOW", "FAILURES_ALLOWED"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The largest batch body accepted (OpenAI's Batch API takes files up to 200 MB).
MAX_BATCH_BODY = 200 * 1024 * 1024
#: The longest long-poll: ``?wait=`` above this is refused.
MAX_WAIT = 60.0
#: Failed authentications from one address within FAILURE_WINDOW seconds before it is slowed down (429).
FAILURES_ALLOWED, FAILURE_WINDOW = 10, 60.0
#: How long a failed authentication past that limit is held before its 429 (on the event loop: no thread waits).
FAILURE_DELAY = 1.0
_ID = re.compile(r"^[0-9A-Za-z-]{1,64}$")
#: The largest seq a cursor may name (PostgreSQL's bigint).
MAX_SEQ = 2**63 - 1
#: How long a key that authenticated is taken without asking the database again (revocation's delay).
CACHE_SECONDS = 5.0
#: The fields a job's JSON body may have.
JOB_FIELDS = frozenset({"assistant_id", "smart_chat_assistant_id", "messages", "custom_id", "webhook_url", "subject"})


class Refused(Exception):
    """An answer decided before any facade call (authentication, role, ownership, body size)."""

    def __init__(self, response: Response, delay: float = 0.0) -> None:
        self.response = response
        #: Seconds to hold the answer (on the event loop, not in a thread) before sending it.
        self.delay = delay


_JOB_BODY: dict[str, Any] = {
    **request_body(
        "application/json",
        {
            "type": "object",
            "required": ["assistant_id", "messages"],
            "additionalProperties": False,
            "properties": {
                "assistant_id": {"type": "string", "description": "the Smart Chat assistant's id"},
                "smart_chat_assistant_id": {"type": "string", "description": "the same, by the gateway's name"},
                "messages": {
                    "type": "array",
                    "description": "OpenAI-format messages; image_url parts with https, data: or file "
                    "references (jpeg or png, at most 50 MB)",
                    "items": {"type": "object"},
                },
                "custom_id": {"type": "string", "maxLength": 255},
                "subject": {"type": "string", "maxLength": 255},
                "webhook_url": {
                    "type": "string",
                    "description": "POSTed (signed, no PHI) when the job ends; default: the key's",
                },
            },
        },
        {
            "assistant_id": "65d5f3473d5d68095462165d",
            "messages": [{"role": "user", "content": "Summarise the visit note."}],
            "custom_id": "visit-42",
        },
    ),
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "maxLength": 255},
            "description": "the same key with the same body returns the first job (per API key's principal)",
        }
    ],
}

_REPORT_BODY = request_body(
    "application/json",
    {
        "type": "object",
        "required": ["subject"],
        "properties": {
            "subject": {"type": "string", "maxLength": 255, "description": "whom the jobs are about"},
            "from": {"type": "string", "format": "date-time"},
            "to": {"type": "string", "format": "date-time"},
            "format": {"type": "string", "enum": ["json", "jsonl", "csv", "html"], "default": "json"},
        },
    },
    {"subject": "MRN-0042", "from": "2026-11-01T00:00:00Z", "format": "json"},
)

_BATCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/jsonl": {
                "schema": {"type": "string", "format": "binary"},
                "example": '{"custom_id": "a", "messages": [{"role": "user", "content": "Hi"}]}\n',
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "description": "an OpenAI batch from an uploaded file (docs/openai.md), answered 200",
                    "required": ["input_file_id", "endpoint"],
                    "additionalProperties": False,
                    "properties": {
                        "input_file_id": {"type": "string", "description": "a file uploaded with purpose=batch"},
                        "endpoint": {
                            "type": "string",
                            "enum": ["/v1/chat/completions", "/ai/ai_extensions/ai_gateway"],
                        },
                        "completion_window": {"type": "string", "default": "24h"},
                        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                    },
                }
            },
        },
    }
}

router = APIRouter()


class _Keys:
    """Keys that authenticated in the last CACHE_SECONDS, by a hash of the presented key: a request with one skips
    the database. A revoked or expired key is thus refused within CACHE_SECONDS (per server process)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[float, Principal]] = {}
        #: When each key was last accepted (from the cache or the database): a key in use passes the
        #: throttle of its address, to be checked against the database, however long it has been in use.
        self._used: dict[str, float] = {}

    @staticmethod
    def _slot(presented: str) -> str:
        return hashlib.sha256(presented.encode()).hexdigest()

    def get(self, presented: str) -> Principal | None:
        slot = self._slot(presented)
        found = self._seen.get(slot)
        if found is None or found[0] < time.monotonic():
            return None
        self._used[slot] = time.monotonic()
        return found[1]

    def put(self, presented: str, principal: Principal) -> None:
        if len(self._seen) > 10_000:
            self._seen.clear()
            self._used.clear()
        keep = CACHE_SECONDS
        if principal.expires_at is not None:  # never past the key's own expiry
            keep = min(keep, (principal.expires_at - datetime.now(UTC)).total_seconds())
        slot = self._slot(presented)
        self._seen[slot] = (time.monotonic() + keep, principal)
        self._used[slot] = time.monotonic()

    def in_use(self, presented: str) -> bool:
        """Accepted within the last CACHE_SECONDS."""
        return time.monotonic() - self._used.get(self._slot(presented), -CACHE_SECONDS) < CACHE_SECONDS


class _Failures:
    """Failed authentications per source address, to slow down guessing (per server process)."""

    def __init__(self) -> None:
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()  # requests are authenticated in the server's thread pool

    def blocked_for(self, source: str) -> float:
        with self._lock:
            times = self._seen.get(source)
            if not times:
                return 0.0
            now = time.monotonic()
            while times and times[0] < now - FAILURE_WINDOW:
                times.popleft()
            if len(times) < FAILURES_ALLOWED:
                return 0.0
            return max(0.0, times[0] + FAILURE_WINDOW - now)

    def add(self, source: str) -> None:
        with self._lock:
            if len(self._seen) > 100_000:  # a flood of sources: forget them rather than grow without bound
                self._seen.clear()
            self._seen.setdefault(source, deque(maxlen=FAILURES_ALLOWED * 2)).append(time.monotonic())


#: The requests to our batch paths that another dialect answers (docs/openai.md): a POST /v1/batches whose body is
#: application/json ("batches.create"), and GET /v1/batches/{id} and POST /v1/batches/{id}/cancel of an id
#: ``batch_...`` ("batches.retrieve", "batches.cancel"), a qbgw batch's id being a UUID.
ALTERNATES = ("batches.create", "batches.retrieve", "batches.cancel")


@dataclass
class _Context:
    settings: Settings
    waiter: JobWaiter
    failures: _Failures
    keys: _Keys
    alternates: dict[str, Callable[..., Awaitable[Response]]] = field(default_factory=dict)
    _intake: Intake | None = None
    _intake_lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        """The server stops: the intake's storer ends once it has stored what it was handed."""
        with self._intake_lock:
            if self._intake is not None:
                self._intake.close()
                self._intake = None

    def intake(self, rt: Runtime) -> Intake:
        """This process's intake for ``rt`` (made at its first POST, and again if the runtime was replaced)."""
        with self._intake_lock:
            if self._intake is None or self._intake.runtime is not rt:
                if self._intake is not None:
                    self._intake.close()  # its storer stores what it was handed, then ends
                self._intake = Intake(rt)
            return self._intake


def _ctx(request: Request) -> _Context:
    ctx: _Context = request.app.state.ctx
    return ctx


class _SecretQuery(logging.Filter):
    """The access log's line without the value of a query parameter that may carry a secret: a ``webhook_url``
    (its token; it is stored encrypted, and must not be left in a log file in clear)."""

    HIDDEN = "webhook_url"  # the parameter whose value may hold a token

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "=" in args[2]:
            record.args = (*args[:2], self.redacted(args[2]), *args[3:])
        return True

    @classmethod
    def redacted(cls, target: str) -> str:
        """``target`` (a path and query) with the value of each parameter the server reads as ``webhook_url``
        blotted out: its name compared as the server decodes it (``webhook%5Furl`` is ``webhook_url`` too)."""
        path, mark, query = target.partition("?")
        if not mark:
            return target
        pairs = []
        for pair in query.split("&"):
            name, equals, _ = pair.partition("=")
            secret = equals and unquote_plus(name).strip().lower() == cls.HIDDEN
            pairs.append(f"{name}=[redacted]" if secret else pair)
        return path + mark + "&".join(pairs)


def create_app(
    settings: Settings | None = None,
    routers: tuple[APIRouter, ...] = (),
    alternates: Mapping[str, Callable[..., Awaitable[Response]]] | None = None,
) -> FastAPI:
    """The ASGI application of qbgw's own endpoints (settings from the environment when None), with ``routers``
    beside them, and ``alternates``: handlers for the requests to a path of ours that are another dialect's
    (see ALTERNATES). ``qbgw serve`` runs :func:`qbgw.api.create_app`, which adds the OpenAI-compatible ones."""
    settings = settings or Settings.from_env()
    waiter = JobWaiter(settings.effective_listen_url)
    failures = _Failures()
    access_log = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _SecretQuery) for f in access_log.filters):
        access_log.addFilter(_SecretQuery())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        waiter.start(asyncio.get_running_loop())
        yield
        waiter.stop()
        app.state.ctx.close()

    app = FastAPI(
        title="qbgw",
        version=__version__,
        summary="Jobs for the QuickBlox HIPAA AI Gateway: submit, wait, read results, audit.",
        lifespan=lifespan,
    )
    app.state.ctx = _Context(settings, waiter, failures, _Keys(), dict(alternates or {}))

    _secure_openapi(app)
    app.include_router(router)
    # The browser console: people signed in with a password, never API keys (docs/console.md).
    app.mount("/console", create_console(settings))
    for extra in routers:
        app.include_router(extra)

    _install_handlers(app)

    return app


# ---- who is asking ----


def authenticate(request: Request) -> Principal:
    settings, failures = _ctx(request).settings, _ctx(request).failures
    source = request.client.host if request.client else ""
    held = failures.blocked_for(source)
    key = _presented(request)
    # Guessing from this address: refused before the database, but for a key accepted in the last CACHE_SECONDS
    # (from anywhere; one in the cache passed already), which is checked against the database as usual.
    if held > 0 and not (key and _ctx(request).keys.in_use(key)):
        raise Refused(_throttled(held), delay=min(held, FAILURE_DELAY))
    try:
        principal = access.authenticate(key, source=source, settings=settings)
        if key:
            _ctx(request).keys.put(key, principal)
        return principal
    except errors.Unauthenticated as exc:
        failures.add(source)
        wait = failures.blocked_for(source)
        if wait > 0:  # this failure crossed the limit: it and the rest of the window are answered 429
            raise Refused(_throttled(wait), delay=min(wait, FAILURE_DELAY)) from None
        raise Refused(
            problem(
                401,
                "unauthenticated",
                "A valid API key is required",
                "send Authorization: Bearer <key>; the key given is missing, malformed, unknown, expired or revoked"
                if exc.reason != "no key"
                else "send Authorization: Bearer <key> (qbgw api-keys create makes one)",
                headers={"WWW-Authenticate": 'Bearer realm="qbgw"'},
            )
        ) from None


def allowed(principal: Principal, permission: str) -> str:
    scope = PERMISSIONS[permission].get(principal.role)
    if scope is None:
        raise Refused(
            problem(
                403,
                "forbidden",
                "This key's role does not allow this",
                f"role {principal.role.value!r} may not {permission.replace('.', ' ')}",
            )
        )
    return scope


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await run_in_threadpool(fn, *args, **kwargs)


async def who_any(request: Request) -> Principal:
    """The caller's principal, whatever the endpoint (raises Refused)."""
    key = _presented(request)
    cached = _ctx(request).keys.get(key) if key else None
    if cached is not None:
        return cached
    try:
        return await call(authenticate, request)
    except Refused as refused:
        if refused.delay > 0:
            await asyncio.sleep(refused.delay)
        raise


def _presented(request: Request) -> str | None:
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    return presented.strip() if scheme.lower() == "bearer" and presented.strip() else None


async def who(request: Request, permission: str) -> tuple[Principal, str]:
    principal = await who_any(request)
    return principal, allowed(principal, permission)


def _plausible(identifier: str) -> bool:
    """Whether a path's id could name a job or batch (a UUID's characters); anything else is simply not found."""
    return bool(_ID.match(identifier))


async def job_for(request: Request, principal: Principal, scope: str, job_id: str) -> tuple[JobView, str | None]:
    if not _plausible(job_id):
        raise errors.JobNotFound(job_id[:64])
    return await call(_job_for, principal, scope, job_id, _ctx(request).settings)


def _job_for(principal: Principal, scope: str, job_id: str, settings: Settings) -> tuple[JobView, str | None]:
    view, batch_id = queries.job_metadata(job_id, settings=settings)
    if scope == "own" and view.actor != principal.actor:
        raise errors.JobNotFound(job_id)  # another principal's job does not exist for this one
    return view, batch_id


async def body_chunks(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request's body as it arrives, refused (413) once it passes ``limit`` bytes (or declares more)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(_too_large(limit))
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(_too_large(limit))
        yield chunk


async def body_bytes(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) once it passes ``limit`` bytes."""
    return b"".join([chunk async for chunk in body_chunks(request, limit)])


# ---- health ----


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """The server process is alive (no dependency is checked)."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
async def readyz(request: Request) -> Response:
    """The database is reachable and migrated, and the broker is reachable: 200, else 503 naming what is not."""
    checks = await call(check_health, _ctx(request).settings, skip=("upstream", "audit", "keys"), timeout=3.0)
    ok = all(c.ok for c in checks)
    for check in checks:  # the details (hosts, revisions, queue depths) go to the log, not to anyone who asks
        if not check.ok:
            log.warning("not ready: %s", check.line())
    body = {"status": "ready" if ok else "not ready", "checks": [{"name": c.name, "ok": c.ok} for c in checks]}
    return JSONResponse(body, status_code=200 if ok else 503)


# ---- jobs ----


@router.post("/v1/jobs", status_code=202, tags=["jobs"], openapi_extra=_JOB_BODY)
async def submit_job(request: Request) -> Response:
    """Queue a gateway job (the body of ``qbgw.submit``): 202 with its id and a Location to poll."""
    principal, _ = await who(request, "jobs.submit")
    if "webhook_url" in request.query_params:  # a batch's place for it, not a job's: it would be ignored
        raise errors.InputError("webhook_url: a job's goes in its JSON body, not the query (the query is a batch's)")
    ctx = _ctx(request)
    raw = await body_bytes(request, ctx.settings.max_request_bytes + 65536)
    idempotency = request.headers.get("idempotency-key")
    # A small text-only body is validated here, on the event loop: a hop to the thread pool and back costs
    # more than that (bench/api.py). A large body (its JSON, its inline images) or one naming images (files
    # to read) is validated in a thread.
    data = _job_body(raw) if len(raw) <= ON_LOOP_BYTES else None
    if data is not None and _text_only(data) and data.get("subject") is None:  # (a subject reads its key file)
        job = _prepare(data, principal, idempotency, ctx.settings)
    else:
        job = await call(lambda: _prepare(data or _job_body(raw), principal, idempotency, ctx.settings))
    if job.new is not None:  # stored with the POSTs that arrive meanwhile, by this process's intake
        job_id, queued = job.new.id, await ctx.intake(runtime(ctx.settings)).submit_async(job.new)
    else:
        job_id, queued = await call(_submit_alone, job, principal, idempotency, ctx.settings)
    data = job.data
    if idempotency is None:  # a new job: what it is now is known without reading it back
        body: dict[str, Any] = {"id": job_id, "status": "queued", "custom_id": data.get("custom_id"), "done": False}
    else:  # maybe the first job of this key, in whatever state it is now
        view, _ = await call(queries.job_metadata, job_id, settings=ctx.settings)
        body = {"id": job_id, "status": str(view.status), "custom_id": view.custom_id, "done": view.done}
    body["announced"] = queued
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})


@router.get("/v1/jobs/{job_id}", tags=["jobs"])
async def get_job(request: Request, job_id: str, wait: float = 0.0) -> Response:
    """The job's status and metadata, never its messages nor answer. ``wait``: up to that many seconds
    (at most 60) until the job has ended, woken by the database."""
    principal, scope = await who(request, "jobs.status")
    _check_wait(wait)

    if not _plausible(job_id):
        raise errors.JobNotFound(job_id[:64])
    settings = _ctx(request).settings

    def attempt() -> tuple[bool, tuple[JobView, str | None]]:
        view, batch_id = _job_for(principal, scope, job_id, settings)
        return view.status in TERMINAL, (view, batch_id)

    view, batch_id = await _long_poll(request, job_id, wait, attempt)
    return JSONResponse(_status(view, batch_id))


def _check_wait(wait: float) -> None:
    if not 0 <= wait <= MAX_WAIT:
        raise errors.InputError(f"wait: must be between 0 and {MAX_WAIT:g} seconds, got {wait:g}")


class ClientGone(Exception):
    """The client of a long-poll hung up: the wait ends without a last read (an audited one, maybe)."""


async def _long_poll(
    request: Request,
    job_id: str,
    wait: float,
    attempt: Callable[[], tuple[bool, T]],
    ended_attempt: Callable[[], tuple[bool, T]] | None = None,
) -> T:
    """What ``attempt`` (a blocking read, made in a thread) found once it says it is done, or when ``wait``
    seconds have passed: tried again each time the job's end (or the listener's return) wakes the request, or at
    the waiter's interval. When the database said the job ended, ``ended_attempt`` is made instead, if given
    (the read that follows an end, without first reading the status again): while the request waits, the
    listener is given that read, to start as the end's notification arrives (``JobWaiter.wait_end``)."""
    waiter = _ctx(request).waiter
    deadline, polls = time.monotonic() + wait, 0
    notified = False
    on_end = ended_attempt or attempt
    while True:
        with waiter.watch(job_id) as ended:  # before the read: an end between the read and the wait wakes it
            done, found = await call(ended_attempt if notified and ended_attempt is not None else attempt)
            left = deadline - time.monotonic()
            if done or left <= 0:
                return found
            # Given to the listener only while waiting: a read it started during the attempt would be a second.
            read = await waiter.wait_end(ended, min(left, waiter.interval(polls)), on_end)
            if read is not None:
                done, found = read.result()  # (raises what the read raised)
                if done or deadline - time.monotonic() <= 0:
                    return found
            notified = ended.ended and read is None  # (the listener's read was the one after the end)
            polls += 1
            if not notified and await request.is_disconnected():  # no one to answer: stop, and read nothing
                raise ClientGone


@router.get("/v1/jobs/{job_id}/result", tags=["jobs"])
async def get_result(request: Request, job_id: str, wait: float = 0.0) -> Response:
    """The answer, or the error, of a job that has ended: a read of PHI, audited with the key's principal.
    ``wait``: up to that many seconds (at most 60) until the job has ended, woken by the database; 409 if it
    has not ended by then."""
    principal, scope = await who(request, "jobs.result")
    _check_wait(wait)
    if not _plausible(job_id):
        raise errors.JobNotFound(job_id[:64])

    def admit(view: JobView) -> None:  # whose it is and whether it ended, seen in the same read
        if scope == "own" and view.actor != principal.actor:
            raise errors.JobNotFound(job_id)  # another principal's job does not exist for this one
        if view.status not in TERMINAL:
            raise _NotEnded(view.status)

    settings = _ctx(request).settings
    expect = Expect(owner=principal.actor if scope == "own" else None, ended=True)  # what admit lets through

    def attempt() -> tuple[bool, JobView | str]:
        try:
            return True, queries.read_admitted(job_id, admit, reader=principal.actor, settings=settings, expect=expect)
        except _NotEnded as running:  # nothing was read out, nor audited
            return False, running.status

    full = await _long_poll(request, job_id, wait, attempt)
    if isinstance(full, str):
        return problem(409, "not-finished", "The job has not ended", f"it is {full}", job_id=job_id)
    error = None
    if full.error is not None or full.error_class is not None:
        error = {"class": full.error_class, "message": full.error, "http_status": full.http_status}
    return JSONResponse(
        {
            "id": full.id,
            "status": str(full.status),
            "custom_id": full.custom_id,
            "answer": full.answer,
            "error": error,
            "finished_at": _iso(full.finished_at),
        }
    )


class _NotEnded(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


@router.post("/v1/jobs/{job_id}/cancel", tags=["jobs"])
async def cancel_job(request: Request, job_id: str) -> Response:
    """Cancel a job: ``cancelled`` at once, or ``running`` (cancelled when its attempt ends). 409 when it
    has already succeeded or failed."""
    principal, scope = await who(request, "jobs.cancel")
    await job_for(request, principal, scope, job_id)
    status = await call(control.cancel, job_id, actor=principal.actor, settings=_ctx(request).settings)
    return JSONResponse({"id": job_id, "status": str(status)})


@router.post("/v1/jobs/{job_id}/replay", tags=["jobs"])
async def replay_job(request: Request, job_id: str) -> Response:
    """Queue a failed job again with a fresh budget of attempts (admin). 409 unless it failed."""
    principal, scope = await who(request, "jobs.replay")
    await job_for(request, principal, scope, job_id)
    attempt = await call(control.replay, job_id, actor=principal.actor, settings=_ctx(request).settings)
    return JSONResponse({"id": job_id, "status": "queued", "next_attempt": attempt})


@router.get("/v1/jobs/{job_id}/events", tags=["jobs"])
async def job_events(request: Request, job_id: str) -> Response:
    """The job's audit trail, oldest first (no PHI: digests and sizes). The query is audited."""
    principal, scope = await who(request, "jobs.events")
    await job_for(request, principal, scope, job_id)
    events = await call(
        queries.job_events, job_id, include_reads=True, reader=principal.actor, settings=_ctx(request).settings
    )
    return JSONResponse({"data": [e.as_dict() for e in events]})


# ---- batches ----


@router.post("/v1/batches", status_code=202, tags=["batches"], openapi_extra=_BATCH_BODY)
async def submit_batch(
    request: Request,
    assistant_id: str | None = None,
    completion_window: str = "24h",
    skip_invalid: bool = False,
    webhook_url: str | None = None,
) -> Response:
    """A batch from a JSON Lines body (the lines of ``qbgw batch submit``) of at most 200 MB, held in memory as
    it arrives (never in a file: the lines hold message text); every line is validated before anything is
    stored. A body sent as application/json is an OpenAI batch made from an uploaded file (docs/openai.md)."""
    openai = _ctx(request).alternates.get("batches.create")
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if openai is not None and kind == "application/json":
        return await openai(request)
    principal, _ = await who(request, "batches.submit")
    window = access.parse_duration(completion_window, "completion_window")
    if window > producer.MAX_WINDOW:
        raise errors.InvalidMessages(f"completion_window: at most {producer.MAX_WINDOW.days}d; got {completion_window}")
    hook = webhook_url or principal.webhook_url
    # Decoding, cutting and checking up to 200 MB happen in the thread pool, off the event loop; the body is
    # handed over (not kept here), so that it is let go of once decoded.
    received = [await body_bytes(request, MAX_BATCH_BODY)]
    view = await call(
        _submit_batch,
        received,
        assistant_id=assistant_id,
        window=window,
        skip_invalid=skip_invalid,
        webhook_url=hook,
        actor=principal.actor,
        settings=_ctx(request).settings,
    )
    body = view.as_dict()
    body["problems"] = [{"line": n, "detail": reason} for n, reason in view.problems]
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/batches/{view.id}"})


async def batch_for(request: Request, principal: Principal, scope: str, batch_id: str) -> Any:
    if not _plausible(batch_id):
        raise errors.BatchNotFound(batch_id[:64])
    view = await call(queries.get_batch, batch_id, settings=_ctx(request).settings)
    if scope == "own" and view.actor != principal.actor:
        raise errors.BatchNotFound(batch_id)
    return view


@router.get("/v1/batches/{batch_id}", tags=["batches"])
async def get_batch(request: Request, batch_id: str) -> Response:
    """The batch's status and counts (no PHI); an OpenAI batch's id (``batch_...``) answers in OpenAI's shape."""
    openai = _ctx(request).alternates.get("batches.retrieve")
    if openai is not None and compat.is_openai_batch_id(batch_id):
        return await openai(request, batch_id)
    principal, scope = await who(request, "batches.status")
    view = await batch_for(request, principal, scope, batch_id)
    return JSONResponse(view.as_dict())


@router.get("/v1/batches/{batch_id}/results", tags=["batches"])
async def batch_results(request: Request, batch_id: str, format: str = "jsonl", failed_only: bool = False) -> Response:
    """Every job's answer or error, by custom_id: JSON Lines (``format=jsonl``) or CSV. Audited per job."""
    principal, scope = await who(request, "batches.results")
    if format not in ("jsonl", "csv"):
        raise errors.InputError(f"format: {format!r} is not accepted; use jsonl or csv")
    await batch_for(request, principal, scope, batch_id)
    results = await call(
        queries.batch_results,
        batch_id,
        failed_only=failed_only,
        reader=principal.actor,
        settings=_ctx(request).settings,
    )

    def lines() -> Iterator[str]:  # row by row: the answer is never one more copy of every result in memory
        writer = export.write_jsonl if format == "jsonl" else export.write_csv
        for start in range(0, max(len(results), 1), 200):
            out = io.StringIO()
            if start == 0 or format == "jsonl":
                writer(results[start : start + 200], out)
            else:  # one CSV header, on the first chunk only
                csv_rows = io.StringIO()
                writer(results[start : start + 200], csv_rows)
                out.write(csv_rows.getvalue().split("\r\n", 1)[1])
            yield out.getvalue()

    media = "application/jsonl" if format == "jsonl" else "text/csv"
    return StreamingResponse(lines(), media_type=media)


@router.post("/v1/batches/{batch_id}/cancel", tags=["batches"])
async def cancel_batch(request: Request, batch_id: str) -> Response:
    """Cancel every job of the batch not finished yet; finished ones keep their results (an OpenAI batch's id,
    ``batch_...``: in OpenAI's shape)."""
    openai = _ctx(request).alternates.get("batches.cancel")
    if openai is not None and compat.is_openai_batch_id(batch_id):
        return await openai(request, batch_id)
    principal, scope = await who(request, "batches.cancel")
    await batch_for(request, principal, scope, batch_id)
    view = await call(control.cancel_batch, batch_id, actor=principal.actor, settings=_ctx(request).settings)
    return JSONResponse(view.as_dict())


# ---- audit ----


@router.get("/v1/audit/events", tags=["audit"])
async def audit_events(
    request: Request,
    job_id: str | None = None,
    batch_id: str | None = None,
    assistant_id: str | None = None,
    actor: str | None = None,
    action: str | None = None,
    outcome: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after_seq: int | None = None,
    limit: int = 100,
) -> Response:
    """Audit events oldest first, filtered as ``qbgw audit``; ``next_cursor`` (a seq) gives the next page
    as ``after_seq``. The query is itself audited."""
    principal, _ = await who(request, "audit.events")
    if not 1 <= limit <= 1000:
        raise errors.InputError(f"limit: must be between 1 and 1000, got {limit}")
    if after_seq is not None and not 0 <= after_seq <= MAX_SEQ:
        raise errors.InputError(f"after_seq: must be a seq from 0 to {MAX_SEQ}, got {after_seq}")
    filters = {"job_id": job_id, "batch_id": batch_id, "assistant_id": assistant_id, "actor": actor}
    filters.update(action=action, outcome=outcome)
    for name, value in filters.items():
        if value is not None and (len(value) > 255 or re.search(r"[\x00-\x1f\x7f]", value)):
            raise errors.InputError(f"{name}: at most 255 characters, without control characters")
    for name, when in (("since", since), ("until", until)):
        if when is not None and re.fullmatch(r"[\d.eE+-]+", request.query_params.get(name, "")):  # not a Unix time
            raise errors.InputError(f"{name}: an ISO 8601 time with a time zone (2026-12-05T10:00:00Z), not a number")
        if when is not None and when.tzinfo is None:
            raise errors.InputError(f"{name}: give a time zone (2026-12-05T10:00:00Z), got {when.isoformat()}")
    query = AuditFilter(
        job_id=job_id,
        batch_id=batch_id,
        assistant_id=assistant_id,
        actor=actor,
        action=action,
        outcome=outcome,
        since=since,
        until=until,
        limit=limit,
        after_seq=after_seq,
    )
    events = await call(queries.audit_query, query, reader=principal.actor, settings=_ctx(request).settings)
    cursor = events[-1].seq if len(events) == limit else None
    return JSONResponse({"data": [e.as_dict() for e in events], "next_cursor": cursor})


@router.post("/v1/audit/verify", tags=["audit"])
async def audit_verify(request: Request) -> Response:
    """Verify the whole chain against the signed anchors (audited). 200 either way; ``ok`` says."""
    principal, _ = await who(request, "audit.verify")
    report = await call(admin.verify_log, reader=principal.actor, settings=_ctx(request).settings)
    found = report.problem
    return JSONResponse(
        {
            "ok": report.ok,
            "events": report.events,
            "anchors": report.anchors,
            "seconds": report.seconds,
            "problem": None if found is None else {"seq": found.seq, "detail": found.message},
        }
    )


#: What a report body may hold, and the media type of each format.
REPORT_FIELDS = frozenset({"subject", "from", "to", "format"})
REPORT_TYPES = {
    "json": "application/json",
    "jsonl": "application/jsonl",
    "csv": "text/csv; charset=utf-8",
    "html": "text/html; charset=utf-8",
}


@router.post("/v1/audit/access-report", tags=["audit"], openapi_extra=_REPORT_BODY)
async def audit_access_report(request: Request) -> Response:
    """The access report of a subject (in the body, never in the URL): its jobs, their disclosures to the gateway,
    the reads of their results, with the chain's verification over the period. Auditors only; audited."""
    principal, _ = await who(request, "audit.access_report")
    raw = await body_bytes(request, 65536)
    report, fmt = await call(_access_report, raw, principal.actor, _ctx(request).settings)
    # Every format says whether the chain held, in a header too (a CSV file has no place for it).
    headers = {"Cache-Control": "no-store", "Qbgw-Chain-Ok": "true" if report.chain_ok else "false"}
    if fmt == "json":
        return JSONResponse(_report_json(report), headers=headers)
    render = {"jsonl": reports.render_jsonl, "csv": reports.render_csv, "html": reports.render_html}[fmt]
    return Response(render(report), media_type=REPORT_TYPES[fmt], headers=headers)


def _access_report(raw: bytes, actor: str, settings: Settings) -> tuple[reports.AccessReport, str]:
    data = json_object(raw)
    unknown = sorted(set(data) - REPORT_FIELDS)
    if unknown:
        raise errors.InvalidMessages(f"{unknown[0]}: not a field of a report; it has subject, from, to and format")
    fmt = data.get("format")
    fmt = "json" if fmt is None else fmt
    if not isinstance(fmt, str) or fmt not in REPORT_TYPES:
        raise errors.InvalidMessages(f"format: must be one of {', '.join(REPORT_TYPES)} (or left out: json)")
    start, end = (_report_time(name, data.get(name)) for name in ("from", "to"))
    return reports.access_report(data.get("subject"), start=start, end=end, actor=actor, settings=settings), fmt  # type: ignore[arg-type]


def _report_time(name: str, value: object) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None:
        raise errors.InvalidMessages(f"{name}: must be an ISO 8601 time, e.g. 2026-11-25T18:00:00Z")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _report_json(report: reports.AccessReport) -> dict[str, Any]:
    return {
        "subject_index": report.subject_index,
        "from": _iso(report.start),
        "to": _iso(report.end),
        "chain_ok": report.chain_ok,
        "chain_detail": report.chain_detail,
        "jobs": [j.as_dict() for j in report.jobs],
        "rows": report.rows(),
    }


def _install_handlers(app: FastAPI) -> None:
    """Every error as a problem detail."""

    async def shaped(request: Request, answer: Response) -> Response:
        # An answer made here for a path of another dialect (a key refused before its handler, a parameter of the
        # wrong type, a method or path it does not have) in that dialect's shape (ALTERNATES["error.shape"]).
        shape = _ctx(request).alternates.get("error.shape")
        return answer if shape is None else await shape(request, answer)

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> Response:
        return await shaped(request, exc.response)

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": for the access log; no one reads it

    @app.exception_handler(errors.QbgwError)
    async def _qbgw(_: Request, exc: errors.QbgwError) -> Response:
        return from_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        # Who is asking comes first: a caller without a valid key learns nothing about the parameters.
        if request.url.path.startswith("/v1/"):
            try:
                await who_any(request)
            except Refused as refused:
                return await shaped(request, refused.response)
        found = [
            {"field": ".".join(str(p) for p in e.get("loc", ())[1:]) or None, "detail": e.get("msg", "")}
            for e in exc.errors()
        ]
        return await shaped(request, problem(422, "invalid-request", "The request is invalid", errors_=found))

    app.add_middleware(_Contain)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        titles = {404: NOT_FOUND, 405: "Method not allowed"}
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method of every route of this path, not only the first route's
            allowed = {
                method
                for route in _routes(request.app.router.routes)
                if isinstance(route, APIRoute) and route.matches(request.scope)[0] is Match.PARTIAL
                for method in route.methods or ()
            }
            headers["Allow"] = ", ".join(sorted(allowed)) or headers.get("Allow", "")
        answer = problem(
            exc.status_code,
            "not-found" if exc.status_code == 404 else "http",
            titles.get(exc.status_code, str(exc.detail)),
            f"no such path: {request.url.path[:200]}" if exc.status_code == 404 else None,
            headers=headers,
        )
        return await shaped(request, answer)


def _routes(routes: Iterable[Any]) -> Iterator[Any]:
    """Every route, those of included routers too (FastAPI keeps an included router whole; ours have no prefix)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _routes(inner.routes)
        else:
            yield route


class _Contain:
    """Every unexpected error as a 500 problem detail, logged by its class alone: not Starlette's handler for
    Exception, which re-raises after it, so the server's log would get the traceback with the SQL statement and
    its parameters in it. Plain ASGI: Starlette's ``BaseHTTPMiddleware`` (a task group and two memory streams
    per request) cost about a tenth of a ``POST /v1/jobs``'s CPU (py-spy, bench/api.py)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = scope.get("raw_path")
        if raw and _ENCODED_SLASH.search(raw):
            scope = {**scope, "path": _routed_path(raw)}
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except ClientDisconnect:  # the client hung up while sending its body: no one to answer, nothing wrong here
            log.info("client hung up during %s %s", scope.get("method"), scope.get("path"))
        except Exception as exc:
            log.error("unexpected %s answering %s %s", type(exc).__name__, scope.get("method"), scope.get("path"))
            if not started:  # (else the answer is cut short: the server closes the connection)
                await problem(500, "internal", "Internal error", "the operator is told")(scope, receive, send)


_ENCODED_SLASH = re.compile(rb"%2[fF]")


def _routed_path(raw: bytes) -> str:
    """The path to route, percent-decoded but for an encoded slash, which stays ``%2F``: the servers decode it
    into a ``/`` before routing, so ``/v1/jobs/ID%2Fresult`` read ID's result (role-checked and audited, but a
    proxy's rule by path saw a status read). It is part of the segment it is in, as RFC 3986 has it."""
    text = raw.decode("ascii", "replace")  # a request target is ASCII; the servers decode it so too
    return "%2F".join(unquote(piece) for piece in re.split("%2[fF]", text))


#: The query parameters' bounds, for the OpenAPI document (the checks are the handlers' own).
_BOUNDS: dict[tuple[str, str], tuple[float, float]] = {
    ("*", "wait"): (0, MAX_WAIT),
    ("/v1/audit/events", "limit"): (1, 1000),
    ("/v1/audit/events", "after_seq"): (0, MAX_SEQ),
    ("/v1/files", "limit"): (1, compat.MAX_PAGE),
    ("/v1/batches", "limit"): (1, 100),
}


def _secure_openapi(app: FastAPI) -> None:
    """The OpenAPI document names the bearer key every /v1 operation needs (the docs page's Authorize), and the
    errors each answers, in the shape it sends them (:mod:`qbgw.api.document`)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "a key from `qbgw api-keys create`"}
            }
            for path, operations in schema["paths"].items():
                if path.startswith("/v1/"):
                    for operation in operations.values():
                        operation["security"] = [{"apiKey": []}]
            describe_errors(schema, _BOUNDS)
            describe_successes(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


#: The largest ``POST /v1/jobs`` body validated on the event loop when it is text only (see ``submit_job``).
ON_LOOP_BYTES = 64 * 1024


@dataclass
class _Job:
    """A ``POST /v1/jobs`` body, validated: ``new`` when it is stored by the intake; else the Idempotency-Key
    scoped to its principal, or the webhook URL, it is stored with (by ``submit()``)."""

    data: dict[str, Any]
    new: NewJob | None = None
    scoped: str | None = None
    webhook: str | None = None


def _job_body(raw: bytes) -> dict[str, Any]:
    data = json_object(raw)
    unknown = sorted(set(data) - JOB_FIELDS)
    if unknown:
        raise errors.InvalidMessages(
            f"{unknown[0]}: not a field of a job; a job has assistant_id (or smart_chat_assistant_id), "
            "messages, custom_id, subject and webhook_url"
        )
    # The assistant, by either name (null: not given); an error names the field the client sent.
    given = [name for name in ("assistant_id", "smart_chat_assistant_id") if data.get(name) is not None]
    if len(given) == 2 and data["assistant_id"] != data["smart_chat_assistant_id"]:
        raise errors.InvalidMessages(
            "smart_chat_assistant_id: differs from assistant_id; give the assistant once, by either name"
        )
    name = given[0] if given else "assistant_id"
    data["assistant_id"] = validate_assistant_id(data.get(name), field=name)
    data.pop("smart_chat_assistant_id", None)
    return data


def _text_only(data: dict[str, Any]) -> bool:
    """Whether the job's messages hold text parts only (nothing to decode or read): a guess made before they are
    validated, so anything unexpected is False (validated in a thread, where the errors are the same)."""
    messages = data.get("messages")
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
                return False
        elif not isinstance(content, str):
            return False
    return True


def _prepare(data: dict[str, Any], principal: Principal, idempotency: str | None, settings: Settings) -> _Job:
    """Validate a job's body for ``principal``. One without an Idempotency-Key or a webhook is made here, as
    ``submit()`` makes it, and stored by the intake (:mod:`qbgw.api.intake`)."""
    scoped = None
    if idempotency is not None:
        validate_key("Idempotency-Key", idempotency)
        # Keys are per principal: another key's identical Idempotency-Key is another job, never this one's.
        scoped = "api:" + hashlib.sha256(f"{principal.actor}\x00{idempotency}".encode()).hexdigest()
    webhook = data.get("webhook_url") or principal.webhook_url
    if scoped is not None or webhook is not None:
        return _Job(data, scoped=scoped, webhook=webhook)
    new = producer.new_job(
        runtime(settings),
        data.get("assistant_id", data.get("smart_chat_assistant_id")),  # type: ignore[arg-type]
        data.get("messages"),  # type: ignore[arg-type]
        custom_id=data.get("custom_id"),
        idempotency_key=None,
        actor=principal.actor,
        subject=data.get("subject"),
    )
    return _Job(data, new=new.made())


def _submit_alone(job: _Job, principal: Principal, idempotency: str | None, settings: Settings) -> tuple[str, bool]:
    """Submit a job with an Idempotency-Key or a webhook: (its id, announced)."""
    data = job.data
    try:
        job_id = producer.submit(
            data.get("assistant_id", data.get("smart_chat_assistant_id")),  # type: ignore[arg-type]
            data.get("messages"),  # type: ignore[arg-type]
            custom_id=data.get("custom_id"),
            subject=data.get("subject"),
            idempotency_key=job.scoped,
            webhook_url=job.webhook,
            actor=principal.actor,
            settings=settings,
        )
        return job_id, True
    except errors.NotAnnounced as exc:  # stored; the sweeper publishes it
        return exc.job_id, False
    except errors.IdempotencyConflict:  # name the key the client sent, not the one stored for its principal
        raise errors.IdempotencyConflict(
            f"Idempotency-Key {idempotency!r} already names another job of this key, with a different assistant or "
            "messages; use a new key for a new job"
        ) from None


def _submit_batch(received: list[bytes], **options: Any) -> Any:
    """The batch of a JSONL body (handed over in a list, emptied here): decoded and cut into lines, then
    :func:`qbgw.submit_batch`. Each form is let go of once the next is made: the bytes once decoded, the text
    once cut into lines (up to 200 MB each)."""
    raw = received.pop()
    if not raw:
        raise errors.InvalidBatch("the body is empty: send one JSON object per line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.InvalidBatch(f"the body is not UTF-8 (byte {exc.start})") from None
    del raw
    lines = split_lines(text)
    del text
    return producer.submit_batch(lines, **options)


def _throttled(wait: float) -> Response:
    return problem(
        429,
        "too-many-failures",
        "Too many failed authentications from this address",
        f"try again in {wait:.0f} s",
        headers={"Retry-After": str(max(1, int(wait + 0.999)))},
    )


def _too_large(limit: int) -> Response:
    return problem(413, "too-large", "The request body is too large", f"at most {limit} bytes are accepted")


#: A JSON escape of a UTF-16 surrogate (a pair decodes to one character; a lone one stays a surrogate).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object, parsed; InvalidMessages naming ``body`` for anything else,
    a lone surrogate (``"\\ud800"``: JSON, but no Unicode text; it could be stored and then never be sent)
    included."""
    import json

    try:
        data = json.loads(raw, object_pairs_hook=unique_keys)
    except DuplicateKey as exc:
        raise errors.InvalidMessages(f"body: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise errors.InvalidMessages(f"body: not valid JSON ({exc.__class__.__name__}); send a JSON object") from None
    if not isinstance(data, dict):
        raise errors.InvalidMessages(f"body: must be a JSON object, got {type(data).__name__}")
    if _SURROGATE_ESCAPE.search(raw) and _lone_surrogate(data):
        raise errors.InvalidMessages(
            "body: holds a lone UTF-16 surrogate (an escape like \\ud800 without its pair), which is not Unicode "
            "text; send UTF-8 text"
        )
    return data


def _lone_surrogate(value: Any) -> bool:
    """Whether a string anywhere in ``value`` (keys included) holds a lone surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if has_lone_surrogate(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def _status(view: JobView, batch_id: str | None) -> dict[str, Any]:
    data = view.as_dict()
    for phi in ("answer", "error", "idempotency_key"):
        data.pop(phi, None)
    data["submitted_by"] = data.pop("actor")
    data["batch_id"] = batch_id
    data["done"] = view.done
    return data
