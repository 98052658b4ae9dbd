"""The limiter against the real, shared Redis (and a throwaway one for failures).

No assertion depends on how fast anything runs: admissions are checked on the Redis clock the
script itself reports (``Acquisition.admitted_at_s``), against the bound the algorithm promises.
"""

from __future__ import annotations

import bisect
import itertools
import multiprocessing
import secrets
import time
from collections.abc import Callable, Iterator
from multiprocessing.queues import Queue
from typing import Any

import pytest
import redis

from op_celery._exceptions import ConfigurationError, LimiterUnavailable
from op_celery._limiter import Acquisition, RateLimiter
from op_celery._rates import Rate, parse_rate

from ._support import REDIS_URL, RedisServer

#: Password of the throwaway Redis; no message may ever show it.
PASSWORD = "pw-" + secrets.token_hex(8)


@pytest.fixture
def prefix(key_prefix: str) -> str:
    """The limiter's key prefix inside this test's private namespace (deleted afterwards)."""
    return key_prefix + "op-celery"


@pytest.fixture
def limiter(redis_client: redis.Redis, prefix: str) -> RateLimiter:
    return RateLimiter(redis_client, prefix=prefix)


def _us(acquisition: Acquisition) -> int:
    assert acquisition.admitted_at_s is not None
    return round(acquisition.admitted_at_s * 1_000_000)


def _max_in_any_window(times_us: list[int], window_us: int) -> int:
    """The most admissions any half-open window [t, t + window) holds; the fullest such
    window can always be taken to start at an admission."""
    times_us = sorted(times_us)
    return max(
        (bisect.bisect_left(times_us, t + window_us) - i for i, t in enumerate(times_us)),
        default=0,
    )


# -- several processes on one bucket --------------------------------------------------------


def _hammer(
    prefix: str,
    client_id: str,
    rate: Rate,
    burst: int,
    sleep_on_wait: bool,
    start: Any,
    duration_s: float,
    results: Queue[tuple[list[int], int]],
) -> None:
    """One worker: acquire until ``duration_s`` is over; spin, or sleep the wait it is told."""
    limiter = RateLimiter(redis.Redis.from_url(REDIS_URL), prefix=prefix)
    granted_us: list[int] = []
    denied = 0
    start.wait()
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        acquisition = limiter.acquire(client_id, rate, burst)
        if acquisition.granted:
            granted_us.append(_us(acquisition))
        else:
            denied += 1
            if sleep_on_wait:
                time.sleep(acquisition.wait_s)
    results.put((granted_us, denied))


@pytest.mark.parametrize(("rate_text", "burst"), [("200/s", 1), ("500/s", 2), ("30/100ms", 5)])
def test_four_processes_never_admit_more_than_limit_plus_burst_minus_one_per_period(
    prefix: str, rate_text: str, burst: int
) -> None:
    rate = parse_rate(rate_text)
    context = multiprocessing.get_context("forkserver")
    start = context.Event()
    results: Queue[tuple[list[int], int]] = context.Queue()
    workers = [
        context.Process(
            target=_hammer,
            args=(prefix, "shared", rate, burst, index % 2 == 1, start, 1.0, results),
        )
        for index in range(4)
    ]
    for worker in workers:
        worker.start()
    start.set()
    outcomes = [results.get(timeout=30) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)
        assert worker.exitcode == 0

    admitted_us = [t for granted_us, _ in outcomes for t in granted_us]
    denied = sum(denied for _, denied in outcomes)
    period_us = round(rate.period_s * 1_000_000)
    assert admitted_us, "no process was ever admitted"
    assert denied > 0, "nothing was ever refused: the bucket was not under pressure"
    assert _max_in_any_window(admitted_us, period_us) <= rate.limit + burst - 1


# -- the wait answer --------------------------------------------------------------------------


def _redis_now_us(client: redis.Redis) -> int:
    seconds, microseconds = client.time()
    return seconds * 1_000_000 + microseconds


@pytest.mark.parametrize("burst", [1, 3])
def test_wait_is_the_time_to_the_next_token_and_acquiring_after_it_succeeds(
    limiter: RateLimiter, redis_client: redis.Redis, burst: int
) -> None:
    rate, interval_us = parse_rate("10/s"), 100_000
    admitted = [limiter.acquire("c", rate, burst) for _ in range(burst)]
    refused = limiter.acquire("c", rate, burst)
    refused_by_us = _redis_now_us(redis_client)

    assert all(answer.granted for answer in admitted)
    assert not refused.granted
    assert refused.admitted_at_s is None
    # GCRA's schedule after these admissions, and the token it makes the refused request wait
    # for; the refusal happened between the last admission and the TIME read after it.
    tat_us = 0
    for answer in admitted:
        tat_us = max(tat_us, _us(answer)) + interval_us
    next_token_us = tat_us - (burst - 1) * interval_us
    wait_us = round(refused.wait_s * 1_000_000)
    assert next_token_us - refused_by_us <= wait_us <= next_token_us - _us(admitted[-1])
    assert 0 < refused.wait_s <= 0.1

    time.sleep(refused.wait_s)
    assert limiter.acquire("c", rate, burst).granted


def test_after_idling_a_burst_is_admitted_at_once_then_one_per_interval(
    limiter: RateLimiter,
) -> None:
    rate = parse_rate("1/m")
    answers = [limiter.acquire("c", rate, burst=4) for _ in range(5)]
    assert [a.granted for a in answers] == [True, True, True, True, False]
    assert 59 < answers[-1].wait_s <= 60


def test_the_interval_is_rounded_up_never_down(
    limiter: RateLimiter, redis_client: redis.Redis, prefix: str
) -> None:
    # 3 per second is 333_333.3 us apart: the limiter books the next slot 333_334 us ahead.
    admitted = limiter.acquire("c", parse_rate("3/s"))
    assert int(redis_client.get(f"{prefix}:{{c}}:bucket") or 0) == _us(admitted) + 333_334


# -- the clock is Redis's --------------------------------------------------------------------


def test_a_worker_with_a_skewed_clock_obeys_the_shared_limit(
    redis_client: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rate = parse_rate("1/m")
    assert RateLimiter(redis_client, prefix=prefix).acquire("c", rate, burst=1).granted

    skewed_client = redis.Redis.from_url(REDIS_URL)
    real_time, real_monotonic = time.time, time.monotonic
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    monkeypatch.setattr(time, "monotonic", lambda: real_monotonic() + 3600)
    monkeypatch.setattr(time, "time_ns", lambda: (int(real_time()) + 3600) * 10**9)

    skewed_limiter = RateLimiter(skewed_client, prefix=prefix)
    skewed = skewed_limiter.acquire("c", rate, burst=1)
    assert not skewed.granted
    assert 59 < skewed.wait_s <= 60
    # Nothing time-related went to Redis: the command sent is the keys, the interval, the
    # tolerance and no reservation, packed once.
    [(client_id, *args)] = skewed_limiter._packed
    assert (client_id, args) == ("c", [60_000_000, 0, 0])
    [packed] = skewed_limiter._packed.values()
    sent = b"".join(packed) if isinstance(packed, list) else packed
    assert str(int(real_time())).encode()[:6] not in sent
    skewed_client.close()


# -- projects --------------------------------------------------------------------------------


def test_projects_do_not_share_budgets(limiter: RateLimiter) -> None:
    rate = parse_rate("1/m")
    assert limiter.acquire("project-a", rate, burst=1).granted
    assert not limiter.acquire("project-a", rate, burst=1).granted
    assert limiter.acquire("project-b", rate, burst=1).granted


def test_keys_share_a_cluster_slot_and_expire_when_idle(
    limiter: RateLimiter, redis_client: redis.Redis, prefix: str
) -> None:
    limiter.acquire("c", parse_rate("10/s"), burst=2)
    limiter.pause("c", 5)
    state = limiter.state("c")
    assert state["bucket_key"] == f"{prefix}:{{c}}:bucket"
    assert state["pause_key"] == f"{prefix}:{{c}}:pause"
    assert 0 < redis_client.pttl(state["bucket_key"]) <= 100
    assert 4_000 < redis_client.pttl(state["pause_key"]) <= 5_000


@pytest.mark.parametrize("client_id", ["", "a{b", "a}b"])
def test_a_client_id_that_would_break_the_hash_tag_is_refused(
    limiter: RateLimiter, client_id: str
) -> None:
    with pytest.raises(ConfigurationError, match="client id"):
        limiter.acquire(client_id, parse_rate("1/s"))


def test_a_burst_below_one_is_refused(limiter: RateLimiter) -> None:
    with pytest.raises(ConfigurationError, match="burst"):
        limiter.acquire("c", parse_rate("1/s"), burst=0)


def test_state_reports_backlog_and_what_is_available(limiter: RateLimiter) -> None:
    rate = parse_rate("1/m")
    empty = limiter.state("c", rate, burst=3)
    assert (empty["paused_s"], empty["backlog_s"], empty["available"]) == (0.0, 0.0, 3)
    limiter.acquire("c", rate, burst=3)
    after_one = limiter.state("c", rate, burst=3)
    assert after_one["available"] == 2
    assert 59 < after_one["backlog_s"] <= 60
    assert limiter.state("c")["available"] is None


# -- pause -----------------------------------------------------------------------------------


def test_a_pause_stops_every_client_object_with_the_pause_as_the_wait(
    limiter: RateLimiter, prefix: str
) -> None:
    assert limiter.pause("c", 2) == 2.0
    other = RateLimiter(redis.Redis.from_url(REDIS_URL), prefix=prefix)
    answer = other.acquire("c", parse_rate("1000/s"))
    assert not answer.granted
    assert 1.5 <= answer.wait_s <= 2.0
    assert 1.5 <= other.paused_for("c") <= 2.0
    assert other.paused_for("not-paused") == 0.0
    assert other.acquire("not-paused", parse_rate("1000/s")).granted


def test_a_pause_is_extended_never_shortened(limiter: RateLimiter) -> None:
    limiter.pause("c", 2)
    assert 1.5 <= limiter.pause("c", 0.5) <= 2.0
    assert 2.5 <= limiter.pause("c", 3) <= 3.0
    assert 2.5 <= limiter.paused_for("c") <= 3.0
    assert limiter.pause("other", 0) == 0.0


def test_acquiring_after_the_pause_ends_succeeds(limiter: RateLimiter) -> None:
    limiter.pause("c", 0.05)
    answer = limiter.acquire("c", parse_rate("1000/s"))
    assert not answer.granted
    time.sleep(answer.wait_s)
    assert limiter.acquire("c", parse_rate("1000/s")).granted


# -- a Redis that fails ------------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A throwaway redis-server that requires ``PASSWORD``, killed by its PID afterwards."""
    with RedisServer() as server:
        setup = redis.Redis(port=server.port)
        setup.config_set("requirepass", PASSWORD)
        setup.close()
        yield server


def _assert_helpful_and_secret_free(error: LimiterUnavailable, port: int) -> None:
    for text in (str(error), repr(error), str(error.__cause__), repr(error.__cause__)):
        assert PASSWORD not in text
    assert f"127.0.0.1:{port}" in str(error)
    assert "Redis URL" in str(error)
    assert isinstance(error.__cause__, redis.RedisError)


def test_a_redis_that_goes_down_raises_limiter_unavailable_without_the_password(
    own_redis: RedisServer,
) -> None:
    port = own_redis.port
    limiter = RateLimiter(redis.Redis.from_url(f"redis://:{PASSWORD}@127.0.0.1:{port}/0"))
    rate = parse_rate("100/s")
    assert limiter.acquire("c", rate).granted
    own_redis.stop()
    calls: dict[str, Callable[[], object]] = {
        "acquire": lambda: limiter.acquire("c", rate),
        "pause": lambda: limiter.pause("c", 1),
        "paused_for": lambda: limiter.paused_for("c"),
        "state": lambda: limiter.state("c", rate),
    }
    for operation, call in calls.items():
        with pytest.raises(LimiterUnavailable) as caught:
            call()
        _assert_helpful_and_secret_free(caught.value, port)
        assert operation in str(caught.value)


def test_a_wrong_password_raises_limiter_unavailable_without_it(
    own_redis: RedisServer,
) -> None:
    port = own_redis.port
    wrong = PASSWORD + "-wrong"
    limiter = RateLimiter(redis.Redis.from_url(f"redis://default:{wrong}@127.0.0.1:{port}/0"))
    with pytest.raises(LimiterUnavailable) as caught:
        limiter.acquire("c", parse_rate("1/s"))
    assert wrong not in str(caught.value)
    assert f"127.0.0.1:{port}" in str(caught.value)


def test_scripts_flushed_from_redis_are_loaded_again(
    own_redis: RedisServer,
) -> None:
    port = own_redis.port
    client = redis.Redis(host="127.0.0.1", port=port, password=PASSWORD)
    limiter = RateLimiter(client)
    assert limiter.acquire("c", parse_rate("100/s")).granted
    client.script_flush()
    assert limiter.acquire("c", parse_rate("100/s"), burst=2).granted
    client.close()


def test_a_reservation_books_the_next_slot_and_callers_keep_the_schedule(
    redis_client: redis.Redis, prefix: str
) -> None:
    limiter = RateLimiter(redis_client, prefix=prefix)
    rate = parse_rate("10/s")
    started = time.monotonic()
    first = limiter.acquire("c", rate, max_wait_s=1.0)
    assert first.granted and first.wait_s == 0
    waits = [limiter.acquire("c", rate, max_wait_s=1.0) for _ in range(5)]
    elapsed = time.monotonic() - started
    assert all(a.granted for a in waits)
    # The k-th reservation is the k-th slot after the first admission, 100 ms apart: its wait is
    # that, less the time the calls took.
    for k, answer in enumerate(waits, start=1):
        assert 0.1 * k - elapsed - 0.001 <= answer.wait_s <= 0.1 * k + 0.001, (k, answer)
    assert all(a.wait_s < b.wait_s for a, b in itertools.pairwise(waits))


def test_a_slot_further_than_the_longest_reservation_is_refused_and_not_booked(
    redis_client: redis.Redis, prefix: str
) -> None:
    limiter = RateLimiter(redis_client, prefix=prefix)
    rate = parse_rate("1/s")
    assert limiter.acquire("c", rate, max_wait_s=0.5).granted
    refused = limiter.acquire("c", rate, max_wait_s=0.5)
    assert not refused.granted and 0.5 < refused.wait_s <= 1.0
    again = limiter.acquire("c", rate, max_wait_s=0.5)
    assert not again.granted and again.wait_s <= refused.wait_s


def test_a_pause_is_never_reserved_through(redis_client: redis.Redis, prefix: str) -> None:
    limiter = RateLimiter(redis_client, prefix=prefix)
    limiter.pause("c", 0.3)
    answer = limiter.acquire("c", parse_rate("100/s"), max_wait_s=5.0)
    assert not answer.granted and 0.2 < answer.wait_s <= 0.3
