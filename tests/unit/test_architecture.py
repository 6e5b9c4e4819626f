"""The house: the layer contract holds and would catch a violation, no module imports in a cycle, the package
is installed as ``qbgw`` only, and a user's own ``worker.py`` cannot shadow it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import grimp

from tests.conftest import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path, package_parent: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_layer_contracts_hold() -> None:
    done = _lint(ROOT, ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout


def test_a_core_module_that_imports_the_facade_breaks_the_contract(tmp_path: Path) -> None:
    copy = tmp_path / "qbgw"
    shutil.copytree(ROOT / "worker", copy, ignore=shutil.ignore_patterns("__pycache__"))
    jobs = copy / "store" / "jobs.py"
    jobs.write_text(jobs.read_text() + "\nfrom ..producer import submit  # a core module reaching up\n")
    done = _lint(tmp_path, tmp_path)
    assert done.returncode != 0
    assert "BROKEN" in done.stdout
    assert "qbgw.store.jobs -> qbgw.producer" in done.stdout


def test_no_module_imports_in_a_cycle() -> None:
    graph = grimp.build_graph("qbgw", cache_dir=None)
    edges = [(a, b) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)]
    back = [(a, b) for a, b in edges if graph.find_shortest_chain(importer=b, imported=a) is not None]
    assert len(edges) > 200
    assert not back, back  # an import A -> B with a way back from B to A is a cycle


def test_every_folder_of_the_package_is_installed_under_qbgw() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {"qbgw": "worker", "qbgw.migrations": "migrations"}
    folders = {"qbgw.migrations"} | {
        "qbgw" + "".join("." + part for part in path.parent.relative_to(ROOT / "worker").parts)
        for path in (ROOT / "worker").rglob("__init__.py")
    }
    assert set(config["packages"]) == folders


def test_a_users_own_worker_module_does_not_shadow_qbgw_and_worker_is_not_installed(tmp_path: Path) -> None:
    (tmp_path / "worker.py").write_text("RAN = 'the app s own worker.py'\n")  # a Celery/RQ/Heroku app's module
    script = (
        "import worker, qbgw, qbgw.producer\n"
        "assert worker.RAN == 'the app s own worker.py'\n"
        "assert qbgw.submit is qbgw.producer.submit and qbgw.__name__ == 'qbgw'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr
    elsewhere = subprocess.run(
        [sys.executable, "-c", "import worker"], cwd=tmp_path.parent, capture_output=True, text=True, timeout=60
    )
    assert "No module named 'worker'" in elsewhere.stderr


def test_the_package_folder_imported_by_its_own_name_refuses_with_the_reason() -> None:
    done = subprocess.run([sys.executable, "-c", "import worker"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "import it as qbgw" in done.stderr


def test_a_wheel_carries_the_package_its_scripts_and_its_migrations(tmp_path: Path) -> None:
    # A plain (non-editable) install must migrate the embedded default on first use, as the demo does.
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("qbgw-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"qbgw/__init__.py", "qbgw/upstream/acquire.lua", "qbgw/py.typed", "qbgw/migrations/env.py",
            "qbgw/migrations/script.py.mako"} <= names  # fmt: skip
    assert len([n for n in names if n.startswith("qbgw/migrations/versions/") and n.endswith(".py")]) >= 10
    assert not [n for n in names if n.startswith("worker/")]


def test_python_m_qbgw_and_celery_a_qbgw_work() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qbgw", "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT.parent
    )
    assert done.returncode == 0
    assert "qbgw" in done.stdout
    tasks = subprocess.run(
        [sys.executable, "-c", "from qbgw.celery_entry import app; print(sorted(app.tasks))"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT.parent,
    )
    assert "qbgw.run_job" in tasks.stdout, tasks.stderr
