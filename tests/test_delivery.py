"""The delivery pipeline with no Celery at all: every outcome from real answers of the stand-in
server and a real Redis (issue 17 item 7), and the 429 rules of issue 10."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
import redis

from op_celery._delivery import (
    MAX_THROTTLED_AGE_S,
    AlreadyDelivered,
    Attempt,
    Busy,
    Delivered,
    Delivery,
    Dropped,
    GiveUp,
    Retry,
    Throttled,
)
from op_celery._events import Event, build_event, normalize_call
from op_celery._exceptions import (
    AuthenticationError,
    InvalidPayload,
    RateLimited,
    ServerError,
    UnexpectedAnswer,
)
from op_celery._lua import Script
from op_celery._rates import parse_rate
from op_celery._settings import load_settings
from op_celery.testing import StandInServer

from ._support import CLIENT_ID, CLIENT_SECRET, age_keys

MakeDelivery = Callable[..., Delivery]


@pytest.fixture
def make_delivery(stand_in: StandInServer, redis_url: str, key_prefix: str) -> MakeDelivery:
    """A pipeline on the stand-in and the shared Redis (private prefix), settings overridable."""

    def make(**env: str) -> Delivery:
        settings = load_settings(
            env={
                "OPENPANEL_CLIENT_ID": CLIENT_ID,
                "OPENPANEL_CLIENT_SECRET": CLIENT_SECRET,
                "OPENPANEL_API_URL": stand_in.url,
                "OP_CELERY_REDIS_URL": redis_url,
                "OP_CELERY_KEY_PREFIX": key_prefix + "op-celery",
                **env,
            }
        )
        return Delivery(settings)

    return make


def _event(name: str = "signup") -> Event:
    return build_event("track", normalize_call("track", (name,), {}))


def test_an_accepted_event_is_delivered_and_recorded(
    make_delivery: MakeDelivery, stand_in: StandInServer
) -> None:
    delivery = make_delivery()
    event = _event()
    outcome = delivery.deliver(event, Attempt())
    assert isinstance(outcome, Delivered) and outcome.status == 200
    assert [r.payload["name"] for r in stand_in.received] == ["signup"]
    assert delivery.ledger.claim(event.event_id, 5).delivered


def test_an_event_delivered_before_is_not_sent_again(
    make_delivery: MakeDelivery, stand_in: StandInServer
) -> None:
    delivery = make_delivery()
    event = _event()
    assert isinstance(delivery.deliver(event, Attempt()), Delivered)
    assert isinstance(delivery.deliver(event, Attempt()), AlreadyDelivered)
    assert len(stand_in.requests) == 1


def test_an_event_another_attempt_holds_is_busy_and_not_sent(
    make_delivery: MakeDelivery, stand_in: StandInServer
) -> None:
    delivery = make_delivery()
    event = _event()
    assert delivery.ledger.claim(event.event_id, 30).token is not None  # a copy, elsewhere
    outcome = delivery.deliver(event, Attempt())
    assert isinstance(outcome, Busy) and 0 < outcome.wait_s <= 30
    assert stand_in.requests == []


def test_no_slot_within_the_inline_wait_is_throttled_without_sending(
    make_delivery: MakeDelivery, stand_in: StandInServer
) -> None:
    delivery = make_delivery(OPENPANEL_RATE_LIMIT="1/m")
    assert isinstance(delivery.deliver(_event("first"), Attempt()), Delivered)
    outcome = delivery.deliver(_event("second"), Attempt())
    assert isinstance(outcome, Throttled) and 50 < outcome.wait_s <= 61  # 1 % headroom
    assert len(stand_in.requests) == 1


def test_a_throttled_event_takes_no_claim(make_delivery: MakeDelivery) -> None:
    delivery = make_delivery(OPENPANEL_RATE_LIMIT="1/m")
    assert isinstance(delivery.deliver(_event("first"), Attempt()), Delivered)
    second = _event("second")
    assert isinstance(delivery.deliver(second, Attempt()), Throttled)
    assert delivery.ledger.claim(second.event_id, 5).claimed  # nobody holds it


def test_the_claim_of_a_booked_slot_holds_for_the_wait_too(
    make_delivery: MakeDelivery, redis_url: str
) -> None:
    # The slot and the claim are one script: the caller sleeps until its slot after claiming,
    # so the claim must outlast the sleep as well as the request.
    delivery = make_delivery()
    client = redis.Redis.from_url(redis_url)
    script = Script(client, "slot_claim.lua")
    rate = parse_rate("6/m")  # a slot every 10 s

    def take(event: Event) -> list[int]:
        keys, args = delivery.limiter.acquire_call(CLIENT_ID, rate, 1, max_wait_s=20)
        claim_keys, claim_args = delivery.ledger.claim_call(event.event_id, 30)
        return [int(x) for x in script((*keys, *claim_keys), (*args, *claim_args))]

    first, second = _event("first"), _event("second")
    assert take(first)[1] == 0  # admitted now, claimed
    booked_us, claimed = take(second)
    assert 0 < booked_us < 10**12 and claimed == 0  # a slot ~10 s ahead, claimed
    inflight = delivery.ledger.keys(second.event_id)[1]
    assert client.pttl(inflight) > 30_000 + 5_000  # the claim's 30 s and most of the wait
    client.close()


def test_a_server_error_is_a_counted_retry(
    make_delivery: MakeDelivery, stand_in: StandInServer
) -> None:
    stand_in.fail_next(1, 503)
    outcome = make_delivery().deliver(_event(), Attempt())
    assert isinstance(outcome, Retry) and isinstance(outcome.error, ServerError)


def test_a_refusal_and_retries_used_up_give_up(
    make_delivery: MakeDelivery, stand_in: StandInServer
) -> None:
    delivery = make_delivery(OP_CELERY_MAX_RETRIES="3")
    stand_in.fail_next(1, 400)
    refused = delivery.deliver(_event(), Attempt())
    assert isinstance(refused, GiveUp) and isinstance(refused.error, InvalidPayload)
    stand_in.fail_next(1, 503)
    used_up = delivery.deliver(_event(), Attempt(retries=3))
    assert isinstance(used_up, GiveUp) and "gave up after 3 retries" in used_up.reason


@pytest.mark.parametrize("mode", ["all", "retry-after", "none"])
def test_a_429_is_throttled_and_never_uses_up_retries(
    make_delivery: MakeDelivery, stand_in: StandInServer, mode: str
) -> None:
    stand_in.set_rate_limit(1, 60, headers=mode)  # type: ignore[arg-type]
    delivery = make_delivery(OP_CELERY_MAX_RETRIES="0")
    assert isinstance(delivery.deliver(_event("first"), Attempt()), Delivered)
    outcome = delivery.deliver(_event("second"), Attempt(retries=50, age_s=60))
    assert isinstance(outcome, Throttled)
    # retry-after (60 s) when the server gave one, else the default pause; the pool waits it.
    assert outcome.wait_s == (1.0 if mode == "none" else 60.0)
    assert stand_in.counts() == {200: 1, 429: 1}
    assert delivery.limiter.paused_for(CLIENT_ID) > 0


@pytest.mark.parametrize("retries", [0, 2])
def test_an_event_older_than_the_age_bound_counts_its_429s_as_retries(
    make_delivery: MakeDelivery, stand_in: StandInServer, retries: int
) -> None:
    stand_in.set_rate_limit(1, 60)
    delivery = make_delivery(OP_CELERY_MAX_RETRIES="2")
    assert isinstance(delivery.deliver(_event("first"), Attempt()), Delivered)
    outcome = delivery.deliver(_event("old"), Attempt(retries, age_s=MAX_THROTTLED_AGE_S + 1))
    if retries < 2:
        assert isinstance(outcome, Retry) and isinstance(outcome.error, RateLimited)
    else:
        assert isinstance(outcome, GiveUp) and "gave up after 2 retries" in outcome.reason
    assert stand_in.counts() == {200: 1, 429: 1}


def test_with_no_limit_set_the_rate_is_learned_from_the_headers_of_an_answer(
    make_delivery: MakeDelivery, stand_in: StandInServer
) -> None:
    stand_in.set_rate_limit(100, 10)
    delivery = make_delivery()
    assert isinstance(delivery.deliver(_event(), Attempt()), Delivered)
    status = delivery.rate_status("default")
    assert status["configured"] is None
    assert (status["learned_source"], status["learned_limit"]) == ("headers", "100/10s")
    assert status["in_use_per_second"] == pytest.approx(9.9, rel=1e-4)  # 1 % headroom
    # From now on the events are paced: the second one after it waits for its slot.
    first, second = (delivery.deliver(_event(f"next-{i}"), Attempt()) for i in range(2))
    assert isinstance(first, Delivered) and isinstance(second, Delivered)
    assert second.waited_s == pytest.approx(1 / 9.9, abs=0.02)


def test_a_configured_limit_stays_the_upper_bound_of_a_learned_one(
    make_delivery: MakeDelivery, stand_in: StandInServer
) -> None:
    stand_in.set_rate_limit(1000, 1)
    delivery = make_delivery(OPENPANEL_RATE_LIMIT="5/s")
    assert isinstance(delivery.deliver(_event(), Attempt()), Delivered)
    status = delivery.rate_status("default")
    assert status["learned_source"] == "headers"
    assert (status["in_use_source"], status["configured"]) == ("configured", "5/s")


DAY_S = 86_400


def test_a_webhook_retried_days_later_with_its_event_id_is_not_sent_twice(
    make_delivery: MakeDelivery,
    stand_in: StandInServer,
    redis_client: redis.Redis,
    key_prefix: str,
) -> None:
    # A Stripe webhook is retried for up to three days: each retry is a new .delay() with the
    # same event id. With dedup_for the ledger remembers it that long; without, only the
    # default OP_CELERY_LEDGER_TTL (an hour), after which a retry is sent again.
    delivery = make_delivery()

    def webhook(event_id: str, **extra: object) -> Event:
        kwargs = {"amount": 1299, "event_id": event_id, **extra}
        return build_event("revenue", normalize_call("revenue", (), kwargs))

    remembered = webhook("stripe:evt_remembered", dedup_for=timedelta(days=30))
    forgotten = webhook("stripe:evt_forgotten")
    assert isinstance(delivery.deliver(remembered, Attempt()), Delivered)
    assert isinstance(delivery.deliver(forgotten, Attempt()), Delivered)
    mark_ttl_s = redis_client.ttl(delivery.ledger.keys(remembered.event_id)[0])
    assert 29 * DAY_S < mark_ttl_s <= 30 * DAY_S
    assert redis_client.ttl(delivery.ledger.keys(forgotten.event_id)[0]) <= 3600

    age_keys(redis_client, key_prefix, 3 * DAY_S)  # Stripe's retries, three days on
    again = webhook("stripe:evt_remembered", dedup_for=timedelta(days=30))
    assert isinstance(delivery.deliver(again, Attempt()), AlreadyDelivered)
    assert isinstance(delivery.deliver(webhook("stripe:evt_forgotten"), Attempt()), Delivered)
    assert sorted(r.headers["request-id"] for r in stand_in.received) == [
        "stripe:evt_forgotten",
        "stripe:evt_forgotten",
        "stripe:evt_remembered",
    ]


def test_dedup_for_never_shortens_the_ledgers_memory_below_the_setting(
    make_delivery: MakeDelivery, redis_client: redis.Redis
) -> None:
    # The setting outlives the broker's redelivery of a message; a call may not undercut it.
    delivery = make_delivery(OP_CELERY_LEDGER_TTL="7200")
    event = build_event("track", normalize_call("track", ("x",), {"dedup_for": 60}))
    assert isinstance(delivery.deliver(event, Attempt()), Delivered)
    assert 7100 < redis_client.ttl(delivery.ledger.keys(event.event_id)[0]) <= 7200


# The server's answers that store nothing (issue 15 item 5), and a 2xx that is not its answer.


@pytest.mark.parametrize(
    ("answer", "reason", "status"),
    [
        ("bot", "bot", 202),
        ("duplicate", "duplicate", 200),
        ("ip-filtered", "filtered", 401),
        ("profile-filtered", "filtered", 401),
    ],
)
def test_an_answer_that_stores_nothing_is_dropped_finished_and_counted(
    make_delivery: MakeDelivery, stand_in: StandInServer, answer: str, reason: str, status: int
) -> None:
    delivery = make_delivery()
    event = _event()
    stand_in.fail_next(1, answer)
    outcome = delivery.deliver(event, Attempt())
    assert isinstance(outcome, Dropped)
    assert (outcome.reason, outcome.status) == (reason, status)
    # Finished: never sent again, and counted for `op-celery status`.
    assert isinstance(delivery.deliver(event, Attempt()), AlreadyDelivered)
    assert len(stand_in.requests) == 1
    expected = {"bot": 0, "duplicate": 0, "filtered": 0, reason: 1}
    assert delivery.ledger.tallies("default") == expected


def test_the_stand_ins_own_project_filter_drops_the_event(
    make_delivery: MakeDelivery, stand_in: StandInServer
) -> None:
    stand_in.set_filters(CLIENT_ID, profile_ids=("blocked-user",))
    event = build_event("identify", normalize_call("identify", ("blocked-user",), {}))
    outcome = make_delivery().deliver(event, Attempt())
    assert isinstance(outcome, Dropped) and outcome.reason == "filtered"
    assert "Profile id is blocked by project filter" in outcome.message


def test_revenue_without_a_secret_gives_up_naming_the_secret_setting(
    make_delivery: MakeDelivery, stand_in: StandInServer
) -> None:
    stand_in.fail_next(1, "revenue-without-secret")
    outcome = make_delivery().deliver(_event(), Attempt())
    assert isinstance(outcome, GiveUp) and isinstance(outcome.error, AuthenticationError)
    assert "OPENPANEL_CLIENT_SECRET" in str(outcome.error)


def test_a_captive_portals_200_is_retried_then_given_up_not_delivered(
    make_delivery: MakeDelivery, stand_in: StandInServer
) -> None:
    delivery = make_delivery(OP_CELERY_MAX_RETRIES="2")
    event = _event()
    stand_in.fail_for(60, "captive-portal")
    first = delivery.deliver(event, Attempt())
    assert isinstance(first, Retry) and isinstance(first.error, UnexpectedAnswer)
    last = delivery.deliver(event, Attempt(retries=2))
    assert isinstance(last, GiveUp) and isinstance(last.error, UnexpectedAnswer)
    assert "captive portal" in str(last.error)
    # Not marked delivered: a replay sends it again.
    assert not delivery.ledger.delivered(event.event_id)
    assert [r.status for r in stand_in.requests] == [200, 200]
