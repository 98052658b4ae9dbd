"""The ledger of delivered events: how a redelivered or retried event is not sent twice.

The OpenPanel server stores every accepted request as a new event (no idempotency key), so the
sender must remember what it delivered. After a 2xx the worker writes the event id with a TTL
longer than the broker's visibility timeout; before sending, it checks for it. What remains is
the window between the server's 2xx and the write (a crash exactly there re-sends once).
"""

from __future__ import annotations

from ._redis import redis_for, storage_errors
from ._settings import Settings

__all__ = ["Ledger"]


class Ledger:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._redis = redis_for(settings)
        self._prefix = f"{settings.key_prefix}:delivered:"
        self._ttl_s = int(settings.ledger_ttl_s)

    def delivered(self, event_id: str) -> bool:
        """Whether the event was already delivered; raises StorageUnavailable if unknown."""
        with storage_errors("checking the delivered-events ledger", self._settings.redis_url):
            return bool(self._redis.exists(self._prefix + event_id))

    def record(self, event_id: str) -> None:
        """Remember a delivered event for ``OP_CELERY_LEDGER_TTL`` seconds."""
        with storage_errors("recording a delivered event", self._settings.redis_url):
            self._redis.set(self._prefix + event_id, b"1", ex=self._ttl_s)
