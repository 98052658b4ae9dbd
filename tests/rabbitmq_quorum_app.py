"""A user's Celery app on RabbitMQ with quorum queues (Celery 5.5+), for tests/test_rabbitmq.py::

    celery -A tests.rabbitmq_quorum_app worker

The package's queue (from the test's environment) is a quorum queue on a topic exchange, so
countdowns use Celery's native delayed delivery (quorum queues have no per-message TTL).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

import op_celery  # noqa: F401  (registers the package's tasks on this app)


def quorum_conf(queue: str) -> dict[str, Any]:
    """The config of an app whose tasks go to ``queue``, a quorum queue."""
    return {
        "task_default_queue": queue,
        "task_default_exchange_type": "topic",
        "task_default_queue_type": "quorum",
        "op_celery_queue": queue,
        "broker_transport_options": {"confirm_publish": True},
        "task_ignore_result": True,
    }


app = Celery("quorum-user", broker=os.environ.get("OP_CELERY_BROKER_URL"))
app.conf.update(quorum_conf(os.environ.get("OP_CELERY_QUEUE", "openpanel")))

__all__ = ["app", "quorum_conf"]
