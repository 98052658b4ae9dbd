"""The caller's side of the tasks beyond validation: the spool that keeps events while the
broker is away, re-publishing from it, and the publishers that replay and the CLI use.

Everything here publishes through the app that publishes (``_app.publishing_app``), by task
name, so nothing needs the task classes themselves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

import redis
from celery import Task
from kombu import Queue
from kombu.exceptions import OperationalError

from ._app import publishing_app, settings_for
from ._publish_bound import deadline_errback
from ._settings import Settings
from ._spool import Spool, default_spool_dir
from .dead_letters import DeadLetter

__all__ = [
    "BROKER_ERRORS",
    "NOW",
    "NO_SPOOL",
    "flush_spool",
    "publish_dead_letter",
    "publish_retry_policy",
    "queue_for",
    "republish",
    "spool_for",
    "task_for",
]

#: Errors that mean the broker did not take a message.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    OSError,
    redis.ConnectionError,
    redis.TimeoutError,
)
#: Option of apply_async (never sent) that makes a publish failure raise instead of spooling.
NO_SPOOL = "_op_celery_no_spool"
#: Option of apply_async (never sent): publish now even if the request context defers.
NOW = "_op_celery_now"
#: Seconds between two publish attempts while the broker does not answer.
PUBLISH_RETRY_INTERVAL_S = 0.2

_spools: dict[str, Spool] = {}


def publish_retry_policy(timeout_s: float) -> dict[str, Any]:
    """kombu's retry policy that gives up within ``timeout_s``: its errback ends the retries
    before an attempt that could end later (``_publish_bound.deadline_errback``), and the count of
    retries is what fits when each attempt fails at once (a broker that refuses)."""
    attempts = max(0, math.ceil(timeout_s / PUBLISH_RETRY_INTERVAL_S) - 1)
    return {
        "max_retries": attempts,
        "interval_start": 0,
        "interval_step": PUBLISH_RETRY_INTERVAL_S,
        "interval_max": PUBLISH_RETRY_INTERVAL_S,
        "errback": deadline_errback,
    }


def queue_for(
    app: Any, task_name: str, settings: Settings, kwargs: Mapping[str, Any] | None = None
) -> str:
    """The queue of a call that names none: the one the app's ``task_routes`` give the task,
    else the project's own queue (``OP_CELERY_PROJECT_QUEUES``), else ``OP_CELERY_QUEUE``
    (``openpanel``).

    The app's ``task_default_queue`` is not used: many projects set it for their own tasks,
    and their workers for it may not import op_celery (route ``op_celery.*`` there to say so).
    The name is set as the call's queue, so both publish paths send it there; Celery's router
    still adds a route's other options (an exchange, a priority) on its own path.
    """
    router = app.amqp.router
    if router.routes:
        route = router.lookup_route(task_name, (), dict(kwargs or {}), {}, None)
        queue = route if isinstance(route, str) else (route or {}).get("queue")
        if isinstance(queue, Queue):
            queue = queue.name
        if isinstance(queue, str) and queue:
            return queue
    return settings.queue_of(str((kwargs or {}).get("project") or "default"))


def spool_for(settings: Settings) -> Spool:
    """The spool of the settings' directory, one per process."""
    directory = settings.spool_dir or str(default_spool_dir())
    spool = _spools.get(directory)
    if spool is None:
        spool = _spools.setdefault(directory, Spool(directory))
    return spool


def task_for(operation: str) -> Task[..., None]:
    """The task of an operation on the app that publishes."""
    return cast("Task[..., None]", publishing_app().tasks[f"op_celery.{operation}"])


def republish(task_name: str, kwargs: dict[str, Any], options: dict[str, Any]) -> object:
    """Publish a spooled event again; raises if the broker does not take it (no re-spooling)."""
    task = publishing_app().tasks[task_name]
    publish_options: dict[str, Any] = {"queue": options.get("queue"), NO_SPOOL: True}
    return task.apply_async((), kwargs, task_id=options.get("task_id"), **publish_options)


def flush_spool(settings: Settings | None = None) -> int:
    """Re-publish the spooled events now; returns how many. Raises if the broker is away."""
    return spool_for(settings or settings_for(publishing_app())).flush(republish)


def publish_dead_letter(letter: DeadLetter) -> object:
    """Re-enqueue a dead letter with its event id (the ledger drops it if it was delivered
    after all), on the queue it came from when the letter says; raises if the broker does not
    take it, so the dead letter is kept."""
    kwargs = dict(letter.kwargs)
    kwargs["event_id"] = letter.id
    options: dict[str, Any] = {NO_SPOOL: True}
    queue = letter.extra.get("queue")
    if isinstance(queue, str) and queue:
        options["queue"] = queue  # back to the queue it came from (its routing may have changed)
    return task_for(letter.operation).apply_async((), kwargs, **options)
