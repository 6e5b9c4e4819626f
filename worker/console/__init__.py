"""The browser console at ``/console`` on ``qbgw serve``: the audit trail for the people it is for (auditors,
readers, admins), signed in with a user name and password (:mod:`qbgw.users`). See docs/console.md."""

from __future__ import annotations

from .app import create_console

__all__ = ["create_console"]
