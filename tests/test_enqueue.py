"""Where the tasks publish: Celery's routing settings on both paths, and replay to the queue an
event came from."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

import op_celery
from op_celery import _app
from op_celery._enqueue import publish_dead_letter
from op_celery.dead_letters import DeadLetter


@pytest.fixture
def routed_app(env: dict[str, str]) -> Iterator[Celery]:
    """A user's app that routes op_celery's tasks to a queue of its own, and its other tasks to
    a default queue of its own."""
    app = Celery("routing-app", set_as_current=True)
    app.conf.update(
        broker_url=env["OP_CELERY_BROKER_URL"],
        broker_transport_options={"global_keyprefix": env["OP_CELERY_BROKER_KEY_PREFIX"]},
        op_celery_queue=env["OP_CELERY_QUEUE"],
        task_routes={"op_celery.*": {"queue": env["OP_CELERY_QUEUE"] + "-routed"}},
        task_default_queue=env["OP_CELERY_QUEUE"] + "-default",
        task_ignore_result=True,
    )
    yield app
    app.close()
    _app.reset_settings()


def messages_in(client: redis.Redis, env: dict[str, str], queue: str) -> list[dict[str, Any]]:
    """A queue's messages, oldest first."""
    key = env["OP_CELERY_BROKER_KEY_PREFIX"] + queue
    return [json.loads(raw) for raw in reversed(client.lrange(key, 0, -1))]


def names_in(client: redis.Redis, env: dict[str, str], queue: str) -> list[str]:
    """The ``name`` of each ``track`` message of a queue, oldest first."""
    return [
        message["headers"]["kwargsrepr"].split("'name': '")[1].split("'")[0]
        for message in messages_in(client, env, queue)
    ]


def test_task_routes_for_op_celery_send_both_paths_to_the_routed_queue(
    routed_app: Celery, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    op_celery.track.delay("fast-path")
    op_celery.track.apply_async(("celery-path",), countdown=30)  # Celery's own path
    op_celery.identify.delay("u1")
    routed = messages_in(redis_client, env, env["OP_CELERY_QUEUE"] + "-routed")
    assert [m["headers"]["task"] for m in routed] == ["op_celery.track"] * 2 + [
        "op_celery.identify"
    ]
    assert [m["headers"]["eta"] is not None for m in routed] == [False, True, False]
    assert messages_in(redis_client, env, env["OP_CELERY_QUEUE"]) == []
    assert messages_in(redis_client, env, env["OP_CELERY_QUEUE"] + "-default") == []


def test_a_queue_named_in_the_call_wins_over_the_routes(
    routed_app: Celery, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    elsewhere = env["OP_CELERY_QUEUE"] + "-explicit"
    op_celery.track.apply_async(("explicit",), queue=elsewhere)
    assert names_in(redis_client, env, elsewhere) == ["explicit"]


def test_without_a_route_events_go_to_op_celerys_queue_not_the_apps_default(
    producer: Celery, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    producer.conf.task_default_queue = env["OP_CELERY_QUEUE"] + "-default"
    op_celery.track.delay("unrouted")
    assert names_in(redis_client, env, env["OP_CELERY_QUEUE"]) == ["unrouted"]


def letter(**extra: Any) -> DeadLetter:
    now = time.time()
    return DeadLetter(
        id="d" * 32, operation="track", project="default",
        kwargs={"name": "replayed", "project": "default", "event_id": "d" * 32},
        error="refused", error_type="PermanentError", status=400, attempts=1,
        failed_at=now, first_failed_at=now, extra=dict(extra),
    )  # fmt: skip


def test_replay_returns_a_dead_letter_to_the_queue_it_came_from(
    producer: Celery, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    came_from = env["OP_CELERY_QUEUE"] + "-origin"
    publish_dead_letter(letter(queue=came_from))
    assert names_in(redis_client, env, came_from) == ["replayed"]


def test_replay_of_a_letter_that_names_no_queue_follows_todays_routing(
    routed_app: Celery, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    publish_dead_letter(letter())
    assert names_in(redis_client, env, env["OP_CELERY_QUEUE"] + "-routed") == ["replayed"]


def test_a_project_with_a_queue_of_its_own_goes_there_and_the_others_do_not(
    producer: Celery, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    producer.conf.op_celery_project_queues = ["shop"]
    _app.reset_settings()
    op_celery.track.delay("shop-event", project="shop")
    op_celery.track.delay("blog-event", project="blog")
    op_celery.track.delay("default-event")
    assert names_in(redis_client, env, env["OP_CELERY_QUEUE"] + ".shop") == ["shop-event"]
    assert names_in(redis_client, env, env["OP_CELERY_QUEUE"]) == ["blog-event", "default-event"]


def test_a_route_wins_over_a_projects_own_queue(
    routed_app: Celery, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    routed_app.conf.op_celery_project_queues = "shop"
    _app.reset_settings()
    op_celery.track.delay("shop-event", project="shop")
    assert names_in(redis_client, env, env["OP_CELERY_QUEUE"] + "-routed") == ["shop-event"]
