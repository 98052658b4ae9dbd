"""Redis clients of the worker side (ledger, dead letters), and the one mapping of their errors.

One client per URL and process: redis-py's pool notices a ``fork()`` and reconnects, and its
connections are safe to share between the threads of a thread-pool worker.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from ._embedded import embedded_redis
from ._exceptions import ConfigurationError, StorageUnavailable
from ._settings import EMBEDDED_URL, Settings, redact_url

__all__ = ["redact_url", "redis_for", "storage_errors"]  # redact_url: from _settings

#: Seconds to wait for Redis before calling it unavailable; short, so a task fails fast to retry.
REDIS_TIMEOUT_S = 5.0

_clients: dict[str, redis.Redis] = {}
_lock = threading.Lock()


def redis_for(settings: Settings) -> redis.Redis:
    """The client for ``settings.redis_url`` (``OP_CELERY_REDIS_URL``, else a Redis broker)."""
    url = settings.redis_url
    if url is None:
        raise ConfigurationError(
            "op-celery needs a Redis for its ledger, dead letters and limiter: set "
            "OP_CELERY_REDIS_URL (the broker is not Redis)"
        )
    client = _clients.get(url)
    if client is None:
        with _lock:
            client = _clients.get(url)
            if client is None:
                options: dict[str, Any] = {
                    "socket_timeout": REDIS_TIMEOUT_S,
                    "socket_connect_timeout": REDIS_TIMEOUT_S,
                    "health_check_interval": 30,
                }
                if url == EMBEDDED_URL:
                    client = redis.Redis(unix_socket_path=embedded_redis(), **options)
                else:
                    client = redis.Redis.from_url(url, **options)
                _clients[url] = client
    return client


@contextmanager
def storage_errors(what: str, url: str | None) -> Iterator[None]:
    """Turn redis-py's errors into :class:`StorageUnavailable`, never showing a password."""
    try:
        yield
    except redis.RedisError as exc:
        where = redact_url(url) if url else "Redis"
        raise StorageUnavailable(
            f"{what}: {where} did not answer ({type(exc).__name__}); the event will be retried. "
            "Check that Redis runs and OP_CELERY_REDIS_URL is right"
        ) from exc
