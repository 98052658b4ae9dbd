"""Failures with real processes: nothing handed to ``.delay()`` is lost.

Each test is bounded in time, prints its figures (sent, delivered, duplicates, dead letters,
longest ``.delay()``), and stops every process it started by PID. Tests that stop Redis run
their own ``redis-server`` on a free port; the shared one is never touched.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

import op_celery
from op_celery._app import reset_settings
from op_celery._enqueue import publish_dead_letter
from op_celery._settings import load_settings
from op_celery.dead_letters import DeadLetterStore
from op_celery.testing import StandInServer

from .._support import RedisServer, WorkerProcess, wait_until, worker_env


def report(name: str, **figures: object) -> None:
    line = ", ".join(f"{key}={value}" for key, value in figures.items())
    print(f"\nFAULT {name}: {line}")


def duplicates(stand_in: StandInServer) -> int:
    ids = Counter(r.headers["request-id"] for r in stand_in.received)
    return sum(count - 1 for count in ids.values())


#: Seconds before the outbox's sweeper checks that an unfinished event's message still exists:
#: short here, so an event kombu lost (popped, never recorded as unacked) comes back quickly.
OUTBOX_GRACE = "2"


def outbox_figures(workers: list[WorkerProcess]) -> dict[str, int]:
    """What the outbox did, from the workers' logs: events its sweepers published again, and
    of those, how many had really been lost (no other copy was ever delivered) and how many
    were false alarms (a message in transit during the sweep, dropped later by the ledger)."""
    logs = "\n".join(worker.log for worker in workers)
    again = set(re.findall(r"event (\w+) was lost by the broker .* published again", logs))
    dropped = set(re.findall(r"event (\w+) was delivered before; not sent again", logs))
    return {
        "republished_from_outbox": len(again),
        "real_losses_recovered": len(again - dropped),
        "false_alarms": len(again & dropped),
        "copies_dropped_by_ledger": len(dropped),
    }


def broker_state(client: redis.Redis, env: dict[str, str]) -> dict[str, object]:
    prefix = env.get("OP_CELERY_BROKER_KEY_PREFIX", "")
    return {
        "queued": client.llen(prefix + env["OP_CELERY_QUEUE"]),
        "unacked": client.hlen(prefix + "unacked"),
        "unacked_mutex": client.exists(prefix + "unacked_mutex"),
    }


def test_a_worker_killed_mid_run_loses_no_event(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    redis_client: redis.Redis,
    env: dict[str, str],
) -> None:
    sent = 2000
    producer.conf.op_celery_outbox_grace = OUTBOX_GRACE
    options = {
        "OP_CELERY_VISIBILITY_TIMEOUT": "10",
        "OP_CELERY_OUTBOX_GRACE": OUTBOX_GRACE,
        "CONCURRENCY": "4",
    }
    victim = start_worker(**options)
    survivor = start_worker(**options)
    for i in range(sent):
        op_celery.track.delay(f"kill-{i}")
    assert wait_until(lambda: len(stand_in.received) >= sent // 4, timeout=60)
    victim.kill()
    killed_at = len(stand_in.received)
    if not stand_in.wait_for(sent, timeout=60):
        print("\nstate after the wait:", len(stand_in.received), broker_state(redis_client, env))
    time.sleep(1.0)
    unique = len({r.headers["request-id"] for r in stand_in.received})
    report(
        "sigkill", sent=sent, killed_after=killed_at, delivered_unique=unique,
        duplicates=duplicates(stand_in), **outbox_figures([victim, survivor]),
    )  # fmt: skip
    # A message the victim had popped (BRPOP) but not yet recorded as unacked comes back from
    # the outbox; every other one it held comes back after the visibility timeout.
    assert unique == sent
    # An event whose 2xx reached a thread of the victim just before the kill, not yet in the
    # ledger, is sent again: at most one per thread (the figure is reported; 0 is usual).
    assert duplicates(stand_in) <= int(options["CONCURRENCY"])


def test_a_20_second_outage_of_the_api_loses_no_event(
    producer: Celery, start_worker: Callable[..., WorkerProcess], stand_in: StandInServer
) -> None:
    sent = 200
    stand_in.fail_for(20.0, status=503)
    # A short outbox grace: events waiting for their retry (held unacked with a countdown)
    # must not look lost to the sweeper.
    producer.conf.op_celery_outbox_grace = OUTBOX_GRACE
    worker = start_worker(
        OP_CELERY_RETRY_BACKOFF="1",
        OP_CELERY_RETRY_BACKOFF_MAX="8",
        OP_CELERY_MAX_RETRIES="20",
        OP_CELERY_OUTBOX_GRACE=OUTBOX_GRACE,
    )
    started = time.monotonic()
    for i in range(sent):
        op_celery.track.delay(f"outage-{i}")
    assert stand_in.wait_for(sent, timeout=90)
    figures = outbox_figures([worker])
    report(
        "api-503-20s", sent=sent, delivered=len(stand_in.received),
        failed_attempts=stand_in.counts().get(503, 0), duplicates=duplicates(stand_in),
        all_delivered_after_s=round(time.monotonic() - started, 1), **figures,
    )  # fmt: skip
    assert duplicates(stand_in) == 0
    assert figures["republished_from_outbox"] == 0


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(data_dir=tmp_path / "redis-data")
    server.start()
    yield server
    server.stop()


def test_redis_restarted_while_the_app_enqueues_loses_no_event(
    own_redis: RedisServer, stand_in: StandInServer, tmp_path: Path
) -> None:
    sent = 1000
    env = worker_env(stand_in.url, own_redis.url, "")
    env.update(
        OP_CELERY_VISIBILITY_TIMEOUT="10",
        OP_CELERY_SPOOL_DIR=str(tmp_path / "w-spool"),
        OP_CELERY_OUTBOX_GRACE=OUTBOX_GRACE,
    )
    app = Celery("restart", set_as_current=True)
    app.conf.update(
        broker_url=own_redis.url,
        op_celery_queue=env["OP_CELERY_QUEUE"],
        op_celery_spool_dir=str(tmp_path / "spool"),
        op_celery_outbox_grace=OUTBOX_GRACE,
        broker_transport_options={"socket_connect_timeout": 0.5, "socket_timeout": 2},
    )
    workers = [WorkerProcess(env)]
    workers[0].start()
    blocked: list[float] = []

    def enqueue() -> None:
        for i in range(sent):
            started = time.monotonic()
            op_celery.track.delay(f"restart-{i}")
            blocked.append(time.monotonic() - started)
            time.sleep(0.004)

    def supervise() -> None:
        # As systemd or compose's restart policy would: kombu's Redis transport can stop a
        # worker with "Unrecoverable error" when the broker goes away mid-flight.
        if workers[-1].process is not None and workers[-1].process.poll() is not None:
            workers.append(WorkerProcess(dict(env)))
            workers[-1].start()

    try:
        producer_thread = threading.Thread(target=enqueue)
        producer_thread.start()
        assert wait_until(lambda: len(blocked) >= sent // 3, timeout=60)
        own_redis.stop()
        time.sleep(2.0)
        own_redis.start()
        producer_thread.join(120)
        spooled = len(list((tmp_path / "spool").glob("*.json")))
        deadline = time.monotonic() + 90
        while len(stand_in.received) < sent and time.monotonic() < deadline:
            supervise()
            time.sleep(0.2)
        time.sleep(1.0)
        if len(stand_in.received) < sent:
            names = {r.payload["name"] for r in stand_in.received}
            missing = sorted({f"restart-{i}" for i in range(sent)} - names)
            client = redis.Redis.from_url(own_redis.url)
            state = broker_state(client, {**env, "OP_CELERY_BROKER_KEY_PREFIX": ""})
            spools = len(list(tmp_path.rglob("*.json*")))
            print("MISSING", missing, state, "spool files:", spools)
    finally:
        for worker in workers:
            worker.stop()
        app.close()
        reset_settings()
    unique = len({r.headers["request-id"] for r in stand_in.received})
    report(
        "redis-restart", sent=sent, delivered_unique=unique, duplicates=duplicates(stand_in),
        spooled_at_end_of_enqueue=spooled, longest_delay_call_s=round(max(blocked), 3),
        worker_restarts=len(workers) - 1, **outbox_figures(workers),
    )  # fmt: skip
    # Everything handed to .delay() reached Redis (with its outbox record) or the spool; a
    # message popped in the instant Redis was killed comes back from the outbox.
    assert unique == sent
    # An event whose 2xx came back while Redis was down could not be recorded and is sent
    # again: at most one per worker thread in flight (reported; 0 is usual).
    assert duplicates(stand_in) <= 4


def test_a_wrong_secret_dead_letters_every_event_once_and_replay_delivers_them(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    env: dict[str, str],
) -> None:
    sent = 500
    store = DeadLetterStore(load_settings(env=env))
    wrong = start_worker(OPENPANEL_CLIENT_SECRET="wrong-secret-91c3")
    for i in range(sent):
        op_celery.track.delay(f"secret-{i}")
    assert wait_until(lambda: len(store) == sent, timeout=90)
    tries = stand_in.counts().get(401, 0)
    wrong.stop()
    start_worker()
    replayed = store.replay(publish=publish_dead_letter)
    assert stand_in.wait_for(sent, timeout=90)
    report(
        "wrong-secret", sent=sent, tried=tries, dead_letters=sent, replayed=replayed,
        delivered_after_replay=len(stand_in.received), duplicates=duplicates(stand_in),
    )  # fmt: skip
    assert tries == sent
    assert "wrong-secret-91c3" not in wrong.log
    assert len(store) == 0


def test_garbage_and_the_worker_stays_up(
    producer: Celery, start_worker: Callable[..., WorkerProcess], stand_in: StandInServer,
    redis_client: redis.Redis, env: dict[str, str],
) -> None:  # fmt: skip
    from ..test_dead_letters import envelope

    worker = start_worker()
    store = DeadLetterStore(load_settings(env=env))
    queue = env["OP_CELERY_QUEUE"]
    key = env["OP_CELERY_BROKER_KEY_PREFIX"] + queue
    garbage = [b"\x00\xff not even utf-8", b"{}", b"[1, 2, 3]", b'[[], {"name": ""}, {}]']
    for body in garbage:
        redis_client.lpush(key, envelope(body, "op_celery.track", queue))
    assert wait_until(lambda: len(store) == len(garbage), timeout=30), worker.log
    op_celery.track.delay("after-garbage")
    assert stand_in.wait_for(1, timeout=20)
    report("garbage", pushed=len(garbage), dead_letters=len(store), worker_alive=True)
    assert worker.process is not None and worker.process.poll() is None
