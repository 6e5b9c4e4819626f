"""Which command lines make a gevent worker (patched before anything else is imported)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker._early import wants_gevent


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["/venv/bin/qbgw", "worker", "--pool", "gevent"], {}, True),
        (["-m", "worker", "--pool=gevent", "-c", "64"], {}, True),
        (["qbgw", "worker"], {"QBGW_POOL": "gevent"}, True),
        (["qbgw", "worker", "--pool", "threads"], {"QBGW_POOL": "gevent"}, False),
        (["qbgw", "worker"], {}, False),
        (["qbgw", "submit", "--pool", "gevent"], {}, False),
        (["pytest", "worker", "--pool", "gevent"], {}, False),
    ],
)
def test_wants_gevent(argv: list[str], env: dict[str, str], expected: bool) -> None:
    assert wants_gevent(argv, env) is expected


def test_a_gevent_worker_is_refused_with_the_reason_and_what_to_use(tmp_path: Path) -> None:
    from worker.errors import ConfigError
    from worker.service import run_worker
    from worker.settings import Settings

    with pytest.raises(ConfigError, match=r"not supported.*every 2 s.*QBGW_POOL=threads"):
        run_worker(Settings(data_dir=tmp_path, pool="gevent"))
