"""Shared fixtures: the shared Redis (with private key prefixes), the stand-in server, and
real ``celery worker`` processes started and stopped by PID."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from celery import Celery

from op_celery import _app
from op_celery.testing import StandInServer

from ._support import CLIENT_ID, CLIENT_SECRET, REDIS_URL, WorkerProcess, worker_env


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.RedisError as exc:  # pragma: no cover - CI starts Redis first
        pytest.fail(f"Redis at {REDIS_URL} does not answer ({exc}); start it, see .ci/run")
    return REDIS_URL


@pytest.fixture
def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def key_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A private namespace on the shared Redis, deleted afterwards."""
    prefix = f"opc-test-{uuid.uuid4().hex[:10]}:"
    yield prefix
    keys = list(redis_client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def stand_in() -> Iterator[StandInServer]:
    # Profiles visible at once: these tests identify, then increment, and are about other
    # things; the server's 10 s flush and the retries that span it are tested on their own
    # (tests/test_tasks.py, tests/testing/test_profiles.py).
    with StandInServer(clients={CLIENT_ID: CLIENT_SECRET}, profile_flush_s=0) as server:
        yield server


@pytest.fixture
def env(stand_in: StandInServer, key_prefix: str, redis_url: str) -> dict[str, str]:
    """Worker environment: broker on the shared Redis under a private prefix and queue."""
    return worker_env(stand_in.url, redis_url, key_prefix)


@pytest.fixture
def producer(env: dict[str, str]) -> Iterator[Celery]:
    """A user's own Celery app, made current, publishing where the workers consume."""
    app = Celery("user-app", set_as_current=True)
    app.conf.update(
        broker_url=env["OP_CELERY_BROKER_URL"],
        broker_transport_options={"global_keyprefix": env["OP_CELERY_BROKER_KEY_PREFIX"]},
        op_celery_queue=env["OP_CELERY_QUEUE"],
        task_ignore_result=True,
    )
    yield app
    app.close()
    _app.reset_settings()


@pytest.fixture
def start_worker(env: dict[str, str]) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``celery -A op_celery.worker worker`` processes; all are stopped afterwards."""
    started: list[WorkerProcess] = []

    def start(**overrides: object) -> WorkerProcess:
        worker = WorkerProcess({**env, **{k: str(v) for k, v in overrides.items()}})
        started.append(worker)
        worker.start()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(autouse=True)
def _no_leaked_env() -> Iterator[None]:
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)
