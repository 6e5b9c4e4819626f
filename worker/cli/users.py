"""``qbgw users``: the people who sign in to the browser console (``/console`` on ``qbgw serve``). A password is
read from a hidden prompt, or from the first line of stdin when it is not a terminal; never from the command line,
where other users of the machine and the shell's history would see it."""

from __future__ import annotations

import json
import sys

import click

from .. import users
from ..lifecycle import utcnow
from ..store.users import UserRow
from .kit import handled
from .kit import load_settings as _settings

__all__ = ["users_group"]


def _password() -> str:
    if sys.stdin.isatty():
        return str(click.prompt("Password", hide_input=True, confirmation_prompt=True, err=True))
    return sys.stdin.readline().rstrip("\r\n")


def _show(row: UserRow, as_json: bool) -> str:
    state = row.state(utcnow())
    if as_json:
        return json.dumps(
            {
                "name": row.name,
                "role": row.role,
                "state": state,
                "created_at": row.created_at.isoformat(),
                "created_by": row.created_by,
                "password_set_at": row.password_set_at.isoformat(),
                "disabled_at": row.disabled_at.isoformat() if row.disabled_at else None,
                "locked_until": row.locked_until.isoformat() if row.locked_until else None,
            }
        )
    return f"{row.name:<24} {row.role:<8} {state:<8} created {row.created_at:%Y-%m-%d %H:%M} by {row.created_by}"


@click.group("users")
def users_group() -> None:
    """Users of the browser console at /console (auditor, reader or admin)."""


@users_group.command("create")
@click.option("--name", required=True, help="The user's name: their actor in the audit trail is user:NAME.")
@click.option(
    "--role", required=True, type=click.Choice([r.value for r in users.CONSOLE_ROLES]), help="What they may see."
)
@click.option("--actor", help="Who is creating it, for the audit trail (default QBGW_ACTOR).")
@handled
def create(name: str, role: str, actor: str | None) -> None:
    """Create a user; the password is asked for (or read from stdin's first line), never an argument."""
    row = users.create_user(name, role, _password(), actor=actor, settings=_settings())
    click.echo(_show(row, False))


@users_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@handled
def list_(as_json: bool) -> None:
    """Every user with their state (never a password)."""
    for row in users.list_users(settings=_settings()):
        click.echo(_show(row, as_json))


@users_group.command("disable")
@click.argument("name")
@click.option("--actor", help="Who is disabling, for the audit trail.")
@handled
def disable(name: str, actor: str | None) -> None:
    """Disable a user at once (their sessions end); the name is never given to anyone else."""
    click.echo(_show(users.disable_user(name, actor=actor, settings=_settings()), False))


@users_group.command("reset-password")
@click.argument("name")
@click.option("--actor", help="Who is resetting, for the audit trail.")
@handled
def reset_password(name: str, actor: str | None) -> None:
    """Give a user a new password (asked for, or stdin's first line): unlocks them and ends their sessions."""
    click.echo(_show(users.reset_password(name, _password(), actor=actor, settings=_settings()), False))
