"""A task done with its event takes the next ones off the queue (``_drain``): real Redis,
kombu's own code for what it must read back, the stand-in, and real ``celery worker``s."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection

import op_celery
from op_celery import _drain
from op_celery._settings import load_settings
from op_celery.dead_letters import DeadLetterStore
from op_celery.testing import StandInServer

from ._support import WorkerProcess, wait_until

EVENTS = 60


@pytest.fixture
def app(producer: Celery, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Celery:
    """The user's app, its settings the workers' (credentials, the stand-in, the prefixes)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return producer


def queue_key(env: dict[str, str]) -> str:
    return env["OP_CELERY_BROKER_KEY_PREFIX"] + env["OP_CELERY_QUEUE"]


def unacked(redis_client: redis.Redis, env: dict[str, str]) -> dict[Any, Any]:
    return redis_client.hgetall(env["OP_CELERY_BROKER_KEY_PREFIX"] + "unacked")


@pytest.fixture
def taker(app: Celery, env: dict[str, str]) -> Iterator[_drain._Queue]:
    taker = _drain._queue_for(app, env["OP_CELERY_QUEUE"])
    assert taker is not None
    yield taker
    _drain._queues.pop(app, None)


def test_a_taken_message_is_in_kombus_unacked_hash_and_kombus_own_restore_gives_it_back(
    app: Celery, env: dict[str, str], redis_client: redis.Redis, taker: _drain._Queue
) -> None:
    op_celery.track.delay("first")
    op_celery.track.delay("second")
    raw = taker.take("", more=True)
    assert raw is not None and json.loads(raw)["headers"]["task"] == "op_celery.track"
    assert redis_client.llen(queue_key(env)) == 1
    tag = json.loads(raw)["properties"]["delivery_tag"]
    assert set(unacked(redis_client, env)) == {tag.encode()}
    index = env["OP_CELERY_BROKER_KEY_PREFIX"] + "unacked_index"
    assert redis_client.zscore(index, tag) is not None
    # What kombu's visibility-timeout sweep runs for an expired tag, on kombu's own channel.
    options = {"global_keyprefix": env["OP_CELERY_BROKER_KEY_PREFIX"]}
    with Connection(env["OP_CELERY_BROKER_URL"], transport_options=options) as connection:
        connection.default_channel.qos.restore_by_tag(tag)  # type: ignore[attr-defined]
    assert unacked(redis_client, env) == {}
    back = [json.loads(item) for item in redis_client.lrange(queue_key(env), 0, -1)]
    assert [message["properties"]["delivery_tag"] for message in back][-1] == tag


def test_settling_a_taken_message_removes_it_from_kombus_unacked_hash_and_index(
    app: Celery, env: dict[str, str], redis_client: redis.Redis, taker: _drain._Queue
) -> None:
    op_celery.track.delay("only")
    raw = taker.take("", more=True)
    assert raw is not None
    tag = json.loads(raw)["properties"]["delivery_tag"]
    assert taker.take(tag, more=False) is None
    assert unacked(redis_client, env) == {}
    assert redis_client.zcard(env["OP_CELERY_BROKER_KEY_PREFIX"] + "unacked_index") == 0


@pytest.mark.parametrize(
    "publish",
    [
        pytest.param(lambda: op_celery.track.apply_async(("later",), countdown=60), id="eta"),
        pytest.param(lambda: op_celery.track.apply_async(("soon",), expires=60), id="expires"),
        pytest.param(
            lambda: op_celery.track.apply_async(("linked",), link=op_celery.track.si("after")),
            id="callback",
        ),
    ],
)
def test_a_message_that_must_go_through_celery_is_left_or_given_back_at_the_queues_head(
    app: Celery,
    env: dict[str, str],
    redis_client: redis.Redis,
    taker: _drain._Queue,
    publish: Callable[[], object],
) -> None:
    publish()
    op_celery.track.delay("behind it")
    before = redis_client.lrange(queue_key(env), 0, -1)
    raw = taker.take("", more=True)
    if raw is not None:  # taken by the script (a callback is in the body): _Taken refuses it
        assert _drain._Taken.of(raw, "host") is None
        _drain._give_back(taker, raw, None)
    assert redis_client.lrange(queue_key(env), 0, -1) == before
    assert unacked(redis_client, env) == {}


def test_a_message_of_another_task_is_left_on_the_queue(
    app: Celery, env: dict[str, str], redis_client: redis.Redis, taker: _drain._Queue
) -> None:
    app.send_task("users.own_task", queue=env["OP_CELERY_QUEUE"])
    assert taker.take("", more=True) is None
    assert redis_client.llen(queue_key(env)) == 1


def run_drain(app: Celery, env: dict[str, str]) -> int:
    """What a worker's task runs after its own event, here in the test's process."""
    task = app.tasks["op_celery.track"]
    info = {"exchange": "", "routing_key": env["OP_CELERY_QUEUE"]}
    task.push_request(hostname="test@here", delivery_info=info, called_directly=False)
    try:
        return _drain.drain(task, env["OP_CELERY_QUEUE"])
    finally:
        task.pop_request()
        _drain._queues.pop(app, None)


def test_drained_events_are_delivered_and_leave_nothing_on_the_queue_or_unacked(
    app: Celery, env: dict[str, str], redis_client: redis.Redis, stand_in: StandInServer
) -> None:
    for i in range(10):
        op_celery.track.delay(f"event-{i}")
    assert run_drain(app, env) == 10
    assert [r.payload["name"] for r in stand_in.received] == [f"event-{i}" for i in range(10)]
    assert redis_client.llen(queue_key(env)) == 0
    assert unacked(redis_client, env) == {}


def test_a_drained_event_the_server_refuses_is_one_dead_letter_and_the_rest_go_on(
    app: Celery, env: dict[str, str], redis_client: redis.Redis, stand_in: StandInServer
) -> None:
    stand_in.fail_next(1, status=400, body='{"error": "Bad Request", "message": "no"}')
    for i in range(5):
        op_celery.track.delay(f"event-{i}")
    assert run_drain(app, env) == 5
    [letter] = DeadLetterStore(load_settings(env=env)).list()
    assert letter.kwargs["name"] == "event-0"
    assert [r.payload["name"] for r in stand_in.received] == [f"event-{i}" for i in range(1, 5)]
    assert unacked(redis_client, env) == {}


def test_a_drained_event_that_meets_a_503_is_put_back_as_celerys_retry_and_ends_the_drain(
    app: Celery, env: dict[str, str], redis_client: redis.Redis, stand_in: StandInServer
) -> None:
    stand_in.fail_next(1, status=503)
    op_celery.track.delay("flaky")
    op_celery.track.delay("fine")
    # The retry ends the drain: while the server fails, Celery paces the rest.
    assert run_drain(app, env) == 1
    assert stand_in.received == []
    queued = [json.loads(raw) for raw in redis_client.lrange(queue_key(env), 0, -1)]
    retry, waiting = queued[0], queued[-1]
    assert retry["headers"]["retries"] == 1 and retry["headers"]["eta"] is not None
    assert waiting["headers"]["retries"] == 0 and len(queued) == 2
    assert unacked(redis_client, env) == {}


def test_with_draining_off_nothing_is_taken(
    app: Celery, env: dict[str, str], redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OP_CELERY_DRAIN", "off")
    op_celery.track.delay("for celery")
    assert run_drain(app, env) == 0
    assert redis_client.llen(queue_key(env)) == 1


def succeeded(worker: WorkerProcess) -> int:
    return worker.log.count("] succeeded in ")


@pytest.mark.parametrize("drain", ["on", "off"])
def test_a_solo_worker_with_a_backlog_delivers_each_event_once_in_fewer_celery_tasks(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    drain: str,
) -> None:
    for i in range(EVENTS):
        op_celery.track.delay(f"event-{i}")
    worker = start_worker(POOL="solo", OP_CELERY_DRAIN=drain)
    assert stand_in.wait_for(EVENTS, timeout=60)
    assert sorted(r.payload["name"] for r in stand_in.received) == sorted(
        f"event-{i}" for i in range(EVENTS)
    )
    assert wait_until(lambda: succeeded(worker) > 0, 10)
    if drain == "on":
        assert succeeded(worker) < EVENTS // 2
    else:
        assert wait_until(lambda: succeeded(worker) == EVENTS, 10)


def test_drained_events_that_meet_503s_are_retried_by_celery_and_each_delivered_once(
    producer: Celery, start_worker: Callable[..., WorkerProcess], stand_in: StandInServer
) -> None:
    stand_in.fail_next(15, status=503)
    for i in range(30):
        op_celery.track.delay(f"event-{i}")
    start_worker()
    assert stand_in.wait_for(30, timeout=60)
    names = [r.payload["name"] for r in stand_in.received]
    assert sorted(names) == sorted(f"event-{i}" for i in range(30))
    assert stand_in.counts().get(503) == 15


def test_with_task_events_on_every_message_goes_through_celery(
    app: Celery, env: dict[str, str], redis_client: redis.Redis
) -> None:
    op_celery.track.delay("for flower")
    _drain._note_task_events(sender=SimpleNamespace(task_events=True))  # a worker run with -E
    try:
        assert run_drain(app, env) == 0
    finally:
        _drain._note_task_events(sender=SimpleNamespace(task_events=False))
    assert redis_client.llen(queue_key(env)) == 1


def test_with_a_task_time_limit_every_message_goes_through_celery(
    app: Celery, env: dict[str, str], redis_client: redis.Redis
) -> None:
    op_celery.track.delay("limited")
    app.conf.task_soft_time_limit = 30  # a drain could be cut by it
    assert run_drain(app, env) == 0
    assert redis_client.llen(queue_key(env)) == 1
