"""End-to-end fixtures: the two stacks every pipeline test runs on."""

from __future__ import annotations

import pytest

from worker.settings import Settings


@pytest.fixture(params=["embedded", "redis+postgres"])
def stack(request: pytest.FixtureRequest) -> Settings:
    """The embedded default (SQLite + filesystem broker), then PostgreSQL + Redis."""
    name = "embedded_settings" if request.param == "embedded" else "production_settings"
    settings: Settings = request.getfixturevalue(name)
    return settings
