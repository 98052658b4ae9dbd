"""``op-celery status``: each part read on its own, against the shared Redis and RabbitMQ."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from importlib.util import find_spec

import pytest
import redis

from op_celery._outbox import outbox_keys
from op_celery._spool import Spool
from op_celery.dead_letters import DeadLetterStore

from .._support import CLIENT_ID, CLIENT_SECRET, free_port
from ._support import letter, one_line_error, run


def test_status_shows_queue_dead_letters_spool_and_projects(
    cli_env: dict[str, str],
    store: DeadLetterStore,
    redis_client: redis.Redis,
    queue_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENPANEL_RATE_LIMIT", "50/s")
    redis_client.rpush(queue_key, b"one", b"two")
    queue = cli_env["OP_CELERY_QUEUE"]
    records, _ = outbox_keys(queue, queue_key.removesuffix(queue))
    redis_client.hset(records, mapping={"e1": "{}", "e2": "{}", "e3": "{}"})
    store.add(letter())
    store.add(letter(project="shop", error_type="InvalidPayload", status=400))
    Spool(cli_env["OP_CELERY_SPOOL_DIR"]).write("op_celery.track", {"name": "x"}, {})

    result = run("status", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["broker"]["queue"] == cli_env["OP_CELERY_QUEUE"]
    assert report["broker"]["queue_length"] == 2
    assert report["broker"]["unfinished"] == 3
    dead = report["dead_letters"]
    assert dead["total"] == 2 and dead["by_project"] == {"default": 1, "shop": 1}
    assert dead["by_error_type"] == {"AuthenticationError": 1, "InvalidPayload": 1}
    assert report["spool"] == {"dir": cli_env["OP_CELERY_SPOOL_DIR"], "files": 1}
    [project] = report["projects"]
    assert project["name"] == "default" and project["client_id"] == CLIENT_ID
    assert project["rate_limit"] == "50/s"
    if find_spec("op_celery._limiter") is not None:
        limiter = project["limiter"]
        assert limiter["paused_s"] == 0 and limiter["available"] == limiter["burst"] >= 1

    text = run("status")
    assert text.exit_code == 0, text.output
    assert f"{queue}: 2 waiting, 3 not yet finished (outbox)" in text.output
    assert "dead letters  2" in text.output and "1 files in" in text.output
    assert CLIENT_SECRET not in text.output and CLIENT_SECRET not in result.output


def test_status_with_redis_down_or_a_bad_setting_is_one_line(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OP_CELERY_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert "did not answer" in one_line_error(run("status"))
    assert "did not answer" in one_line_error(run("dead-letters", "list"))

    monkeypatch.setenv("OP_CELERY_VISIBILITY_TIMEOUT", "soon")
    assert "OP_CELERY_VISIBILITY_TIMEOUT" in one_line_error(run("status"))


# -- each part on its own, RabbitMQ, and the real cause of an error ----------------------------

RABBITMQ_URL = os.environ.get("OP_CELERY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture
def rabbitmq_queue(cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The package's queue on a real RabbitMQ as the broker (skipped when none runs), declared
    with three messages in it, and deleted afterwards."""
    from kombu import Connection, Exchange, Queue

    queue = Queue(cli_env["OP_CELERY_QUEUE"], Exchange(cli_env["OP_CELERY_QUEUE"]), "k")
    try:
        # Confirmed publishes: the broker holds the three before the status counts them (an
        # unconfirmed one can still be on its way, and the count said 1 once).
        connection = Connection(
            RABBITMQ_URL, connect_timeout=2, transport_options={"confirm_publish": True}
        )
        connection.connect()
    except OSError as exc:  # pragma: no cover - a machine without RabbitMQ
        pytest.skip(f"no RabbitMQ at {RABBITMQ_URL} ({exc})")
    with connection:
        producer = connection.Producer()
        for n in range(3):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key="k", declare=[queue])
        monkeypatch.setenv("OP_CELERY_BROKER_URL", RABBITMQ_URL)
        monkeypatch.delenv("OP_CELERY_BROKER_KEY_PREFIX")
        yield queue.name
        queue(connection.default_channel).delete()


def test_status_on_rabbitmq_reads_the_queue_depth_by_a_passive_declare(
    rabbitmq_queue: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OP_CELERY_REDIS_URL", redis_url)
    result = run("status", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["broker"]["queue_length"] == 3
    assert report["broker"]["url"] == "amqp://guest:***@127.0.0.1:5672// (OP_CELERY_BROKER_URL)"
    assert report["dead_letters"]["total"] == 0 and report["problems"] == []
    text = run("status")
    assert f"{rabbitmq_queue}: 3 waiting" in text.output and "guest:guest" not in text.output

    monkeypatch.setenv("OP_CELERY_QUEUE", "op-celery-never-declared")
    missing = run("status")
    assert missing.exit_code == 0, missing.output
    assert "the queue does not exist on the broker yet" in missing.output


def test_status_on_rabbitmq_without_redis_prints_the_queue_and_says_what_is_missing(
    rabbitmq_queue: str,
) -> None:
    result = run("status")
    assert result.exit_code == 1, result.output
    assert f"{rabbitmq_queue}: 3 waiting" in result.output
    assert "redis         none: the broker is not Redis; set OP_CELERY_REDIS_URL" in result.output
    assert "dead letters  not available: op-celery has no Redis here" in result.output
    assert result.output.splitlines()[-1].startswith("Error: 1 part of the status")
    assert "Traceback" not in result.output


def test_status_with_the_broker_down_still_shows_the_dead_letters(
    cli_env: dict[str, str],
    store: DeadLetterStore,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store.add(letter())
    port = free_port()
    monkeypatch.setenv("OP_CELERY_BROKER_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setenv("OP_CELERY_REDIS_URL", redis_url)
    result = run("status")
    assert result.exit_code == 1, result.output
    assert f"the broker at redis://127.0.0.1:{port}/0 (OP_CELERY_BROKER_URL) did not answer" in (
        result.output
    )
    assert "dead letters  1" in result.output


def test_a_redis_database_index_out_of_range_is_said_as_such_not_as_no_answer(
    cli_env: dict[str, str], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OP_CELERY_BROKER_URL", redis_url.rsplit("/", 1)[0] + "/999")
    for command in (["status"], ["dead-letters", "list"]):
        error = one_line_error(run(*command))
        assert "has no such database (DB index is out of range)" in error, command
        assert "did not answer" not in error


def test_a_rabbitmq_that_refuses_the_login_is_said_without_the_password(
    cli_env: dict[str, str], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OP_CELERY_BROKER_URL", "amqp://guest:not-the-password@127.0.0.1:5672//")
    monkeypatch.setenv("OP_CELERY_REDIS_URL", redis_url)
    result = run("status")
    assert result.exit_code == 1, result.output
    if "did not answer" in result.output:  # pragma: no cover - a machine without RabbitMQ
        pytest.skip("no RabbitMQ on 127.0.0.1:5672")
    assert "refused the login" in result.output and "not-the-password" not in result.output


def test_status_shows_the_pace_the_pool_learned_from_the_apis_headers(
    cli_env: dict[str, str], stand_in: object
) -> None:
    from op_celery import build_event
    from op_celery._delivery import Attempt, Delivered, delivery_for
    from op_celery._settings import load_settings

    stand_in.set_rate_limit(20, 1.0)  # type: ignore[attr-defined]  # headers on every answer
    delivery = delivery_for(load_settings())
    for _ in range(3):
        outcome = delivery.deliver(build_event("track", {"name": "x"}), Attempt())
        assert isinstance(outcome, Delivered)

    report = json.loads(run("status", "--json").stdout)
    [project] = report["projects"]
    assert project["rate_limit"] is None
    pace = project["pace"]
    assert (pace["learned_source"], pace["in_use_source"]) == ("headers", "headers")
    assert pace["learned_limit"] == "20/s"
    text = run("status").output
    assert "learned 20/s from the API's headers" in text
    assert "the pool learns the API's from its answers" in text


def test_status_shows_the_events_the_server_did_not_store_by_reason(
    cli_env: dict[str, str],
) -> None:
    from op_celery._ledger import Ledger
    from op_celery._settings import load_settings

    ledger = Ledger(load_settings())
    for n, reason in enumerate(["bot", "filtered", "filtered", "duplicate", "filtered"]):
        ledger.record(f"e{n}", tally=("default", reason))

    report = json.loads(run("status", "--json").stdout)
    [project] = report["projects"]
    assert project["not_stored"] == {"bot": 1, "duplicate": 1, "filtered": 3}
    text = run("status").output
    assert "not stored by the server: 1 bot, 1 duplicate, 3 filtered" in text


def test_status_shows_each_projects_own_queue_beside_the_main_one(
    cli_env: dict[str, str],
    redis_client: redis.Redis,
    queue_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OP_CELERY_PROJECT_QUEUES", "shop")
    queue = cli_env["OP_CELERY_QUEUE"]
    redis_client.rpush(queue_key, b"one")
    redis_client.rpush(queue_key + ".shop", b"a", b"b", b"c")
    records, _ = outbox_keys(queue + ".shop", queue_key.removesuffix(queue))
    redis_client.hset(records, mapping={"e1": "{}"})

    report = json.loads(run("status", "--json").stdout)
    assert report["broker"]["queue_length"] == 1
    assert report["broker"]["project_queues"] == [
        {"queue": queue + ".shop", "queue_length": 3, "unfinished": 1, "note": None}
    ]
    text = run("status").output
    assert f"{queue}.shop: 3 waiting, 1 not yet finished (outbox)" in text
