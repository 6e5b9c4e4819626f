"""CLI plumbing shared by every ``qbgw`` command: named exit codes, one-line errors, settings."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .. import errors
from ..settings import Settings

__all__ = ["EXIT", "handled", "logged", "load_settings"]


#: Named exit codes.
EXIT = {
    "ok": 0,
    "job_failed": 1,
    "usage": 2,
    "bad_input": 3,
    "not_found": 4,
    "unavailable": 5,
    "timeout": 6,
    "config": 7,
    "conflict": 8,
    "tampered": 9,
    "unhealthy": 10,
    # `qbgw worker` stopped abnormally: an error Celery cannot recover from, or SIGINT. A warm
    # shutdown (SIGTERM) exits 0.
    "worker_failed": 11,
}

_EXIT_FOR: list[tuple[type[BaseException], str]] = [
    (errors.InputError, "bad_input"),
    (errors.JobNotFound, "not_found"),
    (errors.BatchNotFound, "not_found"),
    (errors.JobStateConflict, "conflict"),
    (errors.StoreUnavailable, "unavailable"),
    (errors.BrokerUnavailable, "unavailable"),
    (errors.ConfigError, "config"),
    (errors.IntegrityError, "tampered"),
    (TimeoutError, "timeout"),
]

F = TypeVar("F", bound=Callable[..., Any])


def handled(func: F) -> F:
    """Turn our errors into one line on stderr and their exit code."""
    return _reporting(func, lambda exc: click.echo(f"qbgw: error: {exc}", err=True))


def logged(func: F) -> F:
    """Like :func:`handled`, for a command whose output is its log (``qbgw worker``): the error is a CRITICAL
    log record, JSON when the log is, so that nothing but records reaches its streams."""
    return _reporting(func, lambda exc: logging.getLogger("qbgw").critical("%s", exc))


def _reporting(func: F, report: Callable[[BaseException], None]) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (errors.QbgwError, TimeoutError) as exc:
            report(exc)
            sys.exit(next((EXIT[name] for kind, name in _EXIT_FOR if isinstance(exc, kind)), 1))

    return wrapper  # type: ignore[return-value]


def load_settings() -> Settings:
    try:
        return Settings.from_env()
    except errors.ConfigError as exc:
        click.echo(f"qbgw: error: {exc}", err=True)
        sys.exit(EXIT["config"])
