"""Dead letters: what is given up is kept, visible, without the secret, and replays once."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from typing import cast

import pytest
import redis
from celery import Celery

import op_celery
from op_celery._enqueue import publish_dead_letter
from op_celery._settings import load_settings
from op_celery.dead_letters import DeadLetter, DeadLetterStore
from op_celery.testing import StandInServer

from ._support import CLIENT_SECRET, WorkerProcess, dead_letter, wait_until


@pytest.fixture
def store(key_prefix: str, redis_url: str) -> DeadLetterStore:
    return DeadLetterStore(
        load_settings(env={"OP_CELERY_REDIS_URL": redis_url, "OP_CELERY_KEY_PREFIX": key_prefix})
    )


@pytest.fixture
def worker_store(env: dict[str, str]) -> DeadLetterStore:
    """The store the test's workers write to."""
    return DeadLetterStore(load_settings(env=env))


def letter(**overrides: object) -> DeadLetter:
    return cast(DeadLetter, dead_letter(**overrides))


def test_list_filters_by_project_and_error(store: DeadLetterStore) -> None:
    store.add(letter(project="shop"))
    store.add(letter(error_type="InvalidPayload", status=400, error="HTTP 400 bad"))
    store.add(letter())
    assert len(store) == 3
    assert [x.project for x in store.list(project="shop")] == ["shop"]
    assert len(list(store.list(error="AuthenticationError"))) == 2
    assert len(list(store.list(error="400"))) == 1
    assert len(list(store.list(limit=2))) == 2


def test_replay_publishes_each_dead_letter_once_even_when_run_twice(
    store: DeadLetterStore,
) -> None:
    for _ in range(5):
        store.add(letter())
    store.add(letter(replayable=False, operation="unknown"))
    published: list[str] = []
    assert store.replay(publish=lambda x: published.append(x.id)) == 5
    assert store.replay(publish=lambda x: published.append(x.id)) == 0
    assert len(published) == len(set(published)) == 5
    assert len(store) == 1  # the unreplayable one stays until purged
    assert store.purge() == 1 and len(store) == 0


def test_a_failed_publish_puts_the_dead_letter_back(store: DeadLetterStore) -> None:
    kept = letter()
    store.add(kept)

    def broken(_: DeadLetter) -> None:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        store.replay(publish=broken)
    assert store.get(kept.id) is not None


def test_a_refused_event_is_dead_lettered_without_the_secret_and_replays_after_the_fix(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    worker_store: DeadLetterStore,
    redis_client: redis.Redis,
) -> None:
    wrong = start_worker(OPENPANEL_CLIENT_SECRET="wrong-secret-5b2a")
    for i in range(5):
        op_celery.track.delay(f"denied-{i}", profile_id="u1")
    assert wait_until(lambda: len(worker_store) == 5)
    letters = list(worker_store.list())
    assert {x.error_type for x in letters} == {"AuthenticationError"}
    assert all(x.status == 401 and x.attempts == 1 and x.replayable for x in letters)
    raw = b"".join(redis_client.hvals(worker_store._hash))
    assert b"wrong-secret-5b2a" not in raw and CLIENT_SECRET.encode() not in raw
    assert len(stand_in.requests) == 5
    wrong.stop()

    start_worker()
    assert worker_store.replay(publish=publish_dead_letter) == 5
    assert stand_in.wait_for(5, timeout=20)
    assert sorted(r.payload["name"] for r in stand_in.received) == [f"denied-{i}" for i in range(5)]
    assert len(worker_store) == 0


def test_an_unknown_project_is_dead_lettered_and_replayable(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    worker_store: DeadLetterStore,
) -> None:
    start_worker()
    op_celery.track.delay("x", project="nowhere")
    assert wait_until(lambda: len(worker_store) == 1)
    [dead] = worker_store.list()
    assert dead.error_type == "ConfigurationError" and dead.replayable
    assert "OPENPANEL_NOWHERE_CLIENT_ID" in dead.error


def envelope(body: bytes, task: str | None, queue: str) -> bytes:
    headers = {} if task is None else {"task": task, "id": uuid.uuid4().hex, "lang": "py"}
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                "delivery_tag": uuid.uuid4().hex,
                "body_encoding": "base64",
                "delivery_info": {"exchange": "", "routing_key": queue},
                "delivery_mode": 2,
                "priority": 0,
            },
        }
    ).encode()


def test_garbage_on_the_queue_is_dead_lettered_and_the_worker_lives_on(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    worker_store: DeadLetterStore,
    redis_client: redis.Redis,
    env: dict[str, str],
) -> None:
    worker = start_worker()
    queue = env["OP_CELERY_QUEUE"]
    key = env["OP_CELERY_BROKER_KEY_PREFIX"] + queue
    redis_client.lpush(key, envelope(b"{not json at all", "op_celery.track", queue))
    redis_client.lpush(key, envelope(b'[[], {"name": 5}, {}]', "op_celery.track", queue))
    redis_client.lpush(key, envelope(b"[[], {}, {}]", "someone.elses.task", queue))
    redis_client.lpush(key, envelope(b'[["a"], {}, {}]', "op_celery.increment", queue))
    assert wait_until(lambda: len(worker_store) == 4), worker.log
    reasons = sorted(x.error_type for x in worker_store.list())
    assert reasons == ["InvalidEvent", "InvalidEvent", "PoisonMessage", "PoisonMessage"]
    op_celery.track.delay("still-alive")
    assert stand_in.wait_for(1, timeout=20)
    assert worker.process is not None and worker.process.poll() is None


def test_purging_dead_letters_forgets_the_outbox_records_their_events_left(
    producer: Celery, worker_store: DeadLetterStore, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    from op_celery._outbox import outbox_keys

    op_celery.track.delay("given up, its record left behind")
    records, due = outbox_keys(env["OP_CELERY_QUEUE"], env["OP_CELERY_BROKER_KEY_PREFIX"])
    [event_id] = [k.decode() for k in redis_client.hkeys(records)]
    worker_store.add(letter(id=event_id, extra={"queue": env["OP_CELERY_QUEUE"]}))
    assert worker_store.purge() == 1
    assert redis_client.hlen(records) == 0
    assert redis_client.zcard(due) == 0
