"""OpenAI's dialect on ``qbgw serve``: ``/v1/files``, OpenAI-style ``/v1/batches`` and ``/v1/chat/completions``,
in the shapes the official ``openai`` SDKs parse, behind the same keys and roles (docs/openai.md).

``POST /v1/batches`` is shared with qbgw's own JSON Lines batches: a body sent as ``application/json`` is
OpenAI's (``input_file_id``, ``endpoint``, ...), anything else is qbgw's. An OpenAI batch's id is ``batch_``
and 32 hex digits, a qbgw batch's a UUID, so ``GET /v1/batches/{id}`` and ``.../cancel`` answer each in its own
shape: qbgw's handlers of those paths hand OpenAI's requests to :data:`ALTERNATES`. Errors here have OpenAI's
shape, ``{"error": {"message", "type", "param", "code"}}``; another principal's file or batch is 404, as if it
did not exist.
"""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from python_multipart.multipart import MultipartParser, parse_options_header

from .. import compat, control, errors, producer, queries
from ..access import Principal
from ..batches.export import BatchResult
from ..batches.views import BatchView
from ..lifecycle import TERMINAL, JobStatus
from ..runtime.locator import runtime
from ..store.batches import BatchStatus
from ..store.jobs import NewJob
from ..store.reads import JobView
from . import app as door
from .document import request_body
from .problems import field_of, from_error

__all__ = ["router", "ALTERNATES", "CHAT_WAIT", "MAX_UPLOAD"]

router = APIRouter()

#: The longest a chat completion request waits for its job; past it the answer is 504 (the job goes on: its id
#: is in ``x-qbgw-job-id``).
CHAT_WAIT = 600.0
#: The largest multipart body of POST /v1/files: the largest file and room for the form's other parts.
MAX_UPLOAD = compat.MAX_FILE_BYTES + 65536
JOB_HEADER = "x-qbgw-job-id"
#: The bodies the document declares for the endpoints that read theirs themselves (multipart, or JSON walked
#: by hand): a client generated from /openapi.json then sends them.
_UPLOAD_BODY = request_body(
    "multipart/form-data",
    {
        "type": "object",
        "required": ["file", "purpose"],
        "properties": {
            "file": {
                "type": "string",
                "format": "binary",
                "description": f"JSON Lines, UTF-8, at most {compat.MAX_FILE_BYTES} bytes",
            },
            "purpose": {"type": "string", "enum": list(compat.PURPOSES)},
        },
    },
)
_CHAT_BODY = request_body(
    "application/json",
    {
        "type": "object",
        "required": ["model", "messages"],
        "description": "Any other parameter is refused unless null: the assistant's own settings decide the model, "
        "sampling and tools",
        "properties": {
            "model": {"type": "string", "description": "the Smart Chat assistant's id"},
            "messages": {
                "type": "array",
                "description": "OpenAI-format messages (text and image_url parts)",
                "items": {"type": "object"},
            },
            "n": {"type": ["integer", "null"], "enum": [1, None]},
            "stream": {"type": ["boolean", "null"], "enum": [False, None]},
        },
        "additionalProperties": {"type": "null"},
    },
    {"model": "65d5f3473d5d68095462165d", "messages": [{"role": "user", "content": "Hello"}]},
)
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.extra = extra

    def response(self) -> JSONResponse:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        body: dict[str, Any] = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        body.update(self.extra)
        return JSONResponse({"error": body}, status_code=self.status, headers=self.headers)


def _from_refused(refused: door.Refused) -> OpenAIError:
    answer = refused.response
    try:
        found = json.loads(bytes(answer.body))
    except ValueError:
        found = {}
    message = ": ".join(str(found[k]) for k in ("title", "detail") if found.get(k))
    headers = {k: v for k, v in answer.headers.items() if k.lower() in ("retry-after", "www-authenticate")}
    return OpenAIError(
        answer.status_code, message or "refused", code=str(found.get("type", "")).rsplit(":", 1)[-1], headers=headers
    )


def _from_error(exc: errors.QbgwError) -> OpenAIError:
    if isinstance(exc, errors.InvalidBatch):
        lines = [{"line": n, "param": field_of(reason)[0], "message": reason} for n, reason in exc.problems]
        shown = "; ".join(f"line {line['line']}: {line['message']}" for line in lines[:5])
        more = f" (and {len(lines) - 5} more)" if len(lines) > 5 else ""
        return OpenAIError(
            400,
            f"The input file is invalid; nothing was stored: {shown or exc.message}{more}",
            param="input_file_id",
            code="invalid_batch",
            lines=lines,
        )
    if isinstance(exc, errors.InputError):
        param, _ = field_of(str(exc))
        code = "unsupported_parameter" if "not supported by the gateway" in str(exc) else "invalid_value"
        return OpenAIError(400, str(exc), param=param, code=code)
    if isinstance(exc, errors.FileNotFound):
        return OpenAIError(404, f"No such File object: {exc.file_id}", param=exc.param, code="not_found")
    if isinstance(exc, errors.BatchNotFound):
        return OpenAIError(404, f"No such Batch object: {exc.batch_id}", param=exc.param, code="not_found")
    if isinstance(exc, errors.JobStateConflict):
        return OpenAIError(409, str(exc), code="state_conflict")
    answer = from_error(exc)  # 5xx: the same words (and logging) as qbgw's own endpoints
    found = json.loads(bytes(answer.body))
    headers = {k: v for k, v in answer.headers.items() if k.lower() == "retry-after"}
    message = ": ".join(str(found[k]) for k in ("title", "detail") if found.get(k))
    return OpenAIError(answer.status_code, message, code="unavailable", headers=headers)


def openai_errors(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Every refusal and error of ``handler`` in OpenAI's error shape."""

    @functools.wraps(handler)
    async def wrapped(*args: Any, **kwargs: Any) -> Response:
        try:
            return await handler(*args, **kwargs)
        except OpenAIError as exc:
            return exc.response()
        except door.Refused as refused:
            if refused.delay > 0:
                await asyncio.sleep(refused.delay)
            return _from_refused(refused).response()
        except errors.QbgwError as exc:
            return _from_error(exc).response()

    return wrapped


def _epoch(when: datetime | None) -> int | None:
    return None if when is None else int(when.timestamp())


def _owner(principal: Principal, scope: str) -> str | None:
    return principal.actor if scope == "own" else None


# ---- files ----


def _file(info: compat.FileInfo, *, show_name: bool) -> dict[str, Any]:
    return {
        "id": info.id,
        "object": "file",
        "bytes": info.bytes,
        "created_at": _epoch(info.created_at),
        "filename": info.filename if show_name else None,
        "purpose": info.purpose,
        "status": "deleted" if info.deleted_at is not None else "processed",
        "status_details": None,
        "expires_at": None,
    }


def _may_read(principal: Principal, permission: str) -> bool:
    try:
        door.allowed(principal, permission)
        return True
    except door.Refused:
        return False


class _Multipart:
    """A multipart/form-data body parsed as it arrives (:meth:`write` each chunk): its parts by name, (file name,
    bytes), in memory (never a temporary file), without the whole body held beside them."""

    def __init__(self, content_type: str) -> None:
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise errors.InputError("file: send multipart/form-data with a file part and a purpose part")
        self.parts: dict[str, tuple[str | None, bytes]] = {}
        self._field, self._value = b"", b""
        self._headers: dict[bytes, bytes] = {}
        self._data: list[bytes] = []
        callbacks: Any = {
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
        }
        self._parser = MultipartParser(boundary, callbacks)

    def write(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except Exception as exc:  # python-multipart's errors: a malformed body
            raise errors.InputError(f"file: the multipart body is malformed ({type(exc).__name__})") from None

    def finish(self) -> dict[str, tuple[str | None, bytes]]:
        try:
            self._parser.finalize()
        except Exception as exc:
            raise errors.InputError(f"file: the multipart body is malformed ({type(exc).__name__})") from None
        return self.parts

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._data.append(data[start:end])

    def _on_part_end(self) -> None:
        _, disposition = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        data, self._headers, self._data = self._data, {}, []
        content = b"".join(data)
        del data[:]  # (the pieces go as the part is joined)
        self.parts[name] = (None if filename is None else filename.decode("utf-8", "replace"), content)


async def _parts(request: Request) -> list[dict[str, tuple[str | None, bytes]]]:
    """The multipart body's parts, parsed as the body arrives (413 past MAX_UPLOAD), in a list to hand over."""
    form = _Multipart(request.headers.get("content-type", ""))
    async for chunk in door.body_chunks(request, MAX_UPLOAD):
        form.write(chunk)
    return [form.finish()]


def _upload(handed: list[dict[str, tuple[str | None, bytes]]], actor: str, settings: Any) -> compat.FileInfo:
    """Store the uploaded file of the parts in ``handed`` (taken out of it: the file's bytes are let go of once
    decoded)."""
    parts = handed.pop()
    if "file" not in parts:
        raise errors.InputError("file: required, the part holding the JSON Lines file")
    unknown = sorted(set(parts) - {"file", "purpose"})
    if unknown:  # expires_after and the like: refused by name, never dropped
        raise errors.InputError(f"{unknown[0]}: not supported; a file upload has the parts file and purpose")
    if "purpose" not in parts:
        raise errors.InputError("purpose: required, the part saying what the file is for: batch")
    purpose = parts["purpose"][1].decode("utf-8", "replace")
    filename = parts["file"][0]
    content = [parts.pop("file")[1]]  # (the list holds the only reference)
    del parts
    return compat.upload_handed(content, filename=filename, purpose=purpose, actor=actor, settings=settings)


@router.post("/v1/files", tags=["openai"], openapi_extra=_UPLOAD_BODY)
@openai_errors
async def upload_file(request: Request) -> Response:
    """Upload a JSON Lines file for a batch (multipart: ``file`` and ``purpose=batch``), at most 200 MB, parsed
    in memory as it arrives and stored encrypted."""
    principal, _ = await door.who(request, "files.upload")
    settings = door._ctx(request).settings
    info = await door.call(_upload, await _parts(request), principal.actor, settings)
    return JSONResponse(_file(info, show_name=True))


@router.get("/v1/files", tags=["openai"])
@openai_errors
async def list_files(
    request: Request, purpose: str | None = None, after: str | None = None, limit: int = 100, order: str = "desc"
) -> Response:
    """The files this key may see (a submitter: its own), newest first (``order=asc``: oldest first)."""
    principal, scope = await door.who(request, "files.status")
    if not 1 <= limit <= compat.MAX_PAGE:
        raise errors.InputError(f"limit: must be between 1 and {compat.MAX_PAGE}, got {limit}")
    if order not in ("asc", "desc"):
        raise errors.InputError(f"order: {order[:10]!r} is not accepted; use asc or desc")
    found = await door.call(
        compat.list_files,
        owner=_owner(principal, scope),
        purpose=purpose,
        after=after,
        limit=limit + 1,
        newest_first=order == "desc",
        settings=door._ctx(request).settings,
    )
    show = _may_read(principal, "files.content")
    data = [_file(info, show_name=show) for info in found[:limit]]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(found) > limit,
        }
    )


@router.get("/v1/files/{file_id}", tags=["openai"])
@openai_errors
async def retrieve_file(request: Request, file_id: str) -> Response:
    """A file's metadata (its name only to roles that may read its content)."""
    principal, scope = await door.who(request, "files.status")
    settings = door._ctx(request).settings
    generated = await _generated(request, principal, "batches.status", file_id)
    if generated is not None:
        return JSONResponse(generated[1])
    info = await door.call(compat.file_info, file_id, owner=_owner(principal, scope), settings=settings)
    return JSONResponse(_file(info, show_name=_may_read(principal, "files.content")))


@router.get("/v1/files/{file_id}/content", tags=["openai"])
@openai_errors
async def file_content(request: Request, file_id: str) -> Response:
    """A file's content (PHI: audited ``file.read``); a batch's output or error file is made from its results
    (audited ``result.read`` per job)."""
    principal, scope = await door.who(request, "files.content")
    generated = await _generated(request, principal, "batches.results", file_id)
    if generated is not None:
        return await _results_file(request, principal, generated[0], file_id)
    content = await door.call(
        compat.file_content,
        file_id,
        reader=principal.actor,
        owner=_owner(principal, scope),
        settings=door._ctx(request).settings,
    )
    return Response(content, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}", tags=["openai"])
@openai_errors
async def delete_file(request: Request, file_id: str) -> Response:
    """Erase a file's content and name (audited ``file.deleted``); its id then answers 404."""
    principal, scope = await door.who(request, "files.delete")
    if file_id.startswith(("file-output-", "file-errors-")):
        raise errors.InputError(
            "file_id: a batch's output and error files are made from its results when read; `qbgw purge` erases them"
        )
    await door.call(
        compat.delete_file,
        file_id,
        actor=principal.actor,
        owner=_owner(principal, scope),
        settings=door._ctx(request).settings,
    )
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


# ---- a batch's output and error files: made from its results when read, never stored twice ----


def _output_ids(batch_id: str) -> tuple[str, str]:
    hexed = uuid.UUID(batch_id).hex
    return f"file-output-{hexed}", f"file-errors-{hexed}"


async def _generated(
    request: Request, principal: Principal, permission: str, file_id: str
) -> tuple[compat.OpenAIBatchInfo, dict[str, Any]] | None:
    """(the batch, the file's metadata) when ``file_id`` names a batch's output or error file, else None."""
    for prefix, purpose in (("file-output-", "batch_output"), ("file-errors-", "batch_output")):
        if file_id.startswith(prefix):
            scope = door.allowed(principal, permission)
            try:
                batch_id = str(uuid.UUID(file_id[len(prefix) :]))
            except ValueError:
                raise errors.FileNotFound(file_id[:64]) from None
            try:
                info = await door.call(
                    compat.get_batch, batch_id, owner=_owner(principal, scope), settings=door._ctx(request).settings
                )
            except errors.BatchNotFound:
                raise errors.FileNotFound(file_id) from None
            if file_id not in (_batch(info)["output_file_id"], _batch(info)["error_file_id"]):
                raise errors.FileNotFound(file_id)  # not made yet: the batch has not ended, or has no such lines
            meta = {
                "id": file_id,
                "object": "file",
                "bytes": None,
                "created_at": _epoch(info.view.completed_at or info.view.cancelled_at or info.view.expired_at),
                "filename": ("batch_output" if prefix == "file-output-" else "batch_errors") + ".jsonl",
                "purpose": purpose,
                "status": "processed",
                "status_details": None,
                "expires_at": None,
            }
            return info, meta
    return None


def _completion(result: BatchResult) -> dict[str, Any]:
    hexed = result.job_id.replace("-", "")
    return {
        "id": f"chatcmpl-{hexed}",
        "object": "chat.completion",
        "created": _epoch(result.finished_at or result.created_at),
        "model": result.assistant_id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.answer, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": None,
        "system_fingerprint": None,
    }


def _line(result: BatchResult, endpoint: str, expired: bool) -> dict[str, Any]:
    hexed = result.job_id.replace("-", "")
    line: dict[str, Any] = {"id": f"batch_req_{hexed}", "custom_id": result.custom_id, "response": None, "error": None}
    erased = result.purged or (result.status is JobStatus.SUCCEEDED and result.answer is None)
    if erased and result.status is not JobStatus.CANCELLED:  # (a cancellation's reason holds no PHI: kept)
        what = "answer" if result.status is JobStatus.SUCCEEDED else "error"
        line["error"] = {
            "code": "purged",
            "message": f"the {what} was erased by qbgw purge (qbgw job {result.job_id})",
        }
    elif result.status is JobStatus.SUCCEEDED:
        body: dict[str, Any] = _completion(result) if endpoint == compat.ENDPOINTS[0] else {"answer": result.answer}
        line["response"] = {"status_code": 200, "request_id": result.job_id, "body": body}
    elif result.status is JobStatus.CANCELLED:
        code = "batch_expired" if result.error_class == "Expired" or expired else "batch_cancelled"
        words = (
            "the batch expired before this request was run" if code == "batch_expired" else "the batch was cancelled"
        )
        line["error"] = {"code": code, "message": words + " (qbgw job " + result.job_id + ")"}
    elif result.http_status is not None:
        error = {"message": result.error, "type": result.error_class, "param": None, "code": result.error_class}
        line["response"] = {"status_code": result.http_status, "request_id": result.job_id, "body": {"error": error}}
    else:
        line["error"] = {"code": result.error_class or "failed", "message": result.error}
    return line


async def _results_file(request: Request, principal: Principal, info: compat.OpenAIBatchInfo, file_id: str) -> Response:
    batch_id = compat.batch_id_of(info.id)
    # Only the file's own jobs are read (and audited as read): the output file's answers, the error file's errors.
    statuses = (JobStatus.SUCCEEDED,) if file_id.startswith("file-output-") else (JobStatus.FAILED, JobStatus.CANCELLED)
    chosen = await door.call(
        queries.batch_results,
        batch_id,
        statuses=statuses,
        reader=principal.actor,
        settings=door._ctx(request).settings,
    )
    expired = info.view.status is BatchStatus.EXPIRED

    def lines() -> Iterator[str]:
        for start in range(0, len(chosen), 200):
            yield "".join(
                json.dumps(_line(r, info.endpoint, expired), ensure_ascii=False) + "\n"
                for r in chosen[start : start + 200]
            )

    return StreamingResponse(lines(), media_type="application/octet-stream")


# ---- batches ----


def _status(view: BatchView) -> str:
    if view.status is BatchStatus.CANCELLED:
        return "cancelling" if view.pending else "cancelled"
    if view.status is BatchStatus.EXPIRED:  # its jobs still running end first (their lines go in the files)
        return "finalizing" if view.pending else "expired"
    return str(view.status)  # validating, in_progress, completed: the same words


def _batch(info: compat.OpenAIBatchInfo, *, show_metadata: bool = True) -> dict[str, Any]:
    """The batch object; ``show_metadata``: False for a role that may not read content (metadata is the
    submitter's free text, stored encrypted as PHI; hidden as a file's name is)."""
    view = info.view
    output_id, errors_id = _output_ids(view.id)
    ended = view.done
    failed = view.failed + view.cancelled
    status = _status(view)
    return {
        "id": info.id,
        "object": "batch",
        "endpoint": info.endpoint,
        "errors": None,
        "input_file_id": info.input_file_id,
        "completion_window": info.completion_window,
        "status": status,
        "output_file_id": output_id if ended and view.succeeded else None,
        "error_file_id": errors_id if ended and failed else None,
        "created_at": _epoch(view.created_at),
        "in_progress_at": _epoch(view.in_progress_at),
        "expires_at": _epoch(view.expires_at),
        "finalizing_at": _epoch(view.expired_at),
        "completed_at": _epoch(view.completed_at),
        "failed_at": None,
        "expired_at": _epoch(view.expired_at) if status == "expired" else None,
        "cancelling_at": _epoch(view.cancelled_at),
        "cancelled_at": _epoch(view.cancelled_at) if status == "cancelled" else None,
        "request_counts": {"total": view.total, "completed": view.succeeded, "failed": failed},
        "metadata": info.metadata if show_metadata else None,
        # qbgw's own words beside OpenAI's (the SDKs keep unknown fields): the batch behind it and its summary.
        "qbgw": {"batch_id": view.id, "summary": view.summary, "cancelled": view.cancelled, "pending": view.pending},
    }


BATCH_FIELDS = frozenset({"input_file_id", "endpoint", "completion_window", "metadata"})


@openai_errors
async def create_batch(request: Request) -> Response:
    principal, _ = await door.who(request, "batches.submit")
    data = door.json_object(await door.body_bytes(request, 65536))
    unknown = sorted(set(data) - BATCH_FIELDS)
    if unknown:
        raise errors.InputError(
            f"{unknown[0]}: not a field of a batch; a batch has input_file_id, endpoint, completion_window and metadata"
        )
    for name in ("input_file_id", "endpoint"):
        if not isinstance(data.get(name), str):
            raise errors.InputError(f"{name}: required, a string")
    info = await door.call(
        compat.create_batch,
        data["input_file_id"],
        endpoint=data["endpoint"],
        completion_window=data.get("completion_window", "24h"),
        metadata=data.get("metadata"),
        actor=principal.actor,
        owner=principal.actor,  # a batch is made only from the submitter's own file
        # ?webhook_url= as on qbgw's own POST /v1/batches (the body is OpenAI's, which has no such field)
        webhook_url=request.query_params.get("webhook_url") or principal.webhook_url,
        settings=door._ctx(request).settings,
    )
    return JSONResponse(_batch(info))


@router.get("/v1/batches", tags=["openai"])
@openai_errors
async def list_batches(request: Request, after: str | None = None, limit: int = 20) -> Response:
    """The OpenAI batches this key may see (a submitter: its own), newest first."""
    principal, scope = await door.who(request, "batches.status")
    if not 1 <= limit <= 100:
        raise errors.InputError(f"limit: must be between 1 and 100, got {limit}")
    found = await door.call(
        compat.list_batches,
        owner=_owner(principal, scope),
        after=after,
        limit=limit + 1,
        settings=door._ctx(request).settings,
    )
    show = _may_read(principal, "files.content")
    data = [_batch(info, show_metadata=show) for info in found[:limit]]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(found) > limit,
        }
    )


@openai_errors
async def _retrieve_batch(request: Request, openai_id: str) -> Response:
    principal, scope = await door.who(request, "batches.status")
    info = await door.call(
        compat.get_batch,
        compat.batch_id_of(openai_id),
        owner=_owner(principal, scope),
        settings=door._ctx(request).settings,
    )
    return JSONResponse(_batch(info, show_metadata=_may_read(principal, "files.content")))


@openai_errors
async def _cancel_batch(request: Request, openai_id: str) -> Response:
    principal, scope = await door.who(request, "batches.cancel")
    settings = door._ctx(request).settings
    batch_id = compat.batch_id_of(openai_id)
    await door.call(compat.get_batch, batch_id, owner=_owner(principal, scope), settings=settings)
    await door.call(control.cancel_batch, batch_id, actor=principal.actor, settings=settings)
    info = await door.call(compat.get_batch, batch_id, settings=settings)
    return JSONResponse(_batch(info, show_metadata=_may_read(principal, "files.content")))


# ---- chat completions ----


def _chat_job(data: dict[str, Any], principal: Principal, settings: Any) -> tuple[str, NewJob | None]:
    """The model of a chat completion request, and its job made as ``submit()`` makes it, for the intake; None
    when the key has a webhook (the job is then stored by ``submit()``, with it: :func:`_submit_chat`)."""
    from ..messages import chat_request

    model, messages = chat_request(data)
    if principal.webhook_url is not None:
        return str(model), None
    new = producer.new_job(
        runtime(settings),
        model,  # type: ignore[arg-type]
        messages,  # type: ignore[arg-type]
        custom_id=None,
        idempotency_key=None,
        actor=principal.actor,
        subject=None,
    )
    return str(model), new.made()


def _submit_chat(data: dict[str, Any], principal: Principal, settings: Any) -> str:
    from ..messages import chat_request

    model, messages = chat_request(data)
    try:
        return producer.submit(
            model,  # type: ignore[arg-type]
            messages,  # type: ignore[arg-type]
            actor=principal.actor,
            webhook_url=principal.webhook_url,
            settings=settings,
        )
    except errors.NotAnnounced as exc:  # stored; the sweeper publishes it
        return exc.job_id


@router.post("/v1/chat/completions", tags=["openai"], openapi_extra=_CHAT_BODY)
@openai_errors
async def chat_completions(request: Request) -> Response:
    """A chat completion: ``model`` is the Smart Chat assistant's id; queued as a qbgw job (its id in the
    ``x-qbgw-job-id`` header), waited for (woken by the database), answered as a ``chat.completion``."""
    principal, _ = await door.who(request, "jobs.submit")
    context = door._ctx(request)
    raw = await door.body_bytes(request, context.settings.max_request_bytes + 65536)
    settings = context.settings
    # As POST /v1/jobs: a small text-only body is validated on the event loop, and its job stored by the intake.
    parsed = door.json_object(raw) if len(raw) <= door.ON_LOOP_BYTES else None
    if parsed is not None and door._text_only(parsed):
        data = parsed
        model, new = _chat_job(data, principal, settings)
    else:
        data, (model, new) = await door.call(
            lambda: (body := parsed or door.json_object(raw), _chat_job(body, principal, settings))
        )
    if new is not None:
        job_id = new.id
        await context.intake(runtime(settings)).submit_async(new)
    else:
        job_id = await door.call(_submit_chat, data, principal, settings)
    header = {JOB_HEADER: job_id}

    def attempt() -> tuple[bool, JobStatus | JobView]:
        status = queries.job_status(job_id, settings=context.settings)
        return status in TERMINAL, status

    def read() -> tuple[bool, JobStatus | JobView]:  # the database said it ended: the answer at once
        view = queries.get_job(job_id, reader=principal.actor, settings=context.settings)
        return view.status in TERMINAL, view  # (not ended: replayed meanwhile; the wait goes on)

    found = await door._long_poll(request, job_id, CHAT_WAIT, attempt, read)
    if (found.status if isinstance(found, JobView) else found) not in TERMINAL:
        raise OpenAIError(
            504,
            f"the job has not ended within {CHAT_WAIT:g} s; it goes on: GET /v1/jobs/{job_id}",
            code="timeout",
            headers={**header, "x-should-retry": "false"},
        )
    view = (
        found
        if isinstance(found, JobView)
        else await door.call(queries.get_job, job_id, reader=principal.actor, settings=context.settings)
    )
    if view.status is JobStatus.SUCCEEDED:
        result = BatchResult(
            custom_id=job_id,
            job_id=job_id,
            status=view.status,
            assistant_id=model,
            answer=view.answer,
            error=None,
            error_class=None,
            http_status=None,
            attempts=view.attempts,
            created_at=view.created_at,
            finished_at=view.finished_at,
        )
        return JSONResponse(_completion(result), headers=header)
    # qbgw has already retried what was worth retrying: the SDK must not send the request again.
    final = {**header, "x-should-retry": "false"}
    if view.status is JobStatus.CANCELLED:
        raise OpenAIError(409, "the job was cancelled before it was answered", code="cancelled", headers=final)
    upstream = view.http_status
    raise OpenAIError(
        # (a gateway's 405 says its AI feature is off: no method of this endpoint is wrong, so no Allow to give)
        upstream if upstream is not None and 400 <= upstream < 500 and upstream not in (401, 403, 405, 429) else 502,
        f"the gateway did not answer: {view.error_class}: {view.error}",
        code=view.error_class,
        headers=final,
    )


def _is_ours(path: str) -> bool:
    """Whether a path is one of this dialect's alone (qbgw's /v1/batches decides by the request, in its handler)."""
    if path.startswith(("/v1/files", "/v1/chat/completions")):
        return True
    parts = path.split("/")
    return len(parts) > 3 and parts[2] == "batches" and compat.is_openai_batch_id(parts[3])


async def _error_shape(request: Request, answer: Response) -> Response:
    """A problem detail made before a handler of this dialect ran (a key refused, a parameter of the wrong type, a
    method or path it does not have), in OpenAI's error shape; any other answer as it is."""
    if not _is_ours(request.url.path) or not answer.headers.get("content-type", "").startswith(
        "application/problem+json"
    ):
        return answer
    try:
        found = json.loads(bytes(answer.body))
    except ValueError:
        found = {}
    listed = found.get("errors") or []
    first = listed[0] if listed and isinstance(listed[0], dict) else {}
    words = [str(found[k]) for k in ("title", "detail") if found.get(k)]
    words += [f"{e.get('field')}: {e.get('detail')}" if e.get("field") else str(e.get("detail")) for e in listed[:5]]
    status = 400 if answer.status_code == 422 else answer.status_code  # a bad value: OpenAI's 400
    keep = ("retry-after", "www-authenticate", "allow")
    headers = {k: v for k, v in answer.headers.items() if k.lower() in keep}
    code = str(found.get("type", "")).rsplit(":", 1)[-1] or None
    return OpenAIError(
        status, ": ".join(words) or "refused", param=first.get("field"), code=code, headers=headers
    ).response()


#: The requests to qbgw's own batch paths that are OpenAI's (see ``app.ALTERNATES``), and how an answer made before
#: one of this dialect's handlers ran is shaped ("error.shape").
ALTERNATES: dict[str, Callable[..., Awaitable[Response]]] = {
    "batches.create": create_batch,
    "batches.retrieve": _retrieve_batch,
    "batches.cancel": _cancel_batch,
    "error.shape": _error_shape,
}
