"""Errors as RFC 9457 problem details (``application/problem+json``): ``type``, ``title``, ``status``,
``detail``, and for bad input ``errors``, a list naming each field (or batch line) and what is accepted. The
validation behind them is the Python API's own: the HTTP layer only translates its errors."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi.responses import JSONResponse

from .. import errors

__all__ = ["problem", "from_error", "field_of", "PROBLEM_TYPE"]

log = logging.getLogger(__name__)

#: The base of every problem's ``type``; the docs page of errors names each one.
PROBLEM_TYPE = "urn:qbgw:problem:"

_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]-]*): ")


def problem(
    status: int,
    slug: str,
    title: str,
    detail: str | None = None,
    *,
    errors_: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {"type": PROBLEM_TYPE + slug, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    if errors_:
        body["errors"] = errors_
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type="application/problem+json", headers=headers)


#: The title of every 404 (RFC 9457: a title does not change from occurrence to occurrence; ``detail`` says which).
NOT_FOUND = "Not found"


def field_of(message: str) -> tuple[str | None, str]:
    """("messages[0].content", "must be ...") from an input error's text "messages[0].content: must be ..."."""
    match = _FIELD.match(message)
    if match is None:
        return None, message
    return match.group(1), message[match.end() :]


def from_error(exc: errors.QbgwError) -> JSONResponse:
    """The answer for an error the library raised on purpose."""
    if isinstance(exc, errors.InvalidBatch):
        lines = [{"line": n, "detail": reason} for n, reason in exc.problems]
        return problem(422, "invalid-batch", "Lines of the batch are invalid", exc.message, errors_=lines)
    if isinstance(exc, errors.IdempotencyConflict):
        return problem(409, "idempotency-conflict", "Idempotency key reused for a different job", str(exc))
    if isinstance(exc, errors.InputError):
        field, reason = field_of(str(exc))
        return problem(
            422, "invalid-request", "The request is invalid", str(exc), errors_=[{"field": field, "detail": reason}]
        )
    if isinstance(exc, errors.JobNotFound):
        return problem(404, "not-found", NOT_FOUND, str(exc))
    if isinstance(exc, errors.BatchNotFound):
        return problem(404, "not-found", NOT_FOUND, str(exc))
    if isinstance(exc, errors.JobStateConflict):
        return problem(409, "state-conflict", "The job's status does not allow this", str(exc))
    if isinstance(exc, errors.StoreUnavailable | errors.BrokerUnavailable):
        what = "database" if isinstance(exc, errors.StoreUnavailable) else "broker"
        log.warning("answering 503: %s", exc)  # the driver's words (hosts, ports, users) stay in the log
        title, detail = "A service the server needs is unavailable", f"the {what} is unavailable; try again"
        return problem(503, "unavailable", title, detail, headers={"Retry-After": "5"})
    if isinstance(exc, errors.IntegrityError):
        log.error("integrity error answering a request: %s", type(exc).__name__)
        return problem(500, "integrity", "Stored data failed its integrity check; the operator is told")
    if isinstance(exc, errors.ConfigError):
        return _misconfigured(exc)
    log.error("unexpected %s answering a request", type(exc).__name__)
    return problem(500, "internal", "Internal error")


def _misconfigured(exc: errors.ConfigError) -> JSONResponse:
    log.error("configuration error answering a request: %s", exc)
    if isinstance(exc, errors.SubjectKeyMissing):
        detail = "this server has no subject key (QBGW_SUBJECT_KEY): subjects cannot be stored or searched"
        return problem(500, "subjects-unconfigured", "Subjects are not configured on this server", detail)
    return problem(500, "configuration", "The server is misconfigured; the operator is told")
