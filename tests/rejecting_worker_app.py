"""A user's worker module whose own code rejects every event, for ``tests/test_consumer.py``::

    celery -A tests.rejecting_worker_app worker

The package's app, with the ``track`` task wrapped by the user to raise Celery's
``Reject(requeue=False)`` (say, a maintenance switch): Celery drops each message.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

from celery.exceptions import Reject

from op_celery.worker import app

track = app.tasks["op_celery.track"]


def _rejecting_run(self: Any, *args: Any, **kwargs: Any) -> None:
    raise Reject("events are switched off here", requeue=False)


track.run = MethodType(_rejecting_run, track)

__all__ = ["app"]
