"""CLI: ``qbgw auth check``, over ``qbgw.admin.check_auth``: create a session with the configured
credentials and say who it is and until when, never the token (only its fingerprint)."""

from __future__ import annotations

import sys

import click

from .. import errors
from ..admin import check_auth
from .kit import EXIT, handled
from .kit import load_settings as _settings

__all__ = ["auth"]


@click.group()
def auth() -> None:
    """QuickBlox authentication (QBGW_AUTH and its credentials)."""


@auth.command("check")
@handled
def check() -> None:
    """Create a session with the configured credentials and report who it is and when it expires.

    Exit codes: 7 credentials missing or refused (a 422 bad signature, a 401), 5 QuickBlox unreachable
    or failing (connection, timeout, 429, 5xx).
    """
    try:
        report = check_auth(_settings())
    except errors.GatewayError as exc:
        # Refused credentials are a configuration problem; an unreachable host is an availability one.
        code = EXIT["unavailable"] if isinstance(exc, errors.TransientGatewayError) else EXIT["config"]
        click.echo(f"qbgw: error: {exc}", err=True)
        sys.exit(code)
    for line in report.lines():
        click.echo(line)
