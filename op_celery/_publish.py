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

Both paths publish over connections of the package's own pool per app (`publish_pools`): the
app's broker settings with the publish bound's timeouts, so that a broker that refuses, never
answers or answers slowly holds ``.delay()`` for about ``OP_CELERY_PUBLISH_TIMEOUT`` (see
`deadline_errback`), while the app's own tasks and its workers' consumers keep the app's
settings.

The private Celery and kombu names it needs are read through ``_compat``, which also says
whether the installed versions are ones the fast path was checked with
(:func:`~op_celery._compat.fast_publish_support`); where they are not, every call takes
Celery's path, and one log line says why.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, Task, signals
from celery.app import task as celery_task
from celery.result import AsyncResult
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from kombu import Connection, Queue
from kombu.common import Broadcast, maybe_declare
from kombu.entity import maybe_delivery_mode
from kombu.exceptions import LimitExceeded, OperationalError
from kombu.pools import ProducerPool
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps
from kombu.utils.uuid import uuid

from . import _compat
from ._app import settings_for
from ._outbox import BROKER_ERRORS as OUTBOX_ERRORS
from ._outbox import Writer, record_json

__all__ = ["deadline_errback", "outbox_writer", "publish", "publish_pools", "redis_broker"]

log = logging.getLogger("op_celery")

#: The only publish options the fast path handles; any other one goes through Celery.
FAST_OPTIONS = frozenset({"queue", "serializer", "retry", "retry_policy"})
#: Execution options of the task class the fast path handles (others must be None).
_HANDLED_EXEC_OPTIONS = frozenset({"queue", "serializer"})
#: The embed part of a protocol-2 body for a task without callbacks, chain or chord, as JSON.
_EMBED_JSON = '{"callbacks": null, "errbacks": null, "chain": null, "chord": null}'
#: Signals whose receivers may change a message: with any receiver, Celery's path publishes.
_BEFORE_PUBLISH = signals.before_task_publish
_AFTER_PUBLISH = signals.after_task_publish
_TASK_SENT: Any = getattr(signals, "task_sent", None)  # deprecated, still sent by Celery 5
#: Seconds a publish may take when the app's settings cannot say (they always can, once read).
DEFAULT_PUBLISH_TIMEOUT_S = 1.0
#: Share of ``OP_CELERY_PUBLISH_TIMEOUT`` one attempt of a publish may wait for the broker: for
#: its TCP connection, and for each of its replies. A broker that accepts the connection and
#: never answers then costs one share per attempt, and `deadline_errback` starts no attempt
#: that could end after the bound.
ATTEMPT_SHARE = 0.25
#: AMQP's delivery mode 2, kombu's default.
PERSISTENT_DELIVERY_MODE = 2
_SHADOW_NAME = celery_task.Task.shadow_name
_CELERY_APPLY_ASYNC = celery_task.Task.__dict__["apply_async"]
#: False when an integration had wrapped ``Task.apply_async`` before this module was imported.
_APPLY_ASYNC_IS_CELERYS = (
    getattr(getattr(_CELERY_APPLY_ASYNC, "__code__", None), "co_filename", None)
    == celery_task.__file__
)


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
    # The bound of `_bounded`, inline: a generator-based context costs a microsecond or two.
    outer = getattr(_bound, "deadline", None)
    if outer is None:
        timeout_s = _app_plan(app).publish_timeout_s
        _bound.deadline = time.monotonic() + timeout_s
        _bound.attempt_s = timeout_s * ATTEMPT_SHARE
    try:
        route = None
        if (
            producer is None
            and link is None
            and link_error is None
            and shadow is None
            and (task_id is None or type(task_id) is str)
        ):
            route = _fast_route(task, app, options, kwargs)
        if route is None:
            return _celery_publish(
                task, app, kwargs, options, base, task_id, producer, link, link_error, shadow,
                outbox_grace_s,
            )  # fmt: skip
        return _send(task, app, route, kwargs, task_id or uuid(), outbox_grace_s)
    finally:
        if outer is None:
            _bound.deadline = None


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
    plan = _app_plan(app)
    publish_options = _with_reprs(task, app, plan, kwargs, options)
    if producer is not None:
        result: AsyncResult[Any] = base.apply_async(
            (), kwargs, task_id, producer, link, link_error, shadow, **publish_options
        )
    else:
        pools = publish_pools(app)
        with _acquire(pools.producers, plan) as own_producer:
            result = base.apply_async(
                (), kwargs, task_id, own_producer, link, link_error, shadow, **publish_options
            )
    if outbox_grace_s is not None and plan.redis_broker and not _own_retry(app, result.id):
        _add_record(app, outbox_grace_s, task, kwargs, result.id, options.get("queue"))
    return result


def _with_reprs(
    task: Any, app: Any, plan: _AppPlan, kwargs: Mapping[str, Any], options: dict[str, Any]
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
        "argsrepr": _argsrepr(amqp.argsrepr_maxsize, maxlevels),
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


# --- Deciding whether the fast path reproduces Celery exactly. --------------------------------


@dataclass(slots=True)
class _AppPlan:
    """Settings read once per app: those Celery's task sender also reads once (retry, retry
    policy, delivery mode, protocol), and two it reads per call but no app changes once it
    publishes (``task_repr_maxlevels``, ``broker_pool_acquire_timeout``)."""

    supported: bool
    redis_broker: bool = False
    protocol: int = 2
    retry: bool = False
    retry_policy: dict[str, Any] = field(default_factory=dict)
    default_delivery_mode: Any = None
    repr_maxlevels: int = 3
    acquire_timeout_s: float | None = None
    publish_timeout_s: float = DEFAULT_PUBLISH_TIMEOUT_S  # OP_CELERY_PUBLISH_TIMEOUT
    #: Per queue name: the app's declaration and its delivery mode (None: not for the fast path).
    queues: dict[str, tuple[Any, int | None]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Route:
    queue: Any  # kombu.Queue
    delivery_mode: int
    retry: bool
    retry_policy: dict[str, Any]
    parent: Any  # the worker task this call runs in, if any
    plan: _AppPlan


_app_plans: weakref.WeakKeyDictionary[Celery, _AppPlan] = weakref.WeakKeyDictionary()


def _app_plan(app: Any) -> _AppPlan:
    plan = _app_plans.get(app)
    if plan is None:
        plan = _make_app_plan(app)
        _app_plans[app] = plan
    return plan


def _make_app_plan(app: Any) -> _AppPlan:
    conf = app.conf
    amqp = app.amqp
    connection = app.connection_for_write()
    try:
        redis_broker = isinstance(connection.transport, kombu_redis.Transport)
        transport_options = dict(connection.transport_options or {})
    finally:
        connection.release()
    protocol = conf.task_protocol
    repr_maxlevels = _compat.repr_maxlevels(conf)
    publish_timeout_s = settings_for(app).publish_timeout_s
    # The body is encoded as the channel says (kombu's encode_body); base64 and no encoding
    # give text, which is what the message JSON is written for.
    body_encoding = transport_options.get("body_encoding", "base64")
    supported = (
        redis_broker
        and (not body_encoding or str(body_encoding).lower() in ("base64", "utf-8"))
        and protocol == 2
        and type(app).send_task is Celery.send_task
        and _compat.amqp_is_celerys(amqp)
    )
    if supported:
        # Said once per process: the versions installed are not ones it was checked with.
        support = _compat.fast_publish_support()
        if not support.ok:
            _compat.step_aside(
                "the fast publish path", support.reason, "events go through Celery's own path"
            )
            supported = False
    if not supported:
        return _AppPlan(
            supported=False,
            redis_broker=redis_broker,
            protocol=protocol,
            repr_maxlevels=repr_maxlevels,
            acquire_timeout_s=_compat.pool_acquire_timeout_s(conf),
            publish_timeout_s=publish_timeout_s,
        )
    return _AppPlan(
        supported=True,
        redis_broker=True,
        protocol=protocol,
        retry=bool(conf.task_publish_retry),
        retry_policy=dict(conf.task_publish_retry_policy or {}),
        default_delivery_mode=conf.task_default_delivery_mode,
        repr_maxlevels=repr_maxlevels,
        acquire_timeout_s=_compat.pool_acquire_timeout_s(conf),
        publish_timeout_s=publish_timeout_s,
    )


def _fast_route(
    task: Any, app: Any, options: dict[str, Any], kwargs: Mapping[str, Any]
) -> _Route | None:
    """The route of a call the fast path reproduces exactly, else None."""
    if (
        not options.keys() <= FAST_OPTIONS
        or options.get("serializer", "json") != "json"
        or "queue" not in options
    ):
        return None
    plan = _app_plan(app)
    if (
        not plan.supported
        or task.typing
        or not task.ignore_result  # Celery would subscribe the result backend to the task id
        or _compat.task_is_v2_compat(task)
        or _compat.task_dumps_pydantic_arguments(task)
        or type(task).shadow_name is not _SHADOW_NAME
        or not _APPLY_ASYNC_IS_CELERYS
        or celery_task.Task.__dict__.get("apply_async") is not _CELERY_APPLY_ASYNC
        or _BEFORE_PUBLISH.receivers
        or _AFTER_PUBLISH.receivers
        or (_TASK_SENT is not None and _TASK_SENT.receivers)
        or _compat.callback_publish_retry()
        or not _plain_exec_options(task)
    ):
        return None
    conf = app.conf  # read on every call, as Celery's apply_async and send_task read them
    if conf.task_always_eager or conf.task_send_sent_event:
        return None
    parent = app.current_worker_task
    if parent is not None and conf.task_inherit_parent_priority:
        return None
    amqp = app.amqp
    router = amqp.router
    if router.routes:
        # Route as Celery does, with the options it would pass: the task's execution options,
        # the caller's over them, minus those send_task pops.
        routed = dict(_compat.exec_options(task), **options)
        for key in ("time_limit", "soft_time_limit", "expires"):
            routed.pop(key, None)
        routed = router.route(routed, task.name, (), kwargs, task)
        if any(v is not None for k, v in routed.items() if k not in FAST_OPTIONS) or routed.get(
            "serializer", "json"
        ) not in ("json", None):
            return None
        queue = routed.get("queue")
    else:
        # What Router.route does without routes when a queue is given: look it up (Queues
        # makes a missing one when task_create_missing_queues is on).
        routed = options
        queue = options["queue"]
        if not isinstance(queue, Queue):
            try:
                queue = amqp.queues[queue]
            except KeyError:  # Celery's path raises its QueueNotFound
                return None
    # Cached per queue name, for the declaration the app has under that name (one per name,
    # so the cache stays as small as the app's set of queues).
    cached = plan.queues.get(queue.name) if isinstance(queue, Queue) else None
    if cached is None or cached[0] is not queue:
        cached = (queue, _queue_delivery_mode(queue, plan))
        if isinstance(queue, Queue) and amqp.queues.get(queue.name) is queue:
            plan.queues[queue.name] = cached
    delivery_mode = cached[1]
    if delivery_mode is None:
        return None
    # As AMQP.send_task_message merges the call's retry settings with the app's.
    retry = routed.get("retry")
    retry_policy = routed.get("retry_policy")
    return _Route(
        queue=queue,
        delivery_mode=delivery_mode,
        retry=plan.retry if retry is None else bool(retry),
        retry_policy=(
            dict(plan.retry_policy, **retry_policy) if retry_policy else dict(plan.retry_policy)
        ),
        parent=parent,
        plan=plan,
    )


_exec_verdicts: weakref.WeakKeyDictionary[Any, tuple[Mapping[str, Any], bool]] = (
    weakref.WeakKeyDictionary()
)


def _plain_exec_options(task: Any) -> bool:
    """Whether the task's execution options (which Celery caches per task) are all unset but
    the queue and the serializer."""
    exec_options = _compat.exec_options(task)
    cached = _exec_verdicts.get(task)
    if cached is None or cached[0] is not exec_options:
        plain = all(
            value is None or key in _HANDLED_EXEC_OPTIONS for key, value in exec_options.items()
        )
        cached = _exec_verdicts[task] = (exec_options, plain)
    return cached[1]


def _queue_delivery_mode(queue: Any, plan: _AppPlan) -> int | None:
    """The delivery mode of messages to ``queue``, or None if the fast path cannot publish to it
    (a broadcast queue, an exchange that is not direct, or a queue kombu declares again on every
    publish: one that expires, whose TTL kombu renews then, or one deleted when unused)."""
    if (
        not isinstance(queue, Queue)
        or isinstance(queue, Broadcast)
        or queue.exchange is None
        or queue.exchange.type != "direct"
        or getattr(queue, "expires", None) is not None
        or not queue.can_cache_declaration
    ):
        return None
    mode = _delivery_mode(queue, plan.default_delivery_mode)
    return mode if type(mode) is int and type(queue.name) is str else None


def _delivery_mode(queue: Any, default: Any) -> int:
    # As AMQP.send_task_message, then kombu's Producer._delivery_details with a string exchange
    # (the producer's own exchange, ``Exchange("")``, has no delivery mode).
    mode = maybe_delivery_mode(getattr(queue.exchange, "delivery_mode", None) or default)
    return PERSISTENT_DELIVERY_MODE if mode is None else mode  # None never comes: a default


# --- Bounding a publish by OP_CELERY_PUBLISH_TIMEOUT. ------------------------------------------
#
# Where a publish can wait (kombu 5.5 to 5.7, redis-py 5 to 8, py-amqp 5):
# - for a connection of the pool: ``broker_pool_acquire_timeout``, else without a limit;
# - for the TCP connection: ``socket_connect_timeout`` (Redis), ``connect_timeout`` (AMQP);
# - for each reply: ``socket_timeout`` (Redis: the handshake, kombu's PING of a new channel,
#   the push), ``read_timeout``/``write_timeout`` (AMQP; its handshake is bounded by
#   ``connect_timeout``); without them (a user's app, by default) a broker that accepts the
#   connection and never answers holds the caller forever;
# - between attempts: kombu's ``Connection.ensure`` and ``_ensure_connection`` retry as the
#   retry policy says, each attempt as long as the timeouts above allow.
# So: the package's pool gives each attempt ATTEMPT_SHARE of the bound, and the policy's
# errback (`deadline_errback`, also what kombu copies into the pool's transport options for
# reconnecting) gives up before an attempt that could end past the bound.

_bound = threading.local()


@contextmanager
def _bounded(timeout_s: float) -> Iterator[None]:
    """Give this thread's publish ``timeout_s`` seconds from now (an outer bound stays)."""
    outer = getattr(_bound, "deadline", None)
    if outer is None:
        _bound.deadline = time.monotonic() + timeout_s
        _bound.attempt_s = timeout_s * ATTEMPT_SHARE
    try:
        yield
    finally:
        if outer is None:
            _bound.deadline = None


def deadline_errback(exc: BaseException, interval: float) -> None:
    """kombu's retry errback: raise ``exc`` (kombu reports it as ``OperationalError``) when the
    next attempt, after ``interval`` seconds of sleep, could end past this thread's bound.

    One function for every call, reading the bound of the publish running in this thread, so
    the copy kombu keeps in the pool's transport options is never a stale call's; outside a
    publish (no bound) it lets kombu retry as its policy says.
    """
    deadline = getattr(_bound, "deadline", None)
    if deadline is not None and time.monotonic() + interval + _bound.attempt_s > deadline:
        raise exc


@dataclass(frozen=True, slots=True)
class PublishPools:
    """The package's broker connections of one app, and producers over them for Celery's path."""

    connections: Any  # kombu.connection.ConnectionPool
    producers: ProducerPool


_publish_pools: weakref.WeakKeyDictionary[Celery, PublishPools] = weakref.WeakKeyDictionary()
_pools_lock = threading.Lock()


def publish_pools(app: Any) -> PublishPools:
    """The app's broker, from its own settings, with each attempt bounded (module comment)."""
    pools = _publish_pools.get(app)
    if pools is None:
        with _pools_lock:
            pools = _publish_pools.get(app)
            if pools is None:
                pools = _publish_pools[app] = _make_pools(app)
    return pools


def _make_pools(app: Any) -> PublishPools:
    bound_s = _app_plan(app).publish_timeout_s
    attempt_s = bound_s * ATTEMPT_SHARE
    limit = app.conf.broker_pool_limit
    connection: Connection = app.connection_for_write(
        # kombu also stops retrying a connection after this long in all (``_ensure_connection``);
        # py-amqp waits this long for a connection and its handshake.
        connect_timeout=bound_s,
        transport_options={
            "socket_connect_timeout": attempt_s,  # Redis
            "socket_timeout": attempt_s,
            "read_timeout": attempt_s,  # AMQP
            "write_timeout": attempt_s,
        },
    )
    connections = connection.Pool(limit=limit)
    return PublishPools(
        connections, ProducerPool(connections, limit=limit, Producer=app.amqp.Producer)
    )


def _forget_pools_after_fork() -> None:
    # A forked child must not share its parent's sockets; Celery drops its own pool likewise.
    _publish_pools.clear()


os.register_at_fork(after_in_child=_forget_pools_after_fork)


@contextmanager
def _acquire(pool: Any, plan: _AppPlan) -> Iterator[Any]:
    """A connection (or producer) of ``pool``, as `_take` lends it, released afterwards."""
    resource = _take(pool, plan)
    try:
        yield resource
    finally:
        resource.release()


def _take(pool: Any, plan: _AppPlan) -> Any:
    """A connection (or producer) of ``pool``, waiting at most what is left of the bound and
    of ``broker_pool_acquire_timeout``; the caller releases it."""
    deadline = getattr(_bound, "deadline", None)
    timeout = plan.acquire_timeout_s
    if deadline is not None:
        left = max(0.0, deadline - time.monotonic())
        timeout = left if timeout is None else min(timeout, left)
    try:
        return pool.acquire(block=True, timeout=timeout)
    except LimitExceeded as exc:
        raise OperationalError(
            f"Timed out waiting for a broker connection after {timeout:.3g} s: all "
            f"{pool.limit} of op-celery's are in use. Consider increasing broker_pool_limit or "
            "OP_CELERY_PUBLISH_TIMEOUT."
        ) from exc


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
    route: _Route,
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
        f'"argsrepr": {_str(_argsrepr(amqp.argsrepr_maxsize, maxlevels))}, '
        f'"kwargsrepr": {_str(kwargsrepr(kwargs, amqp.kwargsrepr_maxsize, maxlevels))}, '
        f'"origin": {_str(_origin())}, "ignore_result": true, "replaced_task_nesting": 0, '
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
    connection = _take(publish_pools(app).connections, plan)  # not `_acquire`: a µs per call
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


def _put(channel: Any, message: _Message, route: _Route) -> None:
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
    return _app_plan(app).redis_broker


@contextmanager
def outbox_writer(app: Any) -> Iterator[Writer]:
    """The outbox's writer on a connection of the app's (Redis) broker pool, for writes
    outside a publish."""
    plan = _app_plan(app)
    with _bounded(plan.publish_timeout_s), _acquire(publish_pools(app).connections, plan) as conn:
        yield _channel_state(conn.default_channel).outbox_writer()


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


# --- The text copies of the arguments. ---------------------------------------------------------

_origins: dict[int, str] = {}
_argsreprs: dict[tuple[int, int], str] = {}


def _origin() -> str:
    # anon_nodename() is "gen<pid>@<host>" with a memoised host name: the same per process.
    pid = os.getpid()
    origin = _origins.get(pid)
    if origin is None:
        origin = _origins[pid] = anon_nodename()
    return origin


def _argsrepr(maxsize: int, maxlevels: int) -> str:
    key = (maxsize, maxlevels)
    text = _argsreprs.get(key)
    if text is None:
        text = _argsreprs[key] = saferepr((), maxsize, maxlevels=maxlevels)
    return text


class _NotPlain(Exception):
    """A value the fast renderer leaves to ``saferepr``."""


def kwargsrepr(kwargs: Mapping[str, Any], maxsize: int, maxlevels: int) -> str:
    """``celery.utils.saferepr.saferepr(kwargs, maxsize, maxlevels=maxlevels)``, faster.

    Renders plain JSON values (exact ``dict``, ``list``, ``str``, ``int``, ``float``, ``bool``
    and None) as ``saferepr`` does: strings quoted with ``'`` and only ``'`` escaped, numbers
    with ``str()``, containers nested ``maxlevels`` deep or more as ``{...}``/``[...]``. When the
    text would be longer than ``maxsize`` (then ``saferepr`` truncates it) or a value is of
    another type, it returns ``saferepr``'s own result.
    """
    if isinstance(maxsize, int) and maxsize > 0 and isinstance(maxlevels, int):
        parts: list[str] = []
        try:
            _render(kwargs, parts, 0, maxlevels)
        except _NotPlain:
            pass
        else:
            text = "".join(parts)
            # With room for everything, saferepr truncates nothing: each token starts with
            # more budget left than the rest of the text needs.
            if len(text) <= maxsize:
                return text
    return saferepr(kwargs, maxsize, maxlevels=maxlevels)


def _render(value: Any, out: list[str], level: int, maxlevels: int) -> None:
    # Scalars inside containers are rendered inline: most of a payload is scalars, and a call
    # per value would cost more than the rendering.
    kind = type(value)
    if kind is dict:
        if maxlevels and level >= maxlevels:
            out.append("{...}")
            return
        out.append("{")
        first = True
        for key, item in value.items():
            if type(key) is not str:
                raise _NotPlain
            if first:
                first = False
            else:
                out.append(", ")
            out.append("'" + key.replace("'", "\\'") + "': ")
            kind = type(item)
            if kind is str:
                out.append("'" + item.replace("'", "\\'") + "'")
            elif item is None:
                out.append("None")
            elif kind is int or kind is float or kind is bool:
                out.append(str(item))
            else:
                _render(item, out, level + 1, maxlevels)
        out.append("}")
    elif kind is list:
        if maxlevels and level >= maxlevels:
            out.append("[...]")
            return
        out.append("[")
        first = True
        for item in value:
            if first:
                first = False
            else:
                out.append(", ")
            kind = type(item)
            if kind is str:
                out.append("'" + item.replace("'", "\\'") + "'")
            elif item is None:
                out.append("None")
            elif kind is int or kind is float or kind is bool:
                out.append(str(item))
            else:
                _render(item, out, level + 1, maxlevels)
        out.append("]")
    elif kind is str:
        out.append("'" + value.replace("'", "\\'") + "'")
    elif value is None:
        out.append("None")
    elif kind is int or kind is float or kind is bool:
        out.append(str(value))
    else:
        raise _NotPlain
