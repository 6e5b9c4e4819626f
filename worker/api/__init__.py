"""The HTTP front door, ``qbgw serve``: FastAPI on uvicorn, behind API keys and roles. An edge, beside the
CLI: it calls the facade and nothing under it. ``app`` has qbgw's own endpoints, ``openai`` OpenAI's dialect."""

from __future__ import annotations

from fastapi import FastAPI

from ..settings import Settings
from . import app, openai

__all__ = ["create_app"]


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI application of ``qbgw serve``: qbgw's endpoints and the OpenAI-compatible ones (docs/openai.md)."""
    return app.create_app(settings, routers=(openai.router,), alternates=openai.ALTERNATES)
