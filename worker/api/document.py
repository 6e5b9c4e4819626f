"""The OpenAPI document's errors: what each ``/v1`` operation can answer besides its success, in the shape it
answers it. FastAPI declares only a 422 of its own validation's shape (``HTTPValidationError``), which the
server never sends: its 422 is a problem detail (:mod:`qbgw.api.problems`), and the OpenAI-compatible
endpoints answer OpenAI's ``{"error": {...}}``. A client generated from the document, or a test that checks
answers against it, must find what the server does send."""

from __future__ import annotations

from typing import Any

__all__ = ["describe_errors", "request_body"]

PROBLEM_JSON = "application/problem+json"

_PROBLEM = {
    "type": "object",
    "description": "RFC 9457 problem details (docs: Errors: problem details)",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string", "description": "urn:qbgw:problem:<slug>"},
        "title": {"type": "string", "description": "a fixed sentence per type"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "description": "for 422: the field (or batch line) and what is accepted",
            "items": {
                "type": "object",
                "properties": {
                    "field": {"type": ["string", "null"]},
                    "line": {"type": "integer"},
                    "detail": {"type": "string"},
                },
            },
        },
        "job_id": {"type": "string", "description": "in not-finished: the job's id"},
    },
}

_OPENAI_ERROR = {
    "type": "object",
    "description": "OpenAI's error shape",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_WHY = {
    "400": "OpenAI's dialect: a bad body field or value; nothing was stored",
    "401": "no key, or a malformed, unknown, expired or revoked one",
    "403": "the key's role may not do this",
    "404": "no such resource, or another principal's",
    "409": "the resource's state does not allow this",
    "413": "the body is larger than the limit",
    "422": "a bad body field, header or query parameter; nothing was stored",
    "429": "too many failed authentications from this address (Retry-After)",
    "503": "the database or the broker is unavailable (Retry-After)",
}

#: Operations that answer 409, and those whose body is size-limited (413).
_CONFLICTS = {
    ("post", "/v1/jobs"),
    ("get", "/v1/jobs/{job_id}/result"),
    ("post", "/v1/jobs/{job_id}/cancel"),
    ("post", "/v1/jobs/{job_id}/replay"),
}
_LIMITED = {("post", "/v1/jobs"), ("post", "/v1/batches"), ("post", "/v1/audit/access-report"), ("post", "/v1/files")}
#: Paths of ours that answer in OpenAI's dialect for an OpenAI batch's id or body (both shapes of error).
_BOTH = {("post", "/v1/batches"), ("get", "/v1/batches/{batch_id}"), ("post", "/v1/batches/{batch_id}/cancel")}
#: Successes that are not JSON.
_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("get", "/v1/batches/{batch_id}/results"): {"application/jsonl": {}, "text/csv": {}},
    ("get", "/v1/files/{file_id}/content"): {"application/octet-stream": {}},
}


def request_body(media_type: str, schema: dict[str, Any], example: Any = None) -> dict[str, Any]:
    """An operation's ``openapi_extra`` declaring its required body (for the endpoints that read theirs themselves:
    FastAPI sees no parameter to declare it from)."""
    content: dict[str, Any] = {"schema": schema} if example is None else {"schema": schema, "example": example}
    return {"requestBody": {"required": True, "content": {media_type: content}}}


def describe_errors(schema: dict[str, Any], bounds: dict[tuple[str, str], tuple[float, float]]) -> None:
    """Declare, in ``schema`` (an OpenAPI document, changed in place), every ``/v1`` operation's error answers
    in the shape it sends them, its non-JSON successes, and the ``bounds`` (``(path, parameter)``: (least,
    most); path ``*``: any) of its query parameters."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = _PROBLEM
    components["OpenAIError"] = _OPENAI_ERROR
    for path, operations in schema.get("paths", {}).items():
        if path.startswith("/v1/"):
            for method, operation in operations.items():
                _describe(method, path, operation)
                _bound(path, operation, bounds)
    used = str(schema.get("paths"))
    for name in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{name}'" not in used:
            components.pop(name, None)


def _describe(method: str, path: str, operation: dict[str, Any]) -> None:
    key = (method, path)
    problem = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    openai = {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}}
    dialect = "openai" in operation.get("tags", ())
    if key in _BOTH:
        content = {**problem, **openai}
    else:
        content = openai if dialect else problem
    statuses = ["401", "403", "429", "503"]
    statuses += ["404"] if "{" in path else []
    statuses += ["409"] if key in _CONFLICTS else []
    statuses += ["413"] if key in _LIMITED else []
    responses = operation.setdefault("responses", {})
    for status in statuses:
        responses[status] = {"description": _WHY[status], "content": content}
    if dialect or key in _BOTH:  # OpenAI's dialect refuses a bad body or value with 400
        responses["400"] = {"description": _WHY["400"], "content": openai}
    # A query parameter of the wrong type (limit=ten) is refused before any handler: a problem detail, or on a path
    # of OpenAI's dialect alone a 400 in its shape (declared above).
    if dialect:
        responses.pop("422", None)
    else:
        responses["422"] = {"description": _WHY["422"], "content": content}
    if key in _BODIES:
        success = next(code for code in responses if code.startswith("2"))
        responses[success]["content"] = {kind: {"schema": {"type": "string"}} for kind in _BODIES[key]}
    operation["responses"] = dict(sorted(responses.items()))


def _bound(path: str, operation: dict[str, Any], bounds: dict[tuple[str, str], tuple[float, float]]) -> None:
    for parameter in operation.get("parameters", ()):
        bound = bounds.get((path, parameter["name"])) or bounds.get(("*", parameter["name"]))
        if bound is not None and parameter.get("in") == "query":
            parameter.setdefault("schema", {}).update(minimum=bound[0], maximum=bound[1])
