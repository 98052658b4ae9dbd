"""The shared rate limit seen from the tasks: real workers, real Redis, the stand-in."""

from __future__ import annotations

import time
from collections.abc import Callable

from celery import Celery

import op_celery
from op_celery.testing import StandInServer

from ._support import RedisServer, WorkerProcess, answer_429_once, free_port, wait_until


def test_two_workers_sharing_a_limit_get_no_429_from_a_server_with_that_limit(
    producer: Celery, start_worker: Callable[..., WorkerProcess], stand_in: StandInServer
) -> None:
    stand_in.set_rate_limit(12, 1.0)
    start_worker(OPENPANEL_RATE_LIMIT="10/s")
    start_worker(OPENPANEL_RATE_LIMIT="10/s")
    for i in range(40):
        op_celery.track.delay(f"paced-{i}")
    assert stand_in.wait_for(40, timeout=60)
    assert stand_in.counts().get(429, 0) == 0


def test_throttled_events_do_not_use_up_their_retries(
    producer: Celery, start_worker: Callable[..., WorkerProcess], stand_in: StandInServer
) -> None:
    # Two per second and no retries at all: every event that had to wait must still arrive.
    start_worker(OPENPANEL_RATE_LIMIT="4/2s", OP_CELERY_MAX_RETRIES="0")
    for i in range(10):
        op_celery.track.delay(f"waits-{i}")
    assert stand_in.wait_for(10, timeout=60)
    assert len(stand_in.requests) == 10


def test_a_429_pauses_every_worker_of_the_pool(
    producer: Celery, start_worker: Callable[..., WorkerProcess], stand_in: StandInServer
) -> None:
    answer_429_once(stand_in)
    start_worker(OPENPANEL_RATE_LIMIT="100/s")
    start_worker(OPENPANEL_RATE_LIMIT="100/s")
    op_celery.track.delay("first")
    assert wait_until(lambda: len(stand_in.requests) >= 1)
    for i in range(6):
        op_celery.track.delay(f"after-{i}")
    assert stand_in.wait_for(7, timeout=30)
    first, *rest = stand_in.requests
    assert first.status == 429
    assert all(r.at - first.at >= 1.9 for r in rest), [round(r.at - first.at, 2) for r in rest]


def test_a_limiter_redis_that_is_down_delays_events_and_loses_none(
    producer: Celery, start_worker: Callable[..., WorkerProcess], stand_in: StandInServer
) -> None:
    port = free_port()
    worker = start_worker(
        OPENPANEL_RATE_LIMIT="50/s",
        OP_CELERY_REDIS_URL=f"redis://127.0.0.1:{port}/0",
        OP_CELERY_RETRY_BACKOFF="0.2",
        OP_CELERY_RETRY_BACKOFF_MAX="1",
    )
    for i in range(3):
        op_celery.track.delay(f"held-{i}")
    assert wait_until(lambda: "did not answer" in worker.log or "failed" in worker.log, 20)
    time.sleep(0.5)
    assert stand_in.requests == []  # never sent unthrottled
    with RedisServer(port):
        assert stand_in.wait_for(3, timeout=30), worker.log
    assert sorted(r.payload["name"] for r in stand_in.received) == ["held-0", "held-1", "held-2"]
