"""Eager mode (``task_always_eager``), as a user's test suite runs it: the task runs in the
caller, sends once, keeps nothing in Redis and never retries itself into a stack overflow."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from celery import Celery

import op_celery
from op_celery import _app
from op_celery.testing import StandInServer

from ._support import free_port


@pytest.fixture
def eager_app(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Celery, dict[str, str]]]:
    """A user's app in eager mode, with the package's settings in the environment."""
    for name, value in env.items():
        if name.startswith(("OPENPANEL_", "OP_CELERY_")):
            monkeypatch.setenv(name, value)
    app = Celery("user-eager-app", set_as_current=True)
    app.conf.update(
        broker_url=env["OP_CELERY_BROKER_URL"],
        broker_transport_options={"global_keyprefix": env["OP_CELERY_BROKER_KEY_PREFIX"]},
        task_always_eager=True,
    )
    _app.reset_settings()
    yield app, env
    app.close()
    _app.reset_settings()


def keys_under(redis_client: redis.Redis, prefix: str) -> list[bytes]:
    return list(redis_client.scan_iter(match=f"{prefix}*", count=1000))


def test_an_eager_call_delivers_once_and_leaves_nothing_in_redis(
    eager_app: tuple[Celery, dict[str, str]],
    stand_in: StandInServer,
    redis_client: redis.Redis,
    key_prefix: str,
) -> None:
    result = op_celery.track.delay("signup", properties={"plan": "pro"}, profile_id="u1")
    assert result.successful()
    assert [r.payload["name"] for r in stand_in.received] == ["signup"]
    # No outbox record, ledger mark, limiter key or dead letter for a worker to find later.
    assert keys_under(redis_client, key_prefix) == []


def test_an_eager_call_needs_no_redis_at_all(
    eager_app: tuple[Celery, dict[str, str]],
    stand_in: StandInServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, _ = eager_app
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    app.conf.broker_url = nowhere
    monkeypatch.setenv("OP_CELERY_BROKER_URL", nowhere)
    monkeypatch.setenv("OP_CELERY_REDIS_URL", nowhere)
    _app.reset_settings()
    op_celery.identify.delay("u1", first_name="Ada")
    op_celery.increment.delay("u1", "logins")
    assert [r.type for r in stand_in.received] == ["identify", "increment"]


def test_a_failing_api_in_eager_mode_fails_the_call_once_instead_of_recursing(
    eager_app: tuple[Celery, dict[str, str]],
    stand_in: StandInServer,
    redis_client: redis.Redis,
    key_prefix: str,
) -> None:
    stand_in.fail_for(60, status=503)
    result = op_celery.track.delay("signup")
    assert result.failed()
    assert isinstance(result.result, op_celery.ServerError)
    assert len(stand_in.requests) == 1  # tried once: no inline retries
    assert keys_under(redis_client, key_prefix) == []  # and no dead letter in the broker


def test_eager_propagates_raises_the_api_error_in_the_caller(
    eager_app: tuple[Celery, dict[str, str]], stand_in: StandInServer
) -> None:
    app, _ = eager_app
    app.conf.task_eager_propagates = True
    stand_in.fail_for(60, status=503)
    with pytest.raises(op_celery.ServerError):
        op_celery.track.delay("signup")
    assert len(stand_in.requests) == 1


def test_eager_mode_without_credentials_says_what_to_set_and_stores_nothing(
    eager_app: tuple[Celery, dict[str, str]],
    stand_in: StandInServer,
    redis_client: redis.Redis,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, _ = eager_app
    app.conf.task_eager_propagates = True
    monkeypatch.delenv("OPENPANEL_CLIENT_ID")
    monkeypatch.delenv("OPENPANEL_CLIENT_SECRET")
    _app.reset_settings()
    with pytest.raises(op_celery.ConfigurationError, match="OPENPANEL_CLIENT_ID"):
        op_celery.track.delay("signup")
    assert stand_in.requests == []
    assert keys_under(redis_client, key_prefix) == []


def test_bad_input_still_raises_at_delay_in_eager_mode(
    eager_app: tuple[Celery, dict[str, str]], stand_in: StandInServer
) -> None:
    with pytest.raises(op_celery.InvalidEvent):
        op_celery.track.delay("")
    assert stand_in.requests == []
