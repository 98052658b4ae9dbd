"""The baselines of ``benchmarks/rate_fidelity.py``: Celery's own ``rate_limit``, no op-celery.

One task, ``naive.track``, does what a user writes without op-celery: one ``requests.post`` of
the event to ``/track`` with the client headers, and NO retry, so every 429 is counted and the
event is lost. Its ``rate_limit`` comes from ``NAIVE_RATE_LIMIT`` (Celery's notation, ``"50/s"``;
per worker process, which is all Celery offers). Each answer's status is counted in the Redis
hash ``<OP_CELERY_BROKER_KEY_PREFIX>naive-status`` (a cross-check of the stand-in's record).

Celery's rate limit, out of the box, delivers about one task per second per worker once a
backlog waits (any pool; measured with threads, prefork and solo, Celery 5.7 / kombu 5.7 on the
Redis transport). Why: a rate-limited worker puts every message it cannot run yet in a token
bucket and adds one timer entry per such message, each re-adding itself when it fires too early;
the entries pile up (one more per message received meanwhile) and fall due together, and kombu's
``Hub.fire_timers`` fires at most ``max_timers=10`` per pass and then answers ``min_delay`` (1 s)
as the poll timeout, although the next entries are due within milliseconds. So the event loop
sleeps a second between passes. Unless ``NAIVE_HUB_FIX=0``, this module patches ``fire_timers``
so that the poll timeout never runs past the next timer entry (``_fire_due_timers``): the
baseline gets the rate it asks for.

Run by the benchmark as ``celery -A naive_app worker ...`` with the benchmark directory on
``PYTHONPATH`` and the settings (those of ``_harness.broker_env`` plus ``OPENPANEL_API_URL``,
``OPENPANEL_CLIENT_ID``, ``OPENPANEL_CLIENT_SECRET``) in the environment.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
import requests
from celery import Celery
from kombu.asynchronous.hub import Hub

PREFIX = os.environ["OP_CELERY_BROKER_KEY_PREFIX"]
#: Redis hash of answers by status code, written by the workers.
STATUS_KEY = f"{PREFIX}naive-status"

app = Celery("naive_rate", set_as_current=True)
app.conf.update(
    broker_url=os.environ["OP_CELERY_BROKER_URL"],
    broker_transport_options={"global_keyprefix": PREFIX},
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    result_backend=None,
    task_default_queue=os.environ["OP_CELERY_QUEUE"],
    worker_prefetch_multiplier=4,  # as op-celery's app
)

TRACK_URL = os.environ["OPENPANEL_API_URL"].rstrip("/") + "/track"
HEADERS = {
    "openpanel-client-id": os.environ["OPENPANEL_CLIENT_ID"],
    "openpanel-client-secret": os.environ["OPENPANEL_CLIENT_SECRET"],
}
_original_fire_timers = Hub.fire_timers


def _fire_due_timers(self: Hub, *args: Any, **kwargs: Any) -> float:
    """``Hub.fire_timers``, but the poll timeout never passes the next timer entry's time."""
    delay: float = _original_fire_timers(self, *args, **kwargs)
    queue = self.timer._queue
    if queue:
        return max(0.0, min(delay, queue[0].eta - time.monotonic()))
    return delay


if os.environ.get("NAIVE_HUB_FIX", "1") != "0":
    Hub.fire_timers = _fire_due_timers  # type: ignore[method-assign]

_counts = redis.Redis.from_url(os.environ["OP_CELERY_BROKER_URL"])


@app.task(name="naive.track", ignore_result=True, rate_limit=os.environ.get("NAIVE_RATE_LIMIT"))
def track(body: dict[str, Any]) -> int:
    """POST one event; no retry. Returns (and counts) the answer's status."""
    status = requests.post(TRACK_URL, json=body, headers=HEADERS, timeout=10).status_code
    _counts.hincrby(STATUS_KEY, str(status), 1)
    return status
