"""Enqueue a validated op-celery call: the message Celery would send, for a fraction of the cost.

Celery's publish path (``Task.apply_async`` → ``Celery.send_task`` → ``AMQP.send_task_message``
→ ``kombu.Producer.publish`` → the Redis transport's ``Channel._put``) spends most of an enqueue
on work an op-celery message does not need (profiled with Celery 5.7 and kombu 5.7; see
``benchmarks/RESULTS.md``):

- kombu's Redis channel builds a new ``redis.Redis`` client for every message
  (``Channel.conn_or_acquire``): about 50 µs, most of it copying the response-callback table;
- ``argsrepr``/``kwargsrepr`` run Celery's streaming ``saferepr``: about 40 µs for a ``track``;
- the queue is re-declared on every publish (kombu binds a copy of the entity before finding it
  in its cache), and some twenty settings are looked up through Celery's layered config.

`publish` builds the same protocol-2 message itself (headers, properties and body identical to
Celery's, byte for byte except the fresh ids) and pushes it over the same pooled broker
connection with the same retry behaviour: kombu's ``Connection.ensure`` with the app's
``task_publish_retry``/``task_publish_retry_policy``, revival of the connection after a
connection error, and errors surfacing as ``kombu.exceptions.OperationalError``. It keeps one
Redis client per kombu channel (redis-py clients are thread-safe; a channel belongs to one
pooled connection, used by one thread at a time) and declares each queue once per channel.

Anything it does not reproduce exactly goes through Celery's own path, unchanged: a broker
other than Redis; publish options beyond ``queue`` (``countdown``, ``eta``, ``expires``,
``priority``, ``headers``, ``link``, a ``producer``...); task-level execution options
(time limits, priority...); a router that adds more than a queue; ``task_always_eager``;
``task_send_sent_event``; a task inheriting its parent's priority; and any receiver of
``before_task_publish``, ``after_task_publish`` or ``task_sent``, or a wrapped
``Task.apply_async``, because tracing integrations (OpenTelemetry, Sentry, Datadog) hook those
to add headers.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, Task, signals
from celery.app import amqp as celery_amqp
from celery.app import task as celery_task
from celery.result import AsyncResult
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from kombu import Queue
from kombu.common import Broadcast, maybe_declare
from kombu.entity import maybe_delivery_mode
from kombu.exceptions import LimitExceeded, OperationalError
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps
from kombu.utils.uuid import uuid

__all__ = ["publish"]

#: The only publish options the fast path handles; any other one goes through Celery.
FAST_OPTIONS = frozenset({"queue", "serializer", "retry", "retry_policy"})
#: Execution options of the task class the fast path handles (others must be None).
_HANDLED_EXEC_OPTIONS = frozenset({"queue", "serializer"})
#: The embed part of a protocol-2 body for a task without callbacks, chain or chord.
_EMBED: Mapping[str, None] = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
#: Signals whose receivers may change a message: with any receiver, Celery's path publishes.
_PUBLISH_SIGNALS = tuple(
    signal
    for signal in (
        signals.before_task_publish,
        signals.after_task_publish,
        getattr(signals, "task_sent", None),  # deprecated, still sent by Celery 5
    )
    if signal is not None
)
#: AMQP's delivery mode 2, kombu's default.
PERSISTENT_DELIVERY_MODE = 2
_AMQP: Any = celery_amqp.AMQP
#: Set while a worker publishes a task's callbacks; Celery then retries differently.
_callback_publish_retry: Any = getattr(celery_amqp, "_callback_publish_retry", None)
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
) -> AsyncResult[Any]:
    """Enqueue ``task`` with keyword arguments ``kwargs`` (validated plain JSON).

    The arguments are those of ``Task.apply_async``; ``base`` is the calling class's
    ``super()``, whose ``apply_async`` (Celery's) publishes whatever the fast path does not
    reproduce exactly.
    """
    app: Any = task.app
    route = None
    if producer is None and link is None and link_error is None and shadow is None:
        route = _fast_route(task, app, options, kwargs)
    if route is None:
        result: AsyncResult[Any] = base.apply_async(
            (), kwargs, task_id, producer, link, link_error, shadow, **options
        )
        return result
    return _send(task, app, route, kwargs, task_id or uuid())


# --- Deciding whether the fast path reproduces Celery exactly. --------------------------------


@dataclass(slots=True)
class _AppPlan:
    """What Celery itself computes once per app (``AMQP._create_task_sender`` caches the same)."""

    supported: bool
    retry: bool = False
    retry_policy: dict[str, Any] = field(default_factory=dict)
    default_delivery_mode: Any = None
    repr_maxlevels: int = 3
    acquire_timeout_s: float | None = None


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
    finally:
        connection.release()
    supported = (
        redis_broker
        and conf.task_protocol == 2
        and type(app).send_task is Celery.send_task
        and type(amqp).as_task_v2 is celery_amqp.AMQP.as_task_v2
        and type(amqp)._create_task_sender is _AMQP._create_task_sender
        and _callback_publish_retry is not None
    )
    if not supported:
        return _AppPlan(supported=False)
    return _AppPlan(
        supported=True,
        retry=bool(conf.task_publish_retry),
        retry_policy=dict(conf.task_publish_retry_policy or {}),
        default_delivery_mode=conf.task_default_delivery_mode,
        repr_maxlevels=conf.task_repr_maxlevels,
        acquire_timeout_s=conf.broker_pool_acquire_timeout,
    )


def _fast_route(
    task: Any, app: Any, options: dict[str, Any], kwargs: Mapping[str, Any]
) -> _Route | None:
    """The route of a call the fast path reproduces exactly, else None."""
    if not options.keys() <= FAST_OPTIONS or options.get("serializer", "json") != "json":
        return None
    plan = _app_plan(app)
    if not plan.supported:
        return None
    if (
        task.typing
        or not task.ignore_result  # Celery would subscribe the result backend to the task id
        or task.__v2_compat__
        or getattr(task, "_dump_pydantic_arguments", None) is not None
        or type(task).shadow_name is not celery_task.Task.shadow_name
        or not _APPLY_ASYNC_IS_CELERYS
        or celery_task.Task.__dict__.get("apply_async") is not _CELERY_APPLY_ASYNC
        or any(signal.receivers for signal in _PUBLISH_SIGNALS)
        or _callback_publish_retry.get()
    ):
        return None
    exec_options = task._get_exec_options()
    for key, value in exec_options.items():
        if value is not None and key not in _HANDLED_EXEC_OPTIONS:
            return None
    conf = app.conf
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
        routed = dict(exec_options, **options)
        for key in ("time_limit", "soft_time_limit", "expires"):
            routed.pop(key, None)
        routed = router.route(routed, task.name, (), kwargs, task)
    else:
        # What Router.route does with no routes and a queue given: look the queue up.
        routed = dict(options)
        name = routed.get("queue")
        if not isinstance(name, Queue):
            try:
                routed["queue"] = amqp.queues[name]
            except KeyError:  # Celery's path raises its QueueNotFound
                return None
    queue = routed.get("queue")
    if (
        not isinstance(queue, Queue)
        or isinstance(queue, Broadcast)
        or queue.exchange.type != "direct"
        or any(value is not None for key, value in routed.items() if key not in FAST_OPTIONS)
        or routed.get("serializer", "json") != "json"
    ):
        return None
    # As AMQP.send_task_message merges the call's retry settings with the app's.
    retry = routed.get("retry")
    retry_policy = routed.get("retry_policy")
    return _Route(
        queue=queue,
        delivery_mode=_delivery_mode(queue, plan.default_delivery_mode),
        retry=plan.retry if retry is None else bool(retry),
        retry_policy=(
            dict(plan.retry_policy, **retry_policy) if retry_policy else dict(plan.retry_policy)
        ),
        parent=parent,
        plan=plan,
    )


def _delivery_mode(queue: Any, default: Any) -> int:
    # As AMQP.send_task_message, then kombu's Producer._delivery_details with a string exchange
    # (the producer's own exchange, ``Exchange("")``, has no delivery mode).
    mode = maybe_delivery_mode(getattr(queue.exchange, "delivery_mode", None) or default)
    return PERSISTENT_DELIVERY_MODE if mode is None else mode  # None never comes: a default


# --- Building and sending the message. ---------------------------------------------------------


def _send(
    task: Any, app: Any, route: _Route, kwargs: dict[str, Any], task_id: str
) -> AsyncResult[Any]:
    amqp = app.amqp
    plan = route.plan
    maxlevels = plan.repr_maxlevels
    parent = route.parent
    if parent is not None:
        root_id = parent.request.root_id or parent.request.id
        parent_id = parent.request.id
    else:
        root_id, parent_id = task_id, None
    # Key for key, in order, what AMQP.as_task_v2 puts in a protocol-2 message.
    headers = {
        "lang": "py",
        "task": task.name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],  # time limits are execution options: Celery's path
        "root_id": root_id or task_id,
        "parent_id": parent_id,
        "argsrepr": _argsrepr(amqp.argsrepr_maxsize, maxlevels),
        "kwargsrepr": kwargsrepr(kwargs, amqp.kwargsrepr_maxsize, maxlevels),
        "origin": _origin(),
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    properties = {
        "correlation_id": task_id,
        "reply_to": app.thread_oid,
        "delivery_mode": route.delivery_mode,
    }
    body = dumps(((), kwargs, _EMBED))  # kombu's JSON serializer, as Producer.publish uses
    queue = route.queue
    # A pooled broker connection, as Celery's producer pool lends (its producers hold one each
    # from this same pool); the producer itself would only be rebound and copied.
    try:
        connection = app.pool.acquire(block=True, timeout=plan.acquire_timeout_s)
    except LimitExceeded as exc:
        raise OperationalError(
            f"Timed out waiting for a broker connection after {plan.acquire_timeout_s}s: all "
            f"{app.pool.limit} are in use. Consider increasing broker_pool_limit or "
            "broker_pool_acquire_timeout."
        ) from exc
    try:
        with connection._reraise_as_library_errors():

            def put() -> None:
                _put(connection.default_channel, queue, body, headers, properties, route)

            if route.retry:
                # As kombu's Producer.publish: the policy also governs reconnecting.
                connection.transport_options.update(route.retry_policy)
                connection.ensure(_REVIVAL, put, **route.retry_policy)()
            else:
                put()
    finally:
        connection.release()
    result: AsyncResult[Any] = task.AsyncResult(task_id)
    result.ignored = True  # as Celery's send_task sets it
    if parent is not None:
        parent.add_trail(result)
    return result


class _Revival:
    """Connection.ensure revives this after reconnecting; each attempt of `_put` reads the
    connection's (new) default channel itself, so there is nothing to rebind."""

    def revive(self, channel: Any) -> None:
        pass


_REVIVAL = _Revival()


@dataclass(slots=True)
class _ChannelState:
    client: Any  # redis.Redis bound to the channel's connection pool
    declared: set[str]


_channel_states: weakref.WeakKeyDictionary[Any, _ChannelState] = weakref.WeakKeyDictionary()


def _put(
    channel: Any,
    queue: Any,
    body: str,
    headers: dict[str, Any],
    properties: dict[str, Any],
    route: _Route,
) -> None:
    """One attempt: what kombu's ``Producer._publish`` and the Redis ``Channel._put`` do."""
    state = _channel_states.get(channel)
    if state is None or state.client.connection_pool is not channel.pool:
        state = _ChannelState(channel._create_client(), set())
        _channel_states[channel] = state
    name = queue.name
    if name not in state.declared:
        maybe_declare(queue, channel, route.retry, **route.retry_policy)
        state.declared.add(name)
    message = channel.prepare_message(
        body, 0, "application/json", "utf-8", headers, dict(properties)
    )
    channel._inplace_augment_message(message, "", name)
    key = channel._q_for_pri(name, channel._get_message_priority(message, reverse=False))
    payload = dumps(message)  # as the Redis transport serialises it
    client = state.client
    expires = channel._expires.get(name) if channel._expires else None
    if expires is None:
        client.lpush(key, payload)
        return
    with client.pipeline() as pipe:
        pipe.lpush(key, payload)
        for priority in channel.priority_steps:
            pipe.pexpire(channel._q_for_pri(name, priority), expires)
        pipe.execute()


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
