"""The same Alembic migrations build the schema on SQLite and PostgreSQL, and match the models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from qbgw.errors import ConfigError
from qbgw.settings import Settings
from qbgw.store import schema
from tests.conftest import ROOT


def _url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "postgres":
        return str(request.getfixturevalue("pg_database"))
    return f"sqlite:///{tmp_path / 'm.db'}"


def test_upgrade_builds_both_tables_and_alembic_check_finds_no_drift(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = _url(backend, tmp_path, request)
    schema.upgrade(url)
    engine = create_engine(url)
    assert {"jobs", "audit_events", "alembic_version"} <= set(inspect(engine).get_table_names())
    assert schema.current_revision(engine) == schema.head_revision(url)
    engine.dispose()
    # `alembic check` is the command an operator would run; it exits non-zero on drift.
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "check"],
        env={"QBGW_DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "No new upgrade operations detected" in result.stdout + result.stderr


def test_downgrade_and_upgrade_again_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'd.db'}"
    schema.upgrade(url)
    schema.upgrade(url, "head")  # idempotent
    from alembic import command

    command.downgrade(schema.alembic_config(url), "base")
    engine = create_engine(url)
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    schema.upgrade(url)
    assert "jobs" in inspect(engine).get_table_names()
    engine.dispose()


def test_a_database_behind_head_is_refused_unless_it_is_the_embedded_default(tmp_path: Path) -> None:
    from qbgw.store.db import make_engine

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    engine = make_engine(url)
    with pytest.raises(ConfigError, match="run `qbgw db upgrade`"):
        schema.ensure_current(engine, Settings(data_dir=tmp_path, database_url=url))
    # The embedded default (no database URL given) migrates itself on first use.
    embedded = Settings(data_dir=tmp_path / "embedded")
    embedded_engine = make_engine(embedded.effective_database_url)
    schema.ensure_current(embedded_engine, embedded)
    assert schema.current_revision(embedded_engine) == schema.head_revision(url)
    engine.dispose()
    embedded_engine.dispose()
