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
from ._settings import DEFAULT_LEDGER_TTL_S, EMBEDDED_URL, Settings, load_settings

__all__ = ["adopt", "configure_app", "package_app", "publishing_app", "settings_for"]

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


def _conf_view(app: Celery, broker_visibility: bool = True) -> dict[str, Any]:
    # Only the keys we read, so Celery's lazy defaults are not all materialised.
    conf = app.conf
    view = {
        key: conf[key] for key in list(conf.keys()) if key.startswith(("openpanel", "op_celery"))
    }
    view["broker_url"] = conf.get("broker_url")
    # The visibility timeout the broker really applies is the app's, when it sets one: the
    # countdowns must stay under it (``Settings.max_countdown_s``), and the ledger outlive it.
    visibility_s = _app_visibility_timeout_s(app) if broker_visibility else None
    if visibility_s is not None:
        view["op_celery_visibility_timeout"] = visibility_s
        if view.get("op_celery_ledger_ttl") is None and not os.environ.get("OP_CELERY_LEDGER_TTL"):
            view["op_celery_ledger_ttl"] = max(DEFAULT_LEDGER_TTL_S, 2 * visibility_s)
    return view


#: Seconds the package's app waits for a broker's TCP connection, and for each of its replies,
#: outside a publish (a publish has its own bound, ``OP_CELERY_PUBLISH_TIMEOUT``).
CONSUMER_CONNECT_TIMEOUT_S = 5.0
CONSUMER_SOCKET_TIMEOUT_S = 10.0
#: kombu's visibility timeout when an app's Redis broker sets none, in seconds.
KOMBU_VISIBILITY_TIMEOUT_S = 3600.0
#: URL schemes of the brokers that have a visibility timeout (kombu's Redis transport).
_REDIS_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel", "sentinel+ssl", "embedded")


def _redis_broker_url(app: Celery) -> bool:
    url = str(app.conf.get("broker_url") or "")
    return url.split("://", 1)[0].lower() in _REDIS_SCHEMES


def _app_visibility_timeout_s(app: Celery) -> float | None:
    """The visibility timeout the app's Redis broker is given, if the app gives one."""
    if not _redis_broker_url(app):
        return None
    value = (app.conf.get("broker_transport_options") or {}).get("visibility_timeout")
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def adopt(app: Celery) -> list[str]:
    """At worker start, before it connects: give a user's app (Redis broker) the package's
    visibility timeout and kombu's prompt sweep of unacked messages where it sets none; return
    the lines to log once the worker is up, saying what that set or what the app's own value
    changes. Nothing on the package's own app, which ``configure_app`` configured.

    When the app's own tasks are acked late (``task_acks_late``, or a task's ``acks_late``),
    kombu's 3,600 s stays: a shorter one would hand their long runs to a second worker.
    """
    if app is _package_app or not _redis_broker_url(app):
        return []
    name = app.main or "?"
    wanted_s = load_settings(_conf_view(app, broker_visibility=False)).visibility_timeout_s
    options = dict(app.conf.get("broker_transport_options") or {})
    own_s = _app_visibility_timeout_s(app)
    if own_s is None:
        late = _own_late_acked_tasks(app)
        if late:
            return [
                f"op_celery: visibility timeout {KOMBU_VISIBILITY_TIMEOUT_S:,.0f} s (kombu's "
                f"default, kept: app {name!r} acks {late[0]!r} late, and a shorter one would "
                f"hand its long runs to a second worker): a crashed worker's events come back "
                f"after {_duration(KOMBU_VISIBILITY_TIMEOUT_S)}, not {_duration(wanted_s)}; set "
                "broker_transport_options={'visibility_timeout': ...} to choose"
            ]
        options["visibility_timeout"] = wanted_s
        options.setdefault("unacked_restore_interval", _restore_interval_s(wanted_s))
        options.setdefault("unacked_restore_throttle", 1)
        app.conf.broker_transport_options = options
        reset_settings(app)
        return [
            f"op_celery: visibility timeout {wanted_s:,.0f} s set on app {name!r} (it set none; "
            f"kombu's default is {KOMBU_VISIBILITY_TIMEOUT_S:,.0f} s): a crashed worker's "
            f"events come back after {_duration(wanted_s)}; its own tasks get it too"
        ]
    if own_s != wanted_s:
        return [
            f"op_celery: visibility timeout {own_s:,.0f} s (the broker_transport_options of "
            f"app {name!r}, kept): a crashed worker's events come back after "
            f"{_duration(own_s)}, not {_duration(wanted_s)}; countdowns are capped at "
            f"{own_s / 2:,.0f} s"
        ]
    return []


def _own_late_acked_tasks(app: Celery) -> list[str]:
    """The app's own tasks (neither op_celery's nor Celery's) that are acked late."""
    return sorted(
        name
        for name, task in app.tasks.items()
        if not name.startswith(("op_celery.", "celery.")) and getattr(task, "acks_late", False)
    )


def _restore_interval_s(visibility_s: float) -> float:
    # kombu sweeps for expired unacked messages only every interval x throttle seconds
    # (100 s by default): without these, a crashed worker's events would come back up to
    # 100 s after the visibility timeout, not at it.
    return min(10.0, max(1.0, visibility_s / 10))


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        hours = int(seconds // 3600)
        return "an hour" if hours == 1 else f"{hours} hours"
    if seconds >= 60 and seconds % 60 == 0:
        minutes = int(seconds // 60)
        return "a minute" if minutes == 1 else f"{minutes} minutes"
    return f"{seconds:,.0f} s"


def configure_app(app: Celery, settings: Settings) -> None:
    """Apply the settings the package's tasks rely on to an app the package owns."""
    transport_options: dict[str, Any] = {
        "visibility_timeout": settings.visibility_timeout_s,
        # The app's own connections (its workers' consumers): a broker gone silent is noticed.
        # Publishing goes through op-celery's own pool with the publish bound's timeouts
        # (``_publish_bound.publish_pools``), on this app as on a user's.
        "socket_connect_timeout": CONSUMER_CONNECT_TIMEOUT_S,
        "socket_timeout": CONSUMER_SOCKET_TIMEOUT_S,
        "unacked_restore_interval": _restore_interval_s(settings.visibility_timeout_s),
        "unacked_restore_throttle": 1,
    }
    if settings.broker_key_prefix:
        transport_options["global_keyprefix"] = settings.broker_key_prefix
    if settings.broker_url.startswith("sentinel://"):
        # kombu's Sentinel transport needs the master's name; the package's Redis names it in
        # OP_CELERY_REDIS_SENTINEL_MASTER, and a broker behind the same sentinels shares it.
        transport_options["master_name"] = settings.redis_sentinel_master
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
