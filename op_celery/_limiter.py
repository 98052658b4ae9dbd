"""One rate limit per OpenPanel project, shared by every worker through Redis.

The algorithm is GCRA (a leaky bucket kept as one timestamp), run by ``lua/acquire.lua`` in one
round trip per :meth:`RateLimiter.acquire`. The script reads the time from Redis ``TIME``, so
the workers' clocks play no part.

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

Keys (the prefix is configurable, :data:`DEFAULT_KEY_PREFIX` by default)::

    <prefix>:{<client_id>}:bucket   the TAT; expires once it books nothing ahead
    <prefix>:{<client_id>}:pause    present while the project is paused after a 429

The client id in braces is a Redis Cluster hash tag: both keys of a project live in one slot.
The prefix defaults to the package's key namespace (``OP_CELERY_KEY_PREFIX``).

Every ``redis`` error is mapped to :class:`LimiterUnavailable` here and nowhere else; its
message names the server (never a password) and says what to check. The limiter never admits
when Redis does not answer: the caller retries the event later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypedDict

import redis

from ._exceptions import ConfigurationError, LimiterUnavailable
from ._lua import lua
from ._rates import DEFAULT_BURST, Rate
from ._settings import DEFAULT_KEY_PREFIX

__all__ = ["Acquisition", "LimiterState", "RateLimiter"]

#: Client ids whose keys a limiter keeps ready; beyond this the cache starts afresh.
MAX_CACHED_CLIENT_IDS = 1024

_MICROSECONDS_PER_S = 1_000_000
#: Replies of acquire.lua below this are reservations (µs to wait), above it admission times.
_RESERVATION_CEILING_US = 10**12


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


class RateLimiter:
    """Rate limits per OpenPanel project, shared through the Redis behind ``client``.

    The Lua scripts are registered with ``client`` once, here; each :meth:`acquire` is then one
    ``EVALSHA``; after a Redis restart the registered script loads itself again.
    """

    def __init__(self, client: redis.Redis, *, prefix: str = DEFAULT_KEY_PREFIX) -> None:
        self._client = client
        self._prefix = prefix
        self._where = _describe(client)
        self._key_cache: dict[str, tuple[bytes, bytes]] = {}
        self._packed: dict[tuple[str, int, int, int], Any] = {}
        self._acquire = client.register_script(lua("acquire.lua"))
        self._pause = client.register_script(lua("pause.lua"))

    def acquire(
        self, client_id: str, rate: Rate, burst: int = DEFAULT_BURST, *, max_wait_s: float = 0.0
    ) -> Acquisition:
        """Admit one request for ``client_id`` at ``rate``, or say how long to wait.

        ``burst`` (at least 1) is how many requests are admitted at once after idling; see the
        module docstring for what it costs. With ``max_wait_s``, a slot at most that far ahead
        is booked for the caller (granted, ``wait_s`` until it): callers that then sleep until
        their slot keep the schedule exactly, where callers that ask again after a wait race for
        each slot and lose some. Raises :class:`LimiterUnavailable` when Redis does not answer.
        """
        if burst < 1:
            raise ConfigurationError(f"burst must be at least 1, got {burst!r}")
        interval_us = _interval_us(rate)
        tolerance_us = (burst - 1) * interval_us
        reserve_us = min(_RESERVATION_CEILING_US - 1, max(0, int(max_wait_s * _MICROSECONDS_PER_S)))
        args = (interval_us, tolerance_us, reserve_us)
        try:
            answer = self._send_packed(client_id, args)
        except redis.RedisError as exc:
            raise self._unavailable("acquire", exc) from exc
        if answer >= _RESERVATION_CEILING_US:
            return Acquisition(True, 0.0, answer / _MICROSECONDS_PER_S)
        if answer > 0:
            return Acquisition(True, answer / _MICROSECONDS_PER_S)
        return Acquisition(False, -answer / _MICROSECONDS_PER_S)

    def _send_packed(self, client_id: str, args: tuple[int, int, int]) -> int:
        """One EVALSHA of acquire.lua, its bytes packed once per project and arguments.

        The command of a project never changes, so redis-py's per-call argument encoding and
        command building (a fifth of an acquire's cost, benchmarks/acquire_cost.py) is done
        once. A stale pooled connection (after a Redis restart) or a script flushed from Redis
        falls back to the ordinary call, with redis-py's own retries and script loading.
        """
        cache_key = (client_id, *args)
        packed = self._packed.get(cache_key)
        pool = self._client.connection_pool
        connection: Any = pool.get_connection()  # redis-py's Connection is untyped here
        try:
            if packed is None:
                if len(self._packed) >= MAX_CACHED_CLIENT_IDS:
                    self._packed.clear()
                keys = self._key_cache.get(client_id) or self._cache_keys(client_id)
                packed = connection.pack_command("EVALSHA", self._acquire.sha, 2, *keys, *args)
                self._packed[cache_key] = packed
            connection.send_packed_command(packed, check_health=False)
            answer = connection.read_response()
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.NoScriptError) as exc:
            if not isinstance(exc, redis.exceptions.NoScriptError):
                connection.disconnect()
            keys = self._key_cache.get(client_id) or self._cache_keys(client_id)
            answer = self._acquire(keys=keys, args=args)
        finally:
            pool.release(connection)
        return int(answer)

    def pause(self, client_id: str, seconds: float) -> float:
        """Admit nothing for ``client_id`` for ``seconds``, in every worker (after a 429).

        A pause is only ever extended: the project stays paused until the later of its current
        end and now + ``seconds``. Returns the seconds left until the pause ends.
        """
        pause_ms = math.ceil(seconds * 1000)
        if pause_ms <= 0:
            return self.paused_for(client_id)
        try:
            remaining_ms = self._pause(keys=self._keys(client_id)[1:], args=(pause_ms,))
        except redis.RedisError as exc:
            raise self._unavailable("pause", exc) from exc
        return max(0, int(remaining_ms)) / 1000

    def paused_for(self, client_id: str) -> float:
        """Seconds until the pause of ``client_id`` ends; 0 when it is not paused."""
        pause_key = self._keys(client_id)[1]
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
        right now if the project were not paused.
        """
        bucket_key, pause_key = self._keys(client_id)
        try:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.time()
                pipe.get(bucket_key)
                pipe.pttl(pause_key)
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
            bucket_key=bucket_key,
            pause_key=pause_key,
            paused_s=max(0, int(pause_ms)) / 1000,
            backlog_s=backlog_us / _MICROSECONDS_PER_S,
            available=available,
        )

    def _cache_keys(self, client_id: str) -> tuple[bytes, bytes]:
        """The keys of ``client_id``, encoded once: :meth:`acquire` runs per event."""
        if len(self._key_cache) >= MAX_CACHED_CLIENT_IDS:
            self._key_cache.clear()
        bucket_key, pause_key = self._keys(client_id)
        encoding = self._client.connection_pool.connection_kwargs.get("encoding", "utf-8")
        keys = self._key_cache[client_id] = (
            bucket_key.encode(encoding),
            pause_key.encode(encoding),
        )
        return keys

    def _keys(self, client_id: str) -> tuple[str, str]:
        if not client_id or "{" in client_id or "}" in client_id:
            raise ConfigurationError(
                f"client id {client_id!r} cannot key a rate limit: it must be non-empty and "
                "hold no braces"
            )
        tag = f"{self._prefix}:{{{client_id}}}"
        return f"{tag}:bucket", f"{tag}:pause"

    def _unavailable(self, operation: str, exc: redis.RedisError) -> LimiterUnavailable:
        """The one mapping of a ``redis`` error to ours; the message carries no password."""
        detail = f"{type(exc).__name__}: {exc}"
        password = self._client.connection_pool.connection_kwargs.get("password")
        if password:
            detail = detail.replace(str(password), "***")
        return LimiterUnavailable(
            f"the rate limiter's Redis at {self._where} failed during {operation} ({detail}); "
            "the event was not sent and will be retried. Check that this Redis runs and that "
            "the limiter's Redis URL (OP_CELERY_REDIS_URL) is right"
        )


def _interval_us(rate: Rate) -> int:
    """Microseconds between admissions at ``rate``, rounded up so the limiter is never fast."""
    period_us = round(rate.period_s * _MICROSECONDS_PER_S)
    return max(1, -(-period_us // rate.limit))


def _describe(client: redis.Redis) -> str:
    """Where ``client`` connects, without credentials: ``host:port/db`` or a socket path."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}/{kwargs.get('db', 0)}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
