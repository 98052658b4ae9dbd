"""The ledger of delivered events: how a redelivered, retried or copied event is not sent twice.

The OpenPanel server stores every accepted request as a new event (no idempotency key), so the
sender must remember what it delivered. After a 2xx the worker writes the event id with a TTL
longer than the broker's visibility timeout; before sending, it checks for it.

Two copies of one event can also be in flight at once: the outbox's sweeper re-publishes a
message it could not find (``_outbox``), and in a rare race the original was only in transit.
So the check is a *claim* (``lua/claim.lua``, the same one round trip as a plain check): an
event not delivered is claimed for one attempt, for at most :meth:`Ledger.claim`'s ``ttl_s``;
a second copy meanwhile is told how long the claim still holds and comes back then. Delivery
replaces the claim by the delivered mark; a failed attempt releases it (``lua/release.lua``).

An event id is the caller's idempotency key when the caller passes one (``event_id=``; else
each ``.delay()`` draws a fresh one): a webhook that its sender retries for days is delivered
once if its id is derived from the sender's (``event_id=f"stripe:{event.id}"``) and its
``dedup_for`` covers the retries, since the mark of a default event lasts only the setting.

What remains is the window between the server's 2xx and the write of the mark: a worker killed
exactly there leaves its event to be sent again once. A mark that Redis refuses (full or
read-only, ``_redis.WRITE_REFUSALS``) is kept in the process and written again every
:data:`PENDING_MARK_RETRY_S` until Redis takes it, so the event's copies (its message, back
after the visibility timeout) find it; only a worker that stops first, or a copy that comes
before the mark, sends such an event again.

An event the server answered but did not store (a bot, a duplicate, the project's filters:
``_client.Dropped``) is finished too: it gets the same mark, so it is never sent again, and
its reason is counted per project in the same round trip (a pipeline: the counter lives in
another hash slot), for ``op-celery status`` (:meth:`Ledger.tallies`).

Keys (the prefix is ``OP_CELERY_KEY_PREFIX``)::

    <prefix>:{<event id>}:delivered   the mark, for OP_CELERY_LEDGER_TTL seconds (or the
                                      event's dedup_for, when longer)
    <prefix>:{<event id>}:inflight    the claim of one attempt (its token), for its ttl
    <prefix>:answers:<project>        hash: events the server did not store, by reason (bot,
                                      duplicate, filtered); kept, never expires

The event id in braces is a Redis Cluster hash tag: both keys of an event live in one slot, so
each script runs on a cluster (the ``Ledger`` refuses a prefix that would break that).

On a replicated Redis (Sentinel, a cluster's replicas) a failover can lose the last writes the
old master had not yet passed on: a mark lost so means one duplicate of that event, a claim lost
so means another copy may be sent while the first is in flight. Neither loses an event.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

from ._exceptions import ConfigurationError, StorageUnavailable
from ._lua import Script, bulk, encoded
from ._redis import is_cluster, redis_for, storage_errors, write_refusal
from ._settings import Settings

__all__ = ["TALLIED_REASONS", "Claim", "Ledger"]

log = logging.getLogger("op_celery")

#: Seconds between two attempts to write the delivered marks a refusing Redis did not take.
PENDING_MARK_RETRY_S = 0.5
#: Marks kept at most for that; past it the oldest is dropped (its event may be sent again).
MAX_PENDING_MARKS = 10_000

#: The reasons counted in ``<prefix>:answers:<project>`` (``_client.DropReason``), in order.
TALLIED_REASONS = ("bot", "duplicate", "filtered")


class _PendingMarks:
    """Delivered marks a Redis refusing writes did not take, written again by a daemon thread
    every :data:`PENDING_MARK_RETRY_S` until it takes them (the thread ends when none is left).
    """

    def __init__(self, write: Callable[[Sequence[str], Sequence[object]], object]) -> None:
        self._write = write
        #: delivered key -> (the script's keys, its arguments), oldest first.
        self._marks: dict[str, tuple[Sequence[str], Sequence[object]]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._marks)

    def keep(self, keys: Sequence[str], args: Sequence[object]) -> None:
        with self._lock:
            if len(self._marks) >= MAX_PENDING_MARKS:
                self._marks.pop(next(iter(self._marks)))
            self._marks[keys[0]] = (keys, args)
            if self._thread is None or not self._thread.is_alive():  # (or lost in a fork)
                self._thread = threading.Thread(
                    target=self._run, name="op-celery-marks", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        written = 0
        while True:
            time.sleep(PENDING_MARK_RETRY_S)
            with self._lock:
                items = list(self._marks.items())
                if not items:
                    self._thread = None
                    break
            for key, (keys, args) in items:
                try:
                    self._write(keys, args)
                except (redis.RedisError, RedisClusterException):
                    break  # still refused (or away): all of them wait for the next round
                written += 1
                with self._lock:
                    if self._marks.get(key) == (keys, args):
                        del self._marks[key]
        log.info("op_celery: %d delivered marks written once Redis took writes again", written)


@dataclass(frozen=True, slots=True)
class Claim:
    """The ledger's answer to :meth:`Ledger.claim`."""

    #: The event was delivered before: do not send it.
    delivered: bool
    #: The token of this attempt's claim; None when not claimed.
    token: str | None
    #: Seconds until another attempt's claim runs out, when it holds one; else 0.
    busy_s: float = 0.0

    @property
    def claimed(self) -> bool:
        return self.token is not None


class Ledger:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._redis = redis_for(settings)
        self._prefix = settings.key_prefix
        self._check_one_slot()
        self._ttl_s = int(settings.ledger_ttl_s)
        self._claim = Script(self._redis, "claim.lua")
        self._release = Script(self._redis, "release.lua")
        self._record = Script(self._redis, "delivered.lua")
        #: Where the delivered mark, run per event, goes as a packed command (not a cluster's).
        self._pool: Any = None if is_cluster(self._redis) else self._redis.connection_pool
        self._encoding = str(getattr(self._pool, "connection_kwargs", {}).get("encoding", "utf-8"))
        #: Marks a full or read-only Redis refused, written again once it takes writes.
        self._pending = _PendingMarks(lambda keys, args: self._record(keys, args))

    def keys(self, event_id: str) -> tuple[str, str]:
        """The event's delivered and in-flight keys, in one hash slot."""
        tag = f"{self._prefix}:{{{event_id}}}"
        return f"{tag}:delivered", f"{tag}:inflight"

    def _check_one_slot(self) -> None:
        """Refuse a key prefix whose braces would tear an event's keys apart on a cluster
        (``a{b`` or ``a{}b``: Redis hashes from the first ``{`` to the next ``}``)."""
        delivered, inflight = self.keys("0f3c2a1e-event")
        if key_slot(delivered.encode()) != key_slot(inflight.encode()):
            raise ConfigurationError(
                f"OP_CELERY_KEY_PREFIX {self._prefix!r} puts an event's ledger keys into two "
                "Redis Cluster slots: use a prefix with no braces, or one whole hash tag such "
                "as '{op-celery}'"
            )

    def delivered(self, event_id: str) -> bool:
        """Whether the event was already delivered; raises StorageUnavailable if unknown."""
        url = self._settings.redis_url
        with storage_errors("checking the delivered-events ledger", url, writes=False):
            return bool(self._redis.exists(self.keys(event_id)[0]))

    def claim(self, event_id: str, ttl_s: float) -> Claim:
        """Claim the event for one attempt to send it, for at most ``ttl_s`` seconds.

        Raises StorageUnavailable when Redis does not answer.
        """
        keys, args = self.claim_call(event_id, ttl_s)
        with storage_errors("checking the delivered-events ledger", self._settings.redis_url):
            answer = int(self._claim(keys, args))
        return self.claim_of(answer, args[0])

    def claim_call(self, event_id: str, ttl_s: float) -> tuple[tuple[str, str], tuple[str, int]]:
        """The KEYS and ARGV (a fresh token first) of ``lua/claim.lua`` for :meth:`claim`, for a
        script that includes it (``lua/slot_claim.lua``); read its answer with
        :meth:`claim_of`."""
        # 128 random bits, as a uuid4's, without building the UUID (this runs per event).
        return self.keys(event_id), (os.urandom(16).hex(), max(1, int(ttl_s * 1000)))

    @staticmethod
    def claim_of(answer: int, token: str) -> Claim:
        """``lua/claim.lua``'s answer to the attempt named ``token`` as a :class:`Claim`."""
        if answer == 0:
            return Claim(delivered=False, token=token)
        if answer < 0:
            return Claim(delivered=True, token=None)
        return Claim(delivered=False, token=None, busy_s=answer / 1000)

    def release(self, event_id: str, token: str) -> None:
        """Give up this attempt's claim (if it still holds), so a retry can claim again."""
        with storage_errors("releasing an event's claim", self._settings.redis_url):
            self._release(self.keys(event_id)[1:], (token,))

    def tally_key(self, project: str) -> str:
        """The hash counting the project's events the server did not store, by reason."""
        return f"{self._prefix}:answers:{project}"

    def record(
        self,
        event_id: str,
        outbox_keys: tuple[str, str] | None = None,
        *,
        dedup_for_s: int | None = None,
        tally: tuple[str, str] | None = None,
    ) -> None:
        """Remember a finished event for ``OP_CELERY_LEDGER_TTL`` seconds; its claim ends.

        ``dedup_for_s`` (the event's ``dedup_for``) remembers it longer, never shorter: the
        setting is what outlives the broker's redelivery of a message, so no call may go below.
        ``outbox_keys`` (the records hash and due set of the event's queue, when this Redis is
        the broker's) also forgets the event's outbox record, in the same round trip.
        ``tally`` ``(project, reason)`` counts an event the server did not store, in the same
        round trip too (pipelined: a cluster sends each command to its slot's node).
        """
        ttl_s = max(self._ttl_s, dedup_for_s or 0)
        if outbox_keys is not None and is_cluster(self._redis):
            outbox_keys = None  # no broker lives on a cluster: there is no record to forget
        keys = [*self.keys(event_id), *(outbox_keys or ())]
        args = (ttl_s, event_id)
        try:
            self._record_now(keys, args, tally)
        except StorageUnavailable as exc:
            if write_refusal(exc) is not None:  # full or read-only: written once it takes writes
                self._pending.keep(keys, args)
            raise

    def _record_now(
        self, keys: list[str], args: tuple[int, str], tally: tuple[str, str] | None
    ) -> None:
        with storage_errors("recording a delivered event", self._settings.redis_url):
            if tally is None:
                if self._pool is None:
                    self._record(keys, args)
                    return
                packed = b"".join(
                    (
                        self._record.packed_head(len(keys), len(args)),
                        *(bulk(encoded(item, self._encoding)) for item in (*keys, *args)),
                    )
                )
                self._record.call_packed(self._pool, packed, keys, args)
                return
            pipe = self._redis.pipeline(transaction=False)
            self._record(keys, args, client=pipe)
            pipe.hincrby(self.tally_key(tally[0]), tally[1], 1)
            # A failed count (a key of another type) is not worth failing the mark for.
            marked, _ = pipe.execute(raise_on_error=False)
            if isinstance(marked, redis.exceptions.NoScriptError):
                self._record(keys, args)  # Redis lost the script: loaded and run again
            elif isinstance(marked, Exception):
                raise marked

    def tallies(self, project: str) -> dict[str, int]:
        """The project's events the server did not store, by reason (every reason, 0 if none).

        Raises StorageUnavailable when Redis does not answer.
        """
        with storage_errors("reading the answers' counts", self._settings.redis_url):
            counts = self._redis.hgetall(self.tally_key(project))
        found = {k.decode() if isinstance(k, bytes) else str(k): int(v) for k, v in counts.items()}
        return {reason: found.get(reason, 0) for reason in TALLIED_REASONS}
