"""The public surface: what ``__all__`` promises, and what a type checker sees."""

from __future__ import annotations

import textwrap
from pathlib import Path

import op_celery

from ._support import mypy_on


def test_all_is_exactly_what_the_package_exports() -> None:
    # "@py_builtins"/"@pytest_ar": pytest rewrites the asserts of a package that registers a
    # pytest plugin (op_celery.testing._pytest) and leaves those names in its modules.
    public = {name for name in vars(op_celery) if not name.startswith(("_", "@"))}
    modules = {"worker", "testing", "dead_letters", "signals", "contrib", "cli", "metrics"}
    assert set(op_celery.__all__) - {"__version__"} == public - modules
    for name in op_celery.__all__:
        assert hasattr(op_celery, name)


def test_the_package_ships_py_typed() -> None:
    assert (Path(op_celery.__file__).parent / "py.typed").exists()


def test_every_error_derives_from_one_base_and_transient_is_not_permanent() -> None:
    # Not every exported name: touching the task proxies would resolve (and so create) the
    # publishing app, which later tests expect to build from their own environment.
    from op_celery import _exceptions

    for name in _exceptions.__all__:
        error = getattr(_exceptions, name)
        assert issubclass(error, op_celery.OpenPanelError), name
        assert getattr(op_celery, name) is error, f"{name} is not exported"
    assert not issubclass(op_celery.TransientError, op_celery.PermanentError)
    assert not issubclass(op_celery.PermanentError, op_celery.TransientError)


def test_mypy_flags_wrong_task_arguments_in_user_code(tmp_path: Path) -> None:
    source = textwrap.dedent(
        """
        from op_celery import increment, track
        track.delay(nme="x")
        increment.delay(profile_id="u1", property="v", value="2")
        track.delay("fine", properties={"a": 1}, profile_id="u1")
        """
    )
    out, errors = mypy_on(source, tmp_path)
    assert 'Unexpected keyword argument "nme"' in out
    assert 'Argument "value" to "delay"' in out
    assert len(errors) == 2, out


def test_storage_outages_are_transient_but_not_refusals_of_the_api() -> None:
    for storage in (op_celery.StorageUnavailable, op_celery.LimiterUnavailable):
        assert issubclass(storage, op_celery.TransientError)
        assert not issubclass(storage, op_celery.DeliveryError)
    assert issubclass(op_celery.LimiterUnavailable, op_celery.StorageUnavailable)
    for api in (
        op_celery.RateLimited,
        op_celery.ServerError,
        op_celery.NetworkError,
        op_celery.ProfileNotFound,
    ):
        assert issubclass(api, op_celery.DeliveryError)
        assert issubclass(api, op_celery.TransientError)


def test_transient_api_errors_keep_status_and_retry_after_through_pickle() -> None:
    import pickle

    error = op_celery.RateLimited("slow down", status=429, server_message="x", retry_after=2.5)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.status, copy.server_message, copy.retry_after, str(copy)) == (
        429,
        "x",
        2.5,
        "slow down",
    )
    storage = pickle.loads(pickle.dumps(op_celery.StorageUnavailable("redis down; retried")))
    assert str(storage) == "redis down; retried" and storage.retry_after is None
