"""What each worker process does when it is ready: say what the default project's limit is,
start the outbox's sweeper, and re-publish what an earlier process left in the spool."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_ready

from ._app import settings_for
from ._delivery import delivery_for
from ._enqueue import NO_SPOOL, republish, spool_for
from ._exceptions import OpenPanelError
from ._outbox import Sweeper
from ._publish import redis_broker
from ._settings import Settings

__all__ = ["start_sweeper"]

log = logging.getLogger("op_celery")


@worker_ready.connect(weak=False)
def _announce(sender: Any = None, **_: Any) -> None:
    """At worker start: say what the default project's limit is (or that it has none), and
    re-publish what a previous process on this machine left in the spool (a worker that died
    while the broker was away leaves the retries it could not publish there)."""
    app = getattr(sender, "app", None)
    if app is None or "op_celery.track" not in app.tasks:
        return
    settings = settings_for(app)
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
