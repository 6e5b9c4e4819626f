"""``qbgw serve`` (the HTTP front door) and ``qbgw api-keys`` (its keys)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from .. import access, control, queries
from ..store.keys import KeyRow
from .kit import handled, logged
from .kit import load_settings as _settings

__all__ = ["serve", "api_keys", "webhooks"]

#: Seconds ``qbgw serve`` gives its open requests to end after SIGTERM.
SHUTDOWN_GRACE = 10


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Server processes.")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning"]))
@logged
def serve(host: str, port: int, workers: int, log_level: str) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json, interactive docs at /docs) behind API keys."""
    import uvicorn

    settings = _settings()
    keys = access.list_keys(settings=settings)  # the database is reachable and migrated (embedded: made now)
    now = datetime.now(UTC)
    if not any(k.state(now) == "active" for k in keys):
        click.echo(
            "qbgw serve: no active API key yet; create one with: qbgw api-keys create --name NAME --role ROLE", err=True
        )
    # Forwarded headers only from the proxies named (uvicorn's own default would believe 127.0.0.1's).
    proxies = settings.trusted_proxy_list
    uvicorn.run(
        "qbgw.api:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies or None,
        server_header=False,
        # On SIGTERM, requests still waiting (a long-poll, a chat completion) get this long to end, then are cut.
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
    )


@click.group("api-keys")
def api_keys() -> None:
    """API keys of qbgw serve: create, list, rotate, revoke. Only a hash of each key is stored."""


def _show(row: KeyRow, as_json: bool) -> str:
    now = datetime.now(UTC)
    data = {
        "id": row.id,
        "name": row.name,
        "role": row.role,
        "state": row.state(now),
        "created_at": row.created_at.isoformat(),
        "created_by": row.created_by,
        "expires_at": row.expires_at.isoformat() if row.expires_at else None,
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
    }
    if as_json:
        return json.dumps(data)
    expires = data["expires_at"] or "never"
    return f"{row.id}  {row.name:<24} {row.role:<9} {data['state']:<8} expires {expires}"


@api_keys.command("create")
@click.option("--name", required=True, help="The principal: the actor of every audit event its requests cause.")
@click.option("--role", required=True, type=click.Choice([r.value for r in access.Role]), help="What it may do.")
@click.option("--expires", help="Lifetime: 90d, 12h, 2w (default: no expiry).")
@click.option("--webhook-url", help="Where the ends of its jobs and batches are POSTed when they name no URL.")
@click.option("--actor", help="Who is creating it, for the audit trail (default QBGW_ACTOR).")
@handled
def create(name: str, role: str, expires: str | None, webhook_url: str | None, actor: str | None) -> None:
    """Create a key and print it once (stdout: only the key)."""
    lifetime = access.parse_duration(expires, "--expires") if expires else None
    row, secret = access.create_key(
        name, role, expires_in=lifetime, webhook_url=webhook_url, actor=actor, settings=_settings()
    )
    click.echo(f"created key {row.id} for {name} ({role}); it is shown only now:", err=True)
    click.echo(secret)


@api_keys.command("rotate")
@click.option("--name", required=True, help="The principal whose key is replaced (same role).")
@click.option("--overlap", default="24h", show_default=True, help="How long the old keys keep working.")
@click.option("--expires", help="The new key's lifetime (default: no expiry).")
@click.option("--webhook-url", help="The new key's default webhook (\"\" for none; default: the old key's).")
@click.option("--actor", help="Who is rotating, for the audit trail.")
@handled
def rotate(name: str, overlap: str, expires: str | None, webhook_url: str | None, actor: str | None) -> None:
    """A new key for the same principal; the old ones expire after --overlap. Prints the new key once."""
    row, secret = access.rotate_key(
        name,
        overlap=access.parse_duration(overlap, "--overlap"),
        expires_in=access.parse_duration(expires, "--expires") if expires else None,
        webhook_url=webhook_url,
        actor=actor,
        settings=_settings(),
    )
    click.echo(f"created key {row.id} for {name} ({row.role}); the old keys expire in {overlap}:", err=True)
    click.echo(secret)


@api_keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@handled
def list_(as_json: bool) -> None:
    """Every key with its state (never a secret)."""
    for row in access.list_keys(settings=_settings()):
        click.echo(_show(row, as_json))


@api_keys.command("revoke")
@click.argument("key_id")
@click.option("--actor", help="Who is revoking, for the audit trail.")
@handled
def revoke(key_id: str, actor: str | None) -> None:
    """Revoke a key at once (its id, as `qbgw api-keys list` shows)."""
    row = access.revoke_key(key_id, actor=actor, settings=_settings())
    click.echo(_show(row, False))


@api_keys.command("webhook-secret")
@click.option("--name", required=True, help="The principal (key name) whose webhooks it signs.")
@click.option("--rotate", is_flag=True, help="Make a new secret; the old ones keep signing for --overlap.")
@click.option("--overlap", default="24h", show_default=True, help="With --rotate: how long the old ones still sign.")
@click.option("--actor", help="Who is asking, for the audit trail.")
@handled
def webhook_secret(name: str, rotate: bool, overlap: str, actor: str | None) -> None:
    """Print the principal's webhook signing secret (whsec_...), made if it has none; --rotate for a new one."""
    click.echo(
        access.webhook_secret(
            name, rotate=rotate, overlap=access.parse_duration(overlap, "--overlap"), actor=actor, settings=_settings()
        )
    )


@click.group("webhooks")
def webhooks() -> None:
    """Webhook deliveries: the failed ones, and sending them again."""


@webhooks.command("failed")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@handled
def failed(limit: int, as_json: bool) -> None:
    """Deliveries that failed (refused, or no 2xx within QBGW_WEBHOOK_RETRY_WINDOW), newest first."""
    for delivery in queries.failed_webhooks(limit=limit, settings=_settings()):
        if as_json:
            click.echo(json.dumps(delivery.as_dict()))
        else:
            subject = delivery.job_id or delivery.batch_id
            click.echo(
                f"{delivery.id}  {delivery.event}  {subject}  attempts={delivery.attempts}  "
                f"last={delivery.last_status or '-'} {delivery.last_error or ''}".rstrip()
            )


@webhooks.command("redeliver")
@click.argument("delivery_ids", nargs=-1)
@click.option("--all-failed", is_flag=True, help="Every failed delivery (up to 10,000).")
@click.option("--actor", help="Who is redelivering, for the audit trail.")
@handled
def redeliver(delivery_ids: tuple[str, ...], all_failed: bool, actor: str | None) -> None:
    """Queue failed deliveries again, each with a fresh retry window (audited)."""
    settings = _settings()
    ids = list(delivery_ids)
    if all_failed:
        ids += [d.id for d in queries.failed_webhooks(limit=10_000, settings=settings)]
    if not ids and all_failed:
        click.echo("no failed deliveries", err=True)
        return
    if not ids:
        raise click.UsageError("name delivery ids (qbgw webhooks failed lists them), or pass --all-failed")
    for delivery_id in dict.fromkeys(ids):
        delivery = control.redeliver_webhook(delivery_id, actor=actor, settings=settings)
        click.echo(f"{delivery.id} {delivery.status}")
