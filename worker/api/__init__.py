"""The HTTP front door, ``qbgw serve``: FastAPI on uvicorn, behind API keys and roles. An edge, beside the
CLI: it calls the facade and nothing under it."""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
