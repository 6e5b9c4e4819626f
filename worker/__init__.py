"""qbgw: a Celery job-queue worker for the QuickBlox HIPAA AI Gateway.

Producers call :func:`submit` (or :func:`submit_batch` for thousands of jobs) and read results
with :func:`get_job` / :func:`wait_for_job` (or :func:`batch_results`); workers run with
``qbgw worker``. Settings come from ``QBGW_*`` environment variables, or a
:class:`Settings` passed as ``settings=``.

The package's folder is ``worker/`` in the repository; it is installed and imported as ``qbgw`` only.
"""

from __future__ import annotations

if __name__ != "qbgw":  # the repository's folder imported by its own name: a second copy of every module
    raise ImportError(
        f"qbgw's package folder was imported as {__name__!r}; import it as qbgw (pip install -e . maps the "
        "worker/ folder to that name), never as worker"
    )

from .access import Principal, Role, create_key, list_keys, revoke_key, rotate_key
from .admin import anchor_now, check_auth, purge_phi, rotate_keys, sweep, verify_log
from .audit.events import AuditRecord
from .audit.verify import VerifyReport
from .batches.export import BatchResult
from .batches.views import BatchView
from .control import cancel, cancel_batch, replay
from .errors import (
    AuthenticationFailed,
    BatchNotFound,
    BrokerUnavailable,
    ConfigError,
    DecryptionFailed,
    FeatureDisabled,
    FileNotFound,
    GatewayError,
    IdempotencyConflict,
    InputError,
    IntegrityError,
    InternalError,
    InvalidBatch,
    InvalidImage,
    InvalidMessages,
    InvalidTransition,
    JobNotFound,
    JobStateConflict,
    MalformedResponse,
    NotAnnounced,
    PermanentGatewayError,
    QbgwError,
    RateLimited,
    ResolutionFailed,
    StaleSession,
    StoreUnavailable,
    SubjectKeyMissing,
    TransientGatewayError,
    Unauthenticated,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .execution.sweeper import SweepReport
from .lifecycle import JobStatus
from .producer import submit, submit_batch
from .queries import (
    AuditFilter,
    JobView,
    audit_query,
    batch_results,
    failed_jobs,
    get_batch,
    get_job,
    job_events,
    job_metadata,
    job_status,
    list_batches,
    wait_for_batch,
    wait_for_job,
)
from .reports import AccessReport, JobSummary, access_report, render_csv, render_html, render_jsonl, render_table
from .settings import Secret, Settings
from .store.batches import BatchStatus
from .upstream.auth import AuthReport

__version__ = "0.1.0"

__all__ = [
    # producing and reading
    "submit",
    "get_job",
    "job_metadata",
    "wait_for_job",
    "job_events",
    "job_status",
    "audit_query",
    "AuditFilter",
    "verify_log",
    "anchor_now",
    "VerifyReport",
    "rotate_keys",
    "purge_phi",
    "cancel",
    "failed_jobs",
    "replay",
    "sweep",
    "SweepReport",
    "JobView",
    "JobStatus",
    "AuditRecord",
    "access_report",
    "AccessReport",
    "JobSummary",
    "render_csv",
    "render_jsonl",
    "render_table",
    "render_html",
    # batches
    "submit_batch",
    "get_batch",
    "list_batches",
    "wait_for_batch",
    "cancel_batch",
    "batch_results",
    "BatchView",
    "BatchStatus",
    "BatchResult",
    # configuration
    "Settings",
    "Secret",
    "check_auth",
    "AuthReport",
    # API keys of qbgw serve
    "create_key",
    "rotate_key",
    "revoke_key",
    "list_keys",
    "Role",
    "Principal",
    # errors
    "QbgwError",
    "ConfigError",
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
    "SubjectKeyMissing",
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
