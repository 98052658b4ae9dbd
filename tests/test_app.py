"""Which app publishes: the user's, never a silent guess that ends in the embedded Redis."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery, _state

import op_celery
from op_celery import _app


def in_thread(call: Callable[[], Any]) -> Any:
    """``call()`` in a new thread (where no Celery app is current); its result or exception."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:  # the outcome is what the test looks at
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    return outcome[0]


@pytest.fixture
def two_apps(env: dict[str, str]) -> Iterator[tuple[Celery, Celery]]:
    """Two user apps on the test's broker, neither current nor default in any thread."""
    previous_default = _state.default_app
    previous_current = _state._tls.current_app
    apps = []
    for name in ("web", "billing"):
        app = Celery(name, set_as_current=False)
        app.conf.update(
            broker_url=env["OP_CELERY_BROKER_URL"],
            broker_transport_options={"global_keyprefix": env["OP_CELERY_BROKER_KEY_PREFIX"]},
            op_celery_queue=env["OP_CELERY_QUEUE"],
            task_ignore_result=True,
        )
        apps.append(app)
    try:
        yield apps[0], apps[1]
    finally:
        _state.set_default_app(previous_default)
        _state._set_current_app(previous_current)
        for app in apps:
            app.close()
        _app.reset_settings()


def test_two_apps_and_no_current_one_is_a_configuration_error_saying_how_to_choose(
    two_apps: tuple[Celery, Celery], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OP_CELERY_BROKER_URL", raising=False)
    error = in_thread(lambda: op_celery.track.delay("ambiguous"))
    assert isinstance(error, op_celery.ConfigurationError)
    assert "'web'" in str(error) and "'billing'" in str(error)
    assert "app.set_default()" in str(error) and "OP_CELERY_BROKER_URL" in str(error)


def test_the_app_made_default_publishes_from_any_thread(
    two_apps: tuple[Celery, Celery], redis_client: redis.Redis, env: dict[str, str]
) -> None:
    web, _billing = two_apps
    web.set_default()
    in_thread(lambda: op_celery.track.delay("chosen"))
    [raw] = redis_client.lrange(env["OP_CELERY_BROKER_KEY_PREFIX"] + env["OP_CELERY_QUEUE"], 0, -1)
    assert "'chosen'" in json.loads(raw)["headers"]["kwargsrepr"]


def test_the_broker_url_setting_chooses_the_packages_app(
    two_apps: tuple[Celery, Celery], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OP_CELERY_BROKER_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setattr(_app, "_package_app", None)
    try:
        chosen = in_thread(_app.publishing_app)
        assert chosen is _app._package_app
        assert chosen.conf.broker_url == "redis://127.0.0.1:1/0"
    finally:
        if _app._package_app is not None:
            _app._package_app.close()


def test_a_sentinel_broker_gets_the_master_name_kombu_needs() -> None:
    from op_celery._settings import load_settings

    app = Celery("sentinel-conf", set_as_current=False)
    settings = load_settings(
        env={
            "OP_CELERY_BROKER_URL": "sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380",
            "OP_CELERY_REDIS_SENTINEL_MASTER": "events-master",
        }
    )
    _app.configure_app(app, settings)
    assert app.conf.broker_transport_options["master_name"] == "events-master"
    app.close()
