"""The ledger: a delivered event is not sent again, and two copies of one event are never sent at
the same time."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis
from celery import Celery

import op_celery
from op_celery._app import settings_for
from op_celery._ledger import Ledger
from op_celery._outbox import outbox_keys
from op_celery._settings import load_settings
from op_celery.testing import StandInServer

from ._support import WorkerProcess, wait_until


@pytest.fixture
def ledger(redis_url: str, key_prefix: str) -> Ledger:
    settings = load_settings(
        env={"OP_CELERY_REDIS_URL": redis_url, "OP_CELERY_KEY_PREFIX": key_prefix + "op-celery"}
    )
    return Ledger(settings)


def test_an_event_never_seen_is_claimed(ledger: Ledger) -> None:
    claim = ledger.claim("e1", ttl_s=10)
    assert claim.claimed and not claim.delivered


def test_a_second_claim_is_told_how_long_the_first_holds(ledger: Ledger) -> None:
    ledger.claim("e1", ttl_s=10)
    second = ledger.claim("e1", ttl_s=10)
    assert not second.claimed and not second.delivered
    assert 0 < second.busy_s <= 10


def test_a_delivered_event_is_reported_delivered_not_claimed(ledger: Ledger) -> None:
    first = ledger.claim("e1", ttl_s=10)
    assert first.claimed
    ledger.record("e1")
    assert ledger.delivered("e1")
    again = ledger.claim("e1", ttl_s=10)
    assert again.delivered and not again.claimed


def test_a_tallied_record_marks_the_event_and_counts_its_reason_per_project(
    ledger: Ledger,
) -> None:
    ledger.claim("e1", ttl_s=10)
    ledger.record("e1", tally=("shop", "filtered"))
    ledger.record("e2", tally=("shop", "filtered"))
    ledger.record("e3", tally=("shop", "bot"))
    ledger.record("e4")  # delivered: not counted
    assert ledger.claim("e1", ttl_s=10).delivered
    assert ledger.tallies("shop") == {"bot": 1, "duplicate": 0, "filtered": 2}
    assert ledger.tallies("default") == {"bot": 0, "duplicate": 0, "filtered": 0}


def test_a_tallied_record_survives_redis_losing_the_script(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    redis_client.script_flush()  # as after a restart: the pipelined EVALSHA gets NOSCRIPT
    ledger.record("e1", tally=("default", "duplicate"))
    assert ledger.delivered("e1")
    assert ledger.tallies("default")["duplicate"] == 1


def test_a_released_claim_can_be_taken_again(ledger: Ledger) -> None:
    first = ledger.claim("e1", ttl_s=10)
    assert first.token is not None
    ledger.release("e1", first.token)
    assert ledger.claim("e1", ttl_s=10).claimed


def test_releasing_with_another_attempts_token_leaves_the_claim(ledger: Ledger) -> None:
    assert ledger.claim("e1", ttl_s=10).claimed
    ledger.release("e1", "some-other-attempt")
    assert not ledger.claim("e1", ttl_s=10).claimed


def test_a_claim_runs_out_after_its_ttl(ledger: Ledger) -> None:
    assert ledger.claim("e1", ttl_s=0.05).claimed
    assert wait_until(lambda: ledger.claim("e1", ttl_s=10).claimed, timeout=5)


def test_a_copy_arriving_while_another_worker_sends_waits_and_is_not_sent_twice(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    redis_client: redis.Redis,
    env: dict[str, str],
) -> None:
    ledger = Ledger(load_settings(env=env))
    event_id = "f" * 32
    worker = start_worker()
    # Another attempt holds the event (as a worker sending the original would) for 5 s.
    assert ledger.claim(event_id, ttl_s=5).claimed
    op_celery.track.apply_async(("copied",), {"event_id": event_id})
    assert wait_until(lambda: "is being sent by another worker" in worker.log, timeout=10)
    assert stand_in.received == []  # turned away, to come back when the claim runs out
    assert stand_in.wait_for(1, timeout=30)  # once the claim ran out
    assert wait_until(lambda: ledger.delivered(event_id), timeout=10)
    op_celery.track.apply_async(("copied",), {"event_id": event_id})  # a late copy
    assert wait_until(lambda: "was delivered before; not sent again" in worker.log, timeout=10)
    assert len(stand_in.received) == 1


def test_an_event_delivered_before_is_not_sent_and_its_record_is_forgotten(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    redis_client: redis.Redis,
    env: dict[str, str],
) -> None:
    ledger = Ledger(load_settings(env=env))
    ledger.record("d" * 32)
    op_celery.track.apply_async(("seen",), {"event_id": "d" * 32})
    op_celery.track.delay("new")
    start_worker()
    assert stand_in.wait_for(1, timeout=30)
    time.sleep(0.5)
    assert [r.payload["name"] for r in stand_in.received] == ["new"]
    records, _ = outbox_keys(env["OP_CELERY_QUEUE"], env["OP_CELERY_BROKER_KEY_PREFIX"])
    assert wait_until(lambda: redis_client.hlen(records) == 0, timeout=10)
    assert settings_for(producer).outbox
