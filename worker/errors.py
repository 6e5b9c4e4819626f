"""Errors: the one exception tree of qbgw. Pure; imports nothing but the stdlib.

Retry semantics live in the types: the worker retries a ``TransientGatewayError`` and fails the
job at once on a ``PermanentGatewayError``; no caller inspects status codes itself.

    QbgwError
    ├── ConfigError ............................ a setting is missing or malformed
    │   └── SubjectKeyMissing .................. a subject was given, but no subject key is configured
    ├── InputError (also ValueError) ........... bad input from a producer; nothing was stored
    │   ├── InvalidMessages .................... the messages list breaks the OpenAI shape
    │   ├── InvalidImage ....................... an image is not jpeg/png, too large, or unreadable
    │   ├── IdempotencyConflict ................ an idempotency key reused for a different job
    │   └── InvalidBatch ....................... lines of a batch are invalid (line numbers and reasons)
    ├── Unauthenticated ........................ an API key is missing, malformed, unknown, expired or revoked
    ├── JobNotFound (also LookupError) ......... no job has this id
    ├── BatchNotFound (also LookupError) ....... no batch has this id
    ├── FileNotFound (also LookupError) ........ no file has this id (OpenAI-compatible /v1/files)
    ├── JobStateConflict ....................... the job's status does not allow the operation
    ├── InvalidTransition (also RuntimeError) .. a status change the table forbids: a bug
    ├── InternalError .......................... an unexpected exception met a job in the worker
    ├── IntegrityError ......................... stored data fails its integrity check
    │   └── DecryptionFailed ................... a stored value cannot be decrypted (moved, altered, no key)
    ├── StoreUnavailable ....................... the database cannot be reached
    ├── BrokerUnavailable ...................... the broker cannot be reached
    │   └── NotAnnounced ....................... the job is stored, but its message was not sent
    └── GatewayError ........................... an attempt at the upstream did not give an answer
        ├── TransientGatewayError .............. worth another attempt later
        │   ├── UpstreamUnavailable ............ connection refused/reset, DNS, TLS
        │   ├── UpstreamTimeout ................ connect or read timeout
        │   ├── RateLimited .................... 429, maybe with Retry-After
        │   ├── StaleSession ................... 401 for a token the fleet had already replaced
        │   └── UpstreamServerError ............ 408 or 5xx
        └── PermanentGatewayError .............. retrying cannot help
            ├── UpstreamRejected ............... 4xx (400, 403, 404, 413, 422, ...)
            ├── FeatureDisabled ................ 405: the AI gateway is off for the application
            ├── AuthenticationFailed ........... 401: the session token is missing or expired
            ├── ResolutionFailed ............... an image reference could not be resolved (before any call)
            └── MalformedResponse .............. a 2xx whose body is not {"answer": "..."}

Every class passes all of its arguments to ``super().__init__`` so that it survives ``pickle``
(Celery pickles exceptions; an unpicklable one has crashed workers).
"""

from __future__ import annotations

__all__ = [
    "QbgwError",
    "ConfigError",
    "SubjectKeyMissing",
    "InputError",
    "InvalidMessages",
    "InvalidImage",
    "IdempotencyConflict",
    "InvalidBatch",
    "Unauthenticated",
    "JobNotFound",
    "BatchNotFound",
    "FileNotFound",
    "JobStateConflict",
    "InvalidTransition",
    "InternalError",
    "IntegrityError",
    "DecryptionFailed",
    "StoreUnavailable",
    "BrokerUnavailable",
    "NotAnnounced",
    "GatewayError",
    "TransientGatewayError",
    "UpstreamUnavailable",
    "UpstreamTimeout",
    "RateLimited",
    "StaleSession",
    "UpstreamServerError",
    "PermanentGatewayError",
    "UpstreamRejected",
    "FeatureDisabled",
    "AuthenticationFailed",
    "MalformedResponse",
    "ResolutionFailed",
]


class QbgwError(Exception):
    """Root of every error qbgw raises on purpose."""


class ConfigError(QbgwError):
    """A setting is missing or malformed; raised when the settings are built."""


class SubjectKeyMissing(ConfigError):
    """A job's subject (or an access report's) needs QBGW_SUBJECT_KEY, and none is configured."""


class InputError(QbgwError, ValueError):
    """Input from a producer was rejected before anything was stored."""


class InvalidMessages(InputError):
    """The messages list (or the assistant id) does not have the accepted shape."""


class InvalidImage(InputError):
    """An image is not a jpeg or png, is larger than allowed, or cannot be read."""


class IdempotencyConflict(InputError):
    """An idempotency key already names a job with a different assistant or messages."""


class InvalidBatch(InputError):
    """Lines of a batch failed validation; ``problems`` holds (line number, reason) pairs."""

    #: How many problems the message lists; all of them stay in ``problems``.
    SHOWN = 20

    def __init__(self, message: str, problems: tuple[tuple[int, str], ...] = ()) -> None:
        super().__init__(message, tuple(problems))
        self.message = message
        self.problems = tuple(problems)

    def __str__(self) -> str:
        lines = [self.message, *(f"  line {n}: {reason}" for n, reason in self.problems[: self.SHOWN])]
        if len(self.problems) > self.SHOWN:
            lines.append(f"  ... and {len(self.problems) - self.SHOWN} more")
        return "\n".join(lines)


class Unauthenticated(QbgwError):
    """An API key was missing, malformed, unknown, expired or revoked; ``reason`` says which (for the audit
    event and the operator; the HTTP answer says only that the key is not accepted)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"API key not accepted: {self.reason}"


class JobNotFound(QbgwError, LookupError):
    """No job has the given id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"no such job: {self.job_id}"


class FileNotFound(QbgwError, LookupError):
    """No file has the given id (or it is another principal's). ``param``: the field that named it."""

    def __init__(self, file_id: str, param: str = "file_id") -> None:
        super().__init__(file_id)
        self.file_id, self.param = file_id, param


class BatchNotFound(QbgwError, LookupError):
    """No batch has the given id. ``param``: the field that named it."""

    def __init__(self, batch_id: str, param: str = "batch_id") -> None:
        super().__init__(batch_id)
        self.batch_id, self.param = batch_id, param

    def __str__(self) -> str:
        return f"no such batch: {self.batch_id}"


class JobStateConflict(QbgwError):
    """The job's status does not allow what was asked (e.g. replaying a job that succeeded)."""


class InvalidTransition(QbgwError, RuntimeError):
    """A job status change that the transition table forbids (a bug, never retried)."""


class InternalError(QbgwError):
    """An exception that is none of an attempt's expected outcomes met a job in the worker (a bug, or
    stored input that cannot be sent). The job waits and is tried again; after ``QBGW_MAX_FAULTS`` in a
    row it fails with the reason. ``exception`` is the class name of what was raised, ``stage`` where."""

    def __init__(self, message: str, exception: str = "", stage: str = "") -> None:
        super().__init__(message, exception, stage)
        self.message = message
        self.exception = exception
        self.stage = stage

    def __str__(self) -> str:
        return self.message


class IntegrityError(QbgwError):
    """Stored data fails an integrity check (the audit chain, an encrypted value)."""


class DecryptionFailed(IntegrityError):
    """A stored value cannot be decrypted: moved to another row, altered, or its key is gone.

    The message names the table, column and row, never the contents.
    """

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(where, reason)
        self.where = where
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot decrypt {self.where}: {self.reason}"


class StoreUnavailable(QbgwError):
    """The database could not be reached or refused the operation."""


class BrokerUnavailable(QbgwError):
    """The broker could not be reached."""


class NotAnnounced(BrokerUnavailable):
    """The job was stored but publishing its message failed; the sweeper will dispatch it."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(job_id, reason)
        self.job_id = job_id
        self.reason = reason

    def __str__(self) -> str:
        return (
            f"job {self.job_id} is stored, but the broker could not be told ({self.reason}); "
            "`qbgw sweep` (or a running sweeper) will dispatch it"
        )


class GatewayError(QbgwError):
    """An attempt at the upstream gateway ended without an answer.

    ``status`` is the HTTP status when there was a response; ``reasons`` are the upstream's
    error strings (which may echo PHI: they are stored encrypted, never logged).
    """

    def __init__(self, message: str, status: int | None = None, reasons: tuple[str, ...] = ()) -> None:
        super().__init__(message, status, reasons)
        self.message = message
        self.status = status
        self.reasons = tuple(reasons)

    def __str__(self) -> str:
        return self.message


class TransientGatewayError(GatewayError):
    """Another attempt later may succeed."""


class UpstreamUnavailable(TransientGatewayError):
    """The connection failed: refused, reset, DNS or TLS."""


class UpstreamTimeout(TransientGatewayError):
    """The upstream did not connect or answer within the configured timeout."""


class RateLimited(TransientGatewayError):
    """HTTP 429; ``retry_after`` is the wait in seconds the upstream asked for, if any."""

    def __init__(
        self,
        message: str,
        status: int | None = 429,
        reasons: tuple[str, ...] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status, reasons)
        self.args = (message, status, tuple(reasons), retry_after)
        self.retry_after = retry_after


class StaleSession(TransientGatewayError):
    """HTTP 401 "Required session does not exist" for a session token that another worker had already
    replaced: the attempt is retried at once with the shared session, without spending the job's renewal."""


class UpstreamServerError(TransientGatewayError):
    """HTTP 408 or 5xx."""


class PermanentGatewayError(GatewayError):
    """Retrying cannot help; the job fails with the upstream's reason."""


class UpstreamRejected(PermanentGatewayError):
    """A 4xx the upstream will give again for the same request."""


class FeatureDisabled(PermanentGatewayError):
    """HTTP 405: the HIPAA AI Gateway feature is not enabled for the application."""


class AuthenticationFailed(PermanentGatewayError):
    """HTTP 401: the session token is missing, invalid or expired."""


class MalformedResponse(PermanentGatewayError):
    """A success status whose body is not ``{"answer": "<string>"}``."""


class ResolutionFailed(PermanentGatewayError):
    """An image or document reference could not be turned into what the gateway accepts, in
    the worker, before any upstream call (the file vanished or changed, a fetch was refused)."""
