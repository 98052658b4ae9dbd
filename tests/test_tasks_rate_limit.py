"""The shared rate limit seen from the tasks: real workers, real Redis, the stand-in."""

from __future__ import annotations

import time
from collections.abc import Callable

from celery import Celery

import op_celery
from op_celery._settings import load_settings
from op_celery.dead_letters import DeadLetterStore
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


def test_a_throttled_backlog_is_put_back_about_once_per_event_not_once_per_slot(
    producer: Celery, start_worker: Callable[..., WorkerProcess], stand_in: StandInServer
) -> None:
    # 30 events at 5/s on 16 threads: the first few get a slot within the inline wait (1 s),
    # the others a turn in the project's waiting line, one slot apart, and come back when it
    # is theirs. Told only "a slot frees in w", they all came back at once each time, a few
    # were let through and the rest put back again: once per slot per waiting event.
    worker = start_worker(OPENPANEL_RATE_LIMIT="5/s", OPENPANEL_RATE_HEADROOM="0", CONCURRENCY="16")
    for i in range(30):
        op_celery.track.delay(f"backlog-{i}")
    assert stand_in.wait_for(30, timeout=60)
    put_back = worker.log.count(" retry: Retry in ")
    # Measured: 23 put back with the line (each waiting event once), 56 without it.
    assert 0 < put_back <= 40, put_back
    assert len(stand_in.requests) == 30


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


def test_with_no_limit_set_two_workers_learn_it_from_the_headers_and_pace_at_it(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    env: dict[str, str],
) -> None:
    stand_in.set_rate_limit(10, 1.0)  # x-ratelimit-* on every answer, as @fastify/rate-limit
    workers = [start_worker(), start_worker()]
    for i in range(40):
        op_celery.track.delay(f"learned-{i}")
    assert stand_in.wait_for(40, timeout=60)
    counts = stand_in.counts()
    # Before the first answer the pool knows nothing, so a few can get 429; none after.
    assert counts.get(429, 0) <= 8, counts
    accepted = sorted(r.at for r in stand_in.requests if r.status == 200)
    assert accepted[-1] - accepted[0] >= 2.5  # 40 at 10/s, not all at once
    assert len(DeadLetterStore(load_settings(env=env))) == 0
    said = "the server allows 10/s (x-ratelimit headers)"
    assert wait_until(lambda: sum(w.log.count(said) for w in workers) == 1)  # once, by one worker


def test_429s_never_dead_letter_an_event_even_with_no_retries_allowed(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    env: dict[str, str],
) -> None:
    stand_in.set_rate_limit(4, 1.0, headers="none")  # bare 429s, nothing to learn from
    start_worker(OP_CELERY_MAX_RETRIES="0")
    start_worker(OP_CELERY_MAX_RETRIES="0")
    for i in range(24):
        op_celery.track.delay(f"bare-{i}")
    assert stand_in.wait_for(24, timeout=90)
    assert stand_in.counts().get(429, 0) > 0  # the server did push back
    assert sorted(r.payload["name"] for r in stand_in.received) == sorted(
        f"bare-{i}" for i in range(24)
    )
    assert len(DeadLetterStore(load_settings(env=env))) == 0
