"""The one retry decision follows the contract's response table."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from op_celery import (
    AuthenticationError,
    InvalidPayload,
    NetworkError,
    ProfileNotFound,
    RateLimited,
    ServerError,
)
from op_celery._retry import backoff_s, decide, parse_retry_after
from op_celery._settings import load_settings

SETTINGS = load_settings(env={})


def test_permanent_errors_are_never_retried() -> None:
    for error in (InvalidPayload("x", status=400), AuthenticationError("x", status=401)):
        assert not decide(error, 0, SETTINGS).retry


def test_retry_after_drives_the_countdown_with_a_little_jitter() -> None:
    decision = decide(RateLimited("x", status=429, retry_after=2.0), 0, SETTINGS)
    assert decision.retry
    assert 2.0 <= decision.countdown_s <= 2.25


def test_backoff_is_exponential_full_jitter_and_capped() -> None:
    rng = random.Random(1)
    samples = [backoff_s(3, SETTINGS, rng) for _ in range(2000)]
    assert min(samples) >= 0 and max(samples) <= 8.0
    assert max(samples) > 7.0 and min(samples) < 1.0
    assert max(backoff_s(30, SETTINGS, rng) for _ in range(200)) <= SETTINGS.retry_backoff_max_s


def test_transient_errors_stop_after_max_retries() -> None:
    assert decide(ServerError("x", status=503), 9, SETTINGS).retry
    assert not decide(ServerError("x", status=503), 10, SETTINGS).retry
    assert not decide(NetworkError("x"), SETTINGS.max_retries, SETTINGS).retry


def test_profile_not_found_is_retried_only_a_few_times() -> None:
    assert decide(ProfileNotFound("x", status=404), 4, SETTINGS).retry
    assert not decide(ProfileNotFound("x", status=404), 5, SETTINGS).retry


def test_no_countdown_exceeds_half_the_visibility_timeout() -> None:
    decision = decide(RateLimited("x", status=429, retry_after=86400), 0, SETTINGS)
    assert decision.countdown_s == SETTINGS.visibility_timeout_s / 2


def test_retry_after_parses_seconds_and_http_dates() -> None:
    now = datetime(2026, 11, 26, 12, 0, 0, tzinfo=timezone.utc)
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now) == 0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("-5") == 0.0


@pytest.mark.parametrize(
    "value",
    ["1000000000", "inf", "Infinity", "1e400", "Fri, 31 Dec 2100 23:59:59 GMT"],
)
def test_a_server_given_wait_is_bounded_whatever_it_says(value: str) -> None:
    from op_celery._retry import MAX_RETRY_AFTER_S

    assert parse_retry_after(value) == MAX_RETRY_AFTER_S


@pytest.mark.parametrize("value", ["nan", "-inf", "", "   ", "Mon, 99 Foo 99999 GMT", "1e400e"])
def test_a_wait_that_is_no_number_or_date_is_no_wait(value: str) -> None:
    assert parse_retry_after(value) in (None, 0.0)


def test_profile_not_found_retries_span_the_servers_profile_flushes_whatever_the_jitter() -> None:
    from op_celery._retry import PROFILE_RETRY_INTERVAL_S

    for seed in range(200):
        rng = random.Random(seed)
        waits = [
            decide(ProfileNotFound("x", status=404), n, SETTINGS, rng).countdown_s
            for n in range(SETTINGS.profile_not_found_retries)
        ]
        assert sum(waits) >= 30  # three flushes of the 10 s profile buffer
    assert PROFILE_RETRY_INTERVAL_S * SETTINGS.profile_not_found_retries >= 30


def test_an_outage_of_the_packages_redis_is_retried_soon_and_never_given_up() -> None:
    from op_celery import LimiterUnavailable, StorageUnavailable
    from op_celery._retry import STORAGE_RETRY_MAX_S

    for error in (StorageUnavailable("ledger away"), LimiterUnavailable("limiter away")):
        for retries in (0, 3, SETTINGS.max_retries, 10 * SETTINGS.max_retries):
            decision = decide(error, retries, SETTINGS, random.Random(retries))
            assert decision.retry
            assert 0.5 <= decision.countdown_s <= STORAGE_RETRY_MAX_S
