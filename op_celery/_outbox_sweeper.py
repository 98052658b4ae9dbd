"""The outbox sweeper: finds the events the broker lost, and publishes them again.

One per worker process (``_startup``), one at a time per queue across them all (under a lock):
every half grace period it picks the records due (``lua/outbox_sweep.lua``), reads in one
``MULTI`` every message on the queue's lists and in kombu's ``unacked`` hash, and judges each
record whose message is in neither: looked at again ``CONFIRM_DELAY_S`` later, then published
again if a loss could explain it (``_outbox_liveness``), or forgotten ``SETTLE_S`` after its
first miss if none could (the message was removed on purpose). The whole design, its costs and
its limits are in ``_outbox``'s docstring; the records and their writer are there too.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from . import _compat
from ._lua import Script
from ._outbox import BROKER_ERRORS, broker_refusals, close_quietly, outbox_keys
from ._outbox_liveness import ALIVE_TTL_S, Losses, losses
from ._redis import write_refusal
from ._settings import redact_url

__all__ = ["SweepResult", "Sweeper"]

log = logging.getLogger("op_celery")

#: Records the sweeper looks at per pass.
MAX_RECORDS_PER_SWEEP = 500
#: Messages (queue lists plus unacked) the sweeper reads at most in one look: for each
#: ``track`` message, about 2 µs of Redis time, 13 µs of the sweeper's CPU and 1.8 KB sent
#: (``benchmarks/outbox_sweep.py``), so about 10 ms, 65 ms and 9 MB a look at most.
MAX_SCAN_MESSAGES = 5_000
#: Seconds between finding a record's message nowhere and looking again before publishing it:
#: a message a worker has popped but not yet recorded as unacked (its BRPOP reply still in the
#: socket of a busy worker) is in that state for milliseconds, a lost one for good.
CONFIRM_DELAY_S = 1.0
#: Seconds a record whose message is nowhere waits, when no loss is known, before the sweeper
#: judges its message removed on purpose (purged, expired, revoked, refused by a worker)
#: rather than lost: long enough for a consumer that died holding it to be found dead.
SETTLE_S = ALIVE_TTL_S + CONFIRM_DELAY_S + 3.0
#: Seconds a missing hash lives after its last write (entries of records a worker deleted
#: while they were being judged go with it).
MISSING_TTL_S = 24 * 3600
#: Per queue, with the broker's key prefix in front (as ``_outbox``'s keys): the sweep lock, and
#: the records whose message was found nowhere, not judged yet (event id ->
#: "<last seen> <first missed>").
LOCK_KEY = "_op_celery.outbox_sweeping.{queue}"
MISSING_KEY = "_op_celery.outbox_missing.{queue}"


@dataclass(frozen=True, slots=True)
class SweepResult:
    """What one pass of the sweeper did."""

    #: False when another worker holds the sweep lock, so this pass did nothing.
    swept: bool = False
    #: Messages on the lists and in unacked, when too many to scan; else 0.
    too_busy: int = 0
    #: Records whose message was nowhere and a loss could explain it.
    lost: int = 0
    #: Of those, published again (the others were delivered already, or failed to publish).
    republished: int = 0
    #: Records whose message was nowhere with no loss to explain it: removed on purpose
    #: (purged, expired, revoked, refused by a worker), so the records were forgotten.
    removed: int = 0
    #: Records whose message was nowhere, not judged yet (looked at again SETTLE_S later).
    pending: int = 0

    def __add__(self, other: SweepResult) -> SweepResult:
        return SweepResult(
            swept=self.swept or other.swept,
            too_busy=self.too_busy + other.too_busy,
            lost=self.lost + other.lost,
            republished=self.republished + other.republished,
            removed=self.removed + other.removed,
            pending=self.pending + other.pending,
        )


def _where(connection: Any) -> str:
    """The redacted URL of a kombu connection (of the sweeper: None until it connects)."""
    return redact_url(connection.as_uri()) if connection is not None else "(not connected)"


class Sweeper:
    """Finds the events the broker lost and publishes them again, every ``grace_s / 2``.

    ``grace_s`` is how old a record gets before it is looked at (``OP_CELERY_OUTBOX_GRACE``).

    ``republish(task, kwargs, task_id, queue)`` publishes one call again; ``delivered(event_id)``
    asks the ledger. ``connect()`` returns a kombu connection to the broker (a Redis one).
    """

    def __init__(
        self,
        grace_s: float,
        connect: Callable[[], Any],
        queues: Callable[[], Iterable[str]],
        republish: Callable[[str, dict[str, Any], str, str], object],
        delivered: Callable[[str], bool],
    ) -> None:
        self.grace_s = grace_s
        self._connect = connect
        self._queues = queues
        self._republish = republish
        self._delivered = delivered
        self._token = uuid.uuid4().hex
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def interval_s(self) -> float:
        return max(0.5, self.grace_s / 2)

    def start(self) -> None:
        """Sweep in a daemon thread until :meth:`stop`."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="op-celery-outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        connection = None
        while not self._stop.wait(self.interval_s):
            try:
                if connection is None:
                    connection = self._connect()
                self.sweep(connection)
                broker_refusals().accepted(_where(connection))
            except BROKER_ERRORS as exc:
                state = write_refusal(exc)
                if state is not None:  # full or read-only: said once, not every pass
                    broker_refusals().refused(state, _where(connection))
                else:
                    log.warning("op_celery: outbox sweep skipped, the broker did not answer: %s",
                                exc)  # fmt: skip
                if connection is not None:
                    close_quietly(connection)
                    connection = None
            except Exception:  # a bug must not end the thread that keeps events from being lost
                log.exception("op_celery: outbox sweep failed")

    def sweep(self, connection: Any) -> SweepResult:
        """One pass over each queue, on ``connection`` (a kombu connection to the Redis broker)."""
        total = SweepResult()
        if not self._supported():
            return total
        channel = connection.default_channel
        known = losses(_compat.redis_client(channel), _compat.redis_key_prefix(channel))
        for queue in dict.fromkeys(self._queues()):
            total += self.sweep_queue(connection, queue, known)
        return total

    @staticmethod
    def _supported() -> bool:
        support = _compat.redis_channel_support()
        if not support.ok:
            _compat.step_aside(
                "the outbox sweeper", support.reason, "lost events are not published again"
            )
        return support.ok

    def sweep_queue(self, connection: Any, queue: str, known: Losses | None = None) -> SweepResult:
        """One pass over the records of ``queue``; ``known``: the possible losses as this pass
        found them (looked up here if not given)."""
        if not self._supported():
            return SweepResult()
        channel = connection.default_channel
        # A plain client on kombu's pool, and key names with the broker's prefix in front.
        prefix = _compat.redis_key_prefix(channel)
        client = _compat.redis_client(channel)
        # Held until just before this sweeper's next pass: another one sweeps if it stops.
        lock, hold_ms = prefix + LOCK_KEY.format(queue=queue), max(1, int(self.interval_s * 900))
        if not client.set(lock, self._token, nx=True, px=hold_ms):
            if client.get(lock) != self._token.encode():
                return SweepResult()
            client.pexpire(lock, hold_ms)
        if known is None:
            known = losses(client, prefix)
        lists, unacked = _compat.redis_message_keys(channel, queue)
        records_key, due_key = outbox_keys(queue, prefix)
        missing_key = prefix + MISSING_KEY.format(queue=queue)
        answer = Script(client, "outbox_sweep.lua")(
            [records_key, due_key, missing_key, unacked, *lists],
            [MAX_RECORDS_PER_SWEEP, MAX_SCAN_MESSAGES],
        )
        status = int(answer[0])
        if status == 0:
            return SweepResult(swept=True)
        if status < 0:
            log.info(
                "op_celery: %d messages queued or unacked, more than the outbox sweeper reads "
                "(%d); it looks for lost events of queue %r again once the backlog is smaller",
                int(answer[1]),
                MAX_SCAN_MESSAGES,
                queue,
            )
            return SweepResult(swept=True, too_busy=int(answer[1]))
        picked_at = float(answer[2])
        due = {
            pick.record.event_id: pick
            for pick in (_Picked.parse(answer[i : i + 3], self.grace_s, picked_at)
                         for i in range(3, len(answer), 3))
        }  # fmt: skip
        _, present = _look(client, lists, unacked)
        if present is None:
            return SweepResult(swept=True)
        judged = _Judged(picked_at + self.grace_s)
        judged.seen = [i for i, pick in due.items() if pick.task_id in present]
        suspects = [i for i, pick in due.items() if pick.task_id not in present]
        if not suspects:
            judged.write(client, records_key, due_key, missing_key)
            return SweepResult(swept=True)
        # Look again a moment later, at the records too, and judge only what is still
        # nowhere (a record a worker has deleted meanwhile is finished).
        time.sleep(CONFIRM_DELAY_S)
        raws, present = _look(client, lists, unacked, records_key, suspects)
        if present is None:
            return SweepResult(swept=True)
        current = [_Record.parse(raw) for raw in raws if raw is not None]
        lost: list[_Record] = []
        removed: list[str] = []
        for record in current:
            pick = due[record.event_id]
            if record.task_id in present:
                judged.seen.append(record.event_id)
            elif known.may_have_lost(pick.last_seen):
                lost.append(record)
            elif known.now - pick.first_missed >= SETTLE_S:
                removed.append(record.event_id)
            else:
                judged.pending.append(pick)
        judged.forget += removed
        republished = 0
        for record in lost:
            if self._delivered(record.event_id):
                judged.forget.append(record.event_id)
                continue
            try:
                self._republish(record.task, record.kwargs, record.task_id, queue)
            except Exception as exc:  # kept, and looked at again after the grace period
                log.warning(
                    "op_celery: event %s was lost by the broker and could not be published "
                    "again yet (%s); the outbox keeps it",
                    record.event_id,
                    exc,
                )
                judged.pending.append(due[record.event_id])
                continue
            judged.seen.append(record.event_id)  # its new message is on the queue
            republished += 1
            log.warning(
                "op_celery: event %s was lost by the broker (taken off the queue, never "
                "recorded as unacked); published again from the outbox",
                record.event_id,
            )
        if removed:
            log.info(
                "op_celery: %d events of queue %r left the broker unfinished, and no worker "
                "crash, reconnection or Redis restart could have lost them: they were removed "
                "on purpose (purged, or ended by a worker without a delivery: expired, "
                "revoked, refused, failed); the outbox forgets them (first: %s)",
                len(removed),
                queue,
                ", ".join(removed[:3]),
            )
        judged.write(client, records_key, due_key, missing_key)
        return SweepResult(
            swept=True,
            lost=len(lost),
            republished=republished,
            removed=len(removed),
            pending=len(judged.pending),
        )


@dataclass(frozen=True, slots=True)
class _Record:
    """One outbox record, decoded."""

    event_id: str
    task_id: str
    task: str
    kwargs: dict[str, Any]

    @classmethod
    def parse(cls, raw: bytes | str) -> _Record:
        record = json.loads(raw)
        kwargs = record["kwargs"]
        return cls(str(kwargs.get("event_id")), str(record["id"]), str(record["task"]), kwargs)


@dataclass(frozen=True, slots=True)
class _Picked:
    """A record the sweep script picked, with what is known of its message's whereabouts."""

    record: _Record
    #: When its message was last seen present (Redis time; for a new record, its writer's).
    last_seen: float
    #: When its message was first found nowhere (or the time of this pick).
    first_missed: float
    #: Whether its message had been found nowhere before (a missing entry).
    missed: bool

    @property
    def task_id(self) -> str:
        return self.record.task_id

    @classmethod
    def parse(cls, part: list[Any], grace_s: float, picked_at: float) -> _Picked:
        raw, due_at, missing = part
        if missing:
            last_seen, first_missed = (float(x) for x in _text(missing).split())
            return cls(_Record.parse(raw), last_seen, first_missed, True)
        return cls(_Record.parse(raw), float(due_at) - grace_s, picked_at, False)


@dataclass
class _Judged:
    """What a pass decided about the records it picked, written in one ``MULTI``."""

    #: When a record whose message was seen is due again (a grace period after the pick).
    due_again: float
    #: Records whose message was seen (or published again): due again at ``due_again``.
    seen: list[str] = field(default_factory=list)
    #: Records to delete: removed on purpose, or delivered already.
    forget: list[str] = field(default_factory=list)
    #: Records whose message is nowhere, judged :data:`SETTLE_S` after it was first missed.
    pending: list[_Picked] = field(default_factory=list)

    def write(self, client: redis.Redis, records: str, due: str, missing: str) -> None:
        if not (self.seen or self.forget or self.pending):
            return
        with client.pipeline(transaction=True) as pipe:
            # XX everywhere: a record a worker deleted meanwhile stays deleted.
            if self.seen:
                pipe.zadd(due, dict.fromkeys(self.seen, self.due_again), xx=True)
            if self.forget:
                pipe.hdel(records, *self.forget)
                pipe.zrem(due, *self.forget)
            if self.seen or self.forget:
                pipe.hdel(missing, *self.seen, *self.forget)
            if self.pending:
                pipe.hset(missing, mapping={
                    p.record.event_id: f"{p.last_seen!r} {p.first_missed!r}" for p in self.pending
                })  # fmt: skip
                pipe.zadd(due, {p.record.event_id: p.first_missed + SETTLE_S for p in self.pending},
                          xx=True)  # fmt: skip
                pipe.expire(missing, MISSING_TTL_S)
            pipe.execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _look(
    client: redis.Redis,
    lists: list[str],
    unacked: str,
    records_key: str = "",
    event_ids: Iterable[str] = (),
) -> tuple[list[Any], set[str] | None]:
    """In one ``MULTI`` (one moment, as far as any worker can tell): the records of
    ``event_ids``, and the task ids of every message on ``lists`` and in ``unacked`` (None if
    there are messages and none of them can be read: kombu stores them some other way now)."""
    wanted = list(event_ids)
    with client.pipeline(transaction=True) as pipe:
        if wanted:
            pipe.hmget(records_key, wanted)
        for key in lists:
            pipe.lrange(key, 0, -1)
        pipe.hvals(unacked)
        answers = pipe.execute()
    records = answers.pop(0) if wanted else []
    held = answers.pop()
    ids: set[str] = set()
    total = 0
    for messages in answers:
        total += len(messages)
        ids.update(_compat.task_id_of_queued(raw) or "" for raw in messages)
    total += len(held)
    ids.update(_compat.task_id_of_unacked(raw) or "" for raw in held)
    ids.discard("")
    if total and not ids:
        _compat.step_aside(
            "the outbox sweeper",
            f"none of the {total} messages kombu {_compat.KOMBU_VERSION_TEXT} keeps in Redis "
            "could be read as JSON with a task id",
            "lost events are not published again",
        )
        return records, None
    return records, ids
