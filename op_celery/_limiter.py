"""One rate limit per OpenPanel project, shared by every worker through Redis, at the slowest of
the configured rate and the rate learned from the server.

The algorithm is GCRA (a leaky bucket kept as one timestamp), run by ``lua/acquire.lua`` in one
round trip per :meth:`RateLimiter.acquire`. The script reads the time from Redis ``TIME``, so
the workers' clocks play no part (tests may pass ``now_s`` to drive time).

What it guarantees, on the Redis clock: in any half-open span of one period (one second for
``"50/s"``), at most ``limit + burst - 1`` requests are admitted. ``burst`` is the number
admitted at once after the limiter has been idle; the emission interval ``period / limit`` is
rounded up to a whole microsecond, so the limiter never runs faster than its rate.

Against a server that counts ``L`` requests per fixed window (the common ``429`` limiter), the
windows are such spans: with the rate set to ``L`` per window, a window is sent at most
``L + burst - 1`` requests, as admitted. The default burst is 1. Callers that ask again after
sleeping race for each slot and lose the ones they wake late for (four sleeping workers reached
95 % of 100/s with ``burst=1``); callers that *reserve* (``acquire(max_wait_s=...)``, what the
tasks do) are handed the next free slot and sleep until it, so the schedule is kept exactly and
no slack is needed. A burst of 2 is the alternative for non-reserving callers: its price is at
most one request over ``L`` in a window. A burst of ``L`` (a bucket that starts full) can put
``2L - 1`` requests into one window. What the limiter cannot see is the network: a request
reaches the server some latency after it was admitted, and if that latency varies by up to
``J`` seconds a window can receive about ``J * L / period`` more. To never see a 429, set the
rate to ``L - (burst - 1)`` per window, less a margin for that jitter (e.g. 99 % of ``L``).

The rate the server allows is learned two ways, and the lower of it and the configured rate (if
any) is the one used:

- **From headers** (:meth:`RateLimiter.learn`, ``lua/learn.lua``): ``x-ratelimit-limit`` over
  the window inferred from ``x-ratelimit-reset`` (the largest reset seen: the answer that opens
  a window carries all of it), slowed by the headroom. Kept :data:`LEARNED_TTL_S` after the
  last refresh; a changed limit is taken at once.
- **From 429s** (:meth:`RateLimiter.backoff`, ``lua/backoff.lua``), when no headers came: each 429
  outside a pause lowers the rate to ``1 - BACKOFF_BETA`` of the rate in use (of half of it when
  429s without retry-after came back right after a pause twice in a row), and the rate climbs back
  along CUBIC's curve (RFC 9438) from the end of the pause, back just below the 429's rate
  (:data:`BACKOFF_MARGIN`) after :data:`BACKOFF_PERIOD_S`, then probing upwards
  (:data:`BACKOFF_GAIN`). Growth costs no write: acquire computes the curve from the last 429's
  rate and time. For the very first 429 the rate in use is what was sent (acquire counts
  admissions while nothing paces) over the server's window, estimated as the time it took plus the
  pause, down to whole seconds.

Every 429 also pauses the whole pool, for ``retry-after`` or, without one,
:data:`DEFAULT_PAUSE_S` doubled while 429s come back right after a pause (up to
:data:`MAX_PAUSE_S`); the pause moves the bucket's TAT to its end, so workers come back one
interval apart.

Keys (the prefix is configurable, :data:`DEFAULT_KEY_PREFIX` by default)::

    <prefix>:{<client_id>}:bucket   the TAT; expires once it books nothing ahead
    <prefix>:{<client_id>}:pause    present while the project is paused after a 429
    <prefix>:{<client_id>}:learned  the rate learned from headers (limit, window, interval)
    <prefix>:{<client_id>}:backoff  the rate learned from 429s (rate and time of the last one)
    <prefix>:{<client_id>}:tally    admissions counted while nothing paces the project
    <prefix>:{<client_id>}:line     when the next refused event that waits in line comes back

The client id in braces is a Redis Cluster hash tag: every key of a project lives in one slot.
The prefix defaults to the package's key namespace (``OP_CELERY_KEY_PREFIX``).

Every ``redis`` error is mapped to :class:`LimiterUnavailable` here and nowhere else; its
message names the server (never a password) and says what to check. The limiter never admits
when Redis does not answer: the caller retries the event later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import redis

from ._exceptions import ConfigurationError, LimiterUnavailable
from ._lua import Script
from ._rates import DEFAULT_BURST, Rate
from ._redis import is_cluster, note_refusal, refusal_message
from ._settings import DEFAULT_KEY_PREFIX

__all__ = [
    "BACKOFF_BETA",
    "BACKOFF_GAIN",
    "BACKOFF_MARGIN",
    "BACKOFF_PERIOD_S",
    "BACKOFF_TTL_S",
    "DEFAULT_PAUSE_S",
    "LEARNED_TTL_S",
    "MAX_PAUSE_S",
    "Acquisition",
    "Backoff",
    "Learned",
    "LimiterState",
    "RateLimiter",
    "RateStatus",
]

#: Client ids whose keys a limiter keeps ready; beyond this the cache starts afresh.
MAX_CACHED_CLIENT_IDS = 1024
#: Share of the rate taken off at a 429 (CUBIC's 1 - beta_cubic is 0.3; 0.1 keeps more of the
#: rate, as the pool's pause already stops the overshoot; measured in benchmarks/RESULTS.md).
BACKOFF_BETA = 0.1
#: How fast the rate learned from 429s grows once past the last 429's rate: ``1 + gain *
#: (t / K - 1) ** 3`` times that rate (after 1.5 K: +12.5 %; after 2 K: twice it).
BACKOFF_GAIN = 1.0
#: Seconds after a 429 until the rate learned from 429s is back at the rate of that 429 (K).
BACKOFF_PERIOD_S = 16.0
#: Share below the rate of a 429 where the curve levels off: that rate was too fast.
BACKOFF_MARGIN = 0.02
#: Seconds the rate learned from 429s is kept after the last 429.
BACKOFF_TTL_S = 900.0
#: Seconds the pool pauses after a 429 that named no retry-after.
DEFAULT_PAUSE_S = 1.0
#: Longest pause in seconds when 429s without retry-after keep doubling it.
MAX_PAUSE_S = 60.0
#: Seconds a rate learned from headers is kept without a refresh.
LEARNED_TTL_S = 300.0

_MICROSECONDS_PER_S = 1_000_000
#: Replies of acquire.lua below this are reservations (µs to wait), above it admission times.
_RESERVATION_CEILING_US = 10**12
#: Indexes of a project's keys in the tuple of ``_keys``.
_BUCKET, _PAUSE, _LEARNED, _BACKOFF, _TALLY, _LINE = range(6)


@dataclass(frozen=True, slots=True)
class Acquisition:
    """The limiter's answer to one :meth:`RateLimiter.acquire`.

    Refused: ``wait_s`` is the seconds until a request can be admitted, or until the project's
    pause ends. Granted: ``wait_s`` is 0, or, for a reservation (``acquire(max_wait_s=...)``),
    the seconds until the booked slot, when the caller sends. ``admitted_at_s`` is the Redis
    clock at an immediate admission, in seconds since the epoch; ``None`` otherwise (refused,
    reserved, or an answer that did not come from Redis, e.g. a test double).
    """

    granted: bool
    wait_s: float
    admitted_at_s: float | None = None


@dataclass(frozen=True, slots=True)
class Learned:
    """What :meth:`RateLimiter.learn` stored: the server's ``limit`` per ``window_s``, paced
    at ``per_second`` (headroom taken off); ``changed`` when the pace is new."""

    limit: int
    window_s: float
    per_second: float
    changed: bool


@dataclass(frozen=True, slots=True)
class Backoff:
    """What :meth:`RateLimiter.backoff` did: the pool is paused ``pause_s``; when ``lowered``,
    the rate learned from 429s restarts at ``(1 - BACKOFF_BETA) * level_per_s`` and is back at
    ``level_per_s`` (just below the rate of the 429) after ``BACKOFF_PERIOD_S``."""

    pause_s: float
    lowered: bool
    level_per_s: float | None


class LimiterState(TypedDict):
    """A project's limiter state, for a status command."""

    client_id: str
    bucket_key: str
    pause_key: str
    #: Seconds until the pause ends; 0 when not paused.
    paused_s: float
    #: Seconds of admissions booked ahead of now (TAT - now); 0 when idle.
    backlog_s: float
    #: Requests that would be admitted right now, without pause; ``None`` without a rate.
    available: int | None


class RateStatus(TypedDict):
    """Where a project's pace comes from, for ``op-celery status`` and the metrics."""

    client_id: str
    #: The configured limit (``OPENPANEL_RATE_LIMIT``) as written, e.g. ``"50/s"``; None if unset.
    configured: str | None
    configured_per_second: float | None
    #: ``"headers"`` (x-ratelimit-*), ``"429s"`` (backing off), or None (nothing learned).
    learned_source: Literal["headers", "429s"] | None
    #: The learned rate in requests per second, as acquire uses it now; None if none.
    learned_per_second: float | None
    #: From headers: the server's limit and window, e.g. ``"100/10s"``; None otherwise.
    learned_limit: str | None
    #: Seconds until the learned rate is forgotten without a refresh (or another 429).
    learned_expires_s: float | None
    #: From 429s: the rate the pace levels off at (just below the last 429's) and the seconds
    #: since that 429; None otherwise.
    level_per_second: float | None
    since_last_429_s: float | None
    #: The pace of every worker's acquire: the lower of configured and learned; None = unpaced.
    in_use_per_second: float | None
    #: ``"configured"``, ``"headers"``, ``"429s"`` or None: which of them sets the pace.
    in_use_source: Literal["configured", "headers", "429s"] | None
    #: Seconds until the pause ends; 0 when not paused.
    paused_s: float
    #: Seconds of admissions booked ahead of now; 0 when idle.
    backlog_s: float


class RateLimiter:
    """Rate limits per OpenPanel project, shared through the Redis behind ``client``.

    The Lua scripts are made once, here; each :meth:`acquire` is then one ``EVALSHA``; after a
    Redis restart a script loads itself again (``_lua.Script``).
    """

    def __init__(self, client: redis.Redis, *, prefix: str = DEFAULT_KEY_PREFIX) -> None:
        self._client = client
        self._prefix = prefix
        self._where = _describe(client)
        #: A Redis Cluster client has no single connection pool: acquire then takes the
        #: ordinary script call (routed by its keys' slot), and reads are not one MULTI (the
        #: clock comes from another node than the keys).
        self._pool: Any = None if is_cluster(client) else client.connection_pool
        self._key_cache: dict[str, tuple[bytes, ...]] = {}
        self._packed: dict[tuple[str, int, int, int, int], Any] = {}
        self._acquire = Script(client, "acquire.lua")
        self._pause = Script(client, "pause.lua")
        self._learn = Script(client, "learn.lua")
        self._backoff = Script(client, "backoff.lua")

    def acquire(
        self,
        client_id: str,
        rate: Rate | None,
        burst: int = DEFAULT_BURST,
        *,
        max_wait_s: float = 0.0,
        line_s: float = 0.0,
        now_s: float | None = None,
    ) -> Acquisition:
        """Admit one request for ``client_id``, or say how long to wait.

        The pace is the slowest of ``rate`` (the configured one; None for none) and what was
        learned from the server (headers, or 429s); with neither, every request is admitted.
        ``burst`` (at least 1) is how many requests are admitted at once after idling; see the
        module docstring for what it costs. With ``max_wait_s``, a slot at most that far ahead
        is booked for the caller (granted, ``wait_s`` until it): callers that then sleep until
        their slot keep the schedule exactly, where callers that ask again after a wait race for
        each slot and lose some. With ``line_s``, a refused caller joins the project's waiting
        line (see ``lua/acquire.lua``): its ``wait_s`` is its turn, an interval after the
        caller refused before it, at most ``line_s`` away, so that a backlog of refused callers
        that come back when told come back one at a time, not all at once. ``now_s`` replaces
        the Redis clock (tests that drive time). Raises :class:`LimiterUnavailable` when Redis
        does not answer.
        """
        interval_us, burst, reserve_us, line_us = _acquire_args(rate, burst, max_wait_s, line_s)
        try:
            if now_s is None:
                answer = self._send_packed(client_id, (interval_us, burst, reserve_us, line_us))
            else:
                answer = int(
                    self._acquire(
                        self._cached_keys(client_id),
                        (interval_us, burst, reserve_us, *_backoff_args(), _us(now_s), line_us),
                    )
                )
        except redis.RedisError as exc:
            raise self._unavailable("acquire", exc) from exc
        return self.acquisition(answer)

    def acquire_call(
        self,
        client_id: str,
        rate: Rate | None,
        burst: int = DEFAULT_BURST,
        *,
        max_wait_s: float = 0.0,
        line_s: float = 0.0,
    ) -> tuple[tuple[bytes, ...], tuple[Any, ...]]:
        """The KEYS and ARGV of ``lua/acquire.lua`` for :meth:`acquire`'s arguments, for a
        script that includes it (``lua/slot_claim.lua``); read its answer with
        :meth:`acquisition`."""
        interval_us, burst, reserve_us, line_us = _acquire_args(rate, burst, max_wait_s, line_s)
        args = (interval_us, burst, reserve_us, *_backoff_args(), 0, line_us)
        return self._cached_keys(client_id), args

    @staticmethod
    def acquisition(answer: int) -> Acquisition:
        """``lua/acquire.lua``'s answer as an :class:`Acquisition`."""
        if answer >= _RESERVATION_CEILING_US:
            return Acquisition(True, 0.0, answer / _MICROSECONDS_PER_S)
        if answer > 0:
            return Acquisition(True, answer / _MICROSECONDS_PER_S)
        return Acquisition(False, -answer / _MICROSECONDS_PER_S)

    def _send_packed(self, client_id: str, args: tuple[int, int, int, int]) -> int:
        """One EVALSHA of acquire.lua, its bytes packed once per project and arguments.

        The command of a project never changes, so redis-py's per-call argument encoding and
        command building (a fifth of an acquire's cost, benchmarks/acquire_cost.py) is done
        once. A stale pooled connection (after a Redis restart) or a script flushed from Redis
        falls back to the ordinary call, with redis-py's own retries and script loading.
        """
        interval_us, burst, reserve_us, line_us = args
        full_args = (interval_us, burst, reserve_us, *_backoff_args(), 0, line_us)
        pool = self._pool
        if pool is None:
            return int(self._acquire(self._cached_keys(client_id), full_args))
        cache_key = (client_id, *args)
        packed = self._packed.get(cache_key)
        connection: Any = _get_connection(pool)  # redis-py's Connection is untyped here
        try:
            if packed is None:
                if len(self._packed) >= MAX_CACHED_CLIENT_IDS:
                    self._packed.clear()
                keys = self._cached_keys(client_id)
                packed = connection.pack_command(
                    "EVALSHA", self._acquire.sha, len(keys), *keys, *full_args
                )
                self._packed[cache_key] = packed
            connection.send_packed_command(packed, check_health=False)
            answer = connection.read_response()
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.NoScriptError) as exc:
            if not isinstance(exc, redis.exceptions.NoScriptError):
                connection.disconnect()
            answer = self._acquire(self._cached_keys(client_id), full_args)
        finally:
            pool.release(connection)
        return int(answer)

    def learn(
        self,
        client_id: str,
        limit: int,
        reset_s: float,
        *,
        headroom_pct: float = 0.0,
        now_s: float | None = None,
    ) -> Learned:
        """Store the rate a server announced (``x-ratelimit-limit`` and ``-reset``) for every
        worker's acquire, slowed by ``headroom_pct`` percent; see the module docstring."""
        if limit < 1 or not reset_s > 0:
            raise ConfigurationError(
                f"a learned rate needs limit >= 1 and reset > 0, got {limit!r}, {reset_s!r}"
            )
        factor = max(0.01, 1 - max(0.0, headroom_pct) / 100)
        keys = self._cached_keys(client_id)
        args = (limit, math.ceil(reset_s * 1000), repr(factor), _ms(LEARNED_TTL_S), _us(now_s))
        try:
            interval_us, changed, stored_limit, window_ms = self._learn(
                (keys[_LEARNED], keys[_BACKOFF]), args
            )
        except redis.RedisError as exc:
            raise self._unavailable("learn", exc) from exc
        return Learned(
            limit=int(stored_limit),
            window_s=int(window_ms) / 1000,
            per_second=_MICROSECONDS_PER_S / int(interval_us),
            changed=bool(changed),
        )

    def backoff(
        self,
        client_id: str,
        retry_after_s: float | None,
        rate: Rate | None = None,
        *,
        now_s: float | None = None,
    ) -> Backoff:
        """After a 429: pause every worker, and lower the rate learned from 429s unless headers
        taught the rate; ``rate`` is the configured one (it caps what is learned)."""
        retry_after_ms = -1 if retry_after_s is None else max(1, math.ceil(retry_after_s * 1000))
        args = (
            retry_after_ms,
            _ms(DEFAULT_PAUSE_S),
            _ms(MAX_PAUSE_S),
            repr(BACKOFF_BETA),
            _us(BACKOFF_PERIOD_S),
            _ms(BACKOFF_TTL_S),
            0 if rate is None else _interval_us(rate),
            _us(now_s),
            repr(BACKOFF_GAIN),
            repr(BACKOFF_MARGIN),
        )
        keys = self._cached_keys(client_id)
        try:
            pause_ms, lowered, at_429_milli = self._backoff(
                (keys[_PAUSE], keys[_BUCKET], keys[_LEARNED], keys[_BACKOFF], keys[_TALLY]), args
            )
        except redis.RedisError as exc:
            raise self._unavailable("backoff", exc) from exc
        at_429 = int(at_429_milli) / 1000
        return Backoff(int(pause_ms) / 1000, bool(lowered), at_429 or None)

    def pause(self, client_id: str, seconds: float) -> float:
        """Admit nothing for ``client_id`` for ``seconds``, in every worker.

        A pause is only ever extended: the project stays paused until the later of its current
        end and now + ``seconds``. Returns the seconds left until the pause ends.
        """
        pause_ms = math.ceil(seconds * 1000)
        if pause_ms <= 0:
            return self.paused_for(client_id)
        keys = self._cached_keys(client_id)
        try:
            remaining_ms = self._pause((keys[_PAUSE], keys[_BUCKET]), (pause_ms,))
        except redis.RedisError as exc:
            raise self._unavailable("pause", exc) from exc
        return max(0, int(remaining_ms)) / 1000

    def paused_for(self, client_id: str) -> float:
        """Seconds until the pause of ``client_id`` ends; 0 when it is not paused."""
        pause_key = self._keys(client_id)[_PAUSE]
        try:
            remaining_ms = self._client.pttl(pause_key)
        except redis.RedisError as exc:
            raise self._unavailable("paused_for", exc) from exc
        return max(0, int(remaining_ms)) / 1000

    def state(
        self, client_id: str, rate: Rate | None = None, burst: int = DEFAULT_BURST
    ) -> LimiterState:
        """The state of ``client_id``'s limit, read atomically; changes nothing.

        With ``rate`` (and ``burst``), ``available`` says how many requests would be admitted
        right now at that rate if the project were not paused.
        """
        keys = self._keys(client_id)
        try:
            with self._client.pipeline(transaction=self._pool is not None) as pipe:
                pipe.time()
                pipe.get(keys[_BUCKET])
                pipe.pttl(keys[_PAUSE])
                (seconds, microseconds), tat, pause_ms = pipe.execute()
        except redis.RedisError as exc:
            raise self._unavailable("state", exc) from exc
        now_us = seconds * _MICROSECONDS_PER_S + microseconds
        backlog_us = max(0, int(tat) - now_us) if tat is not None else 0
        available = None
        if rate is not None:
            interval_us = _interval_us(rate)
            available = max(0, ((burst - 1) * interval_us - backlog_us) // interval_us + 1)
        return LimiterState(
            client_id=client_id,
            bucket_key=keys[_BUCKET],
            pause_key=keys[_PAUSE],
            paused_s=max(0, int(pause_ms)) / 1000,
            backlog_s=backlog_us / _MICROSECONDS_PER_S,
            available=available,
        )

    def status(self, client_id: str, rate: Rate | None = None) -> RateStatus:
        """Where ``client_id``'s pace comes from, read atomically; changes nothing.

        ``rate`` is the configured one (None for none). The rate learned from 429s is the one
        acquire.lua computes at this moment (the curve from the last 429).
        """
        keys = self._keys(client_id)
        try:
            with self._client.pipeline(transaction=self._pool is not None) as pipe:
                pipe.time()
                pipe.hgetall(keys[_LEARNED])
                pipe.pttl(keys[_LEARNED])
                pipe.hgetall(keys[_BACKOFF])
                pipe.pttl(keys[_BACKOFF])
                pipe.pttl(keys[_PAUSE])
                pipe.get(keys[_BUCKET])
                replies = pipe.execute()
        except redis.RedisError as exc:
            raise self._unavailable("status", exc) from exc
        (seconds, microseconds), learned, learned_ttl, backoff, backoff_ttl, pause_ms, tat = replies
        now_us = seconds * _MICROSECONDS_PER_S + microseconds
        learned = {_text(k): _text(v) for k, v in learned.items()}
        backoff = {_text(k): _text(v) for k, v in backoff.items()}
        configured = None if rate is None else _MICROSECONDS_PER_S / _interval_us(rate)
        source: Literal["headers", "429s"] | None = None
        learned_per_s = last_429 = since_429 = expires = None
        learned_limit = None
        if "interval_us" in learned:
            source = "headers"
            learned_per_s = _MICROSECONDS_PER_S / int(learned["interval_us"])
            learned_limit = str(Rate(int(learned["limit"]), int(learned["window_ms"]) / 1000))
            expires = max(0, int(learned_ttl)) / 1000
        elif "wmax" in backoff:
            source = "429s"
            last_429 = float(backoff["wmax"])
            since_429 = max(0, now_us - int(backoff["t0"])) / _MICROSECONDS_PER_S
            learned_per_s = _backoff_rate(last_429, since_429)
            expires = max(0, int(backoff_ttl)) / 1000
        in_use: float | None = None
        in_use_source: Literal["configured", "headers", "429s"] | None = None
        if configured is not None:
            in_use, in_use_source = configured, "configured"
        if learned_per_s is not None and (in_use is None or learned_per_s < in_use):
            in_use, in_use_source = learned_per_s, source
        return RateStatus(
            client_id=client_id,
            configured=None if rate is None else str(rate),
            configured_per_second=configured,
            learned_source=source,
            learned_per_second=learned_per_s,
            learned_limit=learned_limit,
            learned_expires_s=expires,
            level_per_second=last_429,
            since_last_429_s=since_429,
            in_use_per_second=in_use,
            in_use_source=in_use_source,
            paused_s=max(0, int(pause_ms)) / 1000,
            backlog_s=max(0, int(tat) - now_us) / _MICROSECONDS_PER_S if tat is not None else 0.0,
        )

    def _cached_keys(self, client_id: str) -> tuple[bytes, ...]:
        """The keys of ``client_id``, encoded once: :meth:`acquire` runs per event."""
        keys = self._key_cache.get(client_id)
        if keys is not None:
            return keys
        if len(self._key_cache) >= MAX_CACHED_CLIENT_IDS:
            self._key_cache.clear()
        encoding = _connection_kwargs(self._client).get("encoding", "utf-8")
        keys = self._key_cache[client_id] = tuple(
            key.encode(encoding) for key in self._keys(client_id)
        )
        return keys

    def _keys(self, client_id: str) -> tuple[str, str, str, str, str, str]:
        if not client_id or "{" in client_id or "}" in client_id:
            raise ConfigurationError(
                f"client id {client_id!r} cannot key a rate limit: it must be non-empty and "
                "hold no braces"
            )
        tag = f"{self._prefix}:{{{client_id}}}"
        return (
            f"{tag}:bucket",
            f"{tag}:pause",
            f"{tag}:learned",
            f"{tag}:backoff",
            f"{tag}:tally",
            f"{tag}:line",
        )

    def _unavailable(self, operation: str, exc: redis.RedisError) -> LimiterUnavailable:
        """The one mapping of a ``redis`` error to ours; the message carries no password."""
        state = note_refusal(exc, self._where)
        if state is not None:  # full or read-only: said once, as for the ledger's writes
            return LimiterUnavailable(refusal_message(f"{operation} (rate limiter)", self._where,
                                                      state, exc))  # fmt: skip
        detail = f"{type(exc).__name__}: {exc}"
        password = _connection_kwargs(self._client).get("password")
        if password:
            detail = detail.replace(str(password), "***")
        return LimiterUnavailable(
            f"the rate limiter's Redis at {self._where} failed during {operation} ({detail}); "
            "the event was not sent and will be retried. Check that this Redis runs and that "
            "the limiter's Redis URL (OP_CELERY_REDIS_URL) is right"
        )


def _backoff_rate(level_per_s: float, since_s: float) -> float:
    """The rate learned from 429s ``since_s`` after the last one: acquire.lua's curve."""
    x = max(0.0, since_s) / BACKOFF_PERIOD_S
    gain = BACKOFF_BETA if x <= 1 else BACKOFF_GAIN
    return level_per_s * (1 + gain * (x - 1) ** 3)


def _acquire_args(
    rate: Rate | None, burst: int, max_wait_s: float, line_s: float
) -> tuple[int, int, int, int]:
    """acquire.lua's interval, burst, reservation and line arguments, in its units."""
    if burst < 1:
        raise ConfigurationError(f"burst must be at least 1, got {burst!r}")
    interval_us = 0 if rate is None else _interval_us(rate)
    reserve_us = min(_RESERVATION_CEILING_US - 1, max(0, int(max_wait_s * _MICROSECONDS_PER_S)))
    line_us = min(_RESERVATION_CEILING_US - 1, max(0, int(line_s * _MICROSECONDS_PER_S)))
    return interval_us, burst, reserve_us, line_us


def _backoff_args() -> tuple[str, str, int]:
    return repr(BACKOFF_BETA), repr(BACKOFF_GAIN), _us(BACKOFF_PERIOD_S)


def _interval_us(rate: Rate) -> int:
    """Microseconds between admissions at ``rate``, rounded up so the limiter is never fast."""
    period_us = round(rate.period_s * _MICROSECONDS_PER_S)
    return max(1, -(-period_us // rate.limit))


def _us(seconds: float | None) -> int:
    """Seconds as whole microseconds; None (the Redis clock) as 0."""
    return 0 if seconds is None else round(seconds * _MICROSECONDS_PER_S)


def _ms(seconds: float) -> int:
    return math.ceil(seconds * 1000)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


#: Per connection-pool class: whether its ``get_connection`` wants a command name.


def _get_connection(pool: Any) -> Any:
    """A pooled connection (redis-py 6.4 on, the declared floor, takes no command name)."""
    return pool.get_connection()


def _connection_kwargs(client: Any) -> dict[str, Any]:
    """The connection settings of ``client``: its pool's, or a cluster's (shared by its nodes)."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        return dict(pool.connection_kwargs)
    manager = getattr(client, "nodes_manager", None)
    return dict(getattr(manager, "connection_kwargs", None) or {})


def _describe(client: redis.Redis) -> str:
    """Where ``client`` connects, without credentials: ``host:port/db`` or a socket path."""
    if is_cluster(client):
        node = client.get_default_node()  # type: ignore[attr-defined]
        return f"cluster {getattr(node, 'host', '?')}:{getattr(node, 'port', '?')}"
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}/{kwargs.get('db', 0)}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
