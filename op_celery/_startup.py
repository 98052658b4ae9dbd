"""What each worker process does at start: give a user's app the package's broker settings it
lacks (before the worker connects); once ready, say what keeps it from serving op-celery's
tasks (one line each, with what to do), what the default project's limit is, start the
outbox's sweeper, and re-publish what an earlier process left in the spool."""

from __future__ import annotations

import logging
from typing import Any

from celery.concurrency import get_implementation
from celery.concurrency.base import BasePool
from celery.concurrency.solo import TaskPool as SoloPool
from celery.concurrency.thread import TaskPool as ThreadPool
from celery.signals import celeryd_after_setup, worker_init, worker_ready
from kombu.serialization import prepare_accept_content

from ._app import adopt, settings_for
from ._delivery import delivery_for
from ._enqueue import NO_SPOOL, queue_for, republish, spool_for
from ._exceptions import OpenPanelError
from ._outbox_sweeper import Sweeper
from ._publish import redis_broker
from ._settings import Settings, redact_url

__all__ = ["problems", "start_sweeper"]

log = logging.getLogger("op_celery")

#: What ``adopt`` said at ``worker_init``, per app, to log once the worker is ready.
_adopted: dict[int, list[str]] = {}


@worker_init.connect(weak=False)
def _adopt(sender: Any = None, **_: Any) -> None:
    """Before the worker connects: the package's broker settings on a user's app (``adopt``)."""
    app = getattr(sender, "app", None)
    if app is not None and "op_celery.track" in app.tasks:
        _adopted[id(app)] = adopt(app)
        _keep_what_the_pool_cannot_stop(app, getattr(sender, "pool_cls", None))


def _keep_what_the_pool_cannot_stop(app: Any, pool_cls: Any) -> None:
    """Turn off ``worker_cancel_long_running_tasks_on_connection_loss`` on a pool that cannot
    stop a running task (threads, solo): Celery would ask it to, on every lost connection (a
    full Redis counts as one, ``_consumer``), and 5.6 then stops the worker with
    "Unrecoverable error: NotImplementedError" (5.7 logs a traceback per task instead). Those
    tasks finish; their acks fail on the old connection, and their messages come back after
    the visibility timeout, where the ledger drops the delivered ones."""
    if not app.conf.worker_cancel_long_running_tasks_on_connection_loss or pool_cls is None:
        return
    try:
        pool = get_implementation(pool_cls)
    except (KeyError, ImportError, AttributeError, ValueError):
        return  # Celery says what is wrong with the pool when it starts it
    # Prefork sets its terminate_job when it starts; these two never have one but BasePool's.
    unstoppable = isinstance(pool, type) and issubclass(pool, (ThreadPool, SoloPool))
    if unstoppable and getattr(pool, "terminate_job", None) is BasePool.terminate_job:
        app.conf.worker_cancel_long_running_tasks_on_connection_loss = False


@celeryd_after_setup.connect(weak=False)
def _consume_project_queues(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """Once ``-Q`` is applied: a worker that consumes the package's queue consumes the queues
    of the projects in ``OP_CELERY_PROJECT_QUEUES`` too, so routing a project to its own queue
    needs no change to any worker's command line."""
    app = getattr(instance, "app", None)
    if app is None or "op_celery.track" not in app.tasks:
        return
    settings = settings_for(app)
    queues = app.amqp.queues
    if queues.consume_from and settings.queue not in queues.consume_from:
        return  # a worker for other queues (or for some projects only): -Q says what it wants
    for name in settings.queues[1:]:
        queues.select_add(name)


@worker_ready.connect(weak=False)
def _announce(sender: Any = None, **_: Any) -> None:
    """At worker start: say what the default project's limit is (or that it has none), and
    re-publish what a previous process on this machine left in the spool (a worker that died
    while the broker was away leaves the retries it could not publish there)."""
    app = getattr(sender, "app", None)
    if app is None or "op_celery.track" not in app.tasks:
        return
    for line in _adopted.pop(id(app), []):
        log.warning("%s", line)
    settings = settings_for(app)
    for level, line in problems(app, settings, _consumed(sender, app)):
        log.log(level, "%s", line)
    if settings.redis_url is not None:  # without, ``problems`` said it: nothing else to say
        try:
            delivery_for(settings).limit("default")
        except OpenPanelError as exc:
            log.warning("op_celery: the default project is not usable yet: %s", exc)
    start_sweeper(app, settings)
    spool = spool_for(settings)
    spool.recover_stale_claims()
    if spool.pending():
        log.warning("op_celery: %d events in the spool %s", len(spool), spool.directory)
        spool.start_flusher(republish)


_sweepers: dict[int, Sweeper] = {}


def start_sweeper(app: Any, settings: Settings) -> None:
    """Start this process's outbox sweeper (``_outbox``), on a Redis broker with an outbox."""
    if not settings.outbox or not redis_broker(app) or id(app) in _sweepers:
        return

    def publish_again(task: str, kwargs: dict[str, Any], task_id: str, queue: str) -> object:
        options: dict[str, Any] = {"queue": queue, NO_SPOOL: True}
        return app.tasks[task].apply_async((), kwargs, task_id=task_id, **options)

    sweeper = _sweepers[id(app)] = Sweeper(
        settings.outbox_grace_s,
        connect=app.connection_for_write,
        queues=lambda: _consumed_queues(app, settings),
        republish=publish_again,
        delivered=delivery_for(settings).ledger.delivered,
    )
    sweeper.start()


def _consumed_queues(app: Any, settings: Settings) -> list[str]:
    """The queues this worker consumes (``-Q``), else all the app declares, and the package's."""
    queues = app.amqp.queues
    names = list(queues.consume_from or queues)
    return names if names else [settings.queue]


def _consumed(consumer: Any, app: Any) -> list[str]:
    """The queues the ready worker consumes."""
    task_consumer = getattr(consumer, "task_consumer", None)
    queues = getattr(task_consumer, "queues", None)
    if queues:
        return [queue.name for queue in queues]
    return list(app.amqp.queues.consume_from or app.amqp.queues)


def problems(app: Any, settings: Settings, consumed: list[str]) -> list[tuple[int, str]]:
    """What keeps a worker of ``app`` that consumes ``consumed`` from serving op-celery's tasks:
    one line each with its log level, saying what to do.

    A worker that consumes none of the events' queues gets one warning only (a project may run
    a worker of its own for them, as the README suggests); the rest concerns workers that do.
    """
    lines: list[tuple[int, str]] = []
    operations = sorted(name for name in app.tasks if name.startswith("op_celery."))
    queues: dict[str, list[str]] = {}
    for name in operations:
        queues.setdefault(queue_for(app, name, settings), []).append(
            name.removeprefix("op_celery.")
        )
    for queue, names in queues.items():
        if queue in consumed:
            continue
        which = "op_celery's events go" if len(names) == len(operations) else (
            f"op_celery's {', '.join(names)} events go"
        )  # fmt: skip
        lines.append((logging.WARNING,
            f"op_celery: this worker does not consume the queue {queue!r}, where {which}: it "
            f"delivers none of them, so a worker with -Q {queue} must run (or add it here: "
            f"-Q {','.join([*consumed, queue])})",
        ))  # fmt: skip
    if not any(queue in consumed for queue in queues):
        return lines
    accepted = prepare_accept_content(app.conf.accept_content or ["json"]) or set()
    if "application/json" not in accepted:
        lines.append((logging.ERROR,
            "op_celery: this worker does not accept JSON (accept_content="
            f"{list(app.conf.accept_content)!r}), and every op_celery event is JSON: it refuses "
            "them all; add 'json' to accept_content",
        ))  # fmt: skip
    if settings.redis_url is None:
        lines.append((logging.ERROR,
            f"op_celery: the broker {redact_url(settings.broker_url)} is not Redis and "
            "OP_CELERY_REDIS_URL is not set: op_celery's ledger, rate limiter and dead letters "
            "need a Redis, so no event can be delivered; set OP_CELERY_REDIS_URL "
            "(e.g. redis://localhost:6379/0) on the workers",
        ))  # fmt: skip
    lazy = [name for name in operations if not app.tasks[name].acks_late]
    if lazy:
        lines.append((logging.ERROR,
            f"op_celery: {', '.join(lazy)} are not acked late on this worker (task_annotations?): "
            "a worker killed mid-task loses the events it holds; leave acks_late to op_celery",
        ))  # fmt: skip
    return lines
