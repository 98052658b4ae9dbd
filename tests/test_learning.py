"""What a worker process makes of the server's rate-limit headers and 429s (``_learning``),
against the real shared Redis; no clock is waited on."""

from __future__ import annotations

import logging

import pytest
import redis

from op_celery._learning import RateHeaders, RateLearner, rate_headers
from op_celery._limiter import RateLimiter
from op_celery._rates import parse_rate

from ._support import REDIS_URL

FASTIFY = {"x-ratelimit-limit": "100", "x-ratelimit-remaining": "99", "x-ratelimit-reset": "10"}


@pytest.fixture
def limiter(redis_client: redis.Redis, key_prefix: str) -> RateLimiter:
    return RateLimiter(redis_client, prefix=key_prefix + "op-celery")


def test_rate_headers_reads_fastify_rate_limits_headers() -> None:
    assert rate_headers(FASTIFY) == RateHeaders(limit=100, remaining=99, reset_s=10.0)
    assert rate_headers({**FASTIFY, "x-ratelimit-remaining": "many"}) == RateHeaders(100, None, 10)


@pytest.mark.parametrize(
    "headers",
    [
        None,
        {},
        {"retry-after": "1"},
        {"x-ratelimit-limit": "100"},
        {"x-ratelimit-limit": "lots", "x-ratelimit-reset": "10"},
        {"x-ratelimit-limit": "0", "x-ratelimit-reset": "10"},
        {"x-ratelimit-limit": "100", "x-ratelimit-reset": "0"},
        {"x-ratelimit-limit": "100", "x-ratelimit-reset": "nan"},
    ],
)
def test_rate_headers_is_none_without_usable_headers(headers: dict[str, str] | None) -> None:
    assert rate_headers(headers) is None


def test_a_reset_given_as_a_unix_time_is_taken_as_the_time_until_then() -> None:
    import time

    seen = rate_headers({"x-ratelimit-limit": "5", "x-ratelimit-reset": str(time.time() + 30)})
    assert seen is not None and 28 < seen.reset_s <= 30


def test_observe_stores_the_rate_for_every_process_and_writes_again_only_for_news(
    limiter: RateLimiter, redis_client: redis.Redis, key_prefix: str
) -> None:
    learner = RateLearner(limiter, headroom_pct=1)
    learner.observe("c", FASTIFY)
    status = limiter.status("c")
    assert status["learned_source"] == "headers"
    assert status["learned_limit"] == "100/10s"
    assert status["learned_per_second"] == pytest.approx(9.9, rel=1e-4)
    key = f"{key_prefix}op-celery:{{c}}:learned"
    redis_client.delete(key)
    learner.observe("c", {**FASTIFY, "x-ratelimit-reset": "4"})  # nothing new: no write
    assert not redis_client.exists(key)
    learner.observe("c", {**FASTIFY, "x-ratelimit-limit": "50"})  # a new limit: written
    assert limiter.status("c")["learned_limit"] == "50/10s"


def test_the_change_of_a_learned_rate_is_logged_once_by_the_pool(
    limiter: RateLimiter, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    other_process = RateLearner(
        RateLimiter(redis.Redis.from_url(REDIS_URL), prefix=key_prefix + "op-celery")
    )
    caplog.set_level(logging.INFO, logger="op_celery")
    RateLearner(limiter).observe("c", FASTIFY)
    other_process.observe("c", FASTIFY)
    lines = [r.getMessage() for r in caplog.records if "x-ratelimit" in r.getMessage()]
    assert lines == ["op_celery: client c: the server allows 100/10s (x-ratelimit headers); every "
                     "worker now paces at 10/s"]  # fmt: skip


def test_a_429_without_headers_pauses_lowers_the_pace_and_says_so(
    limiter: RateLimiter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="op_celery")
    backoff = RateLearner(limiter).rate_limited("c", 2.0, parse_rate("20/s"))
    assert backoff.pause_s == 2.0 and backoff.lowered
    assert 1.5 < limiter.status("c")["paused_s"] <= 2.0
    assert limiter.status("c")["learned_source"] == "429s"
    assert any("learned from 429s" in r.getMessage() for r in caplog.records)
