"""The baseline of ``benchmarks/delivery.py``: what a user writes without op-celery.

One Celery task that POSTs the event body with a bare ``requests.post`` (a new connection per
event, no retries, the answer ignored), on the same broker, queue prefix and worker settings as
op-celery's app; and ``naive.track_urllib3``, the same on one keep-alive urllib3 connection per
process (the least a Celery task can do per event). Run by the benchmark as
``celery -A _naive_app worker ...`` with the benchmark directory on ``PYTHONPATH`` and the
settings in the environment.
"""

from __future__ import annotations

import json
import os
from typing import Any

import requests
import urllib3
from celery import Celery

app = Celery("naive", set_as_current=True)
app.conf.update(
    broker_url=os.environ["OP_CELERY_BROKER_URL"],
    broker_transport_options={"global_keyprefix": os.environ["OP_CELERY_BROKER_KEY_PREFIX"]},
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


@app.task(name="naive.track", ignore_result=True)
def track(body: dict[str, Any], user_agent: str | None = None) -> None:
    headers = dict(HEADERS)
    if user_agent:
        headers["user-agent"] = user_agent
    requests.post(TRACK_URL, json=body, headers=headers, timeout=10)


_pool = urllib3.PoolManager(maxsize=1)


@app.task(name="naive.track_urllib3", ignore_result=True)
def track_urllib3(body: dict[str, Any], user_agent: str | None = None) -> None:
    """The least a Celery task can do per event: one POST on a keep-alive urllib3 connection
    (``benchmarks/cpu.py``'s floor of Celery and kombu's own cost per message)."""
    headers = {**HEADERS, "content-type": "application/json"}
    if user_agent:
        headers["user-agent"] = user_agent
    _pool.request("POST", TRACK_URL, body=json.dumps(body).encode(), headers=headers, timeout=10)
