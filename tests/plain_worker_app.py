"""A user's worker module that does not import op_celery, for ``tests/test_consumer.py``::

    celery -A tests.plain_worker_app worker -Q <the package's queue>

It consumes the package's queue (from the test's environment) and drops each event as a
message of an unregistered task.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("plain", broker=os.environ["OP_CELERY_BROKER_URL"])
app.conf.update(
    broker_transport_options={"global_keyprefix": os.environ["OP_CELERY_BROKER_KEY_PREFIX"]},
    task_default_queue=os.environ["OP_CELERY_QUEUE"],
)

__all__ = ["app"]
