"""qbgw: a Celery job-queue worker for the QuickBlox HIPAA AI Gateway.

Producers call :func:`submit` (or :func:`submit_batch` for thousands of jobs) and read results
with :func:`get_job` / :func:`wait_for_job` (or :func:`batch_results`); workers run with
``qbgw worker``. Settings come from ``QBGW_*`` environment variables, or a
:class:`Settings` passed as ``settings=``.
"""

from __future__ import annotations

from worker.audit import AuditRecord
from worker.auth import AuthReport, check_auth
from worker.batch_export import BatchResult, batch_results
from worker.batches import BatchStatus, BatchView, cancel_batch, get_batch, list_batches, submit_batch, wait_for_batch
from worker.control import cancel, replay
from worker.errors import (
    AuthenticationFailed,
    BatchNotFound,
    BrokerUnavailable,
    ConfigError,
    DecryptionFailed,
    FeatureDisabled,
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
    TransientGatewayError,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from worker.integrity import VerifyReport, anchor_now, verify_log
from worker.lifecycle import JobStatus
from worker.maintenance import purge_phi, rotate_keys
from worker.producer import submit
from worker.queries import AuditFilter, JobView, audit_query, failed_jobs, get_job, job_events, job_status, wait_for_job
from worker.settings import Secret, Settings
from worker.sweeper import SweepReport, sweep

__version__ = "0.1.0"

__all__ = [
    # producing and reading
    "submit",
    "get_job",
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
    # errors
    "QbgwError",
    "ConfigError",
    "InputError",
    "InvalidMessages",
    "InvalidImage",
    "IdempotencyConflict",
    "InvalidBatch",
    "JobNotFound",
    "BatchNotFound",
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
