"""The outbox: every enqueued event has a record until a worker is done with it, and the sweeper
publishes again exactly the events whose message the broker lost (a consumer died or reconnected,
or Redis restarted, after the message was last seen), never one still waiting, and never one
removed on purpose (purged, or dropped by a worker without the tasks)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery

import op_celery
from op_celery import _outbox_liveness, _outbox_sweeper
from op_celery._app import settings_for
from op_celery._ledger import Ledger
from op_celery._outbox import outbox_keys
from op_celery._outbox_liveness import Liveness, broker_keys
from op_celery._outbox_sweeper import Sweeper
from op_celery.testing import StandInServer

from ._support import WorkerProcess, wait_until


def queue_key(env: dict[str, str]) -> str:
    return env["OP_CELERY_BROKER_KEY_PREFIX"] + env["OP_CELERY_QUEUE"]


def keys(env: dict[str, str]) -> tuple[str, str]:
    """The test queue's outbox records hash and due set, as the broker names them."""
    return outbox_keys(env["OP_CELERY_QUEUE"], env["OP_CELERY_BROKER_KEY_PREFIX"])


def records(client: redis.Redis, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {k.decode(): json.loads(v) for k, v in client.hgetall(keys(env)[0]).items()}


def make_due(client: redis.Redis, env: dict[str, str]) -> None:
    """Make every record due now (as if its grace period had just passed)."""
    due = keys(env)[1]
    now = time.time()
    for member in client.zrange(due, 0, -1):
        client.zadd(due, {member: now})


def consumer_died(client: redis.Redis, env: dict[str, str], ago_s: float = 1.0) -> None:
    """What a worker SIGKILLed leaves: a consumer that said it was alive and stopped saying so."""
    consumers, _, _ = broker_keys(env["OP_CELERY_BROKER_KEY_PREFIX"])
    client.zadd(consumers, {f"killed-{uuid.uuid4().hex[:6]}": time.time() - ago_s})


def settle_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """Judge a missing message at once (no consumer can still be found dead: the test has none)."""
    monkeypatch.setattr(_outbox_sweeper, "SETTLE_S", 0.0)


def next_look(client: redis.Redis, env: dict[str, str]) -> float:
    """When the sweeper next looks at a record (the earliest due time)."""
    return min(score for _, score in client.zrange(keys(env)[1], 0, -1, withscores=True))


def task_ids(client: redis.Redis, env: dict[str, str]) -> list[str]:
    messages = client.lrange(queue_key(env), 0, -1)
    return [json.loads(m)["headers"]["id"] for m in messages]


class Republished:
    def __init__(self, app: Celery) -> None:
        self.app = app
        self.calls: list[tuple[str, str]] = []

    def __call__(self, task: str, kwargs: dict[str, Any], task_id: str, queue: str) -> object:
        self.calls.append((task, task_id))
        return self.app.tasks[task].apply_async((), kwargs, task_id=task_id, queue=queue)


@pytest.fixture
def sweeper(producer: Celery, env: dict[str, str]) -> Iterator[Callable[[], Sweeper]]:
    """Sweepers over the test's queue, publishing again through the producer's app."""
    # The ledger they ask lives under the test's private prefix on the shared Redis.
    producer.conf.op_celery_key_prefix = env["OP_CELERY_KEY_PREFIX"]
    settings = settings_for(producer)

    def make() -> Sweeper:
        return Sweeper(
            settings.outbox_grace_s,
            connect=producer.connection_for_write,
            queues=lambda: [env["OP_CELERY_QUEUE"]],
            republish=Republished(producer),
            delivered=Ledger(settings).delivered,
        )

    yield make


def sweep(sweeper: Sweeper, producer: Celery) -> _outbox_sweeper.SweepResult:
    with producer.connection_for_write() as connection:
        return sweeper.sweep(connection)


def test_every_enqueued_event_has_a_record_written_with_its_message(
    producer: Celery, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    result = op_celery.track.delay("signup", properties={"plan": "pro"}, profile_id="u1")
    [(event_id, record)] = records(redis_client, env).items()
    assert record["id"] == result.id == task_ids(redis_client, env)[0]
    assert record["task"] == "op_celery.track"
    assert record["queue"] == env["OP_CELERY_QUEUE"]
    assert record["kwargs"]["event_id"] == event_id
    assert record["kwargs"]["properties"] == {"plan": "pro"}


def test_an_event_published_through_celerys_path_has_a_record_too(
    producer: Celery, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    # A countdown is an option the fast path leaves to Celery.
    result = op_celery.track.apply_async(("later",), countdown=30)
    [record] = records(redis_client, env).values()
    assert record["id"] == result.id
    assert record["kwargs"]["name"] == "later"


def test_a_message_popped_by_a_consumer_that_died_before_recording_it_is_published_again(
    producer: Celery,
    redis_client: redis.Redis,
    env: dict[str, str],
    sweeper: Callable[[], Sweeper],
) -> None:
    result = op_celery.track.delay("lost")
    # What a worker SIGKILLed right after kombu's BRPOP leaves: the message is gone, and the
    # consumer stops saying it is alive.
    assert redis_client.rpop(queue_key(env)) is not None
    consumer_died(redis_client, env)
    make_due(redis_client, env)
    outcome = sweep(sweeper(), producer)
    assert (outcome.lost, outcome.republished) == (1, 1)
    assert task_ids(redis_client, env) == [result.id]
    assert len(records(redis_client, env)) == 1


def test_a_message_lost_on_a_connection_its_consumer_had_to_remake_is_published_again(
    producer: Celery,
    redis_client: redis.Redis,
    env: dict[str, str],
    sweeper: Callable[[], Sweeper],
) -> None:
    result = op_celery.track.delay("lost on a broken connection")
    make_due(redis_client, env)
    assert redis_client.rpop(queue_key(env)) is not None
    with producer.connection_for_write() as connection:
        Liveness(producer.connection_for_write).say("reconnected", connection)
    outcome = sweep(sweeper(), producer)
    assert (outcome.lost, outcome.republished) == (1, 1)
    assert task_ids(redis_client, env) == [result.id]


def test_a_message_lost_when_redis_restarted_is_published_again(
    producer: Celery,
    redis_client: redis.Redis,
    env: dict[str, str],
    sweeper: Callable[[], Sweeper],
) -> None:
    result = op_celery.track.delay("lost in a restart")
    assert redis_client.rpop(queue_key(env)) is not None
    make_due(redis_client, env)
    # The run id the last look saw is another server's: Redis restarted since.
    redis_client.set(broker_keys(env["OP_CELERY_BROKER_KEY_PREFIX"])[2], "an-earlier-run")
    outcome = sweep(sweeper(), producer)
    assert (outcome.lost, outcome.republished) == (1, 1)
    assert task_ids(redis_client, env) == [result.id]


def test_a_message_removed_with_no_loss_to_explain_it_is_forgotten_not_published_again(
    producer: Celery,
    redis_client: redis.Redis,
    env: dict[str, str],
    sweeper: Callable[[], Sweeper],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for i in range(3):
        op_celery.track.delay(f"purged-{i}")
    # What ``celery purge`` does (kombu's Redis ``_purge``): the queue's lists are deleted.
    assert redis_client.delete(queue_key(env)) == 1
    make_due(redis_client, env)
    the_sweeper = sweeper()
    first = sweep(the_sweeper, producer)
    # Not judged yet: a consumer that died holding one could still be found dead.
    assert (first.lost, first.removed, first.pending) == (0, 0, 3)
    assert len(records(redis_client, env)) == 3
    settle_now(monkeypatch)
    make_due(redis_client, env)
    second = sweep(the_sweeper, producer)
    assert (second.lost, second.republished, second.removed) == (0, 0, 3)
    assert records(redis_client, env) == {}
    assert task_ids(redis_client, env) == []


def test_a_missing_message_judged_later_is_published_again_if_a_consumer_died_meanwhile(
    producer: Celery,
    redis_client: redis.Redis,
    env: dict[str, str],
    sweeper: Callable[[], Sweeper],
) -> None:
    result = op_celery.track.delay("lost, its consumer found dead later")
    assert redis_client.rpop(queue_key(env)) is not None
    make_due(redis_client, env)
    the_sweeper = sweeper()
    assert sweep(the_sweeper, producer).pending == 1
    consumer_died(redis_client, env)
    make_due(redis_client, env)
    outcome = sweep(the_sweeper, producer)
    assert (outcome.lost, outcome.republished) == (1, 1)
    assert task_ids(redis_client, env) == [result.id]


def test_a_loss_before_the_message_was_last_seen_does_not_bring_it_back(
    producer: Celery,
    redis_client: redis.Redis,
    env: dict[str, str],
    sweeper: Callable[[], Sweeper],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer_died(redis_client, env, ago_s=600)  # long before the event was enqueued
    op_celery.track.delay("purged after a crash long ago")
    redis_client.delete(queue_key(env))
    make_due(redis_client, env)
    settle_now(monkeypatch)
    the_sweeper = sweeper()
    assert sweep(the_sweeper, producer).pending == 1  # judged at the next look
    make_due(redis_client, env)
    outcome = sweep(the_sweeper, producer)
    assert (outcome.lost, outcome.republished, outcome.removed) == (0, 0, 1)
    assert records(redis_client, env) == {}


def test_a_message_still_waiting_on_the_queue_is_not_published_again(
    producer: Celery,
    redis_client: redis.Redis,
    env: dict[str, str],
    sweeper: Callable[[], Sweeper],
) -> None:
    for i in range(5):
        op_celery.track.delay(f"backlog-{i}")
    make_due(redis_client, env)
    outcome = sweep(sweeper(), producer)
    assert outcome.swept and (outcome.lost, outcome.republished) == (0, 0)
    assert len(task_ids(redis_client, env)) == 5
    # Looked at again only a grace period later.
    assert next_look(redis_client, env) > time.time()


def test_a_message_a_consumer_holds_unacked_is_not_published_again(
    producer: Celery,
    redis_client: redis.Redis,
    env: dict[str, str],
    sweeper: Callable[[], Sweeper],
) -> None:
    result = op_celery.track.delay("held")
    with producer.connection_for_write() as connection:
        queue = connection.SimpleQueue(env["OP_CELERY_QUEUE"], no_ack=False)
        message = queue.get(timeout=5)  # kombu moves it to its unacked hash
        assert message.headers["id"] == result.id
        assert task_ids(redis_client, env) == []
        make_due(redis_client, env)
        outcome = sweep(sweeper(), producer)
        assert (outcome.lost, outcome.republished) == (0, 0)
        assert task_ids(redis_client, env) == []
        message.ack()
        queue.close()


def test_a_message_in_transit_at_the_first_look_is_not_published_again(
    producer: Celery,
    redis_client: redis.Redis,
    env: dict[str, str],
    sweeper: Callable[[], Sweeper],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_outbox_sweeper, "CONFIRM_DELAY_S", 3.0)
    op_celery.track.delay("in transit")
    message = redis_client.rpop(queue_key(env))  # popped by a worker that is slow to record it
    assert message is not None
    make_due(redis_client, env)
    outcomes: list[_outbox_sweeper.SweepResult] = []
    pass_ = threading.Thread(target=lambda: outcomes.append(sweep(sweeper(), producer)))
    pass_.start()
    # The first look is over when the record is due again later; then the message turns up.
    assert wait_until(lambda: next_look(redis_client, env) > time.time(), timeout=5)
    redis_client.lpush(queue_key(env), message)
    pass_.join(10)
    [outcome] = outcomes
    assert (outcome.lost, outcome.republished) == (0, 0)
    assert len(task_ids(redis_client, env)) == 1


def test_a_lost_event_the_ledger_knows_as_delivered_loses_its_record_instead(
    producer: Celery,
    redis_client: redis.Redis,
    env: dict[str, str],
    sweeper: Callable[[], Sweeper],
) -> None:
    op_celery.track.delay("delivered, then the record stayed")
    [event_id] = records(redis_client, env)
    redis_client.rpop(queue_key(env))
    consumer_died(redis_client, env)
    Ledger(settings_for(producer)).record(event_id)
    make_due(redis_client, env)
    outcome = sweep(sweeper(), producer)
    assert (outcome.lost, outcome.republished) == (1, 0)
    assert task_ids(redis_client, env) == []
    assert records(redis_client, env) == {}


def test_one_sweeper_at_a_time_looks_at_a_queue(
    producer: Celery, env: dict[str, str], sweeper: Callable[[], Sweeper]
) -> None:
    assert sweep(sweeper(), producer).swept
    assert not sweep(sweeper(), producer).swept


def test_a_backlog_too_long_to_scan_is_judged_later_not_published_again(
    producer: Celery,
    redis_client: redis.Redis,
    env: dict[str, str],
    sweeper: Callable[[], Sweeper],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_outbox_sweeper, "MAX_SCAN_MESSAGES", 1)
    for i in range(3):
        op_celery.track.delay(f"long-{i}")
    redis_client.rpop(queue_key(env))  # lost, but behind a backlog the sweeper won't scan
    consumer_died(redis_client, env)
    make_due(redis_client, env)
    the_sweeper = sweeper()
    outcome = sweep(the_sweeper, producer)
    assert (outcome.too_busy, outcome.republished) == (2, 0)
    redis_client.rpop(queue_key(env))
    consumer_died(redis_client, env)
    monkeypatch.setattr(_outbox_sweeper, "MAX_SCAN_MESSAGES", 10)
    outcome = sweep(the_sweeper, producer)  # the records are still due
    assert (outcome.lost, outcome.republished) == (2, 2)
    assert len(task_ids(redis_client, env)) == 3


def test_with_the_outbox_off_no_record_is_written(
    producer: Celery, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    producer.conf.op_celery_outbox = "off"
    op_celery.track.delay("no record")
    assert records(redis_client, env) == {}
    assert len(task_ids(redis_client, env)) == 1


#: Workers that must delete the record of each event they finish.
FORGETTING_WORKERS: dict[str, dict[str, str]] = {
    "default": {},
    # The web app has the outbox on, the workers off: the records must not pile up anyway.
    "outbox off on the worker": {"OP_CELERY_OUTBOX": "off"},
    # Another URL for the ledger: the mark and the record's deletion are two round trips.
    "ledger in another redis": {"OP_CELERY_REDIS_URL": "the broker's, by another name"},
}


@pytest.mark.parametrize("case", FORGETTING_WORKERS)
def test_a_worker_forgets_the_record_of_each_event_it_finished(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    redis_client: redis.Redis,
    env: dict[str, str],
    case: str,
) -> None:
    options = dict(FORGETTING_WORKERS[case])
    if "OP_CELERY_REDIS_URL" in options:
        options["OP_CELERY_REDIS_URL"] = env["OP_CELERY_BROKER_URL"].replace(
            "127.0.0.1", "localhost"
        )
        assert options["OP_CELERY_REDIS_URL"] != env["OP_CELERY_BROKER_URL"]
    start_worker(**options)
    for i in range(5):
        op_celery.track.delay(f"done-{i}")
    assert stand_in.wait_for(5, timeout=30)
    # The producer names no OP_CELERY_KEY_PREFIX and the worker does: the outbox is keyed by
    # queue, so they still agree.
    assert wait_until(lambda: records(redis_client, env) == {}, timeout=10)


def test_a_dead_lettered_event_leaves_no_record(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    redis_client: redis.Redis,
    env: dict[str, str],
) -> None:
    start_worker(OPENPANEL_CLIENT_SECRET="not-the-secret")
    op_celery.track.delay("refused")
    assert wait_until(lambda: stand_in.counts().get(401, 0) == 1, timeout=30)
    assert wait_until(lambda: records(redis_client, env) == {}, timeout=30)


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_worker_publishes_again_an_event_lost_from_its_queue(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    redis_client: redis.Redis,
    env: dict[str, str],
    pool: str,
) -> None:
    producer.conf.op_celery_outbox_grace = 1
    op_celery.track.delay("lost before any worker ran")
    redis_client.rpop(queue_key(env))
    consumer_died(redis_client, env)  # the worker that popped it was SIGKILLed
    worker = start_worker(OP_CELERY_OUTBOX_GRACE="1", POOL=pool, CONCURRENCY="2")
    assert stand_in.wait_for(1, timeout=30)
    assert [r.payload["name"] for r in stand_in.received] == ["lost before any worker ran"]
    assert "published again from the outbox" in worker.log
    assert wait_until(lambda: records(redis_client, env) == {}, timeout=10)


def test_the_sweeper_thread_keeps_going_when_the_broker_is_away(
    producer: Celery, env: dict[str, str]
) -> None:
    attempts: list[float] = []

    def connect() -> Any:
        attempts.append(time.monotonic())
        raise redis.ConnectionError("broker away")

    swept = Sweeper(
        1.0,
        connect=connect,
        queues=lambda: [env["OP_CELERY_QUEUE"]],
        republish=Republished(producer),
        delivered=lambda event_id: False,
    )
    swept.start()
    try:
        assert wait_until(lambda: len(attempts) >= 2, timeout=10)
    finally:
        swept.stop()


def test_a_consumer_not_heard_from_is_taken_for_a_possible_loss_and_one_that_stopped_is_not(
    producer: Celery, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    prefix = env["OP_CELERY_BROKER_KEY_PREFIX"]
    consumers, _, _ = broker_keys(prefix)
    with producer.connection_for_write() as connection:
        stopped = Liveness(producer.connection_for_write, "stopped-cleanly")
        stopped.say("beat", connection)
        stopped.say("stopped", connection)
        assert _outbox_liveness.losses(redis_client, prefix).latest is None
        # A ttl already over: as if it had not been heard from for ALIVE_TTL_S.
        silent = Liveness(producer.connection_for_write, "went-silent", ttl_s=-1)
        silent.say("beat", connection)
    found = _outbox_liveness.losses(redis_client, prefix)
    assert found.latest is not None and found.latest <= found.now
    assert redis_client.zcard(consumers) == 0
