"""The workers' side of the demo: :mod:`op_celery.signals` receivers that count deliveries,
retries (by reason), 429s, limiter waits and dead letters in one Redis hash, and the rate held."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from .. import signals
from .._app import settings_for
from .._exceptions import OpenPanelError
from .._redis import redis_for
from .._settings import Settings

__all__ = [
    "COUNTERS_ENV",
    "Counts",
    "busiest_span",
    "counters_key",
    "install_counters",
    "times_key",
]

#: Environment variable that makes a worker importing this module count events in Redis.
COUNTERS_ENV = "OP_CELERY_DEMO_COUNTERS"
#: Faults injected into the stand-in: two 503s, then one 429 asking to wait 1 s.


def counters_key(settings: Settings) -> str:
    return f"{settings.key_prefix}:demo:counters"


def times_key(settings: Settings) -> str:
    return f"{settings.key_prefix}:demo:delivered-at"


def _bump(sender: Any, *fields: str, sent_at: float | None = None) -> None:
    try:
        settings = settings_for(sender.app)
        key = counters_key(settings)
        pipe = redis_for(settings).pipeline(transaction=False)
        for name in fields:
            pipe.hincrby(key, name, 1)
        if sent_at is not None:
            pipe.rpush(times_key(settings), repr(sent_at))
        pipe.execute()
    except (OpenPanelError, redis.RedisError):
        pass  # counting is the demo's business; delivery goes on


def _on_delivered(sender: Any, latency_s: float | None = None, **_: Any) -> None:
    # When the request left: the limiter admitted it just before, so this is what it spaced.
    _bump(sender, "delivered", sent_at=time.time() - (latency_s or 0.0))


def _on_retried(sender: Any, reason: str = "", **_: Any) -> None:
    fields = [f"retried:{reason or 'unknown'}"]
    if reason == "RateLimited":
        fields.append("throttled_429")
    _bump(sender, *fields)


def _on_throttled(sender: Any, **_: Any) -> None:
    _bump(sender, "limiter_waits")


def _on_dead_lettered(sender: Any, **_: Any) -> None:
    _bump(sender, "dead")


def install_counters() -> None:
    """Count what happens to events in Redis (the demo's workers do it at import)."""
    for sig, receiver in (
        (signals.event_delivered, _on_delivered),
        (signals.event_retried, _on_retried),
        (signals.event_throttled, _on_throttled),
        (signals.event_dead_lettered, _on_dead_lettered),
    ):
        sig.connect(receiver, weak=False, dispatch_uid=f"op-celery-demo:{receiver.__name__}")


@dataclass(frozen=True)
class Counts:
    delivered: int = 0
    dead: int = 0
    retried_by_reason: dict[str, int] = field(default_factory=dict)
    throttled_429: int = 0
    limiter_waits: int = 0

    @classmethod
    def read(cls, client: redis.Redis, key: str) -> Counts:
        raw = cast("dict[bytes, bytes]", client.hgetall(key))
        values = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            delivered=int(values.get("delivered", 0)),
            dead=int(values.get("dead", 0)),
            retried_by_reason={
                k.split(":", 1)[1]: int(v) for k, v in values.items() if k.startswith("retried:")
            },
            throttled_429=int(values.get("throttled_429", 0)),
            limiter_waits=int(values.get("limiter_waits", 0)),
        )


def busiest_span(times: list[float], span_s: float) -> int:
    """The most of ``times`` that fall in any half-open span ``[t, t + span_s)``."""
    ordered = sorted(times)
    best = start = 0
    for end, moment in enumerate(ordered):
        while ordered[start] <= moment - span_s:
            start += 1
        best = max(best, end - start + 1)
    return best
