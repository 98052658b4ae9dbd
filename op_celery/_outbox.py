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
  already, or dead-lettered; and once Celery ended its message without running it (expired,
  revoked, rejected, refused: ``_consumer``). A failed delete only leaves work for the sweeper.
- A sweeper thread in each worker process (one at a time across the pool, under a lock) looks
  at records older than the grace period (``OP_CELERY_OUTBOX_GRACE``): ``lua/outbox_sweep.lua``
  picks the due ones (those it finds are due again a grace period later). Then it reads,
  in one ``MULTI`` (a snapshot no worker can change halfway), every message on the queue's
  lists and in kombu's ``unacked`` hash, and decodes each as the JSON it is, taking its task id
  from its headers (a message waiting in a backlog, reserved by a worker, or held for its
  countdown is in one of them). A record whose task id is in neither was lost in that window;
  the sweeper looks again :data:`CONFIRM_DELAY_S` later, in one ``MULTI`` with the record
  itself. A record found is looked at again a grace period later, so a long backlog is
  scanned, never re-published.
- A message still nowhere was either lost or removed on purpose (``celery purge``, a worker
  without the package's tasks dropping it, an end no worker of the package saw). It can only
  have been lost by a consumer whose connection ended between its BRPOP and its unacked
  write: so every consumer says it is alive (:class:`Liveness`, every :data:`ALIVE_INTERVAL_S`
  from the consumer step) and says so again when it reconnects, and each pass notes
  (``lua/outbox_losses.lua``) consumers not heard from for :data:`ALIVE_TTL_S` (died),
  reconnections, and a Redis restart (its run id changed) as possible losses, with their
  time. The sweeper publishes the record again (unless the ledger says it was delivered) only
  if such a loss happened after the message was last seen; with none, it waits
  :data:`SETTLE_S` from the first miss (long enough for a consumer that died holding it to be
  found dead) and then forgets the record: the message was removed, and the outbox does not
  override whoever removed it.

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
delivered (if a loss elsewhere happened meanwhile), and then the ledger's claim and its
delivered mark (``_ledger``) keep that copy from reaching the API. A message removed on purpose
after a worker crash, reconnection or Redis restart that came after its last look (at most a
grace period and :data:`CLOCK_MARGIN_S` before) is taken for lost and published again: the
outbox errs toward delivering. A message lost by a consumer that does not run this package (it
never says it is alive) is not brought back. A lost event comes back up to :data:`ALIVE_TTL_S`
later than the grace period alone would say (its consumer must first be found dead). Records
take broker memory for as long as their events wait: about the size of the arguments per
event. The names of kombu's keys come from its Redis channel through
``_compat``; a kombu without them turns the sweeper off, with one log line.

Where it lives, one concept a module: the records, their keys and the writer that ``.delay()``
and the workers use are here; the consumers' word that they are alive and the possible losses
the sweeper weighs (:class:`Liveness`, ``losses``, ``ALIVE_INTERVAL_S``, ``ALIVE_TTL_S``,
``CLOCK_MARGIN_S``) are in ``_outbox_liveness``; the sweeper itself (its pass, ``SETTLE_S``,
``CONFIRM_DELAY_S``, ``MAX_SCAN_MESSAGES``) is in ``_outbox_sweeper``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
from kombu.exceptions import OperationalError

from ._lua import lua
from ._redis import RefusalNotice, refusal_notice

__all__ = [
    "BROKER_ERRORS",
    "Writer",
    "broker_refusals",
    "close_quietly",
    "outbox_keys",
    "record_json",
]

log = logging.getLogger("op_celery")

#: Queues whose key names a writer keeps ready.
MAX_CACHED_QUEUES = 256
#: Errors of the broker's Redis, as redis-py and kombu raise them.
BROKER_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OperationalError, OSError)


def broker_refusals() -> RefusalNotice:
    """The process's one notice of a broker's Redis that refuses writes (full or read-only),
    shared by the consumer step, the QoS it guards, and the sweeper."""
    return refusal_notice(
        "the broker's Redis",
        "workers take no message until it takes writes again (those they hold are retried, or "
        "come back after the visibility timeout), and .delay() keeps what it refuses in the "
        "spool, published once it takes writes",
    )


_str: Callable[[str], str] = json.encoder.encode_basestring_ascii


def record_json(task: str, task_id: str, queue: str, kwargs_json: str) -> str:
    """The outbox record of one call (JSON): what the sweeper needs to publish it again."""
    return (
        f'{{"id": {_str(task_id)}, "task": {_str(task)}, "queue": {_str(queue)}, '
        f'"kwargs": {kwargs_json}}}'
    )


#: Key names, per queue, written with the broker's ``global_keyprefix`` in front as kombu's own
#: keys are: the records (event id -> record), and when each is due to be looked at.
RECORDS_KEY = "_op_celery.outbox.{queue}"
DUE_KEY = "_op_celery.outbox_due.{queue}"


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


def close_quietly(connection: Any) -> None:
    """Close a broker connection of the sweeper or a consumer's liveness, which may be dead."""
    try:
        connection.close()
    except Exception:  # closing a dead connection may fail in any way; it is gone either way
        log.debug("op_celery: closing the sweeper's broker connection failed", exc_info=True)
