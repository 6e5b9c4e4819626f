from __future__ import annotations

import builtins
import pickle

import pytest

from qbgw import errors


def _instance(name: str) -> errors.QbgwError:
    kind = getattr(errors, name)
    if issubclass(kind, errors.RateLimited):
        return kind("gateway answered HTTP 429", 429, ("slow down",), 2.5)
    if issubclass(kind, errors.GatewayError):
        return kind("gateway answered HTTP 503", 503, ("Service Unavailable",))
    if issubclass(kind, errors.JobNotFound):
        return kind("job-1")
    if issubclass(kind, errors.NotAnnounced):
        return kind("job-1", "OperationalError")
    if issubclass(kind, errors.DecryptionFailed):
        return kind("jobs.answer of row job-1", "authentication failed")
    return kind("something was wrong")


@pytest.mark.parametrize("name", errors.__all__)
def test_every_error_survives_a_pickle_round_trip(name: str) -> None:
    exc = _instance(name)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert back.__dict__ == exc.__dict__


@pytest.mark.parametrize("name", errors.__all__)
def test_every_error_is_rooted_and_shadows_no_builtin(name: str) -> None:
    assert issubclass(getattr(errors, name), errors.QbgwError)
    assert not hasattr(builtins, name)


@pytest.mark.parametrize(
    ("kind", "transient"),
    [
        (errors.UpstreamUnavailable, True),
        (errors.UpstreamTimeout, True),
        (errors.RateLimited, True),
        (errors.UpstreamServerError, True),
        (errors.UpstreamRejected, False),
        (errors.FeatureDisabled, False),
        (errors.AuthenticationFailed, False),
        (errors.MalformedResponse, False),
    ],
)
def test_retry_semantics_live_in_the_type(kind: type[errors.GatewayError], transient: bool) -> None:
    assert issubclass(kind, errors.TransientGatewayError) is transient
    assert issubclass(kind, errors.PermanentGatewayError) is not transient


def test_the_tree_in_the_docstring_names_every_class() -> None:
    for name in errors.__all__:
        assert name in (errors.__doc__ or "")


def test_a_job_not_found_names_the_id() -> None:
    assert str(errors.JobNotFound("abc")) == "no such job: abc"
    assert isinstance(errors.JobNotFound("abc"), LookupError)
