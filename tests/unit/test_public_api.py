from __future__ import annotations

import qbgw
from qbgw import errors


def test_all_names_exist_and_every_error_is_exported() -> None:
    for name in qbgw.__all__:
        assert hasattr(qbgw, name), name
    assert set(errors.__all__) <= set(qbgw.__all__)


def test_the_public_api_is_what_users_call() -> None:
    assert {"submit", "get_job", "wait_for_job", "job_events", "Settings"} <= set(qbgw.__all__)
