"""CLI: ``qbgw``. Each command is a few lines over a library call; errors become one line on
stderr and a named exit code.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import click

from .. import errors, producer
from ..admin import sweep as run_sweep
from ..cli import audit as cli_audit
from ..cli import auth as cli_auth
from ..cli import batch as cli_batch
from ..cli import ops as cli_ops
from ..cli import serve as cli_serve
from ..cli import users as cli_users
from ..control import cancel as cancel_job
from ..control import replay as replay_job
from ..emulator.server import EmulatorConfig, serve
from ..execution.service import run_worker
from ..ops import logs
from ..queries import failed_jobs, get_job, job_events, job_metadata, wait_for_job
from ..settings import Settings
from ..store import roles, schema
from ..store.db import describe_url
from . import inputs
from .demo import run_demo
from .kit import EXIT, handled, logged
from .kit import load_settings as _settings

__all__ = ["main", "EXIT"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
def cli(verbose: bool) -> None:
    """qbgw: queue jobs for the QuickBlox HIPAA AI Gateway, run them, read the results.

    Settings come from QBGW_* environment variables (see docs/configuration.md).
    """
    try:
        settings: Settings | None = Settings.from_env()
    except errors.ConfigError:
        settings = None  # the command that needs settings says what is wrong with them
    logs.configure(settings, logging.INFO if verbose else logging.WARNING)


@cli.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--text", "-t", multiple=True, help="A user text part (repeatable).")
@click.option("--image", "-i", multiple=True, type=click.Path(), help="A jpeg/png file or https:// URL (repeatable).")
@click.option("--system", help="A developer message to put first.")
@click.option("--assistant", "-a", help="smart_chat_assistant_id (default: QBGW_ASSISTANT_ID).")
@click.option("--custom-id", help="Your own id for the job, kept with it.")
@click.option("--idempotency-key", help="Submitting the same key again returns the first job.")
@click.option("--actor", help="Who is submitting, for the audit trail.")
@click.option("--subject", help="Whom the job is about (a patient's record number, ...): stored encrypted, searchable.")
@click.option("--require-broker", is_flag=True, help="Store nothing unless the broker takes the message now.")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the answer and print it.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after this many seconds.")
@handled
def submit(
    file: str | None,
    text: tuple[str, ...],
    image: tuple[str, ...],
    system: str | None,
    assistant: str | None,
    custom_id: str | None,
    idempotency_key: str | None,
    actor: str | None,
    subject: str | None,
    require_broker: bool,
    wait_: bool,
    timeout: float | None,
) -> None:
    """Queue a job. Messages come from FILE (JSON; '-' for stdin) or from --text/--image.

    FILE holds a list of OpenAI-format messages, or an object with "messages" (and optionally
    "smart_chat_assistant_id", "custom_id", "idempotency_key", "subject"). Prints the job id.
    """
    settings = _settings()
    request = inputs.build_request(file, text=text, images=image, system=system, max_bytes=settings.max_request_bytes)
    try:
        # An id given as an option wins over the file's; an empty one (from either) is refused, not dropped.
        job_id = producer.submit(
            assistant or request.assistant_id or settings.assistant_id,
            request.messages,
            custom_id=request.custom_id if custom_id is None else custom_id,
            idempotency_key=request.idempotency_key if idempotency_key is None else idempotency_key,
            actor=actor,
            require_broker=require_broker,
            subject=request.subject if subject is None else subject,
            settings=settings,
        )
    except errors.NotAnnounced as exc:
        click.echo(exc.job_id)  # the job is accepted: a sweeper dispatches it
        click.echo(f"qbgw: warning: {exc}", err=True)
        return
    click.echo(job_id)
    if wait_:
        _print_result(job_id, settings, wait=True, timeout=timeout)


@cli.command()
@click.argument("job_id")
@click.option("--actor", "reader", help="Who is reading, for the audit trail (default QBGW_ACTOR).")
@handled
def status(job_id: str, reader: str | None) -> None:
    """Show a job's status, timestamps, attempts and error (not its answer); reading the error is audited."""
    settings = _settings()
    found, batch_id = job_metadata(job_id, settings=settings)  # no PHI: not a read of the answer
    # Only a job with an error has something to disclose here: only then is there a read to audit.
    view = (found if found.error_class is None else get_job(job_id, reader=reader, settings=settings)).as_dict()
    view.pop("answer")
    view["batch_id"] = batch_id
    click.echo(json.dumps(view, indent=2, ensure_ascii=False))


@cli.command()
@click.argument("job_id")
@click.option("--wait", "wait_", is_flag=True, help="Wait until the job is finished.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after this many seconds.")
@click.option("--actor", "reader", help="Who is reading, for the audit trail (default QBGW_ACTOR).")
@handled
def result(job_id: str, wait_: bool, timeout: float | None, reader: str | None) -> None:
    """Print a job's answer (exit 1 if it failed, was cancelled or its answer was purged, 6 if it is not
    finished); the read is audited."""
    _print_result(job_id, _settings(), wait=wait_, timeout=timeout, reader=reader)


def _print_result(
    job_id: str, settings: Settings, *, wait: bool, timeout: float | None, reader: str | None = None
) -> None:
    if wait:
        view = wait_for_job(job_id, timeout=timeout, reader=reader, settings=settings)
    else:
        view = get_job(job_id, reader=reader, settings=settings)
    if view.status == "succeeded" and view.answer is not None:
        click.echo(view.answer)
        return
    if view.status == "succeeded":  # (no answer: erased by qbgw purge)
        click.echo(f"qbgw: job {job_id} succeeded, but its answer was purged (qbgw purge)", err=True)
        sys.exit(EXIT["job_failed"])
    if view.done:
        click.echo(f"qbgw: job {job_id} {view.status}: {view.error or 'no reason recorded'}", err=True)
        sys.exit(EXIT["job_failed"])
    click.echo(f"qbgw: job {job_id} is {view.status} (attempt {view.attempts}); use --wait", err=True)
    sys.exit(EXIT["timeout"])


@cli.command()
@click.argument("job_id")
@click.option("--reads", is_flag=True, help="Also who read the job's result (result.read events).")
@click.option("--actor", "reader", help="Who is querying, for the audit trail (default QBGW_ACTOR).")
@handled
def events(job_id: str, reads: bool, reader: str | None) -> None:
    """Print a job's audit events as JSON Lines, oldest first. The query is itself audited."""
    for event in job_events(job_id, include_reads=reads, reader=reader, settings=_settings()):
        click.echo(json.dumps(event.as_dict(), ensure_ascii=False))


@cli.command()
@click.option("--concurrency", "-c", type=int, default=None, help="Threads per process (QBGW_CONCURRENCY).")
@click.option("--pool", type=click.Choice(["threads", "prefork", "solo", "gevent"]), default=None)
@click.option(
    "--loglevel",
    "-l",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
@logged
def worker(concurrency: int | None, pool: str | None, loglevel: str) -> None:
    """Run a worker: take jobs from the broker and call the gateway.

    Exits 0 after SIGTERM (a warm shutdown) or SIGQUIT (a cold one), 11 when it stopped abnormally (an error
    Celery cannot recover from, SIGINT), 7 when the settings or the schema are wrong. It waits for the database and the
    broker while they cannot be reached.
    """
    settings = Settings.from_env()  # a ConfigError is logged (JSON when the log is), like every other error
    changes = {k: v for k, v in {"concurrency": concurrency, "pool": pool}.items() if v is not None}
    code = run_worker(settings.with_(**changes) if changes else settings, loglevel=loglevel)
    sys.exit(EXIT["ok"] if code == 0 else EXIT["worker_failed"])


@cli.command()
@click.option(
    "--grace",
    type=click.FloatRange(0, 86400),
    default=None,
    help="Seconds a message may be late before it counts as lost.",
)
@click.option(
    "--every", type=click.FloatRange(0.1, 86400), default=None, help="Sweep every this many seconds until stopped."
)
@handled
def sweep(grace: float | None, every: float | None) -> None:
    """Recover jobs of dead workers, dispatch lost or due ones, expire overdue batches; prints what it did.

    Workers sweep by themselves every QBGW_SWEEP_INTERVAL seconds; this is for running it by hand
    or as a separate service.
    """
    settings = _settings()
    while True:
        report = run_sweep(settings=settings, grace=grace)
        for job_id in report.recovered:
            click.echo(f"recovered {job_id}")
        for job_id in report.dispatched:
            click.echo(f"dispatched {job_id}")
        for batch_id in report.expired:
            click.echo(f"expired batch {batch_id}")
        if every is None:
            return
        time.sleep(every)


@cli.command()
@click.argument("job_id")
@click.option("--actor", help="Who is cancelling, for the audit trail.")
@handled
def cancel(job_id: str, actor: str | None) -> None:
    """Cancel a job (a running one ends cancelled when its attempt returns)."""
    status = cancel_job(job_id, actor=actor, settings=_settings())
    click.echo("cancelled" if status == "cancelled" else "cancel requested: the running attempt ends it")


@cli.command()
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--actor", "reader", help="Who is reading, for the audit trail (default QBGW_ACTOR).")
@handled
def failed(limit: int, as_json: bool, reader: str | None) -> None:
    """List failed jobs with their reasons, most recent first (each read is audited)."""
    for view in failed_jobs(limit=limit, reader=reader, settings=_settings()):
        if as_json:
            click.echo(json.dumps(view.as_dict(), ensure_ascii=False))
        else:
            when = view.finished_at.isoformat(timespec="seconds") if view.finished_at else "-"
            reason = view.error if view.error is not None else "(its text was erased by qbgw purge)"
            if view.error_class and not reason.startswith(f"{view.error_class}:"):  # (no "X: X: ...")
                reason = f"{view.error_class}: {reason}"
            click.echo(f"{view.id}  {when}  attempts={view.attempts}  {reason}")


@cli.command()
@click.argument("job_ids", nargs=-1, required=True)
@click.option("--actor", help="Who is replaying, for the audit trail.")
@handled
def replay(job_ids: tuple[str, ...], actor: str | None) -> None:
    """Queue failed jobs again (a new attempt on the same job, audited)."""
    settings = _settings()
    for job_id in job_ids:
        attempt = replay_job(job_id, actor=actor, settings=settings)
        click.echo(f"{job_id} queued for attempt {attempt}")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--token", multiple=True, help="An accepted QB-Token (repeatable; default emulator-token).")
@click.option("--assistant", multiple=True, help="A known assistant id (repeatable).")
@click.option("--any-assistant", is_flag=True, help="Accept every assistant id.")
@click.option("--latency", type=click.FloatRange(min=0), default=0.0, help="Seconds before every answer.")
@click.option("--feature-off", is_flag=True, help="Answer 405, as when the gateway feature is disabled.")
@click.option("--fault-rate", type=click.FloatRange(0, 1), default=0.0, help="Probability of a random fault.")
@click.option("--fault-seed", type=int, default=None, help="Seed the random faults, for a reproducible run.")
@click.option("--hang-seconds", type=click.FloatRange(min=0), default=30.0, help="How long a 'hang' fault waits.")
@click.option("--retry-after", type=click.IntRange(min=0), default=1, help="Retry-After of a '429-retry-after' fault.")
@click.option(
    "--rate-limit",
    type=click.IntRange(min=0),
    default=0,
    help="The plan's calls per second: beyond it, 429 Too Many Requests (0: no limit).",
)
@click.option(
    "--session-idle",
    type=click.FloatRange(min=0, min_open=True),
    default=7200.0,
    show_default=True,
    help="Seconds after its last use that a session token made by POST /session.json expires.",
)
def emulator(
    host: str,
    port: int,
    token: tuple[str, ...],
    assistant: tuple[str, ...],
    any_assistant: bool,
    latency: float,
    feature_off: bool,
    fault_rate: float,
    fault_seed: int | None,
    hang_seconds: float,
    retry_after: int,
    rate_limit: int,
    session_idle: float,
) -> None:
    """Run the QuickBlox HIPAA AI Gateway emulator (for development and tests).

    --fault-rate gives a valid request a random fault (429 with or without Retry-After, 500, 502, 503, hang,
    reset before or after the body, malformed 200), chosen uniformly; POST /_emulator/config sets fault_kinds.
    """
    fields: dict[str, Any] = {
        "latency": latency,
        "feature_enabled": not feature_off,
        "fault_rate": fault_rate,
        "fault_seed": fault_seed,
        "hang_seconds": hang_seconds,
        "retry_after": retry_after,
        "session_idle_seconds": session_idle,
        "rate_limit": rate_limit,
    }
    if token:
        fields["tokens"] = frozenset(token)
    if assistant or any_assistant:
        fields["assistants"] = frozenset(assistant)
    serve(EmulatorConfig(**fields), host, port)


@cli.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.option("--app-role", help="Then grant this role what workers and producers need (as `qbgw db roles`).")
@handled
def db_upgrade(revision: str, app_role: str | None) -> None:
    """Create or migrate the schema (Alembic) on QBGW_DATABASE_URL."""
    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    schema.upgrade(settings.effective_database_url, revision)
    click.echo(f"database {describe_url(settings.effective_database_url)} is at {revision}")
    if app_role:
        _grant(settings, app_role, create=False)


@db.command("roles")
@click.option("--app-role", required=True, help="The role workers and producers connect as.")
@click.option("--create-role", is_flag=True, help="Create it if missing: LOGIN, password QBGW_APP_ROLE_PASSWORD.")
@click.option("--print", "print_only", is_flag=True, help="Print the SQL for a DBA instead of running it.")
@handled
def db_roles(app_role: str, create_role: bool, print_only: bool) -> None:
    """Grant the application role what workers, producers and readers need on QBGW_DATABASE_URL, and nothing
    more: no UPDATE, DELETE or TRUNCATE of audit events, no ALTER. PostgreSQL only; run it as the schema's
    owner after every `qbgw db upgrade` (it revokes first, so running it again changes nothing)."""
    settings = _settings()
    if print_only:
        click.echo(roles.plan(settings.effective_database_url, app_role, create=create_role).sql)
        return
    _grant(settings, app_role, create=create_role)


def _grant(settings: Settings, app_role: str, *, create: bool) -> None:

    grants = roles.apply(settings.effective_database_url, app_role, create=create, password=settings.app_role_password)
    made = "created, and granted" if grants.created else "granted"
    click.echo(f"role {app_role} {made}: " + "; ".join(f"{t} {', '.join(p)}" for t, p in roles.TABLES.items()))
    for warning in grants.warnings:
        click.echo(f"qbgw: warning: {warning}", err=True)
    if grants.created and not settings.app_role_password:
        click.echo(
            f"qbgw: warning: role {app_role} was created without a password (QBGW_APP_ROLE_PASSWORD is empty): it can "
            "log in only where pg_hba.conf trusts it; set a password (ALTER ROLE ... PASSWORD) before it is used "
            "over a network",
            err=True,
        )


@cli.command()
@click.option("--jobs", type=int, default=6, show_default=True, help="How many demo jobs to run.")
@handled
def demo(jobs: int) -> None:
    """Run the whole pipeline once: emulator, a worker process, text and image jobs."""
    run_demo(_settings(), jobs=jobs, out=click.echo)


cli.add_command(cli_audit.audit)
cli.add_command(cli_audit.keys)
cli.add_command(cli_audit.purge)
cli.add_command(cli_auth.auth)
cli.add_command(cli_batch.batch)
cli.add_command(cli_ops.health)
cli.add_command(cli_ops.metrics)
cli.add_command(cli_serve.serve)
cli.add_command(cli_serve.api_keys)
cli.add_command(cli_serve.webhooks)
cli.add_command(cli_users.users_group)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="qbgw")
