"""docker-compose.yml names only real entry points and settings (no Docker engine runs here)."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from qbgw.cli.main import cli
from qbgw.errors import ConfigError
from qbgw.settings import PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
SETTING_NAMES = {PREFIX + f.name.upper() for f in fields(Settings)}


def _resolve(args: list[str]) -> tuple[click.Command, list[str]]:
    """Walk the qbgw command tree along ``args``; returns the command and its remaining args."""
    command: click.Command = cli
    rest = list(args)
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"qbgw has no command {rest[0]!r}"
        command, rest = sub, rest[1:]
    return command, rest


@pytest.mark.parametrize("name", [n for n, s in SERVICES.items() if "build" in s])
def test_every_qbgw_service_runs_a_real_command_with_real_options(name: str) -> None:
    program, *args = SERVICES[name]["command"]
    assert program == "qbgw"
    command, rest = _resolve(args)
    assert not isinstance(command, click.Group), f"{name}: {args} stops at a group"
    options = {opt for param in command.params for opt in getattr(param, "opts", [])}
    for token in rest:
        if token.startswith("-"):
            assert token in options, f"{name}: qbgw {' '.join(args)}: no option {token}"
    assert command.make_context("qbgw", list(rest), resilient_parsing=False) is not None


#: Services whose health check is an HTTP GET made with the image's Python (it has no curl).
HTTP_CHECKED = {"api"}


@pytest.mark.parametrize(
    "name", [n for n, s in SERVICES.items() if "build" in s and "healthcheck" in s and n not in HTTP_CHECKED]
)
def test_every_qbgw_health_check_runs_a_real_command(name: str) -> None:
    kind, program, *args = SERVICES[name]["healthcheck"]["test"]
    assert (kind, program) == ("CMD", "qbgw")
    command, rest = _resolve(args)
    assert command.make_context("qbgw", list(rest), resilient_parsing=False) is not None


def test_the_api_service_serves_on_its_published_port_with_the_workers_environment() -> None:
    api = SERVICES["api"]
    program, *args = api["command"]
    command, rest = _resolve(args)
    assert (program, command.name) == ("qbgw", "serve")
    options = command.make_context("qbgw", list(rest), resilient_parsing=False).params
    assert options["host"] == "0.0.0.0"  # noqa: S104 - reachable from outside its container, as it must be
    assert options["workers"] == 2
    assert api["ports"] == [f"{options['port']}:{options['port']}"]
    assert api["environment"] == SERVICES["worker"]["environment"]
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # POST /v1/audit/verify reads the anchors the workers write: the same volume, mounted read-only.
    anchors = COMPOSE["x-qbgw-env"]["QBGW_AUDIT_ANCHOR_FILE"].rsplit("/", 1)[0]
    assert f"audit-anchors:{anchors}:ro" in api["volumes"]


def test_the_api_health_check_gets_healthz_on_the_served_port() -> None:
    from qbgw.api.app import create_app

    api = SERVICES["api"]
    kind, program, flag, code = api["healthcheck"]["test"]
    assert (kind, program, flag) == ("CMD", "python", "-c")
    port = api["command"][api["command"].index("--port") + 1]
    match = re.fullmatch(r"import urllib\.request; urllib\.request\.urlopen\('(http://[^']+)', timeout=\d+\)", code)
    assert match is not None, code
    assert match.group(1) == f"http://127.0.0.1:{port}/healthz"
    compile(code, "healthcheck", "exec")
    paths = create_app(Settings()).openapi()["paths"]
    assert "get" in paths["/healthz"]


def test_workers_and_the_exporter_have_health_checks() -> None:
    assert SERVICES["worker"]["healthcheck"]["test"][2] == "health"
    assert SERVICES["exporter"]["healthcheck"]["test"][2:] == ["health"]


def test_every_setting_the_compose_file_names_exists() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    named = set(re.findall(r"\bQBGW_[A-Z_]+\b", text))
    assert named
    assert named <= SETTING_NAMES, named - SETTING_NAMES


def test_the_environment_parses_into_settings() -> None:
    required = {"QBGW_ENCRYPTION_KEYS": "k1:" + "A" * 43 + "=", "QBGW_ANCHOR_KEY": "ab" * 32}
    env = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in COMPOSE["x-qbgw-env"].items()}
    for name, value in required.items():
        assert env[name].startswith("${" + name + ":?"), f"{name} must be required, not defaulted"
        env[name] = value
    settings = Settings.from_env(env)
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.broker_url.startswith("redis://")


def test_the_build_context_has_what_the_dockerfile_copies() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    assert all(s.get("build") in (None, ".") for s in SERVICES.values())


def test_workers_wait_for_the_migration_and_the_broker() -> None:
    needs = SERVICES["worker"]["depends_on"]
    assert needs["migrate"]["condition"] == "service_completed_successfully"
    assert needs["redis"]["condition"] == "service_healthy"
    assert "container_name" not in SERVICES["worker"], "a fixed name would forbid --scale worker=N"


def test_the_migration_runs_as_the_owner_and_grants_the_role_the_workers_connect_as() -> None:
    def user(env: dict[str, Any]) -> str:
        return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", env["QBGW_DATABASE_URL"]).split("://")[1].split(":")[0]

    command = SERVICES["migrate"]["command"]
    app = command[command.index("--app-role") + 1]
    owner = user(SERVICES["migrate"]["environment"])
    assert command[1:3] == ["db", "upgrade"]
    assert owner != app
    assert user(SERVICES["worker"]["environment"]) == user(SERVICES["exporter"]["environment"]) == app
    init = SERVICES["postgres"]["volumes"][1].split(":")[0]
    script = (ROOT / init).read_text()
    assert f'-v owner="${{DB_OWNER:-{owner}}}"' in script
    assert f'-v app="${{DB_APP:-{app}}}"' in script
    assert "SUPERUSER" not in script  # the owner must not be one


def test_the_rabbitmq_override_keeps_the_fleet_limit_in_redis() -> None:
    """docker-compose.rabbitmq.yml: compose merges each service's environment over the base file's; the merged
    settings parse (not refused: QBGW_REDIS_URL holds the limit) and every qbgw service gets them."""
    override = yaml.safe_load((ROOT / "docker-compose.rabbitmq.yml").read_text())
    base = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in COMPOSE["x-qbgw-env"].items()}
    base |= {"QBGW_ENCRYPTION_KEYS": "k1:" + "A" * 43 + "=", "QBGW_ANCHOR_KEY": "ab" * 32}
    changes = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in override["x-rabbitmq-env"].items()}
    assert set(re.findall(r"\bQBGW_[A-Z_]+\b", (ROOT / "docker-compose.rabbitmq.yml").read_text())) <= SETTING_NAMES
    settings = Settings.from_env(base | changes)
    assert settings.broker_url.startswith("amqp://")
    assert settings.rate_limit > 0
    assert settings.coordination_url == "redis://redis:6379/0"
    without = {k: v for k, v in (base | changes).items() if k != "QBGW_REDIS_URL"}
    with pytest.raises(ConfigError, match="Set QBGW_REDIS_URL"):
        Settings.from_env(without)
    qbgw_services = {name for name, service in SERVICES.items() if "environment" in service and "build" in service}
    assert {name for name in override["services"] if name != "rabbitmq"} == qbgw_services
    for name in qbgw_services:
        assert override["services"][name]["environment"] == override["x-rabbitmq-env"], name
    assert "rabbitmq" in override["services"]
