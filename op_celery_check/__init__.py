"""The one check op-celery makes in a worker that never imports it.

A user's worker whose Celery module does not import ``op_celery`` has none of its tasks: it
receives op-celery's events and drops each one as an unregistered task. op-celery's own start-up
checks (``op_celery._startup``) cannot run there, since nothing of it is imported. This tiny
package can: the ``celery`` command loads it (the ``celery.commands`` entry point, for
``celery op-celery-check``), and it imports neither op_celery nor anything but Celery and click,
so that every other Celery worker on the machine stays exactly as it was. At worker start it
logs one line if the worker consumes the queue op-celery's events go to but lacks the tasks.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import click
from celery.signals import worker_ready

__all__ = ["command"]

#: op-celery's queue when nothing says otherwise (``op_celery._settings.DEFAULT_QUEUE``).
DEFAULT_QUEUE = "openpanel"
#: A task that exists wherever op_celery is imported.
PROBE_TASK = "op_celery.track"

log = logging.getLogger("op_celery")


def events_queue(app: Any) -> str:
    """Where op-celery's events go on ``app``: its ``task_routes`` for them, else
    ``op_celery_queue``/``OP_CELERY_QUEUE``, else ``openpanel``; as
    ``op_celery._enqueue.queue_for`` decides, without importing it."""
    router = app.amqp.router
    if router.routes:
        route = router.lookup_route(PROBE_TASK, (), {}, {}, None)
        queue = route if isinstance(route, str) else (route or {}).get("queue")
        name = getattr(queue, "name", queue)
        if isinstance(name, str) and name:
            return name
    return str(
        app.conf.get("op_celery_queue") or os.environ.get("OP_CELERY_QUEUE") or DEFAULT_QUEUE
    )


@worker_ready.connect(weak=False)
def _check(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is None or PROBE_TASK in app.tasks:
        return  # op_celery is imported: its own checks run
    queues = getattr(getattr(sender, "task_consumer", None), "queues", None) or ()
    consumed = [queue.name for queue in queues]
    queue = events_queue(app)
    if queue in consumed:
        log.error(
            "op_celery: this worker consumes the queue %r, where op_celery's events go, but "
            "never imports op_celery: it drops every event as an unregistered task; add "
            "`import op_celery` to the module that creates your Celery app (%r)",
            queue,
            app.main,
        )


@click.command(name="op-celery-check", hidden=True)
def command() -> None:
    """Loaded by the celery command so that its workers check they can serve op-celery."""
    click.echo("op-celery's worker check is loaded; it runs at worker start.")
