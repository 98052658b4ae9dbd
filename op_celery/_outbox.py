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
  at records older than the grace period (``OP_CELERY_OUTBOX_GRACE``). ``lua/outbox_sweep.lua``
  checks, atomically, whether each one's task id is on a queue list or in kombu's ``unacked``
  hash (a message waiting in a backlog, reserved by a worker, or held for its countdown is in
  one of them); a record whose message is in neither was lost in that window, and the sweeper
  publishes it again (unless the ledger says it was delivered). A record found is looked at
  again a grace period later, so a long backlog is scanned, never re-published.

Limits, stated plainly: the scan reads every message on the lists and in ``unacked``; with more
than :data:`MAX_SCAN_MESSAGES` there, the sweeper judges nothing until the backlog shrinks (a
lost event then waits longer, but is not duplicated). A worker that has popped a message and
not yet recorded it (its BRPOP reply still unread in a busy process) looks exactly like a loss
for that moment, so a suspect is looked at again :data:`CONFIRM_DELAY_S` later and published
only if still nowhere; one stalled even longer can be re-published while its original is
delivered, and then the ledger's claim and its delivered mark (``_ledger``) keep that copy
from reaching the API. Records take broker memory for as long as their events wait: about the
size of the arguments per event.
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

from ._lua import lua

__all__ = ["Sweeper", "Writer", "outbox_keys", "record_json"]

log = logging.getLogger("op_celery")

#: Queues whose key names a writer keeps ready.
MAX_CACHED_QUEUES = 256
#: Records the sweeper looks at per pass.
MAX_RECORDS_PER_SWEEP = 500
#: Messages (queue lists plus unacked) the sweeper scans at most in one pass: a pass blocks
#: Redis for about 7 µs a ``track`` message (``benchmarks/outbox_sweep.py``), so about 35 ms.
MAX_SCAN_MESSAGES = 5_000
#: Seconds between finding a record's message nowhere and looking again before publishing it:
#: a message a worker has popped but not yet recorded as unacked (its BRPOP reply still in the
#: socket of a busy worker) is in that state for milliseconds, a lost one for good.
CONFIRM_DELAY_S = 1.0
#: Errors of the broker's Redis, as redis-py and kombu raise them.
BROKER_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OperationalError, OSError)

_str: Callable[[str], str] = json.encoder.encode_basestring_ascii


def record_json(task: str, task_id: str, queue: str, kwargs_json: str) -> str:
    """The outbox record of one call: what the sweeper needs to publish it again.

    ``"id"`` (the task id) comes first, where the sweep script looks for it.
    """
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
        ``list_key`` in the same step (one round trip, atomic)."""
        records, due = self._keys_of(queue)
        target = self._prefix + list_key if list_key else records
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
        channel = connection.default_channel
        # kombu's client adds the broker's key prefix, but to the first key of a script only:
        # the script gets a plain client on the same pool and prefixed key names.
        prefixed = channel._create_client()
        prefix = getattr(prefixed, "global_keyprefix", "")
        client = redis.Redis(connection_pool=channel.pool)
        # Held until just before this sweeper's next pass: another one sweeps if it stops.
        lock, hold_ms = prefix + LOCK_KEY.format(queue=queue), max(1, int(self.interval_s * 900))
        if not client.set(lock, self._token, nx=True, px=hold_ms):
            if client.get(lock) != self._token.encode():
                return SweepResult()
            client.pexpire(lock, hold_ms)
        lists = dict.fromkeys(
            prefix + channel._q_for_pri(queue, step) for step in channel.priority_steps
        )
        script = client.register_script(lua("outbox_sweep.lua"))
        keys = [
            prefix + RECORDS_KEY.format(queue=queue),
            prefix + DUE_KEY.format(queue=queue),
            prefix + channel.unacked_key,
            *lists,
        ]
        limits = [self.grace_s, MAX_RECORDS_PER_SWEEP, MAX_SCAN_MESSAGES]
        answer = script(keys=keys, args=limits)
        if int(answer[0]) > 0 and len(answer) > 1:
            # Suspects: look again a moment later, and publish only what is still nowhere.
            suspects = [str(json.loads(raw)["kwargs"].get("event_id")) for raw in answer[1:]]
            time.sleep(CONFIRM_DELAY_S)
            answer = script(keys=keys, args=[*limits, *suspects])
        status = int(answer[0])
        if status == 0:
            return SweepResult(swept=True)
        if status < 0:
            log.info(
                "op_celery: %d messages queued or unacked, more than the outbox sweeper scans "
                "(%d); it looks for lost events of queue %r again once the backlog is smaller",
                int(answer[1]),
                MAX_SCAN_MESSAGES,
                queue,
            )
            return SweepResult(swept=True, too_busy=int(answer[1]))
        republished = 0
        finished: list[str] = []
        for raw in answer[1:]:
            record = json.loads(raw)
            kwargs = record["kwargs"]
            event_id = str(kwargs.get("event_id"))
            if self._delivered(event_id):
                finished.append(event_id)
                continue
            try:
                self._republish(record["task"], kwargs, record["id"], queue)
            except Exception as exc:  # kept, and looked at again after the grace period
                log.warning(
                    "op_celery: event %s was lost by the broker and could not be published "
                    "again yet (%s); the outbox keeps it",
                    event_id,
                    exc,
                )
                continue
            republished += 1
            log.warning(
                "op_celery: event %s was lost by the broker (taken off the queue, never "
                "recorded as unacked); published again from the outbox",
                event_id,
            )
        Writer(channel.pool, prefix).forget(queue, finished)
        return SweepResult(swept=True, lost=len(answer) - 1, republished=republished)


def _close(connection: Any) -> None:
    try:
        connection.close()
    except Exception:  # closing a dead connection may fail in any way; it is gone either way
        log.debug("op_celery: closing the sweeper's broker connection failed", exc_info=True)
