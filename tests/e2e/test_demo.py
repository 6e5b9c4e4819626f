"""The README's first command: ``qbgw demo`` on the embedded default, in a fresh data directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_the_demo_prints_answers_from_a_separate_worker_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QBGW_")}
    env["QBGW_DATA_DIR"] = str(tmp_path / "qbgw")
    done = subprocess.run(
        [sys.executable, "-m", "qbgw", "demo"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count(": succeeded after") == 5
    assert out.count(": failed after 1 attempt(s)") == 1
    assert "Image 1: png 64x48. Image 2: jpeg 320x240." in out
    assert "(two 503s, then an answer): succeeded after 3 attempt(s)" in out
    assert out.count("attempt.request #3") == 1
    assert "worker process" in out
    assert (tmp_path / "qbgw" / "qbgw.db").is_file()
    # The worker was a separate process: its log is its own.
    assert "qbgw.worker" in (tmp_path / "qbgw" / "demo-worker.log").read_text()
