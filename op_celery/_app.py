"""Which Celery app publishes, and the package's own app for users who have none.

A user's app (created anywhere, before or after ``import op_celery``) becomes Celery's current
app and the tasks publish through it. A script with no Celery app of its own publishes through
the package's app, configured from the settings, so ``track.delay()`` just works.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any

from celery import Celery

from . import _compat
from ._embedded import embedded_redis
from ._exceptions import ConfigurationError
from ._settings import EMBEDDED_URL, Settings, load_settings

__all__ = ["configure_app", "package_app", "publishing_app", "settings_for"]

log = logging.getLogger("op_celery")

_lock = threading.Lock()
_package_app: Celery | None = None
_settings: weakref.WeakKeyDictionary[Celery, Settings] = weakref.WeakKeyDictionary()


def settings_for(app: Celery) -> Settings:
    """The settings of ``app`` (environment, overridden by its config), built once per app."""
    settings = _settings.get(app)
    if settings is None:
        settings = load_settings(_conf_view(app))
        _settings[app] = settings
    return settings


def reset_settings(app: Celery | None = None) -> None:
    """Forget cached settings (after changing the environment or config in tests)."""
    if app is None:
        _settings.clear()
    else:
        _settings.pop(app, None)


def _conf_view(app: Celery) -> dict[str, Any]:
    # Only the keys we read, so Celery's lazy defaults are not all materialised.
    conf = app.conf
    view = {
        key: conf[key] for key in list(conf.keys()) if key.startswith(("openpanel", "op_celery"))
    }
    view["broker_url"] = conf.get("broker_url")
    return view


def configure_app(app: Celery, settings: Settings) -> None:
    """Apply the settings the package's tasks rely on to an app the package owns."""
    transport_options: dict[str, Any] = {
        "visibility_timeout": settings.visibility_timeout_s,
        # Bounded, so .delay() against an unreachable broker gives up within the publish bound
        # instead of hanging in connect().
        "socket_connect_timeout": max(0.1, settings.publish_timeout_s / 2),
        "socket_timeout": 10.0,
        # kombu sweeps for expired unacked messages only every interval x throttle seconds
        # (100 s by default): without these, a crashed worker's events would come back up to
        # 100 s after the visibility timeout, not at it.
        "unacked_restore_interval": min(10.0, max(1.0, settings.visibility_timeout_s / 10)),
        "unacked_restore_throttle": 1,
    }
    if settings.broker_key_prefix:
        transport_options["global_keyprefix"] = settings.broker_key_prefix
    broker_url = settings.broker_url
    if broker_url == EMBEDDED_URL:
        broker_url = "redis+socket://" + embedded_redis()
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_default_queue=settings.queue,
        # Events wait on the broker, not in a worker's memory where a crash would strand them.
        worker_prefetch_multiplier=4,
        worker_hijack_root_logger=True,
        # On a lost broker connection, stop the late-acked events in flight: they cannot be
        # acked on the new connection and come back through the visibility timeout anyway.
        worker_cancel_long_running_tasks_on_connection_loss=True,
    )


def package_app() -> Celery:
    """The package's own Celery app (``celery -A op_celery.worker worker`` runs it)."""
    global _package_app
    with _lock:
        if _package_app is None:
            # Not made current: a user's app created later must stay the one that publishes.
            app = Celery("op_celery", set_as_current=False)
            configure_app(app, load_settings())
            # The tasks are on it already if ``op_celery`` was imported: they register on every
            # app, present and future (``_tasks``). Whoever runs a worker imports them.
            _package_app = app
        return _package_app


def publishing_app() -> Celery:
    """The app ``.delay()`` publishes through: the user's, else the package's own.

    Celery's current app is per thread: an app created at import time is current in the main
    thread only, not in a web server's request threads. So, in order: this thread's current
    app; else the app made default with ``app.set_default()``; else the one user app that
    exists; else, with several, the package's app if ``OP_CELERY_BROKER_URL`` names its broker,
    or :class:`ConfigurationError`; else (no Celery app at all) the package's app, whose
    broker is the embedded Redis unless one is configured.
    """
    # Celery offers no public "was an app created?" test: ``current_app`` silently makes a
    # fallback app pointed at amqp://localhost, which is never what an op-celery user wants.
    # So Celery's private state is read, through ``_compat`` (which says how, and what it
    # does on a Celery without it).
    current: Celery | None = _compat.thread_current_app()
    if current is not None:
        return current
    default: Celery | None = _compat.default_app()
    if default is not None:
        return default
    users = [app for app in _compat.active_apps() if _is_user_app(app)]
    if len(users) == 1:
        return users[0]
    if users and not os.environ.get("OP_CELERY_BROKER_URL"):
        # Guessing would send the events to a broker nobody may read: the package's app, with
        # no broker setting, would put them in the embedded Redis.
        names = ", ".join(sorted(repr(app.main or "?") for app in users))
        raise ConfigurationError(
            f"op_celery: {len(users)} Celery apps exist ({names}) and none is current in this "
            f"thread ({threading.current_thread().name}), so op_celery cannot tell which one "
            "publishes: call app.set_default() on yours once at start-up, or set "
            "OP_CELERY_BROKER_URL to publish through op_celery's own app"
        )
    return package_app()


def _is_user_app(app: Celery) -> bool:
    """Whether ``app`` (one of ``_compat.active_apps()``, Celery's fallback app left out) is
    not the package's own."""
    return app is not _package_app
