"""The consumer step (``_consumer``) keeps the outbox true to what happened to each message:
every way a message ends is an end for its record, and nothing a user or Celery removed comes
back. Each test runs real ``celery worker`` processes with a short outbox grace."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

import op_celery
from op_celery._outbox import outbox_keys
from op_celery._outbox_liveness import CLOCK_MARGIN_S, broker_keys, losses
from op_celery._settings import load_settings
from op_celery.dead_letters import DeadLetterStore
from op_celery.testing import StandInServer

from ._support import WORKER_START_TIMEOUT_S, WorkerProcess, wait_until

ROOT = Path(__file__).resolve().parent.parent
#: Seconds of outbox grace on the workers: short, so a record left behind is looked at often.
GRACE = "1"
#: Seconds a test waits after an end to see that nothing comes back: several grace periods.
QUIET_S = 4.0
#: Seconds a record whose message is nowhere can wait to be judged (``_outbox_sweeper.SETTLE_S``),
#: plus a grace period and a margin.
JUDGED_WITHIN_S = 60


def records(client: redis.Redis, env: dict[str, str]) -> dict[str, Any]:
    key, _ = outbox_keys(env["OP_CELERY_QUEUE"], env["OP_CELERY_BROKER_KEY_PREFIX"])
    return {k.decode(): json.loads(v) for k, v in client.hgetall(key).items()}


def republished(worker: WorkerProcess) -> int:
    return worker.log.count("published again from the outbox")


class AppWorker(WorkerProcess):
    """``celery -A <module> worker``: a user's own worker module (under ``tests/``)."""

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
        if not wait_until(
            lambda: (
                " ready." in self.log or self.process is None or self.process.poll() is not None
            ),
            timeout=WORKER_START_TIMEOUT_S,
        ):
            self.stop()
            raise RuntimeError(f"worker not ready:\n{self.log}")
        if " ready." not in self.log:
            raise RuntimeError(f"worker exited at start:\n{self.log}")


@pytest.fixture
def start_app_worker(env: dict[str, str]) -> Iterator[Callable[..., AppWorker]]:
    started: list[AppWorker] = []

    def start(module: str, **overrides: str) -> AppWorker:
        worker = AppWorker({**env, **overrides}, module)
        started.append(worker)
        worker.start()
        return worker

    yield start
    for worker in started:
        worker.stop()


def test_an_expired_message_is_an_end_never_published_again(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    redis_client: redis.Redis,
    env: dict[str, str],
) -> None:
    producer.conf.op_celery_outbox_grace = GRACE
    worker = start_worker(OP_CELERY_OUTBOX_GRACE=GRACE)
    # Held by the worker for its countdown, past which it has expired: Celery discards it.
    op_celery.track.apply_async(("too late",), countdown=3, expires=1)
    assert wait_until(lambda: "expired before a worker ran it" in worker.log, timeout=30)
    assert records(redis_client, env) == {}
    time.sleep(QUIET_S)
    assert republished(worker) == 0
    assert stand_in.received == []
    assert records(redis_client, env) == {}


def test_a_revoked_message_is_an_end_never_published_again(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    redis_client: redis.Redis,
    env: dict[str, str],
) -> None:
    producer.conf.op_celery_outbox_grace = GRACE
    worker = start_worker(OP_CELERY_OUTBOX_GRACE=GRACE)
    result = op_celery.track.apply_async(("revoked",), countdown=4)
    assert wait_until(lambda: result.id in worker.log, timeout=30)  # received, held for later
    producer.control.revoke(result.id)
    assert wait_until(lambda: "was revoked" in worker.log, timeout=30), worker.log
    time.sleep(QUIET_S)
    assert republished(worker) == 0
    assert stand_in.received == []
    assert records(redis_client, env) == {}


def test_celery_purge_is_not_undone_by_the_outbox(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    redis_client: redis.Redis,
    env: dict[str, str],
) -> None:
    producer.conf.op_celery_outbox_grace = GRACE
    sent = 20
    for i in range(sent):
        op_celery.track.delay(f"purged-{i}")
    purge = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "op_celery.worker", "purge",
         "-Q", env["OP_CELERY_QUEUE"], "-f"],
        env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert f"Purged {sent} messages" in purge.stdout, purge.stdout + purge.stderr
    worker = start_worker(OP_CELERY_OUTBOX_GRACE=GRACE)
    assert wait_until(lambda: records(redis_client, env) == {}, timeout=JUDGED_WITHIN_S)
    time.sleep(QUIET_S)
    assert republished(worker) == 0
    assert stand_in.received == []
    assert "removed on purpose" in worker.log


def test_a_worker_without_the_tasks_drops_events_the_outbox_does_not_bring_back(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    start_app_worker: Callable[..., AppWorker],
    stand_in: StandInServer,
    redis_client: redis.Redis,
    env: dict[str, str],
) -> None:
    producer.conf.op_celery_outbox_grace = GRACE
    plain = start_app_worker("tests.plain_worker_app")
    for i in range(3):
        op_celery.track.delay(f"unregistered-{i}")
    assert wait_until(lambda: plain.log.count("unregistered task") >= 3, timeout=30), plain.log
    plain.stop()
    worker = start_worker(OP_CELERY_OUTBOX_GRACE=GRACE)
    assert wait_until(lambda: records(redis_client, env) == {}, timeout=JUDGED_WITHIN_S)
    time.sleep(QUIET_S)
    assert republished(worker) == 0
    assert stand_in.received == []


def test_a_worker_refusing_json_keeps_one_replayable_dead_letter_per_event_and_no_record(
    producer: Celery,
    start_app_worker: Callable[..., AppWorker],
    stand_in: StandInServer,
    redis_client: redis.Redis,
    env: dict[str, str],
) -> None:
    producer.conf.op_celery_outbox_grace = GRACE
    store = DeadLetterStore(load_settings(env=env))
    # C_FORCE_ROOT: Celery refuses to run a pickle-accepting worker as root (as CI runs) without.
    worker = start_app_worker(
        "tests.pickle_worker_app", OP_CELERY_OUTBOX_GRACE=GRACE, C_FORCE_ROOT="1"
    )
    sent = 3
    for i in range(sent):
        op_celery.track.delay(f"refused-{i}")
    assert wait_until(lambda: len(store) == sent, timeout=30), worker.log
    assert wait_until(lambda: records(redis_client, env) == {}, timeout=10)
    time.sleep(QUIET_S)
    assert len(store) == sent
    assert all(letter.replayable and letter.operation == "track" for letter in store)
    assert republished(worker) == 0
    # The package's own purge of those dead letters is not undone either.
    purge = subprocess.run(
        [str(Path(sys.executable).with_name("op-celery")), "dead-letters", "purge", "--yes"],
        env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert f"Deleted {sent} dead letters" in purge.stdout, purge.stdout + purge.stderr
    time.sleep(QUIET_S)
    assert len(store) == 0
    assert republished(worker) == 0
    assert stand_in.received == []


def test_an_event_the_users_code_rejects_is_an_end_never_published_again(
    producer: Celery,
    start_app_worker: Callable[..., AppWorker],
    stand_in: StandInServer,
    redis_client: redis.Redis,
    env: dict[str, str],
) -> None:
    producer.conf.op_celery_outbox_grace = GRACE
    worker = start_app_worker("tests.rejecting_worker_app", OP_CELERY_OUTBOX_GRACE=GRACE)
    op_celery.track.delay("rejected")
    assert wait_until(lambda: "was rejected by the task" in worker.log, timeout=30), worker.log
    assert records(redis_client, env) == {}
    time.sleep(QUIET_S)
    assert republished(worker) == 0
    assert stand_in.received == []


def test_a_worker_says_it_is_alive_and_stopped_cleanly_it_leaves_no_possible_loss(
    producer: Celery, start_worker: Callable[..., WorkerProcess], env: dict[str, str],
    redis_client: redis.Redis,
) -> None:  # fmt: skip
    consumers, _, _ = broker_keys(env["OP_CELERY_BROKER_KEY_PREFIX"])
    worker = start_worker()
    assert redis_client.zcard(consumers) == 1
    worker.stop()
    assert redis_client.zcard(consumers) == 0
    assert losses(redis_client, env["OP_CELERY_BROKER_KEY_PREFIX"]).latest is None


def test_a_sigkilled_worker_is_taken_for_a_possible_loss_once_it_stops_saying_it_is_alive(
    producer: Celery, start_worker: Callable[..., WorkerProcess], env: dict[str, str],
    redis_client: redis.Redis,
) -> None:  # fmt: skip
    prefix = env["OP_CELERY_BROKER_KEY_PREFIX"]
    worker = start_worker()
    killed_at = time.time()
    worker.kill()
    assert losses(redis_client, prefix).latest is None  # not yet: it may only be slow
    assert wait_until(lambda: losses(redis_client, prefix).latest is not None, timeout=60)
    latest = losses(redis_client, prefix).latest
    assert latest is not None and latest > killed_at - CLOCK_MARGIN_S


def test_events_a_misconfigured_worker_refused_are_delivered_by_replay_once_it_is_fixed(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    start_app_worker: Callable[..., AppWorker],
    stand_in: StandInServer,
    env: dict[str, str],
) -> None:
    store = DeadLetterStore(load_settings(env=env))
    refusing = start_app_worker("tests.pickle_worker_app", C_FORCE_ROOT="1")
    for i in range(3):
        op_celery.track.delay(f"refused, then replayed-{i}")
    assert wait_until(lambda: len(store) == 3, timeout=30), refusing.log
    refusing.stop()
    start_worker()  # the fixed worker
    replay = subprocess.run(
        [str(Path(sys.executable).with_name("op-celery")), "dead-letters", "replay", "--yes"],
        env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert "Re-enqueued 3 dead letters" in replay.stdout, replay.stdout + replay.stderr
    assert stand_in.wait_for(3, timeout=30)
    assert sorted(r.payload["name"] for r in stand_in.received) == [
        f"refused, then replayed-{i}" for i in range(3)
    ]
    assert len(store) == 0
