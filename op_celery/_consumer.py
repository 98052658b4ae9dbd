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

The step reaches into Celery's consumer (its strategies and decode-error handler) and kombu's
Redis QoS through ``_compat``; on a Celery without them it does less, and Celery does the rest.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, bootsteps, signals

from . import _compat
from ._app import settings_for
from ._exceptions import OpenPanelError
from .dead_letters import DeadLetterStore

__all__ = ["PoisonGuard", "install"]

log = logging.getLogger("op_celery")


def _store(app: Celery, message: Any, reason: str) -> None:
    settings = settings_for(app)
    delivery = getattr(message, "delivery_info", None) or {}
    queue = delivery.get("routing_key")
    if queue is not None and queue != settings.queue:
        return  # someone else's queue, someone else's business
    try:
        letter = DeadLetterStore(settings).add_raw(
            getattr(message, "body", b""), reason, extra={"queue": queue}
        )
    except OpenPanelError as exc:
        log.error("op_celery: poison message not stored (%s): %s", exc, reason)
        return
    log.warning("op_celery: poison message stored as dead letter %s: %s", letter.id, reason)


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
            _store(app, message, f"undecodable message ({type(exc).__name__}: {exc})")

        _compat.wrap_decode_error_handler(consumer, on_decode_error)

        def on_rejected(sender: Any = None, message: Any = None, exc: Any = None, **_: Any) -> None:
            if sender is consumer:
                _store(app, message, f"not a task message ({exc or 'unknown format'})")

        def on_unknown(sender: Any = None, message: Any = None, name: Any = None, **_: Any) -> None:
            if sender is consumer:
                _store(app, message, f"unknown task name {name!r}")

        signals.task_rejected.connect(on_rejected, weak=False)
        signals.task_unknown.connect(on_unknown, weak=False)

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


def _survive_restore_on_lost_connection(qos: Any) -> None:
    """Work around kombu's Redis transport stopping the worker when the broker goes away.

    On a lost connection Celery closes the channel, whose QoS then pushes the unacked messages
    back, and acks of events finishing meanwhile, through that same connection, already torn
    down: kombu raises AttributeError ("'NoneType' object has no attribute 'hostname'"), which
    Celery treats as an unrecoverable error, and the worker exits. Those messages stay in
    Redis' unacked set and come back through the visibility-timeout sweep (an event delivered
    meanwhile is then skipped by the ledger), so the failure is logged and the worker carries on.
    """
    if getattr(qos, "_op_survives", False):
        return
    for name in _compat.KOMBU_QOS_METHODS:
        setattr(qos, name, _logging_attribute_errors(name, getattr(qos, name)))
    qos._op_survives = True


def _logging_attribute_errors(name: str, original: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
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
                   "[args, kwargs, options])")  # fmt: skip
            message.ack()
            return None
        return strategy(message, body, ack, *args, **kwargs)

    guarded._op_guarded = True  # type: ignore[attr-defined]
    return guarded


def install(app: Celery) -> None:
    """Add the poison guard to ``app``'s workers (done for every app the tasks register on)."""
    if PoisonGuard not in app.steps["consumer"]:
        app.steps["consumer"].add(PoisonGuard)
