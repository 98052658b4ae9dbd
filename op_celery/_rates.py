"""Rates in Celery's notation, and the burst that goes with them.

A rate is ``"<limit>/<period>"``: ``"50/s"``, ``"3000/m"``, ``"100/h"`` as in Celery's
``rate_limit``, and also a period with a count, ``"100/10s"``, ``"5/500ms"``, ``"20/2m"``. A bare
number (``"50"``) means per second, as in Celery. The limit is a whole number of requests; write
``"1/2s"`` rather than ``"0.5/s"``.

The burst is how many requests the limiter admits at once after it has been idle; in any span
of one period it admits at most ``limit + burst - 1``. The default, :data:`DEFAULT_BURST`, is 1:
the tasks reserve their slot (see :mod:`op_celery._limiter`), so no slack is needed to keep the
schedule, and a server that counts ``limit`` per fixed window is never sent more as admitted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._exceptions import ConfigurationError

__all__ = [
    "BURST_SETTING",
    "DEFAULT_BURST",
    "RATE_SETTING",
    "Rate",
    "parse_burst",
    "parse_rate",
    "with_headroom",
]

#: The setting a rate string comes from, named in error messages.
RATE_SETTING = "OPENPANEL_RATE_LIMIT"
#: The setting a burst comes from, named in error messages.
BURST_SETTING = "OPENPANEL_RATE_BURST"
#: Requests admitted at once after idling, by default: 2, one request of slack for late wake-ups.
DEFAULT_BURST = 1

#: Seconds per period unit.
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"(?P<limit>\d+)(?:/(?P<count>\d+)?(?P<unit>ms|s|m|h))?", re.ASCII)
_ACCEPTED_FORMS = (
    '"<limit>/<unit>" or "<limit>/<count><unit>" with a whole, positive limit and unit '
    'ms, s, m or h, e.g. "50/s", "3000/m", "100/h", "100/10s", "5/500ms"'
)


@dataclass(frozen=True, slots=True)
class Rate:
    """``limit`` requests per ``period_s`` seconds."""

    limit: int
    period_s: float

    def __post_init__(self) -> None:
        if self.limit < 1 or not self.period_s > 0:
            raise ValueError(f"a rate needs limit >= 1 and period_s > 0, got {self!r}")

    @property
    def per_second(self) -> float:
        """The sustained rate in requests per second."""
        return self.limit / self.period_s

    def __str__(self) -> str:
        for unit in ("h", "m", "s"):
            count, rest = divmod(self.period_s, _UNIT_SECONDS[unit])
            if rest == 0:
                return f"{self.limit}/{'' if count == 1 else int(count)}{unit}"
        return f"{self.limit}/{round(self.period_s * 1000)}ms"


def parse_rate(text: str, *, setting: str = RATE_SETTING) -> Rate:
    """Parse ``text`` such as ``"50/s"`` or ``"100/10s"`` into a :class:`Rate`.

    Raises :class:`ConfigurationError` naming ``setting`` and the accepted forms when
    ``text`` is none of them.
    """
    match = _RATE.fullmatch(text.strip().replace(" ", "")) if isinstance(text, str) else None
    if match is None:
        raise ConfigurationError(f"{setting}={text!r} is not a rate; use {_ACCEPTED_FORMS}")
    limit = int(match["limit"])
    count = int(match["count"] or 1)
    if limit == 0 or count == 0:
        raise ConfigurationError(
            f"{setting}={text!r} allows nothing; the limit and period must be positive, "
            f"use {_ACCEPTED_FORMS}"
        )
    return Rate(limit=limit, period_s=count * _UNIT_SECONDS[match["unit"] or "s"])


def parse_burst(value: str | int, *, setting: str = BURST_SETTING) -> int:
    """Parse a burst: a whole number of requests, at least 1.

    Raises :class:`ConfigurationError` naming ``setting`` otherwise.
    """
    text = str(value).strip()
    if isinstance(value, bool) or not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ConfigurationError(
            f"{setting}={value!r} is not a burst; use a whole number of requests, at least 1 "
            f"(default {DEFAULT_BURST})"
        )
    return int(text)


def with_headroom(rate: Rate, headroom_pct: float) -> Rate:
    """``rate`` slowed by ``headroom_pct`` percent, so that a few milliseconds of network jitter
    cannot put ``limit + 1`` requests into one window of a server that allows ``limit``.

    Measured against a fixed-window stand-in at 50/s (benchmarks/RESULTS.md): paced at exactly
    the limit, jitter drew a 429 about every 2 s and each one paused the pool for its
    ``retry-after``, holding 63-71 % of the limit; paced 1 % below, 99 % with no 429.
    """
    if headroom_pct <= 0:
        return rate
    # Whole numbers keep Rate exact: "50/s" with 1 % becomes 4950 per 100 s.
    scale = 10_000
    kept = round(scale * (100 - headroom_pct) / 100)
    return Rate(limit=rate.limit * kept, period_s=rate.period_s * scale)
