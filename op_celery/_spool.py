"""The local spool: where ``.delay()`` puts an event when the broker does not answer.

A web request must not wait on a broker outage, and the event must not be dropped. So after
the publish retries (bounded by ``OP_CELERY_PUBLISH_TIMEOUT``) the message is written to a
file in ``OP_CELERY_SPOOL_DIR``, one file per event, and a background thread of the process
re-publishes the spool once the broker answers again (``op-celery spool flush`` does it by
hand). Files are claimed by an atomic rename before they are published, so two processes
flushing one spool never publish a file twice.

The spool holds the task's keyword arguments, as the message would: never a secret.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._process import pid_alive

__all__ = ["Spool", "default_spool_dir"]

log = logging.getLogger("op_celery")

#: Seconds between two attempts of the background flusher while the spool is not empty.
FLUSH_INTERVAL_S = 5.0
_SUFFIX = ".json"
_CLAIMED = ".claimed"


def default_spool_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "op-celery" / "spool"


class Spool:
    """One spool directory."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self._flusher: threading.Thread | None = None
        self._lock = threading.Lock()

    def write(self, task_name: str, kwargs: dict[str, Any], options: dict[str, Any]) -> Path:
        """Store one message durably (written to a temporary name, fsynced, renamed)."""
        # Events hold personal data (emails, IPs): only the process's user may read them,
        # whatever the umask. An existing directory is narrowed too.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.directory.stat().st_mode & 0o077:
            os.chmod(self.directory, 0o700)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        final = self.directory / (name + _SUFFIX)
        temporary = self.directory / (name + ".tmp")
        record = {"task": task_name, "kwargs": kwargs, "options": options}
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(descriptor, "w", encoding="utf-8") as handle:
            json.dump(record, handle, separators=(",", ":"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        return final

    def pending(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob("*" + _SUFFIX))

    def __len__(self) -> int:
        return len(self.pending())

    def recover_stale_claims(self) -> None:
        """Put back files claimed by a process that died while flushing."""
        if not self.directory.is_dir():
            return
        for claimed in self.directory.glob(f"*{_SUFFIX}{_CLAIMED}-*"):
            pid = int(claimed.name.rsplit("-", 1)[1])
            if pid == os.getpid() or pid_alive(pid):
                continue
            original = claimed.with_name(claimed.name.split(_CLAIMED)[0])
            try:
                os.rename(claimed, original)
            except FileNotFoundError:
                continue

    def flush(
        self,
        publish: Callable[[str, dict[str, Any], dict[str, Any]], object],
        progress: Callable[[], None] | None = None,
    ) -> int:
        """Publish every spooled message, oldest first; the first failure stops and raises.

        Returns how many were published (and removed).
        """
        if not self.directory.is_dir():
            return 0
        self.recover_stale_claims()
        published = 0
        for path in self.pending():
            claimed = path.with_name(f"{path.name}{_CLAIMED}-{os.getpid()}")
            try:
                os.rename(path, claimed)  # atomic: only one flusher wins the file
            except FileNotFoundError:
                continue
            try:
                record = json.loads(claimed.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                log.error("op_celery: unreadable spool file %s left aside", claimed)
                continue
            try:
                publish(record["task"], record["kwargs"], record.get("options") or {})
            except BaseException:
                os.rename(claimed, path)
                raise
            claimed.unlink()
            published += 1
            if progress is not None:
                progress()
        return published

    def start_flusher(
        self, publish: Callable[[str, dict[str, Any], dict[str, Any]], object]
    ) -> None:
        """Flush in a daemon thread every few seconds until the spool is empty."""
        with self._lock:
            if self._flusher is not None and self._flusher.is_alive():
                return
            self._flusher = threading.Thread(
                target=self._flush_until_empty, args=(publish,), name="op-celery-spool",
                daemon=True,
            )  # fmt: skip
            self._flusher.start()

    def _flush_until_empty(
        self, publish: Callable[[str, dict[str, Any], dict[str, Any]], object]
    ) -> None:
        while self.pending():
            time.sleep(FLUSH_INTERVAL_S)
            try:
                count = self.flush(publish)
            except Exception as exc:  # the broker is still away: try again later
                log.info("op_celery: spool not flushed yet (%s)", type(exc).__name__)
                continue
            if count:
                log.warning("op_celery: re-published %d spooled events", count)
