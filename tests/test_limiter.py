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
from op_celery._limiter import (
    BACKOFF_BETA,
    BACKOFF_GAIN,
    BACKOFF_MARGIN,
    BACKOFF_PERIOD_S,
    DEFAULT_PAUSE_S,
    LEARNED_TTL_S,
    MAX_PAUSE_S,
    Acquisition,
    RateLimiter,
)
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
    # burst, no reservation and no line (and the backoff's constants, and 0 for "Redis TIME"),
    # packed once.
    [(client_id, *args)] = skewed_limiter._packed
    assert (client_id, args) == ("c", [60_000_000, 1, 0, 0])
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
    state = limiter.state("c")
    assert state["bucket_key"] == f"{prefix}:{{c}}:bucket"
    assert state["pause_key"] == f"{prefix}:{{c}}:pause"
    assert 0 < redis_client.pttl(state["bucket_key"]) <= 100
    limiter.pause("c", 5)
    assert 4_000 < redis_client.pttl(state["pause_key"]) <= 5_000
    # The pause books the bucket up to its end, so the pool comes back paced, not all at once.
    assert 4_000 < redis_client.pttl(state["bucket_key"]) <= 5_001
    limiter.learn("c", 10, 1.0)
    limiter.backoff("c", 1.0)
    keys = sorted(key.decode() for key in redis_client.keys(f"{prefix}:*"))
    assert keys == [f"{prefix}:{{c}}:{name}" for name in ("bucket", "learned", "pause")]
    assert 0 < redis_client.pttl(f"{prefix}:{{c}}:learned") <= 300_000


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


# -- the waiting line of refused callers (time driven through now_s) ----------------------------


def test_refused_callers_in_line_are_told_turns_one_interval_apart(limiter: RateLimiter) -> None:
    rate, t = parse_rate("5/s"), 1_800_000_000.0
    assert limiter.acquire("c", rate, max_wait_s=1.0, line_s=300, now_s=t).granted
    booked = [limiter.acquire("c", rate, max_wait_s=1.0, line_s=300, now_s=t) for _ in range(5)]
    assert [a.granted for a in booked] == [True] * 5  # the slots within the inline wait
    refused = [limiter.acquire("c", rate, max_wait_s=1.0, line_s=300, now_s=t) for _ in range(4)]
    assert not any(a.granted for a in refused)
    # The first is told when the next slot is (1.2 s: after the six admitted), each next one a
    # 200 ms slot later, where callers outside the line are all told the same time.
    assert [round(a.wait_s, 3) for a in refused] == [1.2, 1.4, 1.6, 1.8]
    outside = [limiter.acquire("c", rate, max_wait_s=1.0, now_s=t) for _ in range(2)]
    assert [round(a.wait_s, 3) for a in outside] == [1.2, 1.2]


def test_a_caller_back_at_its_turn_in_line_is_admitted(limiter: RateLimiter) -> None:
    rate, t = parse_rate("10/s"), 1_800_000_000.0
    assert limiter.acquire("c", rate, now_s=t).granted
    turns = [limiter.acquire("c", rate, line_s=300, now_s=t).wait_s for _ in range(20)]
    # Each comes back at its turn (in order) and is admitted there, with no second refusal.
    for wait_s in turns:
        assert limiter.acquire("c", rate, line_s=300, now_s=t + wait_s).granted


def test_the_line_does_not_seat_a_caller_further_than_its_longest_wait(
    limiter: RateLimiter,
) -> None:
    rate, t = parse_rate("1/s"), 1_800_000_000.0
    assert limiter.acquire("c", rate, now_s=t).granted
    turns = [limiter.acquire("c", rate, line_s=3.5, now_s=t).wait_s for _ in range(6)]
    # Three turns fit within 3.5 s; the others come back after 3.5 s and ask again, without
    # taking a place that would push the line further ahead.
    assert [round(w, 3) for w in turns] == [1.0, 2.0, 3.0, 3.5, 3.5, 3.5]


def test_a_pause_seats_the_line_from_its_end(limiter: RateLimiter) -> None:
    rate, t = parse_rate("10/s"), 1_800_000_000.0
    assert limiter.acquire("c", rate, now_s=t).granted
    limiter.backoff("c", 5.0, rate, now_s=t)
    turns = [limiter.acquire("c", rate, line_s=300, now_s=t).wait_s for _ in range(3)]
    assert turns[0] == pytest.approx(5.0, abs=0.001)
    # After the pause the rate learned from the 429 (lower than 10/s) spaces the turns.
    assert turns[1] - turns[0] >= 0.1 and turns[2] - turns[1] == pytest.approx(
        turns[1] - turns[0], abs=1e-6
    )


# -- the rate learned from the server (time driven through now_s, never slept) ----------------

#: A moment on the driven clock (seconds since the epoch, as Redis TIME would say).
T0 = 1_800_000_000.0


def test_a_rate_learned_from_headers_paces_every_limiter_without_a_configured_rate(
    limiter: RateLimiter, prefix: str
) -> None:
    assert limiter.acquire("c", None, now_s=T0).granted  # nothing learned: unpaced
    assert limiter.acquire("c", None, now_s=T0).granted
    learned = limiter.learn("c", 10, 1.0, now_s=T0)
    assert (learned.limit, learned.window_s, learned.per_second, learned.changed) == (
        10, 1.0, 10.0, True,
    )  # fmt: skip
    other = RateLimiter(redis.Redis.from_url(REDIS_URL), prefix=prefix)
    assert other.acquire("c", None, now_s=T0 + 1).granted
    refused = other.acquire("c", None, now_s=T0 + 1.01)
    assert not refused.granted
    assert refused.wait_s == pytest.approx(0.09)
    assert not limiter.learn("c", 10, 0.4, now_s=T0 + 1).changed  # same limit, window kept


def test_the_lower_of_configured_and_learned_rates_is_used(limiter: RateLimiter) -> None:
    limiter.learn("c", 10, 1.0, now_s=T0)  # 10/s learned
    assert limiter.acquire("c", parse_rate("5/s"), now_s=T0).granted
    assert limiter.acquire("c", parse_rate("5/s"), now_s=T0 + 0.01).wait_s == pytest.approx(0.19)
    limiter.learn("d", 10, 1.0, now_s=T0)
    assert limiter.acquire("d", parse_rate("100/s"), now_s=T0).granted
    assert limiter.acquire("d", parse_rate("100/s"), now_s=T0 + 0.01).wait_s == pytest.approx(0.09)


def test_the_window_is_the_largest_reset_seen_and_a_new_limit_starts_afresh(
    limiter: RateLimiter,
) -> None:
    assert limiter.learn("c", 100, 3.0).window_s == 3.0  # a reset seen mid-window
    opened = limiter.learn("c", 100, 10.0)  # the answer that opened a window
    assert (opened.window_s, opened.per_second, opened.changed) == (10.0, 10.0, True)
    assert limiter.learn("c", 100, 4.0).window_s == 10.0
    changed = limiter.learn("c", 30, 2.0)  # the server's limit changed
    assert (changed.limit, changed.window_s) == (30, 2.0)
    assert changed.per_second == pytest.approx(15.0, rel=1e-4)  # whole microseconds, rounded up


def test_headroom_slows_the_learned_rate(limiter: RateLimiter) -> None:
    assert limiter.learn("c", 50, 1.0, headroom_pct=1).per_second == pytest.approx(49.5, 0.001)


def test_a_learned_rate_expires_and_the_pool_is_unpaced_again(
    limiter: RateLimiter, redis_client: redis.Redis, prefix: str
) -> None:
    limiter.learn("c", 1, 60.0, now_s=T0)
    key = f"{prefix}:{{c}}:learned"
    assert 0 < redis_client.pttl(key) <= LEARNED_TTL_S * 1000
    assert limiter.acquire("c", None, now_s=T0).granted
    assert not limiter.acquire("c", None, now_s=T0 + 1).granted
    redis_client.delete(key)  # what its expiry does
    assert limiter.acquire("c", None, now_s=T0 + 2).granted
    assert limiter.acquire("c", None, now_s=T0 + 2).granted


def test_a_first_429_paces_at_what_was_sent_over_the_time_it_took_and_the_pause(
    limiter: RateLimiter,
) -> None:
    for n in range(50):  # 50 sent unpaced in the first half second of a 1 s window
        assert limiter.acquire("c", None, now_s=T0 + n / 100).granted
    backoff = limiter.backoff("c", 1.0, now_s=T0 + 0.5)
    assert (backoff.pause_s, backoff.lowered) == (1.0, True)
    # 50 sent over 0.5 s, then a retry-after of 1 s (rounded up): a window of 1 s, so 50/s.
    assert backoff.level_per_s == pytest.approx(50, rel=0.02)
    for n in range(50):  # the window is taken in whole seconds: 50 in 0.5 s + 1 s is 50/1 s
        assert limiter.acquire("d", None, now_s=T0 + n / 100).granted
    assert limiter.backoff("d", None, now_s=T0 + 0.5).level_per_s == pytest.approx(50, 0.02)
    refused = limiter.acquire("c", None, now_s=T0 + 0.6)
    assert not refused.granted and refused.wait_s == pytest.approx(0.9)  # the pause
    # After the pause, paced one slot after another, starting at (1 - beta) of the 429's rate.
    assert limiter.acquire("c", None, now_s=T0 + 1.5).granted
    second = limiter.acquire("c", None, max_wait_s=1, now_s=T0 + 1.5)
    assert 1 / second.wait_s == pytest.approx(_curve(backoff.level_per_s, 0.0), rel=0.03)
    assert _curve(50, 0.0) == pytest.approx(50 * (1 - BACKOFF_BETA))


def _curve(level_per_s: float, since_s: float) -> float:
    """The pace ``since_s`` after a 429 at ``level_per_s``: CUBIC's curve, as documented."""
    x = since_s / BACKOFF_PERIOD_S
    return level_per_s * (1 + (BACKOFF_BETA if x <= 1 else BACKOFF_GAIN) * (x - 1) ** 3)


def test_the_rate_learned_from_429s_climbs_back_to_the_429s_rate_after_the_period(
    limiter: RateLimiter,
) -> None:
    limiter.acquire("c", parse_rate("40/s"), now_s=T0)
    level = limiter.backoff("c", None, parse_rate("40/s"), now_s=T0).level_per_s
    assert level == pytest.approx(40 * (1 - BACKOFF_MARGIN))  # the configured pace got the 429

    # Without a configured rate, the intervals acquire hands out follow the curve: below the
    # 429's rate at first, back at it after the period, then above it (probing).
    for since_s in (1.0, BACKOFF_PERIOD_S, 1.5 * BACKOFF_PERIOD_S):
        now = T0 + DEFAULT_PAUSE_S + since_s  # the curve starts when the pause ends
        assert limiter.acquire("c", None, now_s=now).granted
        booked = limiter.acquire("c", None, max_wait_s=1, now_s=now)
        assert 1 / booked.wait_s == pytest.approx(_curve(level, since_s), rel=0.01)
    assert _curve(level, 1.0) < level * (1 - BACKOFF_BETA / 2)
    assert _curve(level, BACKOFF_PERIOD_S) == level
    assert _curve(level, 1.5 * BACKOFF_PERIOD_S) > level


def test_a_429_during_a_pause_changes_nothing_and_one_after_it_lowers_the_rate(
    limiter: RateLimiter,
) -> None:
    first = limiter.backoff("c", 2.0, parse_rate("100/s"), now_s=T0)
    assert first.lowered and first.level_per_s == pytest.approx(100 * (1 - BACKOFF_MARGIN))
    during = limiter.backoff("c", 1.0, now_s=T0 + 0.5)  # sent before the pause began
    assert (during.lowered, during.pause_s) == (False, 1.5)
    assert limiter.backoff("c", 3.0, now_s=T0 + 0.5).pause_s == 3.0  # a longer retry-after
    # After the pause: lowered from the pace the curve had reached, to level off just below.
    after = limiter.backoff("c", 1.0, now_s=T0 + 3.6)
    assert after.lowered
    assert after.level_per_s == pytest.approx(
        _curve(first.level_per_s, 3.6 - 2.0) * (1 - BACKOFF_MARGIN),
        rel=1e-3,  # from 2 s
    )
    # Long after: lowered from the pace it had climbed to since, by beta only.
    later = limiter.backoff("c", 1.0, now_s=T0 + 30)
    assert later.level_per_s == pytest.approx(
        _curve(after.level_per_s, 30 - 4.6) * (1 - BACKOFF_MARGIN), rel=1e-3
    )


def test_without_retry_after_429s_right_after_a_pause_double_it_then_halve_the_rate(
    limiter: RateLimiter,
) -> None:
    first = limiter.backoff("c", None, parse_rate("10/s"), now_s=T0)
    assert first.pause_s == DEFAULT_PAUSE_S
    again = limiter.backoff("c", None, now_s=T0 + 1.1)
    assert again.pause_s == 2 * DEFAULT_PAUSE_S
    assert first.level_per_s is not None and again.level_per_s is not None
    assert again.level_per_s == pytest.approx(  # lowered as usual
        _curve(first.level_per_s, 0.1) * (1 - BACKOFF_MARGIN), rel=1e-3
    )
    third = limiter.backoff("c", None, now_s=T0 + 3.2)  # twice in a row: halved too
    assert third.pause_s == 4 * DEFAULT_PAUSE_S
    assert third.level_per_s == pytest.approx(
        _curve(again.level_per_s, 0.1) * (1 - BACKOFF_MARGIN) / 2, rel=1e-3
    )
    # Long after the last pause ended: back to the default.
    assert limiter.backoff("c", None, now_s=T0 + 60).pause_s == DEFAULT_PAUSE_S
    pauses = [limiter.backoff("d", None, now_s=T0 + i).pause_s for i in range(0, 200, 2)]
    assert max(pauses) == MAX_PAUSE_S


def test_with_headers_learned_a_429_only_pauses(limiter: RateLimiter) -> None:
    limiter.learn("c", 10, 1.0, now_s=T0)
    backoff = limiter.backoff("c", 0.7, now_s=T0)
    assert (backoff.lowered, backoff.pause_s) == (False, 0.7)
    assert limiter.status("c")["learned_source"] == "headers"


def test_the_configured_rate_caps_what_a_first_429_teaches(limiter: RateLimiter) -> None:
    for n in range(100):
        limiter.acquire("c", None, now_s=T0 + n / 1000)  # 100 in 0.1 s: 1000/s sent
    level = limiter.backoff("c", 0.1, parse_rate("20/s"), now_s=T0 + 0.1).level_per_s
    assert level == pytest.approx(20, rel=1e-4)


def test_headers_learned_later_replace_the_rate_learned_from_429s(limiter: RateLimiter) -> None:
    limiter.backoff("c", 1.0, parse_rate("10/s"), now_s=T0)
    assert limiter.status("c")["learned_source"] == "429s"
    limiter.learn("c", 100, 1.0, now_s=T0)
    status = limiter.status("c")
    assert (status["learned_source"], status["learned_per_second"]) == ("headers", 100.0)


def test_status_says_configured_learned_its_source_in_use_and_the_pause(
    limiter: RateLimiter,
) -> None:
    nothing = limiter.status("c")
    assert (nothing["configured"], nothing["learned_source"], nothing["in_use_per_second"]) == (
        None, None, None,
    )  # fmt: skip
    limiter.learn("c", 100, 10.0)
    limiter.backoff("c", 4.0)
    status = limiter.status("c", parse_rate("50/s"))
    assert status["configured"] == "50/s" and status["configured_per_second"] == 50.0
    assert status["learned_limit"] == "100/10s" and status["learned_per_second"] == 10.0
    assert (status["in_use_source"], status["in_use_per_second"]) == ("headers", 10.0)
    assert 3 < status["paused_s"] <= 4
    assert status["learned_expires_s"] is not None and status["learned_expires_s"] > 0
    assert limiter.status("c", parse_rate("5/s"))["in_use_source"] == "configured"


# -- converging on a server's rate from its 429s, on the stand-in's clock ----------------------


@pytest.mark.parametrize("mode", ["retry-after", "none"])
def test_the_rate_learned_from_429s_converges_on_the_servers_limit(
    limiter: RateLimiter, mode: str
) -> None:
    """One sender that sends whenever the limiter lets it, against a stand-in that allows 20 per
    1 s window and says nothing but 429 (and maybe retry-after); the stand-in and the limiter
    share a driven clock, so two simulated minutes take a few seconds and no sleep."""
    from op_celery._client import OpenPanelClient
    from op_celery._events import build_event, normalize_call
    from op_celery._exceptions import RateLimited
    from op_celery.testing import StandInServer

    from ._support import CLIENT_ID, CLIENT_SECRET

    now = [T0]
    accepted: list[float] = []
    limited: list[float] = []
    with StandInServer(
        clients={CLIENT_ID: CLIENT_SECRET},
        rate_limit=(20, 1.0),
        rate_limit_headers=mode,  # type: ignore[arg-type]
        clock=lambda: now[0],
    ) as server:
        client = OpenPanelClient(CLIENT_ID, CLIENT_SECRET, server.url, allow_insecure_http=True)
        event = build_event("track", normalize_call("track", ("converge",), {}))
        while now[0] < T0 + 120:
            acquisition = limiter.acquire(CLIENT_ID, None, max_wait_s=1.0, now_s=now[0])
            now[0] += acquisition.wait_s
            if not acquisition.granted:
                continue
            try:
                client.send(event)
                accepted.append(now[0])
            except RateLimited as exc:
                limited.append(now[0])
                limiter.backoff(CLIENT_ID, exc.retry_after, now_s=now[0])
            now[0] += 0.002  # the answer's latency
    last_minute = [t for t in accepted if t >= T0 + 60]
    too_many = [t for t in limited if t >= T0 + 60]
    assert len(last_minute) >= 0.9 * 20 * 60
    assert len(too_many) < 0.03 * (len(last_minute) + len(too_many))
    assert limited, "the server never refused: nothing was learned"
