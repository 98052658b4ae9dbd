"""Dead letters: events given up for good, kept in Redis until replayed or purged.

An event lands here when the API refuses it (400, 401, 403, alias unsupported), when its
retries are used up, or when its message is not a valid event (poison). A dead letter holds the
task's keyword arguments (never the client secret: messages don't carry it), the project, the
error, the attempt count and the times. ``replay`` re-enqueues with the same event id, so an
event that was delivered after all is not sent twice, and removes each dead letter as it goes,
so running it twice enqueues nothing twice.

Storage: one Redis hash (id → JSON) and one sorted set (id by time) under ``OP_CELERY_KEY_PREFIX``.
Filters run in the client, which is fine for thousands of dead letters, not for millions.

``purge`` removes the events for good: it tells :data:`purge_listeners` which dead letters went,
and the Celery layer (``_consumer``) forgets their outbox records there, so that no sweeper
brings back an event whose record was left behind (a refusal, a record a worker failed to
delete).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from ._redis import behind_sentinel, is_cluster, redis_for, storage_errors
from ._settings import Settings, load_settings

__all__ = ["DeadLetter", "DeadLetterStore"]

log = logging.getLogger("op_celery")

#: Dead letters read from Redis per round trip.
SCAN_BATCH = 500
#: Characters of an undecodable message's body kept in its dead letter.
MAX_RAW_CHARS = 4096
#: Milliseconds an add waits, behind Sentinel, for a replica to have the letter (Redis WAIT);
#: past it the letter is kept on the master alone, as without the wait.
REPLICA_WAIT_MS = 100
#: Seconds the adds do not wait after one found no replica to wait for (one down or syncing):
#: a storm of dead letters must not cost each of them the whole wait.
NO_REPLICA_BACKOFF_S = 10.0


#: Called with the settings and the dead letters of each purge, after they were deleted.
purge_listeners: list[Callable[[Settings, list[DeadLetter]], object]] = []


@dataclass(frozen=True)
class DeadLetter:
    """One event given up for good."""

    id: str
    operation: str
    project: str
    kwargs: dict[str, Any]
    error: str
    error_type: str
    status: int | None
    attempts: int
    failed_at: float
    first_failed_at: float
    replayable: bool = True
    replays: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def event_id(self) -> str | None:
        """The event's id: the dead letter's, or for a message that was no valid event
        (``add_raw``), the one its body carried (if any)."""
        if self.operation != "unknown":
            return self.id
        event_id = self.extra.get("event_id")
        return event_id if isinstance(event_id, str) else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> DeadLetter:
        return cls(**json.loads(raw))


class DeadLetterStore:
    """The dead letters of one Redis namespace."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings or load_settings()
        self._redis = redis_for(self._settings)
        # The hash and its time index change together (one MULTI), so on a Redis Cluster they
        # share a hash tag. On one server the names stay as they always were, so an upgrade
        # keeps the dead letters already stored.
        name = "{dead-letters}" if is_cluster(self._redis) else "dead-letters"
        self._hash = f"{self._settings.key_prefix}:{name}"
        self._index = f"{self._settings.key_prefix}:{name}:by-time"
        # Behind Sentinel, a failover promotes a replica without waiting for it to catch up,
        # so a letter written just before would be lost with the old master: each add waits
        # (up to REPLICA_WAIT_MS) until a replica has it, unless none answered lately. Letters
        # are rare; events are not, and the ledger's marks do not wait (a lost mark costs a
        # duplicate, not an event).
        self._wait_for_replica = behind_sentinel(self._settings)
        self._no_replica_until = 0.0

    def _errors(self, what: str, *, writes: bool = True) -> Any:
        return storage_errors(what, self._settings.redis_url, writes=writes)

    def add(self, letter: DeadLetter) -> None:
        """Store a dead letter (replacing one with the same id, keeping its first time)."""
        with self._errors("storing a dead letter"):
            old = self._redis.hget(self._hash, letter.id)
            if old is not None:
                previous = DeadLetter.from_json(old)
                letter = DeadLetter(
                    **{
                        **asdict(letter),
                        "first_failed_at": previous.first_failed_at,
                        "replays": previous.replays,
                    }
                )
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(self._hash, letter.id, letter.to_json())
            pipe.zadd(self._index, {letter.id: letter.failed_at})
            pipe.execute()
            waits = self._wait_for_replica and time.monotonic() >= self._no_replica_until
            if waits and not self._redis.wait(1, REPLICA_WAIT_MS):
                self._no_replica_until = time.monotonic() + NO_REPLICA_BACKOFF_S

    def add_raw(self, body: bytes | str, reason: str, *, extra: dict[str, Any]) -> DeadLetter:
        """Store a message that is not a valid event at all (it cannot be replayed)."""
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
        now = time.time()
        letter = DeadLetter(
            id=f"raw-{time.time_ns():x}",
            operation="unknown",
            project=str(extra.get("project", "unknown")),
            kwargs={"raw": text[:MAX_RAW_CHARS]},
            error=reason,
            error_type="PoisonMessage",
            status=None,
            attempts=1,
            failed_at=now,
            first_failed_at=now,
            replayable=False,
            extra=extra,
        )
        self.add(letter)
        return letter

    def __len__(self) -> int:
        with self._errors("counting dead letters", writes=False):
            return int(self._redis.hlen(self._hash))

    def get(self, letter_id: str) -> DeadLetter | None:
        with self._errors("reading a dead letter", writes=False):
            raw = self._redis.hget(self._hash, letter_id)
        return None if raw is None else DeadLetter.from_json(raw)

    def __iter__(self) -> Iterator[DeadLetter]:
        return self.list()

    def list(
        self, project: str | None = None, error: str | None = None, limit: int | None = None
    ) -> Iterator[DeadLetter]:
        """Dead letters, oldest first; ``error`` matches the error type or a word of the text."""
        seen = 0
        start = 0
        while limit is None or seen < limit:
            with self._errors("listing dead letters", writes=False):
                ids = cast(
                    "list[bytes]", self._redis.zrange(self._index, start, start + SCAN_BATCH - 1)
                )
                if not ids:
                    return
                raws = self._redis.hmget(self._hash, ids)
            start += SCAN_BATCH
            for raw in raws:
                if raw is None:
                    continue
                letter = DeadLetter.from_json(raw)
                if _matches(letter, project, error):
                    yield letter
                    seen += 1
                    if limit is not None and seen >= limit:
                        return

    def take(self, letter_id: str) -> DeadLetter | None:
        """Remove and return one dead letter; None if another replay took it first."""
        with self._errors("taking a dead letter"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.hget(self._hash, letter_id)
            pipe.hdel(self._hash, letter_id)
            pipe.zrem(self._index, letter_id)
            raw, deleted, _ = pipe.execute()
        return DeadLetter.from_json(raw) if raw is not None and deleted else None

    def replay(
        self,
        project: str | None = None,
        error: str | None = None,
        *,
        publish: Callable[[DeadLetter], object],
        progress: Callable[[DeadLetter], None] | None = None,
    ) -> int:
        """Re-enqueue matching replayable dead letters; returns how many were enqueued.

        Each dead letter is removed before it is published and put back if publishing fails,
        so two replays running at once never enqueue the same one twice. ``publish`` enqueues
        one dead letter (the Celery layer's is ``op_celery._enqueue.publish_dead_letter``).
        """
        count = 0
        for letter in list(self.list(project, error)):
            if not letter.replayable:
                continue
            taken = self.take(letter.id)
            if taken is None:
                continue
            try:
                publish(taken)
            except BaseException:
                self.add(taken)
                raise
            count += 1
            if progress is not None:
                progress(taken)
        return count

    def purge(self, project: str | None = None, error: str | None = None) -> int:
        """Delete matching dead letters, and tell :data:`purge_listeners`; returns how many."""
        letters = list(self.list(project, error))
        removed = self.delete(letter.id for letter in letters)
        for listener in list(purge_listeners):
            try:
                listener(self._settings, letters)
            except Exception as exc:  # the dead letters are gone either way
                log.warning("op_celery: after purging dead letters, %r failed: %s", listener, exc)
        return removed

    def delete(self, ids: Iterable[str]) -> int:
        removed = 0
        batch = list(ids)
        for i in range(0, len(batch), SCAN_BATCH):
            chunk = batch[i : i + SCAN_BATCH]
            with self._errors("deleting dead letters"):
                pipe = self._redis.pipeline(transaction=True)
                pipe.hdel(self._hash, *chunk)
                pipe.zrem(self._index, *chunk)
                deleted, _ = pipe.execute()
            removed += int(deleted)
        return removed


def _matches(letter: DeadLetter, project: str | None, error: str | None) -> bool:
    if project is not None and letter.project != project:
        return False
    if error is None:
        return True
    needle = error.lower()
    return (
        needle == letter.error_type.lower()
        or needle == str(letter.status)
        or needle in letter.error.lower()
    )
