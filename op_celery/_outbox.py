"""The outbox: the broker's own record of each event enqueued and not yet finished.

Why: kombu's Redis transport takes a message off the queue (``BRPOP``) before it writes it to
its ``unacked`` hash. A worker SIGKILLed between the two, or a Redis that dies there, takes the
message with it; no visibility timeout brings it back (measured: one event in about 8 SIGKILL
runs of the fault test, one in 5 Redis restarts). RabbitMQ has no such window.

How, on a Redis broker:

- ``.delay()`` writes a record of the call (task, task id, queue, arguments) in the same
  script as its ``LPUSH`` (``lua/outbox_record.lua``, called by ``_publish``): the message
  never exists without it. On Celery's own publish path (options the fast path does not
  reproduce, such as a countdown) the record follows the publish in a second round trip. A
  worker's retries and reschedules of an event publish it again under the same task id and
  queue: they keep the record its first publish wrote.
- A worker deletes the record once it is done with the event: delivered, found delivered
  already, or dead-lettered. A failed delete only leaves work for the sweeper.
- A sweeper thread in each worker process (one at a time across the pool, under a lock) looks
  at records older than the grace period (``OP_CELERY_OUTBOX_GRACE``): ``lua/outbox_sweep.lua``
  picks the due ones (and makes them due again a grace period later). Then the sweeper reads,
  in one ``MULTI`` (a snapshot no worker can change halfway), every message on the queue's
  lists and in kombu's ``unacked`` hash, and decodes each as the JSON it is, taking its task id
  from its headers (a message waiting in a backlog, reserved by a worker, or held for its
  countdown is in one of them). A record whose task id is in neither was lost in that window;
  the sweeper looks again :data:`CONFIRM_DELAY_S` later, in one ``MULTI`` with the record
  itself, and publishes it again if it is still nowhere (unless the ledger says it was
  delivered). A record found is looked at again a grace period later, so a long backlog is
  scanned, never re-published.

Why the messages are read in the sweeper, not in Lua: the script used to find task ids with a
string search for ``"id": "`` in kombu's stored JSON, which a change in kombu's spacing would
have turned into "every message lost". Decoding them exactly costs, per ``track`` message of
about 1.8 KB (``benchmarks/outbox_sweep.py``, 5,000 messages, medians): with ``cjson.decode``
in Lua, 15 µs of Redis time, against 5 µs for the string search, so a 5,000-message pass would
block Redis for 75 ms instead of 25-30 ms; read out in one ``MULTI`` and decoded with Python's
``json`` in the sweeper's thread, about 2 µs of Redis time (building the reply) and 13 µs of the
sweeper's CPU, and 1.8 KB on the wire. The sweeper takes the second: Redis, which every worker
and web process shares, is busy for less than a third of what the string search cost.
A message the sweeper cannot read (not JSON, or without a task id) is no record's; if it can
read none of the messages there are, kombu's format has changed and it judges nothing.

Limits, stated plainly: the look reads every message on the lists and in ``unacked``; with more
than :data:`MAX_SCAN_MESSAGES` there, the sweeper judges nothing until the backlog shrinks (a
lost event then waits longer, but is not duplicated). A worker that has popped a message and
not yet recorded it (its BRPOP reply still unread in a busy process) looks exactly like a loss
for that moment, so a suspect is looked at again :data:`CONFIRM_DELAY_S` later and published
only if still nowhere; one stalled even longer can be re-published while its original is
delivered, and then the ledger's claim and its delivered mark (``_ledger``) keep that copy
from reaching the API. Records take broker memory for as long as their events wait: about the
size of the arguments per event. The names of kombu's keys come from its Redis channel through
``_compat``; a kombu without them turns the sweeper off, with one log line.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis
from kombu.exceptions import OperationalError

from . import _compat
from ._lua import lua

__all__ = ["Sweeper", "Writer", "outbox_keys", "record_json"]

log = logging.getLogger("op_celery")

#: Queues whose key names a writer keeps ready.
MAX_CACHED_QUEUES = 256
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
#: Errors of the broker's Redis, as redis-py and kombu raise them.
BROKER_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OperationalError, OSError)

_str: Callable[[str], str] = json.encoder.encode_basestring_ascii


def record_json(task: str, task_id: str, queue: str, kwargs_json: str) -> str:
    """The outbox record of one call (JSON): what the sweeper needs to publish it again."""
    return (
        f'{{"id": {_str(task_id)}, "task": {_str(task)}, "queue": {_str(queue)}, '
        f'"kwargs": {kwargs_json}}}'
    )


#: Key names, per queue, written with the broker's ``global_keyprefix`` in front as kombu's own
#: keys are: the records (event id -> record), when each is due to be looked at, the sweep lock.
RECORDS_KEY = "_op_celery.outbox.{queue}"
DUE_KEY = "_op_celery.outbox_due.{queue}"
LOCK_KEY = "_op_celery.outbox_sweeping.{queue}"


def outbox_keys(queue: str, prefix: str = "") -> tuple[str, str]:
    """The records hash and due set of ``queue``, with the broker's key prefix."""
    return prefix + RECORDS_KEY.format(queue=queue), prefix + DUE_KEY.format(queue=queue)


class Writer:
    """The outbox's writes, on one connection pool of the broker's Redis.

    ``prefix`` is kombu's ``global_keyprefix`` of the broker: kombu's own client adds it to the
    first key of a script only, so this plain client is given whole key names.
    """

    def __init__(self, pool: Any, prefix: str = "") -> None:
        self._client = redis.Redis(connection_pool=pool)
        self._prefix = prefix
        self._record = self._client.register_script(lua("outbox_record.lua"))
        #: Per queue: its records and due keys, prefixed.
        self._keys: dict[str, tuple[str, str]] = {}

    def _keys_of(self, queue: str) -> tuple[str, str]:
        keys = self._keys.get(queue)
        if keys is None:
            keys = outbox_keys(queue, self._prefix)
            if len(self._keys) < MAX_CACHED_QUEUES:
                self._keys[queue] = keys
        return keys

    def push(
        self,
        grace_s: float,
        queue: str,
        event_id: str,
        record: str,
        list_key: str = "",
        message: str = "",
    ) -> None:
        """Write an event's record, due after ``grace_s``; with ``message``, also push that to
        ``list_key`` (the queue's list, with the broker's key prefix) in the same step (one
        round trip, atomic)."""
        records, due = self._keys_of(queue)
        target = list_key or records
        # EVALSHA directly: redis-py's Script call costs more than the rest of this method.
        command = ("EVALSHA", self._record.sha, 3, target, records, due)
        due_at = repr(time.time() + grace_s)
        client: Any = self._client
        try:
            client.execute_command(*command, message, event_id, record, due_at)
        except redis.exceptions.NoScriptError:  # a restarted or flushed Redis
            client.script_load(self._record.script)
            client.execute_command(*command, message, event_id, record, due_at)

    def forget(self, queue: str, event_ids: Iterable[str]) -> None:
        """Delete the records of finished events."""
        ids = list(event_ids)
        if ids:
            records, due = self._keys_of(queue)
            with self._client.pipeline(transaction=True) as pipe:
                pipe.hdel(records, *ids)
                pipe.zrem(due, *ids)
                pipe.execute()


@dataclass(frozen=True, slots=True)
class SweepResult:
    """What one pass of the sweeper did."""

    #: False when another worker holds the sweep lock, so this pass did nothing.
    swept: bool = False
    #: Messages on the lists and in unacked, when too many to scan; else 0.
    too_busy: int = 0
    #: Records whose message was nowhere.
    lost: int = 0
    #: Of those, published again (the others were delivered already, or failed to publish).
    republished: int = 0


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
            except BROKER_ERRORS as exc:
                log.warning("op_celery: outbox sweep skipped, the broker did not answer: %s", exc)
                if connection is not None:
                    _close(connection)
                    connection = None
            except Exception:  # a bug must not end the thread that keeps events from being lost
                log.exception("op_celery: outbox sweep failed")

    def sweep(self, connection: Any) -> SweepResult:
        """One pass over each queue, on ``connection`` (a kombu connection to the Redis broker)."""
        total = SweepResult()
        for queue in dict.fromkeys(self._queues()):
            result = self.sweep_queue(connection, queue)
            total = SweepResult(
                swept=total.swept or result.swept,
                too_busy=total.too_busy + result.too_busy,
                lost=total.lost + result.lost,
                republished=total.republished + result.republished,
            )
        return total

    def sweep_queue(self, connection: Any, queue: str) -> SweepResult:
        """One pass over the records of ``queue``."""
        support = _compat.redis_channel_support()
        if not support.ok:
            _compat.step_aside(
                "the outbox sweeper", support.reason, "lost events are not published again"
            )
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
        lists, unacked = _compat.redis_message_keys(channel, queue)
        records_key, due_key = outbox_keys(queue, prefix)
        script = client.register_script(lua("outbox_sweep.lua"))
        answer = script(
            keys=[records_key, due_key, unacked, *lists],
            args=[self.grace_s, MAX_RECORDS_PER_SWEEP, MAX_SCAN_MESSAGES],
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
        due = [_Record.parse(raw) for raw in answer[2:]]
        _, present = _look(client, lists, unacked)
        if present is None:
            return SweepResult(swept=True)
        suspects = [record.event_id for record in due if record.task_id not in present]
        if not suspects:
            return SweepResult(swept=True)
        # Look again a moment later, at the records too, and publish only what is still
        # nowhere (a record a worker has deleted meanwhile is finished).
        time.sleep(CONFIRM_DELAY_S)
        raws, present = _look(client, lists, unacked, records_key, suspects)
        if present is None:
            return SweepResult(swept=True)
        current = [_Record.parse(raw) for raw in raws if raw is not None]
        lost = [record for record in current if record.task_id not in present]
        republished = 0
        finished: list[str] = []
        for record in lost:
            if self._delivered(record.event_id):
                finished.append(record.event_id)
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
                continue
            republished += 1
            log.warning(
                "op_celery: event %s was lost by the broker (taken off the queue, never "
                "recorded as unacked); published again from the outbox",
                record.event_id,
            )
        Writer(channel.pool, prefix).forget(queue, finished)
        return SweepResult(swept=True, lost=len(lost), republished=republished)


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


def _close(connection: Any) -> None:
    try:
        connection.close()
    except Exception:  # closing a dead connection may fail in any way; it is gone either way
        log.debug("op_celery: closing the sweeper's broker connection failed", exc_info=True)
