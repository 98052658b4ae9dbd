"""RabbitMQ as the broker, the whole path: real ``celery worker`` processes consuming from the
RabbitMQ at 127.0.0.1:5672 (queues of their own, deleted afterwards), the ledger, limiter and
dead letters on the shared Redis under a private prefix, events to the stand-in."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import amqp
import kombu
import pytest
from celery import Celery

import op_celery
from op_celery._app import reset_settings
from op_celery._enqueue import publish_dead_letter
from op_celery._settings import load_settings
from op_celery.dead_letters import DeadLetterStore
from op_celery.testing import StandInServer

from ._support import (
    WORKER_START_TIMEOUT_S,
    WorkerProcess,
    answer_429_once,
    wait_until,
    worker_env,
)

ROOT = Path(__file__).resolve().parent.parent

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


def _rabbitmq_answers() -> bool:
    try:
        with kombu.Connection(RABBITMQ_URL, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1)
        return True
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _rabbitmq_answers(), reason="no RabbitMQ at 127.0.0.1:5672")


@pytest.fixture
def env(stand_in: StandInServer, key_prefix: str, redis_url: str) -> Iterator[dict[str, str]]:
    """Workers on RabbitMQ (a queue of the test's own), the package's Redis the shared one
    under the test's prefix; the queue and its exchange are deleted afterwards."""
    environment = worker_env(stand_in.url, RABBITMQ_URL, "")
    environment.update(OP_CELERY_REDIS_URL=redis_url, OP_CELERY_KEY_PREFIX=key_prefix + "op-celery")
    del environment["OP_CELERY_BROKER_KEY_PREFIX"]
    yield environment
    queue = environment["OP_CELERY_QUEUE"]
    with kombu.Connection(RABBITMQ_URL) as connection:
        channel = connection.default_channel
        for delete in (channel.queue_delete, channel.exchange_delete):
            try:
                delete(queue)
            except Exception:  # never declared (a test that failed early)
                channel = connection.channel()


@pytest.fixture
def producer(env: dict[str, str]) -> Iterator[Celery]:
    """A user's web app publishing to RabbitMQ."""
    app = Celery("rabbit-user-app", set_as_current=True)
    app.conf.update(
        broker_url=RABBITMQ_URL, op_celery_queue=env["OP_CELERY_QUEUE"], task_ignore_result=True
    )
    yield app
    app.close()
    reset_settings()


@pytest.fixture
def start_worker(env: dict[str, str]) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(**overrides: object) -> WorkerProcess:
        worker = WorkerProcess({**env, **{k: str(v) for k, v in overrides.items()}})
        started.append(worker)
        worker.start()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def store(env: dict[str, str]) -> DeadLetterStore:
    return DeadLetterStore(load_settings(env=env))


def test_typed_tasks_published_to_rabbitmq_are_delivered_once_each(
    producer: Celery, start_worker: Callable[..., WorkerProcess], stand_in: StandInServer
) -> None:
    worker = start_worker()
    op_celery.identify.delay("user-1", first_name="Ada")
    for i in range(5):
        op_celery.track.delay(f"rabbit-{i}", properties={"i": i}, profile_id="user-1")
    op_celery.increment.delay("user-1", "visits", 2)
    assert stand_in.wait_for(7, timeout=30), worker.log
    received = stand_in.received
    assert sorted(r.type for r in received) == ["identify", "increment", *["track"] * 5]
    tracked = sorted(r.payload["name"] for r in received if r.type == "track")
    assert tracked == [f"rabbit-{i}" for i in range(5)]


def test_a_throttled_event_waits_its_countdown_on_rabbitmq_and_is_delivered(
    producer: Celery, start_worker: Callable[..., WorkerProcess], stand_in: StandInServer
) -> None:
    answer_429_once(stand_in, retry_after="1")
    worker = start_worker()
    op_celery.track.delay("after-a-429")
    assert stand_in.wait_for(1, timeout=30), worker.log
    assert [r.payload["name"] for r in stand_in.received] == ["after-a-429"]


def test_a_sigkilled_workers_unacked_events_come_back_to_another_worker(
    producer: Celery, start_worker: Callable[..., WorkerProcess], stand_in: StandInServer
) -> None:
    count = 30
    first = start_worker(OPENPANEL_RATE_LIMIT="10/s", CONCURRENCY="4")
    for i in range(count):
        op_celery.track.delay(f"late-ack-{i}")
    assert wait_until(lambda: len(stand_in.received) >= 3, 30), first.log
    first.kill()
    delivered_before = len(stand_in.received)
    assert delivered_before < count  # the rest was on the dead worker, unacked
    second = start_worker(OPENPANEL_RATE_LIMIT="50/s")
    expected = {f"late-ack-{i}" for i in range(count)}
    assert wait_until(lambda: {r.payload["name"] for r in stand_in.received} >= expected, 60), (
        second.log
    )
    names = [r.payload["name"] for r in stand_in.received]
    # At most the events in flight at the kill (sent, not yet marked) go twice.
    assert len(names) - len(set(names)) <= 4


def test_refused_events_are_dead_lettered_and_replayed_through_rabbitmq(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    store: DeadLetterStore,
) -> None:
    wrong = start_worker(OPENPANEL_CLIENT_SECRET="wrong-secret-rabbit")
    for i in range(3):
        op_celery.track.delay(f"refused-{i}")
    assert wait_until(lambda: len(store) == 3, 30), wrong.log
    assert {x.error_type for x in store.list()} == {"AuthenticationError"}
    wrong.stop()
    start_worker()
    assert store.replay(publish=publish_dead_letter) == 3
    assert stand_in.wait_for(3, timeout=30)
    assert sorted(r.payload["name"] for r in stand_in.received) == [
        f"refused-{i}" for i in range(3)
    ]
    assert len(store) == 0


class AppWorker(WorkerProcess):
    """``celery -A <module> worker``: a user's own app running the package's tasks."""

    def __init__(self, env: dict[str, str], module: str) -> None:
        super().__init__(env)
        self.module = module

    def start(self) -> None:
        command = [
            sys.executable, "-m", "celery", "-A", self.module, "worker",
            "--pool", self.pool, "--concurrency", self.concurrency, "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--hostname", f"test-{uuid.uuid4().hex[:8]}@%h",
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while " ready." not in self.log:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"worker not ready:\n{self.log}")
            time.sleep(0.05)


@pytest.fixture
def quorum_app(env: dict[str, str]) -> Iterator[Celery]:
    """A user's web app whose events go to a quorum queue (``tests.rabbitmq_quorum_app``)."""
    from .rabbitmq_quorum_app import quorum_conf

    app = Celery("quorum-web-app", set_as_current=True)
    app.conf.update(broker_url=RABBITMQ_URL, **quorum_conf(env["OP_CELERY_QUEUE"]))
    yield app
    app.close()
    reset_settings()


@pytest.fixture
def start_quorum_worker(env: dict[str, str]) -> Iterator[Callable[..., AppWorker]]:
    started: list[AppWorker] = []

    def start(**overrides: str) -> AppWorker:
        worker = AppWorker({**env, **overrides}, "tests.rabbitmq_quorum_app")
        started.append(worker)
        worker.start()
        return worker

    yield start
    for worker in started:
        worker.stop()


def test_typed_events_on_a_quorum_queue_are_delivered_once_each(
    quorum_app: Celery,
    start_quorum_worker: Callable[..., AppWorker],
    stand_in: StandInServer,
    env: dict[str, str],
) -> None:
    worker = start_quorum_worker()
    # RabbitMQ refuses to declare it again as a classic queue: it is a quorum queue.
    refused = pytest.raises(amqp.exceptions.PreconditionFailed, match="x-queue-type")
    with kombu.Connection(RABBITMQ_URL) as connection, refused:
        connection.channel().queue_declare(env["OP_CELERY_QUEUE"], durable=True, auto_delete=False)
    op_celery.identify.delay("quorum-user", email="q@example.com")
    for i in range(10):
        op_celery.track.delay(f"quorum-{i}", profile_id="quorum-user")
    assert stand_in.wait_for(11, timeout=30), worker.log
    tracked = sorted(r.payload["name"] for r in stand_in.received if r.type == "track")
    assert tracked == sorted(f"quorum-{i}" for i in range(10))


def test_throttled_events_on_a_quorum_queue_wait_their_countdown_and_are_delivered(
    quorum_app: Celery,
    start_quorum_worker: Callable[..., AppWorker],
    stand_in: StandInServer,
) -> None:
    answer_429_once(stand_in, retry_after="1")  # the pool pauses; events go back with countdowns
    worker = start_quorum_worker(OPENPANEL_RATE_LIMIT="20/s")
    for i in range(10):
        op_celery.track.delay(f"throttled-{i}")
    assert wait_until(lambda: len(stand_in.received) >= 10 or "raised unexpected" in worker.log, 60)
    assert "raised unexpected" not in worker.log
    assert sorted(r.payload["name"] for r in stand_in.received) == sorted(
        f"throttled-{i}" for i in range(10)
    )
