"""CLI for operators: ``qbgw health`` (one line per dependency, a named exit code) and
``qbgw metrics serve`` (the database's view for Prometheus, one process for a fleet).
"""

from __future__ import annotations

import json
import signal
import sys
import threading

import click

from ..ops import metrics as m
from ..ops.exporter import FleetCollector
from ..ops.health import check_health
from ..runtime.locator import runtime
from ..settings import prometheus_multiproc_dir
from .kit import EXIT, handled, load_settings

__all__ = ["health", "metrics"]


@click.command()
@click.option(
    "--skip",
    multiple=True,
    type=click.Choice(["database", "broker", "upstream", "audit", "keys"]),
    help="Leave out a check (repeatable).",
)
@click.option(
    "--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True, help="Seconds each check may take."
)
@click.option(
    "--max-checkpoint-age",
    type=click.FloatRange(min=1),
    default=None,
    help="Oldest acceptable audit checkpoint, in seconds (default 3 x QBGW_AUDIT_ANCHOR_SECONDS "
    "+ QBGW_SWEEP_INTERVAL).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of lines.")
@handled
def health(skip: tuple[str, ...], timeout: float, max_checkpoint_age: float | None, as_json: bool) -> None:
    """Check the database (reachable, migrated), the broker, the upstream (reachable, credentials, gateway
    feature on), the audit checkpoint's age and the encryption keys; one line each.

    Exit 0 when every check passes, 10 when one fails (7 when the settings themselves are wrong).
    """
    checks = check_health(load_settings(), skip=skip, timeout=timeout, max_checkpoint_age=max_checkpoint_age)
    ok = all(c.ok for c in checks)
    if as_json:
        click.echo(json.dumps({"ok": ok, "checks": [c.as_dict() for c in checks]}))
    else:
        for check in checks:
            click.echo(check.line())
    if any(c.settings_wrong for c in checks):
        sys.exit(EXIT["config"])
    sys.exit(EXIT["ok"] if ok else EXIT["unhealthy"])


@click.group()
def metrics() -> None:
    """Prometheus metrics (docs/operations.md lists the names)."""


@metrics.command("serve")
@click.option("--host", default=None, help="Address to bind (default QBGW_METRICS_HOST).")
@click.option("--port", type=click.IntRange(1, 65535), default=9465, show_default=True)
@handled
def metrics_serve(host: str | None, port: int) -> None:
    """Serve the database's view on http://HOST:PORT/metrics: jobs by status, the oldest waiting job, broker
    queue depths, the audit checkpoint's age; computed at each scrape. Run one per fleet.

    With PROMETHEUS_MULTIPROC_DIR set, it also serves the sum of the worker metrics written there.
    """
    settings = load_settings()
    fleet = FleetCollector(runtime(settings))
    registry = m.registry_for(fleet=fleet, workers=prometheus_multiproc_dir() is not None)
    address = host or settings.metrics_host
    server = m.serve(registry, address, port)
    click.echo(f"serving metrics on http://{address}:{port}/metrics", err=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
