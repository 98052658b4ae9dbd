"""What one worker process does with what the server says about its rate limit.

Every answer may carry ``@fastify/rate-limit``'s headers (``x-ratelimit-limit``,
``x-ratelimit-remaining``, ``x-ratelimit-reset``, see ../shared/openpanel-api.md); every 429 may
carry ``retry-after``. :class:`RateLearner` turns them into the limiter's two writes:

- :meth:`RateLearner.observe` (every answer that carries the headers): stores the learned rate
  through :meth:`RateLimiter.learn`, but only when this process has not stored the same one
  within :data:`REFRESH_S`, so a steady pool writes about once a minute per process, not once
  per event.
- :meth:`RateLearner.rate_limited` (every 429): pauses the pool and, without headers, lowers the
  rate learned from 429s (:meth:`RateLimiter.backoff`).

The log says when the pace changes: once per change of the rate learned from headers (by the
worker that stored it), and once per 429 that lowered the rate learned from 429s, at most every
:data:`BACKOFF_LOG_INTERVAL_S` per project and process.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from ._limiter import BACKOFF_BETA, Backoff, RateLimiter
from ._rates import Rate

__all__ = ["BACKOFF_LOG_INTERVAL_S", "REFRESH_S", "RateHeaders", "RateLearner", "rate_headers"]

log = logging.getLogger("op_celery")

#: Seconds a process waits before storing the same learned rate again (to renew its expiry).
REFRESH_S = 60.0
#: Seconds between two log lines of one process about the rate learned from 429s.
BACKOFF_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class RateHeaders:
    """The rate-limit headers of one answer: ``limit`` requests per window, ``remaining`` of
    them left, ``reset_s`` seconds until the window closes."""

    limit: int
    remaining: int | None
    reset_s: float


def rate_headers(headers: Mapping[str, str] | None) -> RateHeaders | None:
    """The ``x-ratelimit-*`` headers of an answer, or None when they are missing or unusable.

    ``x-ratelimit-reset`` is seconds (``@fastify/rate-limit``); a value that looks like a Unix
    time (as some proxies send) is taken as one.
    """
    if not headers:
        return None
    limit_text = headers.get("x-ratelimit-limit")
    reset_text = headers.get("x-ratelimit-reset")
    if limit_text is None or reset_text is None:
        return None
    try:
        limit = int(limit_text.split(",")[0].strip())
        reset_s = float(reset_text.split(",")[0].strip())
    except ValueError:
        return None
    if reset_s > 1e9:  # an epoch time, not a duration
        reset_s -= time.time()
    if limit < 1 or not math.isfinite(reset_s) or reset_s <= 0:
        return None
    remaining_text = headers.get("x-ratelimit-remaining")
    try:
        remaining = None if remaining_text is None else int(remaining_text.strip())
    except ValueError:
        remaining = None
    return RateHeaders(limit, remaining, reset_s)


class RateLearner:
    """One process's side of learning the server's rate, for every project it sends for."""

    def __init__(self, limiter: RateLimiter, *, headroom_pct: float = 0.0) -> None:
        self.limiter = limiter
        self.headroom_pct = headroom_pct
        #: Per client id: (limit, largest reset in ms) last stored, and when (monotonic).
        self._stored: dict[str, tuple[int, int, float]] = {}
        self._logged_backoff: dict[str, float] = {}
        self._lock = threading.Lock()

    def observe(self, client_id: str, headers: Mapping[str, str] | None) -> None:
        """Learn from an answer's headers; one dict look-up when there are none or nothing is
        new. Raises :class:`LimiterUnavailable` when it has to write and Redis does not answer.
        """
        seen = rate_headers(headers)
        if seen is None:
            return
        reset_ms = math.ceil(seen.reset_s * 1000)
        now = time.monotonic()
        stored = self._stored.get(client_id)
        if (
            stored is not None
            and stored[0] == seen.limit
            and reset_ms <= stored[1]
            and now - stored[2] < REFRESH_S
        ):
            return
        learned = self.limiter.learn(
            client_id, seen.limit, seen.reset_s, headroom_pct=self.headroom_pct
        )
        with self._lock:
            self._stored[client_id] = (learned.limit, math.ceil(learned.window_s * 1000), now)
        if learned.changed:
            log.info(
                "op_celery: client %s: the server allows %s (x-ratelimit headers); every worker "
                "now paces at %.4g/s",
                client_id,
                Rate(learned.limit, learned.window_s),
                learned.per_second,
            )

    def rate_limited(
        self, client_id: str, retry_after_s: float | None, configured: Rate | None
    ) -> Backoff:
        """After a 429: pause every worker; without headers, lower the rate learned from 429s."""
        backoff = self.limiter.backoff(client_id, retry_after_s, configured)
        if backoff.lowered and backoff.level_per_s is not None:
            now = time.monotonic()
            last = self._logged_backoff.get(client_id)
            if last is None or now - last >= BACKOFF_LOG_INTERVAL_S:
                self._logged_backoff[client_id] = now
                log.info(
                    "op_celery: client %s: 429 at %.4g/s with no x-ratelimit headers; every "
                    "worker paused %.3g s, then paced from %.4g/s back up (learned from 429s)",
                    client_id,
                    backoff.level_per_s,
                    backoff.pause_s,
                    backoff.level_per_s * (1 - BACKOFF_BETA),
                )
        return backoff
