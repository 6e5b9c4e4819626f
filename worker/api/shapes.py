"""The OpenAPI document's successes: the JSON each ``/v1`` operation of qbgw's dialect answers with, as JSON
Schema. The views the answers are made of (``JobView``, ``BatchView``, ``AuditRecord``, ``JobSummary``) give
their schemas from their own fields, so a field added to a view is in the document too; the few answers made
by hand are written here beside nothing else. ``tests/e2e/test_api.py`` checks real answers against them."""

from __future__ import annotations

import dataclasses
import types
import typing
from datetime import datetime
from enum import Enum
from typing import Any

from ..audit.events import AuditRecord
from ..batches.views import BatchView
from ..reports import JobSummary
from ..store.reads import JobView

__all__ = ["describe_successes", "schema_of"]

_NULL = {"type": "null"}
_TEXT_OR_NULL = {"type": ["string", "null"]}
_WHEN = {"type": "string", "format": "date-time"}


def schema_of(
    cls: type,
    *,
    drop: tuple[str, ...] = (),
    rename: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    description: str = "",
) -> dict[str, Any]:
    """The JSON Schema of a view dataclass's ``as_dict()``: every field, required (``as_dict`` always gives it),
    its type from its annotation; less ``drop``, with ``rename``d keys, plus ``extra`` properties."""
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name not in drop:
            properties[(rename or {}).get(field.name, field.name)] = _type_schema(hints[field.name])
    properties.update(extra or {})
    shaped: dict[str, Any] = {"type": "object", "required": sorted(properties), "properties": properties}
    return {"description": description, **shaped} if description else shaped


def _type_schema(hint: Any) -> dict[str, Any]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and len(args) == 2:
            one = _type_schema(inner[0])
            if set(one) == {"type"} and isinstance(one["type"], str):
                return {"type": [one["type"], "null"]}
            return {"anyOf": [one, _NULL]}
        return {"anyOf": [_type_schema(a) for a in args]}
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return {"type": "array", "items": _type_schema(args[0]) if args else {}}
    if origin is dict or hint is dict:
        return {"type": "object"}
    if isinstance(hint, type) and issubclass(hint, Enum):
        return {"type": "string", "enum": [str(member.value) for member in hint]}
    simple = {bool: {"type": "boolean"}, int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"}}
    if hint in simple:
        return dict(simple[hint])
    if hint is datetime:
        return dict(_WHEN)
    raise TypeError(f"no JSON Schema for the annotation {hint!r}")


def _object(description: str, **properties: Any) -> dict[str, Any]:
    return {"type": "object", "description": description, "required": sorted(properties), "properties": properties}


_JOB_STATUS = schema_of(JobView, drop=("answer", "error", "idempotency_key"), rename={"actor": "submitted_by"})
_JOB_STATUS["properties"].update(batch_id=_TEXT_OR_NULL, done={"type": "boolean"})
_JOB_STATUS["required"] = sorted(_JOB_STATUS["properties"])
_STATUS_VALUES = _JOB_STATUS["properties"]["status"]
_BATCH = schema_of(
    BatchView,
    drop=("problems",),
    extra={"summary": {"type": "string", "description": "a sentence of the counts"}},
    description="A batch: its status, counts and times",
)
_EVENTS = {"type": "array", "items": {"$ref": "#/components/schemas/AuditEvent"}}

#: The components the successes name.
COMPONENTS: dict[str, dict[str, Any]] = {
    "JobStatus": {"description": "A job's status and metadata, never its messages nor answer", **_JOB_STATUS},
    "Batch": _BATCH,
    "AuditEvent": schema_of(AuditRecord, description="An audit event (no PHI: digests and sizes)"),
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


#: Each JSON success of qbgw's dialect, by (method, path).
SUCCESSES: dict[tuple[str, str], dict[str, Any]] = {
    ("get", "/readyz"): _object(
        "ready, or (503) not ready, naming each check",
        status={"type": "string", "enum": ["ready", "not ready"]},
        checks={"type": "array", "items": _object("a check", name={"type": "string"}, ok={"type": "boolean"})},
    ),
    ("post", "/v1/jobs"): _object(
        "the job queued (or, with an Idempotency-Key seen before, the first job of that key as it is now)",
        id={"type": "string"},
        status=_STATUS_VALUES,
        custom_id=_TEXT_OR_NULL,
        done={"type": "boolean"},
        announced={"type": "boolean", "description": "published to the broker now (else the sweeper does)"},
    ),
    ("get", "/v1/jobs/{job_id}"): _ref("JobStatus"),
    ("get", "/v1/jobs/{job_id}/result"): _object(
        "the answer, or the error, of a job that has ended (an audited read)",
        id={"type": "string"},
        status=_STATUS_VALUES,
        custom_id=_TEXT_OR_NULL,
        answer=_TEXT_OR_NULL,
        error={
            "anyOf": [
                _object(
                    "why the job failed or was cancelled",
                    **{"class": _TEXT_OR_NULL, "message": _TEXT_OR_NULL, "http_status": {"type": ["integer", "null"]}},
                ),
                _NULL,
            ]
        },
        finished_at={"type": ["string", "null"], "format": "date-time"},
    ),
    ("post", "/v1/jobs/{job_id}/cancel"): _object(
        "cancelled at once, or running (cancelled when its attempt ends)", id={"type": "string"}, status=_STATUS_VALUES
    ),
    ("post", "/v1/jobs/{job_id}/replay"): _object(
        "queued again with a fresh budget of attempts",
        id={"type": "string"},
        status={"type": "string", "enum": ["queued"]},
        next_attempt={"type": "integer"},
    ),
    ("get", "/v1/jobs/{job_id}/events"): _object("the job's audit trail, oldest first", data=_EVENTS),
    ("post", "/v1/batches"): {
        "allOf": [
            _ref("Batch"),
            _object(
                "the lines skipped as invalid (with skip_invalid)",
                problems={
                    "type": "array",
                    "items": _object("a line", line={"type": "integer"}, detail={"type": "string"}),
                },
            ),
        ]
    },
    ("get", "/v1/batches/{batch_id}"): _ref("Batch"),
    ("post", "/v1/batches/{batch_id}/cancel"): _ref("Batch"),
    ("get", "/v1/audit/events"): _object(
        "audit events oldest first",
        data=_EVENTS,
        next_cursor={"type": ["integer", "null"], "description": "the after_seq of the next page, if there may be one"},
    ),
    ("post", "/v1/audit/verify"): _object(
        "the whole chain verified (ok says whether it holds)",
        ok={"type": "boolean"},
        events={"type": "integer"},
        anchors={"type": "integer"},
        seconds={"type": "number"},
        problem={
            "anyOf": [
                _object("the first problem found", seq={"type": ["integer", "null"]}, detail={"type": "string"}),
                _NULL,
            ]
        },
    ),
    ("post", "/v1/audit/access-report"): _object(
        "a subject's access report (format json; the other formats are text)",
        subject_index={"type": "string"},
        **{
            "from": {"type": ["string", "null"], "format": "date-time"},
            "to": {"type": ["string", "null"], "format": "date-time"},
        },
        chain_ok={"type": "boolean"},
        chain_detail={"type": "string"},
        jobs={"type": "array", "items": schema_of(JobSummary, drop=("events",))},
        rows={
            "type": "array",
            "items": _object(
                "an event",
                time={"type": "string"},
                job_id={"type": "string"},
                kind={"type": "string"},
                actor={"type": "string"},
                detail={"type": "string"},
            ),
        },
    ),
}


def describe_successes(schema: dict[str, Any]) -> None:
    """Declare, in ``schema`` (an OpenAPI document, changed in place), the JSON each operation of
    :data:`SUCCESSES` answers with, and the components they name."""
    schema.setdefault("components", {}).setdefault("schemas", {}).update(COMPONENTS)
    for (method, path), shape in SUCCESSES.items():
        operation = schema.get("paths", {}).get(path, {}).get(method)
        if operation is None:
            continue
        responses = operation.setdefault("responses", {})
        success = next((code for code in responses if code.startswith("2")), "200")
        declared = responses.setdefault(success, {"description": "Successful Response"})
        content = declared.setdefault("content", {})
        content.setdefault("application/json", {})["schema"] = shape
