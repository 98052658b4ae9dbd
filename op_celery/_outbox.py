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
from kombu.exceptions import OperationalError

from . import _compat
from ._lua import Script, lua

__all__ = [
    "Liveness",
    "Losses",
    "Sweeper",
    "Writer",
    "broker_keys",
    "losses",
    "outbox_keys",
    "record_json",
]

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
#: Seconds between a consumer's word to the broker that it is alive (``lua/outbox_alive.lua``).
ALIVE_INTERVAL_S = 2.0
#: Seconds a consumer counts as alive after saying so: one not heard from for that long died
#: (or stalled), and a message it had just popped may be lost.
ALIVE_TTL_S = 10.0
#: Seconds a record whose message is nowhere waits, when no loss is known, before the sweeper
#: judges its message removed on purpose (purged, expired, revoked, refused by a worker)
#: rather than lost: long enough for a consumer that died holding it to be found dead.
SETTLE_S = ALIVE_TTL_S + CONFIRM_DELAY_S + 3.0
#: Seconds a caller's clock, which dates a new record, may run ahead of Redis' without a loss
#: being missed.
CLOCK_MARGIN_S = 5.0
#: Seconds a possible loss is remembered.
LOSSES_KEPT_S = 7 * 24 * 3600.0
#: Seconds a missing hash lives after its last write (entries of records a worker deleted
#: while they were being judged go with it).
MISSING_TTL_S = 24 * 3600
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
#: Per queue: the records whose message was found nowhere, not judged yet (event id ->
#: "<last seen> <first missed>").
MISSING_KEY = "_op_celery.outbox_missing.{queue}"
#: Per broker: the consumers alive (id -> until when), what may have lost a message (-> when),
#: and the Redis run id last seen (a new one: Redis restarted).
CONSUMERS_KEY = "_op_celery.outbox_consumers"
LOSSES_KEY = "_op_celery.outbox_losses"
RUN_KEY = "_op_celery.outbox_redis_run"


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


@dataclass(frozen=True, slots=True)
class Losses:
    """What the broker's consumers may have lost, as of one moment (Redis time)."""

    #: Redis time of the look, in seconds since the epoch.
    now: float
    #: The latest time a message may have been lost (a consumer died or reconnected, Redis
    #: restarted), or None if nothing is known to have lost one.
    latest: float | None

    def may_have_lost(self, last_seen: float) -> bool:
        """Whether a message last seen at ``last_seen`` may have been lost since."""
        return self.latest is not None and self.latest > last_seen - CLOCK_MARGIN_S


def broker_keys(prefix: str = "") -> tuple[str, str, str]:
    """The consumers set, losses set and run-id key of a broker, with its key prefix."""
    return prefix + CONSUMERS_KEY, prefix + LOSSES_KEY, prefix + RUN_KEY


def losses(client: redis.Redis, prefix: str = "") -> Losses:
    """Note the consumers found dead and a Redis restart as possible losses
    (``lua/outbox_losses.lua``), and say when a message was last possibly lost."""
    try:
        run_id = str(client.info("server").get("run_id", ""))
    except redis.ResponseError:  # INFO refused (a managed Redis): restarts go unseen here
        run_id = ""
    now, latest = Script(client, "outbox_losses.lua")(list(broker_keys(prefix)),
                                                      [run_id, LOSSES_KEPT_S])  # fmt: skip
    return Losses(float(now), float(latest) if latest else None)


class Liveness:
    """A consumer's word to the broker that it is alive, so that the sweeper can tell a message
    lost with it (the consumer died or reconnected) from one removed on purpose.

    ``connect()`` returns a kombu connection to the (Redis) broker. :meth:`started` says it
    once, at once (with ``reconnected``, also that the consumer's connection broke), and
    starts a daemon thread that says it every :data:`ALIVE_INTERVAL_S`; :meth:`stop` says the
    consumer stopped cleanly. A consumer not heard from for :data:`ALIVE_TTL_S` is taken for
    dead by the next sweeper pass.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        consumer_id: str | None = None,
        ttl_s: float = ALIVE_TTL_S,
        interval_s: float = ALIVE_INTERVAL_S,
    ) -> None:
        self.consumer_id = consumer_id or f"{uuid.uuid4().hex}"
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self._connect = connect
        self._pending = "beat"
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def say(self, what: str, connection: Any) -> None:
        """Say ``what`` ('beat', 'reconnected' or 'stopped') on ``connection``."""
        channel = connection.default_channel
        prefix = _compat.redis_key_prefix(channel)
        client = _compat.redis_client(channel)
        consumers, lost, _ = broker_keys(prefix)
        Script(client, "outbox_alive.lua")([consumers, lost], [self.consumer_id, self.ttl_s, what])

    def started(self, reconnected: bool = False) -> None:
        """The consumer (re)started: say so now, and keep saying it is alive."""
        with self._lock:
            if reconnected:
                self._pending = "reconnected"
            what = self._pending
        try:
            with self._connect() as connection:
                self.say(what, connection)
        except BROKER_ERRORS as exc:  # the thread says it as soon as the broker answers
            log.warning("op_celery: the consumer could not tell the broker it is alive: %s", exc)
        else:
            with self._lock:
                if self._pending == what:
                    self._pending = "beat"
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="op-celery-alive", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """The consumer stopped cleanly: stop saying it is alive, and say it stopped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + 5)
        try:
            with self._connect() as connection:
                self.say("stopped", connection)
        except BROKER_ERRORS as exc:  # taken for dead later: only more careful
            log.info("op_celery: could not tell the broker the consumer stopped: %s", exc)

    def _run(self) -> None:
        connection = None
        while not self._stop.wait(self.interval_s):
            with self._lock:
                what = self._pending
            try:
                if connection is None:
                    connection = self._connect()
                self.say(what, connection)
            except BROKER_ERRORS as exc:
                log.debug("op_celery: could not tell the broker the consumer is alive: %s", exc)
                if connection is not None:
                    _close(connection)
                    connection = None
                continue
            except Exception:  # a bug must not end the thread
                log.exception("op_celery: telling the broker the consumer is alive failed")
                continue
            with self._lock:
                if self._pending == what:
                    self._pending = "beat"
        if connection is not None:
            _close(connection)


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


def _close(connection: Any) -> None:
    try:
        connection.close()
    except Exception:  # closing a dead connection may fail in any way; it is gone either way
        log.debug("op_celery: closing the sweeper's broker connection failed", exc_info=True)
