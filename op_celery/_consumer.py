"""The package's consumer step, added to every app the tasks register on. It does two jobs
for the worker's message consumer: poison messages (what arrives on the queue but is no event)
are kept as dead letters, and the worker survives its broker going away.

Celery acks a message it cannot decode and rejects one with an unknown task name or format,
logging it and nothing more. A consumer bootstep, added to every app the tasks register on,
stores such messages from the package's queue in the dead letters first, so they stay visible.
A message of one of the package's tasks whose body is not ``[args, kwargs, options]`` would stop
the consumer with an "Unrecoverable error"; the step stores it and acks it instead. That is all
it treats as poison: any other error of Celery's handling of a message (a broker or pool error,
a bug) goes on to Celery as it would without the step, so no message is lost or wrongly kept.
Malformed arguments of a known task and unknown projects are caught by the task itself.

The step also keeps the outbox (``_outbox``) true to what happened to each message:

- It tells the broker that this consumer is alive, every ``ALIVE_INTERVAL_S``, and that it
  reconnected when its connection broke (Celery restarts the consumer's steps then): the only
  ways a message can vanish in kombu's window between BRPOP and its unacked write. The sweeper
  publishes again only a message that one of those, or a Redis restart, could have lost; a
  message removed on purpose (``celery purge``, a worker without op-celery's tasks) is not.
- Every other way a message of the package's tasks ends without a delivery or a dead letter
  is an end for its outbox record, which goes at once: expired (``expires=``) or revoked
  (``task_revoked``), rejected by the task without requeue (``Reject``, ``task_postrun`` in
  state ``REJECTED``), refused by the consumer (``task_rejected``, ``task_unknown``, a body it
  cannot decode or does not accept). A sweeper never publishes again what Celery chose not to
  run. A refusal of an event is a configuration error of that worker: the event is kept as one
  replayable dead letter (replay it once the worker is fixed), not published every grace period.

The step also keeps the worker alive through a broker's Redis that answers but refuses writes
(full at ``maxmemory`` under ``noeviction``, or a read-only replica; ``_redis.WRITE_REFUSALS``),
which Celery takes for an unrecoverable error and exits on:

- those refusals count as lost connections for this consumer: it reconnects instead;
- once (re)connected, before any step takes a message, the consumer waits until the broker's
  Redis takes a write (a probe every ``WRITE_PROBE_FIRST_S``, doubling to
  ``WRITE_PROBE_MAX_S``), saying so once, and once more when it carries on. Taking messages
  meanwhile would lose each one: kombu pops it, then fails to write it to its unacked hash;
- an ack (or a push back) that Redis refuses is said once, not per message: the message stays
  in kombu's unacked hash and comes back after the visibility timeout, and the ledger drops it
  then if its event was delivered and marked (a mark refused too is kept and written once
  Redis takes writes: ``_ledger``).

At most one message per consumer is popped in the instant Redis fills (kombu's pop succeeds,
its unacked write fails): the consumer's reconnection is a possible loss for the outbox, whose
sweeper publishes it again once Redis takes writes (with ``OP_CELERY_OUTBOX=off`` it is lost).

The step reaches into Celery's consumer (its strategies, decode-error handler, connection
errors and ``connect``) and kombu's Redis QoS through ``_compat``; on a Celery without them it
does less, and Celery does the rest.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

import redis
from celery import Celery, bootsteps, signals
from celery import states as celery_states
from kombu.exceptions import OperationalError

from . import _compat
from ._app import settings_for
from ._events import OPERATIONS
from ._exceptions import OpenPanelError
from ._outbox import BROKER_ERRORS as OUTBOX_ERRORS
from ._outbox import Writer, broker_refusals
from ._outbox_liveness import Liveness
from ._publish import outbox_writer, redis_broker
from ._redis import FULL, WRITE_REFUSALS, redis_for, write_refusal
from ._settings import Settings, _redis_url_of, redact_url
from .dead_letters import DeadLetter, DeadLetterStore, purge_listeners

__all__ = ["PoisonGuard", "forget_record", "install"]

log = logging.getLogger("op_celery")

#: Seconds between the first two probes of a broker's Redis that refuses writes; each wait
#: doubles, up to ``WRITE_PROBE_MAX_S``, so a worker carries on within seconds of the fix.
WRITE_PROBE_FIRST_S = 0.5
WRITE_PROBE_MAX_S = 5.0
#: Percent of ``maxmemory`` a broker's Redis that was full must have free before the worker
#: takes messages again (one message more must not fill it again at once).
WRITE_HEADROOM_PCT = 1.0
#: Seconds between two looks, while waiting, at whether the worker was asked to stop.
STOP_CHECK_S = 0.25
#: The probe: a key of a few bytes, written at each (re)connection, that expires by itself.
WRITE_PROBE_KEY = "_op_celery.write_probe"
WRITE_PROBE_TTL_MS = 10_000


def forget_record(app: Celery, queue: str, event_id: str, why: str) -> None:
    """Forget the outbox record of an event whose message ended without a delivery or a dead
    letter of the task's own (expired, revoked, rejected, refused), so no sweeper publishes it
    again; a broker that does not answer leaves it to the sweeper, which finds the message
    gone and, with no loss to explain it, forgets the record too."""
    if not redis_broker(app):
        return
    try:
        with outbox_writer(app) as writer:
            writer.forget(queue, (event_id,))
    except OUTBOX_ERRORS as exc:
        log.info("op_celery: event %s (%s): outbox record left to the sweeper: %s", event_id, why,
                 exc)  # fmt: skip
        return
    log.info("op_celery: event %s %s; its outbox record is gone, it is not published again",
             event_id, why)  # fmt: skip


def _forget_purged(settings: Settings, letters: list[DeadLetter]) -> None:
    """After a purge of dead letters: forget their events' outbox records, in the broker's
    Redis when it is the store's (else the sweeper, which finds their messages gone with no
    loss to explain it, forgets them)."""
    if settings.redis_url is None or settings.redis_url != _redis_url_of(settings.broker_url):
        return
    by_queue: dict[str, list[str]] = {}
    for letter in letters:
        event_id = letter.event_id
        if event_id is not None:
            queue = str(letter.extra.get("queue") or settings.queue)
            by_queue.setdefault(queue, []).append(event_id)
    writer = Writer(redis_for(settings).connection_pool, settings.broker_key_prefix)
    for queue, ids in by_queue.items():
        writer.forget(queue, ids)


purge_listeners.append(_forget_purged)


def _event_of(message: Any) -> tuple[str, dict[str, Any]] | None:
    """The operation and keyword arguments of a message of one of the package's tasks, read
    from its body as the JSON ``[args, kwargs, options]`` they send, whatever the consumer made
    of it (refused its content type, say); None if it is not that."""
    headers = getattr(message, "headers", None) or {}
    name = headers.get("task") if isinstance(headers, dict) else None
    if not isinstance(name, str) or not name.startswith("op_celery."):
        return None
    operation = name.removeprefix("op_celery.")
    body = getattr(message, "body", None)
    try:
        payload = json.loads(body) if isinstance(body, (bytes, str)) else None
    except ValueError:
        return None
    if not (isinstance(payload, list) and len(payload) == 3 and isinstance(payload[1], dict)):
        return None
    kwargs: dict[str, Any] = payload[1]
    if operation not in OPERATIONS or not isinstance(kwargs.get("event_id"), str):
        return None
    return operation, kwargs


def _store(app: Celery, message: Any, reason: str, error_type: str = "PoisonMessage") -> None:
    """Keep a message the worker refused as a dead letter: a replayable one when it is an event
    of the package's tasks (the worker's configuration is at fault: fix it, then replay), else
    the raw message (``PoisonMessage``, not replayable). Either way the event's outbox record
    goes: a refusal is not an event to bring back each grace period."""
    settings = settings_for(app)
    delivery = getattr(message, "delivery_info", None) or {}
    queue = delivery.get("routing_key")
    if queue is not None and queue not in settings.queues:
        return  # someone else's queue, someone else's business
    event = _event_of(message)
    store = DeadLetterStore(settings)
    try:
        if event is None:
            letter = store.add_raw(getattr(message, "body", b""), reason, extra={"queue": queue})
        else:
            operation, kwargs = event
            now = time.time()
            letter = DeadLetter(
                id=kwargs["event_id"], operation=operation,
                project=str(kwargs.get("project", "default")), kwargs=kwargs,
                error=f"refused by the worker: {reason}", error_type=error_type, status=None,
                attempts=1, failed_at=now, first_failed_at=now, extra={"queue": queue},
            )  # fmt: skip
            store.add(letter)
    except OpenPanelError as exc:
        log.error("op_celery: refused message not stored (%s): %s", exc, reason)
    else:
        if event is None:
            log.warning("op_celery: poison message stored as dead letter %s: %s", letter.id,
                        reason)  # fmt: skip
        else:
            log.warning(
                "op_celery: %s event %s refused by this worker (%s); kept as a dead letter: fix "
                "the worker, then run op-celery dead-letters replay", event[0], letter.id, reason,
            )  # fmt: skip
    if event is not None:
        forget_record(app, queue or settings.queue, event[1]["event_id"],
                      "was refused by the worker")  # fmt: skip


class PoisonGuard(bootsteps.StartStopStep):
    """Consumer step: dead-letter messages Celery cannot decode before it drops them, and
    messages of our tasks whose body has the wrong shape, which would otherwise stop the
    consumer with an "Unrecoverable error"."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        super().__init__(consumer, **kwargs)
        app: Celery = consumer.app
        # Wrapped here, in __init__, because the task consumer captures the bound method
        # when the Tasks step starts, which is before any step of ours could start.

        def on_decode_error(message: Any, exc: Exception) -> None:
            _store(app, message, f"undecodable message ({type(exc).__name__}: {exc})",
                   type(exc).__name__)  # fmt: skip

        _compat.wrap_decode_error_handler(consumer, on_decode_error)

        def on_rejected(sender: Any = None, message: Any = None, exc: Any = None, **_: Any) -> None:
            if sender is consumer:
                _store(app, message, f"not a task message ({exc or 'unknown format'})")

        def on_unknown(sender: Any = None, message: Any = None, name: Any = None, **_: Any) -> None:
            if sender is consumer:
                _store(app, message, f"unknown task name {name!r}", "NotRegistered")

        signals.task_rejected.connect(on_rejected, weak=False)
        signals.task_unknown.connect(on_unknown, weak=False)
        self.liveness: Liveness | None = None
        if redis_broker(app):
            name = f"{getattr(consumer, 'hostname', None) or socket.gethostname()}:{os.getpid()}"
            self.liveness = Liveness(app.connection_for_write, f"{name}:{id(self):x}")
            _alive.append(self.liveness)
            if not _compat.add_consumer_connection_errors(consumer, WRITE_REFUSALS):
                _compat.step_aside("surviving a full or read-only broker", "this Celery's "
                                   "consumer has no connection_errors", "the worker stops on "
                                   "one, and its supervisor must start it again")  # fmt: skip
            _compat.wrap_consumer_connect(consumer, lambda: wait_for_writes(app))
            _install_refusal_filter()

    def start(self, consumer: Any) -> None:
        # The Tasks step has just filled consumer.strategies; the message handler looks them
        # up per message in this same dict, so wrapping the entries in place takes effect.
        app: Celery = consumer.app

        def wrap(name: str, strategy: Any) -> Any:
            if name.startswith("op_celery.") and not getattr(strategy, "_op_guarded", False):
                return _guard(app, name, strategy)
            return strategy

        _compat.wrap_task_strategies(consumer, wrap)
        qos = _compat.redis_qos(consumer)
        if qos is not None:
            _survive_restore_on_lost_connection(qos)
            _compat.reuse_channel_client(qos.channel)
        if self.liveness is not None:
            # Celery starts the steps again after a broken connection: ``restart_count`` (a
            # public attribute of its consumer) is 0 at the first start.
            self.liveness.started(reconnected=(getattr(consumer, "restart_count", 0) or 0) > 0)


def wait_for_writes(app: Celery) -> None:
    """Hold the worker's consumer, about to (re)connect to ``app``'s Redis broker, until that
    Redis takes a write; said once (and once more when it does), however long it takes.

    A Redis that was full must also have :data:`WRITE_HEADROOM_PCT` of its ``maxmemory``
    free: at the very edge, the next message taken would fill it again. The probe has its own
    connection, closed after. Any other error of it (a broker away) is left to the consumer's
    own connection, which meets it too and which Celery retries as it would without this. A
    worker asked to stop meanwhile stops.
    """
    notice = broker_refusals()
    pause_s = WRITE_PROBE_FIRST_S
    with app.connection_for_read() as connection:
        where = redact_url(connection.as_uri())
        away: tuple[type[BaseException], ...] = (OperationalError, *connection.connection_errors)
        try:  # one attempt: a broker away is the consumer's own connection's to retry
            connection.ensure_connection(max_retries=0)
        except away:
            return
        while True:
            try:
                if _takes_writes(connection, was_full=notice.state == FULL):
                    notice.accepted(where, settled=True)
                    return
            except WRITE_REFUSALS as exc:
                notice.refused(write_refusal(exc) or FULL, where)
            except (*away, *connection.channel_errors):
                return
            until = time.monotonic() + pause_s
            while time.monotonic() < until:
                _compat.worker_should_stop()
                time.sleep(STOP_CHECK_S)
            pause_s = min(pause_s * 2, WRITE_PROBE_MAX_S)


def _takes_writes(connection: Any, was_full: bool) -> bool:
    """Write the probe key through ``connection`` (raising what Redis answers); False if the
    Redis ``was_full`` and is still within :data:`WRITE_HEADROOM_PCT` of its ``maxmemory``."""
    channel = connection.default_channel
    client = _compat.redis_client(channel)
    client.set(_compat.redis_key_prefix(channel) + WRITE_PROBE_KEY, "1", px=WRITE_PROBE_TTL_MS)
    if not was_full:
        return True
    try:
        memory = client.info("memory")
    except redis.ResponseError:  # INFO refused (a managed Redis): the write is all we know
        return True
    maxmemory = int(memory.get("maxmemory") or 0)
    used = int(memory.get("used_memory") or 0)
    return not maxmemory or used <= maxmemory * (1 - WRITE_HEADROOM_PCT / 100)


class _RefusalFilter(logging.Filter):
    """Turns kombu's tracebacks of a timer refused by a full or read-only Redis (once a second
    per channel: its bindings' expiry refresh, its unacked restore) into the broker notice's
    one line; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        state = write_refusal(exc)
        if state is None:
            return True
        broker_refusals().refused(state, "(kombu's event loop)")
        return False


_refusal_filter = _RefusalFilter()


def _install_refusal_filter() -> None:
    for name in _compat.KOMBU_TIMER_LOGGERS:
        logger = logging.getLogger(name)
        if _refusal_filter not in logger.filters:
            logger.addFilter(_refusal_filter)


def _survive_restore_on_lost_connection(qos: Any) -> None:
    """Work around kombu's Redis transport stopping the worker when the broker goes away or
    refuses writes.

    On a lost connection Celery closes the channel, whose QoS then pushes the unacked messages
    back, and acks of events finishing meanwhile, through that same connection, already torn
    down: kombu raises AttributeError ("'NoneType' object has no attribute 'hostname'"), which
    Celery treats as an unrecoverable error, and the worker exits. A full or read-only Redis
    refuses the same acks and pushes (``WRITE_REFUSALS``), with the same end. Either way those
    messages stay in Redis' unacked set and come back through the visibility-timeout sweep (an
    event delivered meanwhile is then skipped by the ledger), so the failure is logged (a
    refusal once, not per message) and the worker carries on.
    """
    if getattr(qos, "_op_survives", False):
        return
    for name in _compat.KOMBU_QOS_METHODS:
        setattr(qos, name, _logging_attribute_errors(name, getattr(qos, name), qos))
    qos._op_survives = True


def _qos_where(qos: Any) -> str:
    """The redacted URL of the broker a QoS's channel talks to."""
    try:
        return redact_url(qos.channel.connection.client.as_uri())
    except AttributeError:  # a channel torn down: its URL does not matter any more
        return "(its connection is closed)"


def _logging_attribute_errors(name: str, original: Any, qos: Any = None) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except WRITE_REFUSALS as exc:
            broker_refusals().refused(write_refusal(exc) or FULL, _qos_where(qos))
            if name in ("ack", "reject") and args and qos is not None:
                # Still in Redis' unacked hash, no longer held here: else the prefetch
                # limit, counting it forever, would stop this channel taking messages.
                _compat.forget_delivered(qos, args[0])
            return None
        except AttributeError as exc:
            log.warning(
                "op_celery: %s on the lost broker connection failed (%s); the events concerned "
                "return after the visibility timeout",
                name,
                exc,
            )
            return None

    return call


def _malformed(payload: Any) -> bool:
    """Whether a decoded protocol-2 body is not ``[args, kwargs, options]`` (options: the
    embedded callbacks, errbacks, chain and chord, or null)."""
    return not (
        isinstance(payload, (list, tuple))
        and len(payload) == 3
        and isinstance(payload[0], (list, tuple))
        and isinstance(payload[1], dict)
        and (payload[2] is None or isinstance(payload[2], dict))
    )


def _guard(app: Celery, name: str, strategy: Any) -> Any:
    """``strategy``, but a message whose body is not ``[args, kwargs, options]`` is stored as
    a dead letter and acked instead of reaching it.

    Decoding the body is Celery's business too: a body that cannot be decoded raises kombu's
    ``DecodeError`` (or ``ContentDisallowed``) here as it would in Celery's handler, which
    hands it to ``on_decode_error`` (wrapped to store it) or rejects it (and ``task_rejected``
    stores it). Whatever the strategy itself raises is not the message's fault and goes to
    Celery unchanged, as without this guard (a broker error restarts the consumer, another
    error stops the worker); the message, never acked, is restored by kombu.
    """

    def guarded(message: Any, body: Any, ack: Any, *args: Any, **kwargs: Any) -> Any:
        # ``body`` is None for protocol 2, whose body Celery decodes later; a protocol-1 body
        # (decoded already, a dict) is Celery's to check.
        if body is None and _malformed(message.payload):
            _store(app, message, f"malformed {name} message (the body is not "
                   "[args, kwargs, options])", "MalformedMessage")  # fmt: skip
            message.ack()
            return None
        return strategy(message, body, ack, *args, **kwargs)

    guarded._op_guarded = True  # type: ignore[attr-defined]
    return guarded


#: The consumers of this process that say they are alive.
_alive: list[Liveness] = []


@signals.worker_shutdown.connect(weak=False)
def _on_worker_shutdown(**_: Any) -> None:
    """The worker stopped cleanly, its consumer's connection closed (kombu reads a BRPOP reply
    in flight before closing, and gives back what it held): it lost nothing, so its consumers
    say they stopped. A worker killed before this point is taken for dead instead."""
    while _alive:
        _alive.pop().stop()


def _queue_of(request: Any, app: Celery) -> str:
    info = getattr(request, "delivery_info", None) or {}
    return str(info.get("routing_key") or settings_for(app).queue)


@signals.task_revoked.connect(weak=False)
def _on_revoked(sender: Any = None, request: Any = None, expired: bool = False, **_: Any) -> None:
    """An expired or revoked message of the package's tasks is acked and never run: its
    record goes (Celery sends this in the worker's main process, from its consumer)."""
    name = str(getattr(sender, "name", "") or "")
    kwargs = getattr(request, "kwargs", None)
    if not name.startswith("op_celery.") or not isinstance(kwargs, dict):
        return
    event_id = kwargs.get("event_id")
    if isinstance(event_id, str):
        why = "expired before a worker ran it" if expired else "was revoked"
        forget_record(sender.app, _queue_of(request, sender.app), event_id, why)


@signals.task_postrun.connect(weak=False)
def _on_postrun(
    sender: Any = None, kwargs: Any = None, retval: Any = None, state: Any = None, **_: Any
) -> None:
    """A task that raised ``Reject(requeue=False)`` (a user's subclass or wrapper) ends its
    message: its record goes (sent where the task ran: a pool process, or the worker)."""
    if state != celery_states.REJECTED or getattr(retval, "requeue", True):
        return
    name = str(getattr(sender, "name", "") or "")
    event_id = kwargs.get("event_id") if isinstance(kwargs, dict) else None
    if name.startswith("op_celery.") and isinstance(event_id, str):
        forget_record(sender.app, _queue_of(sender.request, sender.app), event_id,
                      "was rejected by the task")  # fmt: skip


def install(app: Celery) -> None:
    """Add the poison guard to ``app``'s workers (done for every app the tasks register on)."""
    if PoisonGuard not in app.steps["consumer"]:
        app.steps["consumer"].add(PoisonGuard)
