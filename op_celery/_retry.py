"""The one place that decides: retry, after how long, or give up.

Every task feeds its failure here; Celery's autoretry catches the transient errors and
``OpenPanelTask.retry`` asks :func:`decide` for the countdown, so the contract's response table
is applied in exactly one function.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from ._exceptions import DeliveryError, ProfileNotFound, StorageUnavailable, TransientError
from ._settings import Settings

__all__ = ["Decision", "backoff_s", "decide", "parse_retry_after"]

#: Seconds added at most to a server-given ``retry-after``, so that a pool of workers told the
#: same time does not come back in the same millisecond.
RETRY_AFTER_JITTER_S = 0.25
#: The longest wait a server can impose through ``retry-after`` (delta-seconds or an HTTP date):
#: a larger, infinite or far-future value is read as this. A limiter's window is seconds to a
#: minute; a value of years is a misconfigured proxy, and obeying it would pause the pool for
#: good (every pause and countdown derived from it is bounded by this too).
MAX_RETRY_AFTER_S = 600.0
#: OpenPanel's server makes a profile visible to increment/decrement only when its profile
#: buffer is flushed, every 10 s: a 404 "Profile not found" right after an identify is
#: retried at this fixed interval (not a backoff from milliseconds), so that the default five
#: retries span 30 s, three flushes, whatever the jitter draws.
PROFILE_RETRY_INTERVAL_S = 6.0
#: Longest countdown after the package's Redis did not answer: short, because a failover takes
#: seconds, and an event that waits on it is never given up.
STORAGE_RETRY_MAX_S = 5.0


@dataclass(frozen=True, slots=True)
class Decision:
    """``retry`` is False when the event must be given up (dead-lettered)."""

    retry: bool
    countdown_s: float = 0.0
    reason: str = ""


def backoff_s(retries: int, settings: Settings, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, base * 2**retries)]."""
    ceiling = min(
        settings.retry_backoff_max_s,
        settings.max_countdown_s,
        settings.retry_backoff_s * (2 ** min(retries, 32)),
    )
    return (rng or random).uniform(0, ceiling)


def decide(
    error: BaseException,
    retries: int,
    settings: Settings,
    rng: random.Random | None = None,
) -> Decision:
    """What to do after ``error`` on an event that has been retried ``retries`` times."""
    if not isinstance(error, TransientError):
        status = error.status if isinstance(error, DeliveryError) else None
        return Decision(False, reason=f"permanent failure (status {status})")
    if isinstance(error, StorageUnavailable):
        # The package's Redis is away (a restart, a failover): the event waits on the broker,
        # never sent unthrottled, and is never given up for it; retried soon, for as long as
        # it takes, and spread so the pool does not come back in one instant.
        ceiling = min(STORAGE_RETRY_MAX_S, backoff_s(retries, settings, rng) + 0.5)
        countdown = (rng or random).uniform(0.5, max(0.5, ceiling))
        return Decision(True, min(countdown, settings.max_countdown_s), "package's Redis away")
    limit = (
        settings.profile_not_found_retries
        if isinstance(error, ProfileNotFound)
        else settings.max_retries
    )
    if retries >= limit:
        return Decision(False, reason=f"gave up after {retries} retries")
    if error.retry_after is not None:
        countdown = error.retry_after + (rng or random).uniform(0, RETRY_AFTER_JITTER_S)
        reason = f"server asked to wait {error.retry_after:g} s"
    elif isinstance(error, ProfileNotFound):
        countdown = PROFILE_RETRY_INTERVAL_S + (rng or random).uniform(0, 1.0)
        reason = "profile not visible yet (the server flushes profiles every 10 s)"
    else:
        countdown = backoff_s(retries, settings, rng)
        reason = "backoff"
    return Decision(True, min(countdown, settings.max_countdown_s), reason)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``retry-after`` header: delta-seconds or an HTTP date, at most
    :data:`MAX_RETRY_AFTER_S`; None when the value is neither (or NaN)."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))
