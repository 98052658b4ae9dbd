"""Enqueue a validated op-celery call: the message Celery would send, for a fraction of the cost.

Celery's publish path (``Task.apply_async`` → ``Celery.send_task`` → ``AMQP.send_task_message``
→ ``kombu.Producer.publish`` → the Redis transport's ``Channel._put``) spends most of an enqueue
on work an op-celery message does not need (profiled with Celery 5.7 and kombu 5.7; see
``benchmarks/RESULTS.md``):

- kombu's Redis channel builds a new ``redis.Redis`` client for every message
  (``Channel.conn_or_acquire``): about 50 µs, most of it copying the response-callback table;
- ``argsrepr``/``kwargsrepr`` run Celery's streaming ``saferepr``: about 40 µs for a ``track``
  (on Celery's path too, op-celery passes its own rendering of them, the same text, as the
  ``argsrepr``/``kwargsrepr`` publish options; Celery then also copies both into the message
  properties, a Celery quirk that costs their length in bytes per message);
- the queue is re-declared on every publish (kombu binds a copy of the entity before finding it
  in its cache), a producer is rebound (its exchange copied) for every message, and settings
  are looked up through Celery's layered config at 2-3 µs each.

`publish` writes the same protocol-2 message itself (headers, properties and body identical to
Celery's, byte for byte except the fresh ids; ``tests/test_publish.py`` compares them) and
pushes it over a connection of the app's broker pool with the same retry behaviour: kombu's
``Connection.ensure`` with the app's ``task_publish_retry``/``task_publish_retry_policy``
merged with the call's, reconnection after a connection error, and errors surfacing as
``kombu.exceptions.OperationalError``. It keeps one Redis client per kombu channel (redis-py
clients are thread-safe; a channel belongs to one pooled connection, used by one thread at a
time) and declares each queue once per channel.

Anything it does not reproduce exactly goes through Celery's own path, unchanged: a broker
other than Redis; publish options beyond ``queue``, ``retry`` and ``retry_policy``
(``countdown``, ``eta``, ``expires``,
``priority``, ``headers``, ``link``, a ``producer``...); task-level execution options
(time limits, priority...); a router that adds more than a queue; a queue that expires or is
deleted when unused (kombu redeclares those on every publish); ``task_always_eager``;
``task_send_sent_event``; a task inheriting its parent's priority; and any receiver of
``before_task_publish``, ``after_task_publish`` or ``task_sent``, or a wrapped
``Task.apply_async``, because tracing integrations (OpenTelemetry, Sentry, Datadog) hook those
to add headers.

Both paths publish over connections of the package's own pool per app
(:func:`~op_celery._publish_bound.publish_pools`): the app's broker settings with the publish
bound's timeouts, so that a broker that refuses, never answers or answers slowly holds
``.delay()`` for about ``OP_CELERY_PUBLISH_TIMEOUT``, while the app's own tasks and its workers'
consumers keep the app's settings.

This module is the publish entry, Celery's path, and the building and sending of the fast
path's message. Three concepts it uses live apart: whether a call may take the fast path
(``_publish_plan``), the publish bound and the package's pools (``_publish_bound``), and the
text copies of the arguments (``_reprs``).

The private Celery and kombu names it needs are read through ``_compat``, which also says
whether the installed versions are ones the fast path was checked with
(:func:`~op_celery._compat.fast_publish_support`); where they are not, every call takes
Celery's path, and one log line says why.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from celery import Task
from celery.result import AsyncResult
from kombu import Queue
from kombu.common import maybe_declare
from kombu.utils.json import dumps
from kombu.utils.uuid import uuid

from . import _compat
from ._outbox import BROKER_ERRORS as OUTBOX_ERRORS
from ._outbox import Writer, record_json
from ._publish_bound import ATTEMPT_SHARE, acquire, bound, bounded, publish_pools, take
from ._publish_plan import AppPlan, Route, app_plan, fast_route
from ._reprs import argsrepr, kwargsrepr, origin

__all__ = ["outbox_writer", "publish", "queue_access", "redis_broker"]

log = logging.getLogger("op_celery")

#: The embed part of a protocol-2 body for a task without callbacks, chain or chord, as JSON.
_EMBED_JSON = '{"callbacks": null, "errbacks": null, "chain": null, "chord": null}'


def publish(
    task: Task[Any, Any],
    kwargs: dict[str, Any],
    options: dict[str, Any],
    base: Any,
    task_id: str | None = None,
    producer: Any = None,
    link: Any = None,
    link_error: Any = None,
    shadow: str | None = None,
    outbox_grace_s: float | None = None,
) -> AsyncResult[Any]:
    """Enqueue ``task`` with keyword arguments ``kwargs`` (validated plain JSON).

    The arguments are those of ``Task.apply_async``; ``base`` is the calling class's
    ``super()``, whose ``apply_async`` (Celery's) publishes whatever the fast path does not
    reproduce exactly. With ``outbox_grace_s`` (the outbox is on) and a Redis broker, the call's
    outbox record is written in the same script as the message (fast path) or right after it
    (Celery's path), due that many seconds later.
    """
    app: Any = task.app
    # The bound of `bounded`, inline: a generator-based context costs a microsecond or two.
    outer = getattr(bound, "deadline", None)
    if outer is None:
        timeout_s = app_plan(app).publish_timeout_s
        bound.deadline = time.monotonic() + timeout_s
        bound.attempt_s = timeout_s * ATTEMPT_SHARE
    try:
        route = None
        if (
            producer is None
            and link is None
            and link_error is None
            and shadow is None
            and (task_id is None or type(task_id) is str)
        ):
            route = fast_route(task, app, options, kwargs)
        if route is None:
            return _celery_publish(
                task, app, kwargs, options, base, task_id, producer, link, link_error, shadow,
                outbox_grace_s,
            )  # fmt: skip
        return _send(task, app, route, kwargs, task_id or uuid(), outbox_grace_s)
    finally:
        if outer is None:
            bound.deadline = None


def _celery_publish(
    task: Any,
    app: Any,
    kwargs: dict[str, Any],
    options: dict[str, Any],
    base: Any,
    task_id: str | None,
    producer: Any,
    link: Any,
    link_error: Any,
    shadow: str | None,
    outbox_grace_s: float | None,
) -> AsyncResult[Any]:
    """Celery's own path, with a producer of the package's pool unless the caller gave one."""
    plan = app_plan(app)
    publish_options = _with_reprs(task, app, plan, kwargs, options)
    if producer is not None:
        result: AsyncResult[Any] = base.apply_async(
            (), kwargs, task_id, producer, link, link_error, shadow, **publish_options
        )
    else:
        pools = publish_pools(app)
        with acquire(pools.producers, plan) as own_producer:
            result = base.apply_async(
                (), kwargs, task_id, own_producer, link, link_error, shadow, **publish_options
            )
    if outbox_grace_s is not None and plan.redis_broker and not _own_retry(app, result.id):
        _add_record(app, outbox_grace_s, task, kwargs, result.id, options.get("queue"))
    return result


def _with_reprs(
    task: Any, app: Any, plan: AppPlan, kwargs: Mapping[str, Any], options: dict[str, Any]
) -> dict[str, Any]:
    """The options of a call for Celery's path, with the text copies of its arguments that
    Celery would render (``saferepr``, about 40 µs for a ``track``) rendered here instead,
    through Celery's own ``argsrepr``/``kwargsrepr`` publish options: the same text.

    Not when the caller gave either, when Celery changes the arguments before rendering them
    (a ``pydantic=True`` task), or with task protocol 1, which has no such headers.
    """
    if (
        "argsrepr" in options
        or "kwargsrepr" in options
        or plan.protocol != 2
        or _compat.task_dumps_pydantic_arguments(task)
    ):
        return options
    amqp = app.amqp
    maxlevels = plan.repr_maxlevels
    return {
        **options,
        "argsrepr": argsrepr(amqp.argsrepr_maxsize, maxlevels),
        "kwargsrepr": kwargsrepr(kwargs, amqp.kwargsrepr_maxsize, maxlevels),
    }


def _own_retry(app: Any, task_id: str) -> bool:
    """Whether a worker publishes this task again from within it (a retry or a reschedule):
    its record exists since the first publish, with the same task id and queue."""
    current = app.current_worker_task
    return current is not None and current.request.id == task_id


def _add_record(
    app: Any, grace_s: float, task: Any, kwargs: Mapping[str, Any], task_id: str, queue: Any
) -> None:
    """Write the outbox record of a call Celery published: a second round trip, so a crash
    in between leaves that one message without a record (as without an outbox)."""
    support = _compat.redis_channel_support()
    if not support.ok:
        _compat.step_aside("the outbox", support.reason, "events are enqueued without a record")
        return
    name = queue.name if isinstance(queue, Queue) else str(queue or app.conf.task_default_queue)
    record = record_json(task.name, task_id, name, _json(kwargs))
    try:
        with outbox_writer(app) as writer:
            writer.push(grace_s, name, str(kwargs.get("event_id")), record)
    except OUTBOX_ERRORS as exc:
        # The event is enqueued; only its protection against a lost message is missing.
        log.warning("op_celery: event %s enqueued without its outbox record: %s",
                    kwargs.get("event_id"), exc)  # fmt: skip


# --- Building and sending the message. ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Message:
    """The parts of one message that do not depend on the channel it goes out on."""

    body: str  # the serialised ((), kwargs, embed), before the transport's body encoding
    headers_json: str  # the protocol-2 headers, as JSON
    task_id: str
    reply_to: str
    delivery_mode: int
    queue: Any  # kombu.Queue
    outbox_grace_s: float | None  # None: the outbox is off
    event_id: str
    record: str  # the outbox record, when there is an outbox


def _send(
    task: Any,
    app: Any,
    route: Route,
    kwargs: dict[str, Any],
    task_id: str,
    outbox_grace_s: float | None,
) -> AsyncResult[Any]:
    amqp = app.amqp
    plan = route.plan
    maxlevels = plan.repr_maxlevels
    parent = route.parent
    if parent is not None:
        root_id = parent.request.root_id or parent.request.id or task_id
        parent_id = parent.request.id
    else:
        root_id, parent_id = task_id, None
    # The headers of AMQP.as_task_v2, key for key and in its order, as json.dumps writes them;
    # every value not written out here is a constant of a call the fast path publishes.
    headers_json = (
        f'{{"lang": "py", "task": {_str(task.name)}, "id": {_str(task_id)}, "shadow": null, '
        '"eta": null, "expires": null, "group": null, "group_index": null, "retries": 0, '
        f'"timelimit": [null, null], "root_id": {_str(root_id)}, '
        f'"parent_id": {_nullable(parent_id)}, '
        f'"argsrepr": {_str(argsrepr(amqp.argsrepr_maxsize, maxlevels))}, '
        f'"kwargsrepr": {_str(kwargsrepr(kwargs, amqp.kwargsrepr_maxsize, maxlevels))}, '
        f'"origin": {_str(origin())}, "ignore_result": true, "replaced_task_nesting": 0, '
        '"stamped_headers": null, "stamps": {}}'
    )
    kwargs_json = _json(kwargs)
    message = _Message(
        body=f"[[], {kwargs_json}, {_EMBED_JSON}]",  # kombu's json serializer's text
        headers_json=headers_json,
        task_id=task_id,
        reply_to=app.thread_oid,
        delivery_mode=route.delivery_mode,
        queue=route.queue,
        outbox_grace_s=outbox_grace_s,
        event_id=str(kwargs.get("event_id")),
        record=""
        if outbox_grace_s is None
        else record_json(task.name, task_id, route.queue.name, kwargs_json),
    )
    # A pooled broker connection, as Celery's producer pool lends (its producers hold one each
    # from this same pool); the producer itself would only be rebound and copied.
    connection = take(publish_pools(app).connections, plan)  # not `acquire`: a µs per call
    try:

        def put() -> None:
            _put(connection.default_channel, message, route)

        if route.retry:
            # As kombu's Producer.publish: the policy also governs reconnecting.
            connection.transport_options.update(route.retry_policy)
            _ensure(connection, put, route.retry_policy)
        else:
            with _compat.reraise_as_library_errors(connection):
                put()
    finally:
        connection.release()
    result: AsyncResult[Any] = task.AsyncResult(task_id)
    result.ignored = True  # as Celery's send_task sets it
    if parent is not None:
        parent.add_trail(result)
    return result


def _ensure(connection: Any, put: Callable[[], None], policy: Mapping[str, Any]) -> None:
    """``connection.ensure(obj, put, **policy)()``, as kombu's ``Producer.publish`` calls it,
    with the first attempt made directly.

    ``Connection.ensure``'s wrapper costs a few microseconds per call. Its first iteration only
    calls ``put``; what it does next depends only on the exception ``put`` raised. So ``put`` is
    tried first, and if it raises an error the wrapper handles (a recoverable connection or
    channel error), that same exception is handed to a wrapper made then, as its own first
    attempt: reconnection, retries, revival and the final ``OperationalError`` are kombu's.
    Other exceptions propagate as they would through the wrapper.
    """
    try:
        put()
        return
    except connection.recoverable_connection_errors + connection.recoverable_channel_errors as exc:
        failure: BaseException | None = exc

    def replay() -> None:
        nonlocal failure
        if failure is not None:
            error, failure = failure, None
            raise error
        put()

    connection.ensure(_REVIVAL, replay, **policy)()


class _Revival:
    """Connection.ensure revives this after reconnecting; each attempt of `_put` reads the
    connection's (new) default channel itself, so there is nothing to rebind."""

    def revive(self, channel: Any) -> None:
        pass


_REVIVAL = _Revival()


@dataclass(slots=True)
class _ChannelState:
    client: Any  # a plain redis.Redis on the channel's connection pool
    prefix: str  # the broker's global_keyprefix, which kombu puts in front of its keys
    #: Per queue name: the Redis key its messages go to (prefixed) and their "priority" property.
    queues: dict[str, tuple[str, int]]
    writer: Writer | None = None  # the outbox's, made when first needed

    def outbox_writer(self) -> Writer:
        if self.writer is None:
            self.writer = Writer(self.client.connection_pool, self.prefix)
        return self.writer


_channel_states: weakref.WeakKeyDictionary[Any, _ChannelState] = weakref.WeakKeyDictionary()


def _put(channel: Any, message: _Message, route: Route) -> None:
    """One attempt: what kombu's ``Producer._publish`` and the Redis ``Channel._put`` do, with
    one Redis client per channel instead of one per message."""
    state = _channel_state(channel)
    queue = message.queue
    name = queue.name
    known = state.queues.get(name)
    if known is None:
        # Once per channel (kombu's maybe_declare caches per connection, after a copy and a
        # bind of the queue on every message).
        maybe_declare(queue, channel, route.retry, **route.retry_policy)
        # Producer.publish passes priority 0, which prepare_message turns into the channel's
        # default; the Redis channel picks the list from the priority it then reads back.
        priority = 0 or channel.default_priority
        key = state.prefix + _compat.redis_queue_key(channel, name, priority)
        known = state.queues[name] = (key, priority)
    key, priority = known
    body, body_encoding = channel.encode_body(message.body, channel.body_encoding)
    # The message as prepare_message and _inplace_augment_message build it and the transport
    # serialises it with json.dumps: same keys, same order, same separators.
    payload = (
        f'{{"body": {_str(body)}, "content-encoding": "utf-8", '
        f'"content-type": "application/json", "headers": {message.headers_json}, '
        f'"properties": {{"correlation_id": {_str(message.task_id)}, '
        f'"reply_to": {_str(message.reply_to)}, "delivery_mode": {message.delivery_mode}, '
        f'"delivery_info": {{"exchange": "", "routing_key": {_str(name)}}}, '
        f'"priority": {priority}, "body_encoding": {_nullable(body_encoding)}, '
        f'"delivery_tag": {_str(_compat.next_delivery_tag(channel))}}}}}'
    )
    grace_s = message.outbox_grace_s
    if grace_s is None:
        state.client.lpush(key, payload)
    else:
        # One script: the message never exists without its record.
        state.outbox_writer().push(grace_s, name, message.event_id, message.record, key, payload)


def redis_broker(app: Any) -> bool:
    """Whether the app's broker is Redis (read once per app)."""
    return app_plan(app).redis_broker


@contextmanager
def outbox_writer(app: Any) -> Iterator[Writer]:
    """The outbox's writer on a connection of the app's (Redis) broker pool, for writes
    outside a publish."""
    plan = app_plan(app)
    with bounded(plan.publish_timeout_s), acquire(publish_pools(app).connections, plan) as conn:
        yield _channel_state(conn.default_channel).outbox_writer()


def queue_access(app: Any, queue: str) -> tuple[Any, str, tuple[str, str] | None]:
    """For a worker that takes messages off ``queue`` itself (``_drain``): a Redis client on
    the app's (Redis) broker, the queue's list at the default priority (where every publish
    of the package puts its messages), and kombu's unacked hash and index (None if kombu's
    channel lacks them), broker key prefix included."""
    plan = app_plan(app)
    with bounded(plan.publish_timeout_s), acquire(publish_pools(app).connections, plan) as conn:
        channel = conn.default_channel
        state = _channel_state(channel)
        key = state.prefix + _compat.redis_queue_key(channel, queue, channel.default_priority)
        return state.client, key, _compat.redis_unacked_keys(channel)


def _channel_state(channel: Any) -> _ChannelState:
    state = _channel_states.get(channel)
    if state is None or state.client.connection_pool is not channel.pool:
        state = _ChannelState(_compat.redis_client(channel), _compat.redis_key_prefix(channel), {})
        _channel_states[channel] = state
    return state


#: How json.dumps writes a str (ensure_ascii, its default).
_str: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _nullable(value: str | None) -> str:
    return "null" if value is None else _str(value)


def _json(value: Any) -> str:
    """``kombu.utils.json.dumps(value)``, as kombu's json serializer calls it.

    For plain JSON (what op-celery's validation lets through) that is ``json.dumps`` with its
    defaults, whose encoder is made once, where kombu's makes one per call. Other values go to
    kombu's, which knows more types.
    """
    try:
        return json.dumps(value)
    except TypeError:
        text: str = dumps(value)
        return text
