"""End to end: a real Redis broker, real ``celery worker`` processes, the stand-in server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest
import redis
from celery import Celery

import op_celery
from op_celery import InvalidEvent
from op_celery._ledger import Ledger
from op_celery._settings import load_settings
from op_celery.dead_letters import DeadLetterStore
from op_celery.testing import StandInServer
from op_celery.testing._profiles import PROFILE_FLUSH_INTERVAL_S

from ._support import (
    CLIENT_ID,
    CLIENT_SECRET,
    WorkerProcess,
    age_keys,
    answer_429_once,
    wait_until,
)


def queued(redis_client: redis.Redis, env: dict[str, str]) -> list[bytes]:
    key = env["OP_CELERY_BROKER_KEY_PREFIX"] + env["OP_CELERY_QUEUE"]
    return list(redis_client.lrange(key, 0, -1))


def enqueue_every_operation() -> None:
    ua = "Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0"
    op_celery.identify.delay("u1", first_name="Ada", email="ada@example.com", user_agent=ua)
    op_celery.track.delay(
        "signup", properties={"plan": "pro"}, profile_id="u1", groups=["acme"],
        timestamp=datetime(2026, 11, 26, 9, 30, tzinfo=timezone.utc),
        client_ip="203.0.113.7", user_agent=ua,
    )  # fmt: skip
    op_celery.increment.delay("u1", "logins")
    op_celery.decrement.delay("u1", "credits", value=2)
    op_celery.group.delay("acme", "company", "Acme Inc", properties={"seats": 5})
    op_celery.assign_group.delay(["acme"], profile_id="u1")


def test_each_operation_arrives_with_the_right_body_and_headers(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
) -> None:
    start_worker()
    # The identify must be processed before the counters, or the stand-in answers 404.
    op_celery.identify.delay("u1")
    assert stand_in.wait_for(1)
    enqueue_every_operation()
    assert stand_in.wait_for(7, timeout=20)
    by_type = {r.type: r for r in stand_in.received}
    assert set(by_type) == {
        "identify", "track", "increment", "decrement", "group", "assign_group"
    }  # fmt: skip
    track = by_type["track"]
    assert track.payload == {
        "name": "signup",
        "properties": {"plan": "pro", "__timestamp": "2026-11-26T09:30:00.000Z"},
        "profileId": "u1",
        "groups": ["acme"],
    }
    assert track.headers["openpanel-client-id"] == CLIENT_ID
    assert track.headers["openpanel-client-secret"] == CLIENT_SECRET
    assert track.headers["openpanel-sdk-name"] == "op-celery"
    assert track.headers["openpanel-sdk-version"] == op_celery.__version__
    assert track.headers["openpanel-client-ip"] == "203.0.113.7"
    assert track.headers["x-client-ip"] == "203.0.113.7"
    assert track.headers["user-agent"].startswith("Mozilla/5.0")
    assert len(track.headers["request-id"]) == 32
    assert by_type["increment"].payload == {"profileId": "u1", "property": "logins", "value": 1}
    assert by_type["decrement"].payload["value"] == 2
    assert by_type["increment"].headers["user-agent"] == f"op-celery/{op_celery.__version__}"
    assert "openpanel-client-ip" not in by_type["increment"].headers
    assert by_type["group"].payload == {
        "id": "acme", "type": "company", "name": "Acme Inc", "properties": {"seats": 5}
    }  # fmt: skip
    assert by_type["assign_group"].payload == {"groupIds": ["acme"], "profileId": "u1"}


def test_invalid_input_raises_in_the_caller_and_enqueues_nothing(
    producer: Celery, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    bad_calls: list[Callable[[], object]] = [
        lambda: op_celery.track.delay(""),
        lambda: op_celery.track.delay("x", properties={"d": datetime.now()}),
        lambda: op_celery.track.delay(nme="x"),  # type: ignore[call-arg]
        lambda: op_celery.increment.delay("u1", "v", value="2"),  # type: ignore[arg-type]
        lambda: op_celery.identify.delay(None),  # type: ignore[arg-type]
        lambda: op_celery.identify.apply_async(kwargs={"profile_id": "u", "email": "nope"}),
        lambda: op_celery.track.s(name="session_end").delay(),
    ]
    for call in bad_calls:
        with pytest.raises(InvalidEvent):
            call()
    assert queued(redis_client, env) == []


def test_messages_are_json_with_the_project_name_and_no_secret(
    producer: Celery, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    op_celery.track.delay("signup", profile_id="u1", project="default")
    [raw] = queued(redis_client, env)
    assert CLIENT_SECRET.encode() not in raw
    message = json.loads(raw)
    assert message["content-type"] == "application/json"
    assert message["headers"]["task"] == "op_celery.track"
    body = json.loads(__import__("base64").b64decode(message["body"]))
    args, kwargs, _ = body
    assert args == []
    assert kwargs["name"] == "signup" and kwargs["project"] == "default"
    assert "secret" not in json.dumps(kwargs).lower()


def test_a_503_then_success_delivers_exactly_once(
    producer: Celery, start_worker: Callable[..., WorkerProcess], stand_in: StandInServer
) -> None:
    stand_in.fail_next(1, status=503)
    start_worker()
    op_celery.track.delay("retry-me")
    assert stand_in.wait_for(1, timeout=20)
    time.sleep(1.0)  # room for a wrong second delivery to show up
    assert [r.payload["name"] for r in stand_in.received] == ["retry-me"]
    assert [r.status for r in stand_in.requests] == [503, 200]


def test_a_429_with_retry_after_is_retried_no_sooner_than_it_says(
    producer: Celery, start_worker: Callable[..., WorkerProcess], stand_in: StandInServer
) -> None:
    answer_429_once(stand_in)
    start_worker()
    op_celery.track.delay("throttled")
    assert stand_in.wait_for(1, timeout=20)
    first, second = stand_in.requests
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 2.0


def test_a_401_is_tried_once_and_logged_once_without_the_secret(
    producer: Celery, start_worker: Callable[..., WorkerProcess], stand_in: StandInServer
) -> None:
    worker = start_worker(OPENPANEL_CLIENT_SECRET="wrong-secret-0d9e")
    op_celery.track.delay("denied")
    assert wait_until(lambda: len(stand_in.requests) >= 1)
    assert wait_until(lambda: "given up" in worker.log)
    time.sleep(1.0)
    assert [r.status for r in stand_in.requests] == [401]
    log = worker.log
    assert log.count("given up") == 1
    assert "Ingestion:" in log and "401" in log
    assert "wrong-secret-0d9e" not in log


def test_alias_is_reported_as_not_supported(
    producer: Celery, start_worker: Callable[..., WorkerProcess], stand_in: StandInServer
) -> None:
    worker = start_worker()
    op_celery.alias.delay("u1", "anon-7")
    assert wait_until(lambda: "given up" in worker.log)
    assert "Alias is not supported" in worker.log
    assert [r.status for r in stand_in.requests] == [400]


def test_profile_not_found_is_retried_until_the_identify_lands(
    producer: Celery, start_worker: Callable[..., WorkerProcess], stand_in: StandInServer
) -> None:
    start_worker()
    op_celery.increment.delay("late-user", "visits")
    assert wait_until(lambda: len(stand_in.requests) >= 1)
    op_celery.identify.delay("late-user")
    assert stand_in.wait_for(2, timeout=20)
    assert sorted(r.type for r in stand_in.received) == ["identify", "increment"]
    assert 404 in [r.status for r in stand_in.requests]


def test_an_increment_right_after_its_identify_is_retried_past_the_servers_profile_flush(
    producer: Celery, start_worker: Callable[..., WorkerProcess], stand_in: StandInServer
) -> None:
    # As on the real server, the identified profile is visible to increments only once the
    # profile buffer is flushed (10 s); the increment's 404s are retried until then.
    stand_in.set_profile_flush(PROFILE_FLUSH_INTERVAL_S)
    start_worker()
    op_celery.identify.delay("flushed-user", properties={"visits": 41})
    assert stand_in.wait_for(1)
    op_celery.increment.delay("flushed-user", "visits")
    assert wait_until(lambda: 404 in [r.status for r in stand_in.requests])
    stand_in.advance(PROFILE_FLUSH_INTERVAL_S)  # the flush, without waiting for it
    assert stand_in.wait_for(2, timeout=30)
    assert [r.status for r in stand_in.requests if r.type == "increment"][-1] == 200
    stand_in.advance(PROFILE_FLUSH_INTERVAL_S)
    assert stand_in.profile("flushed-user", CLIENT_ID) == {"visits": 42}


def test_a_script_without_an_app_publishes_through_the_package_app(
    start_worker: Callable[..., WorkerProcess], stand_in: StandInServer, env: dict[str, str]
) -> None:
    start_worker()
    script = "import op_celery; op_celery.track.delay('from-a-script', profile_id=1)"
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=30)
    assert stand_in.wait_for(1, timeout=20)
    assert stand_in.received[0].payload["name"] == "from-a-script"


def test_calling_a_task_directly_sends_in_the_caller(
    stand_in: StandInServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = Celery("direct", set_as_current=True)
    app.conf.update(
        openpanel_client_id=CLIENT_ID,
        openpanel_client_secret=CLIENT_SECRET,
        openpanel_api_url=stand_in.url,
    )
    try:
        op_celery.track("direct-call")
        assert [r.payload["name"] for r in stand_in.received] == ["direct-call"]
    finally:
        app.close()


def test_a_direct_call_the_projects_filters_refuse_returns_and_signals_the_drop(
    stand_in: StandInServer,
) -> None:
    app = Celery("direct", set_as_current=True)
    app.conf.update(
        openpanel_client_id=CLIENT_ID,
        openpanel_client_secret=CLIENT_SECRET,
        openpanel_api_url=stand_in.url,
    )
    seen: list[str] = []

    def on_dropped(reason: str, **_: object) -> None:
        seen.append(reason)

    op_celery.signals.event_dropped.connect(on_dropped, weak=False)
    try:
        stand_in.fail_next(1, "ip-filtered")
        op_celery.track("direct-filtered")  # no error: nothing to fix, nothing to retry
        assert seen == ["filtered"]
    finally:
        op_celery.signals.event_dropped.disconnect(on_dropped)
        app.close()


def test_a_revenue_webhook_delayed_again_days_later_with_its_event_id_is_sent_once(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    redis_client: redis.Redis,
    key_prefix: str,
) -> None:
    worker = start_worker()

    def on_webhook(stripe_event_id: str, **extra: object) -> None:
        op_celery.revenue.delay(1299, {"currency": "USD"}, event_id=stripe_event_id, **extra)

    on_webhook("stripe:evt_a", dedup_for=timedelta(days=30))
    on_webhook("stripe:evt_b")  # the default ledger TTL: an hour
    assert stand_in.wait_for(2)
    assert {r.payload["properties"]["__revenue"] for r in stand_in.received} == {1299}
    # The worker marks an event delivered just after the server's 200: wait for both marks.
    marks = [f"{key_prefix}op-celery:{{stripe:evt_{x}}}:delivered" for x in "ab"]
    assert wait_until(lambda: redis_client.exists(*marks) == 2)
    age_keys(redis_client, key_prefix, 3 * 86_400)  # Stripe's retries of both, 3 days on
    on_webhook("stripe:evt_a", dedup_for=timedelta(days=30))
    on_webhook("stripe:evt_b")
    assert stand_in.wait_for(3)
    assert wait_until(lambda: "event stripe:evt_a was delivered before; not sent" in worker.log)
    ids = sorted(r.headers["request-id"] for r in stand_in.received)
    assert ids == ["stripe:evt_a", "stripe:evt_b", "stripe:evt_b"]


def test_bot_duplicate_and_filtered_answers_end_counted_and_never_as_dead_letters(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    env: dict[str, str],
) -> None:
    answers = ["bot", "duplicate", "ip-filtered", "profile-filtered"]
    for answer in answers:
        stand_in.fail_next(1, answer)
    worker = start_worker(CONCURRENCY="1")  # one at a time: each event meets its answer
    for n in range(len(answers)):
        op_celery.track.delay(f"not-stored-{n}")
    assert wait_until(lambda: worker.log.count("finished, not sent again") == 4), worker.log
    time.sleep(1.0)  # room for a wrong resend or dead letter to show up
    assert [r.status for r in stand_in.requests] == [202, 200, 401, 401]
    settings = load_settings(env=env)
    assert Ledger(settings).tallies("default") == {"bot": 1, "duplicate": 1, "filtered": 2}
    assert list(DeadLetterStore(settings).list()) == []
    log = worker.log
    assert "given up" not in log
    assert "refused by the project's own filters" in log
    assert "IP address is blocked by project filter" in log
    assert "Googlebot (Search bot)" in log


def test_a_captive_portals_200_is_retried_then_dead_lettered_with_that_reason(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    env: dict[str, str],
) -> None:
    stand_in.fail_for(600, "captive-portal")
    worker = start_worker(OP_CELERY_MAX_RETRIES="2")
    op_celery.track.delay("behind-a-portal")
    assert wait_until(lambda: "given up" in worker.log), worker.log
    assert [r.status for r in stand_in.requests] == [200, 200, 200]  # one try, two retries
    [letter] = DeadLetterStore(load_settings(env=env)).list()
    assert letter.error_type == "UnexpectedAnswer" and letter.replayable
    assert "a proxy or captive portal answered instead of OpenPanel" in letter.error
    assert "OPENPANEL_API_URL" in letter.error


SHOP_CLIENT_ID = "5a3c7e91-2b4d-4f6a-8c1e-9d0b2a4c6e8f"


def test_a_worker_of_the_package_queue_also_consumes_the_projects_own_queues(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    redis_client: redis.Redis,
    env: dict[str, str],
) -> None:
    from op_celery import _app

    stand_in.add_client(SHOP_CLIENT_ID, "sec_shop")
    producer.conf.op_celery_project_queues = ["shop"]
    _app.reset_settings()
    op_celery.track.delay("shop-event", project="shop")
    op_celery.track.delay("default-event")
    shop_queue = env["OP_CELERY_BROKER_KEY_PREFIX"] + env["OP_CELERY_QUEUE"] + ".shop"
    assert redis_client.llen(shop_queue) == 1
    # The worker's command line names no project queue: the setting adds it.
    worker = start_worker(
        OP_CELERY_PROJECT_QUEUES="shop",
        OPENPANEL_SHOP_CLIENT_ID=SHOP_CLIENT_ID,
        OPENPANEL_SHOP_CLIENT_SECRET="sec_shop",
    )
    assert stand_in.wait_for(2, timeout=20)
    clients = {r.payload["name"]: r.headers["openpanel-client-id"] for r in stand_in.received}
    assert clients == {"shop-event": SHOP_CLIENT_ID, "default-event": CLIENT_ID}
    assert redis_client.llen(shop_queue) == 0
    assert f"{env['OP_CELERY_QUEUE']}.shop" in worker.log  # the banner lists it
