"""Schema: Alembic from code (``qbgw db upgrade``) and the "is this database migrated?" check.

The migrations live in the top-level ``migrations/`` folder of the checkout, installed with the package as
``qbgw.migrations``: an editable install and a wheel find them alike.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from ..errors import ConfigError, StoreUnavailable
from ..settings import Settings
from .db import describe_url, make_engine

__all__ = [
    "alembic_config",
    "upgrade",
    "current_revision",
    "current_revision_of",
    "head_revision",
    "ensure_current",
    "probe",
]

#: Where the migrations are (the package that carries them: ``qbgw.migrations``).
MIGRATIONS = f"{__package__.rpartition('.')[0]}.migrations"


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url`` that finds the migrations wherever qbgw is installed.

    Raises:
        ConfigError: the installation lacks its migrations (a damaged install).
    """
    folder = Path(str(resources.files(MIGRATIONS)))
    if not (folder / "env.py").is_file():
        raise ConfigError(f"qbgw's migrations are missing from {folder}: reinstall qbgw")
    config = Config()  # alembic.ini is for the `alembic` command in a checkout; qbgw needs no file
    config.set_main_option("script_location", str(folder))
    config.set_main_option("path_separator", "os")
    # ConfigParser interpolation would choke on a "%" in a password.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Run the migrations up to ``revision`` (``head`` by default)."""
    command.upgrade(alembic_config(url), revision)


def head_revision(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return current_revision_of(connection)


def current_revision_of(connection: Connection) -> str | None:
    """The revision ``alembic_version`` names, read on ``connection`` (None: not migrated)."""
    return MigrationContext.configure(connection).get_current_revision()


def probe(url: str, *, timeout: float) -> tuple[str | None, str | None]:
    """(the database's revision, the code's head) for a health check, on a connection of its own.

    Raises:
        StoreUnavailable: the database cannot be reached within about ``timeout`` seconds.
        ConfigError: the URL is unusable.
    """
    engine = make_engine(url, connect_timeout=timeout)
    try:
        current = current_revision(engine)
    except Exception as exc:  # the driver's own connection errors differ per backend
        raise StoreUnavailable(f"cannot reach database {describe_url(url)}: {_reason(exc)}") from exc
    finally:
        engine.dispose()
    return current, head_revision(url)


def _reason(exc: Exception) -> str:
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


def ensure_current(engine: Engine, settings: Settings) -> None:
    """Make sure the schema is at head before the process uses the database.

    The embedded default (SQLite in the data directory) is migrated on first use; any other
    database must be migrated by its operator with ``qbgw db upgrade``.

    Raises:
        ConfigError: the database is behind and is not the embedded default.
        StoreUnavailable: the database cannot be reached.
    """
    url = settings.effective_database_url
    try:
        current = current_revision(engine)
    except Exception as exc:  # the driver's own connection errors differ per backend
        raise StoreUnavailable(f"cannot reach database {describe_url(url)}: {type(exc).__name__}") from exc
    head = head_revision(url)
    if current == head:
        return
    if not settings.database_url:
        upgrade(url)
        return
    raise ConfigError(
        f"database {describe_url(url)} is at revision {current or 'none'}, not {head}: run `qbgw db upgrade`"
    )
