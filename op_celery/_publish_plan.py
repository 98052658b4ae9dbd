"""Deciding whether the publish fast path reproduces Celery's message exactly, and with what.

``_publish`` writes a task message itself only where it would be the one Celery sends: a
Redis broker whose body encoding gives text, task protocol 2, Celery's own ``send_task`` and
``AMQP``, installed versions the fast path was checked with (``_compat``), and, per call, no
publish option, task option, router result, queue or signal receiver that Celery's path would
act on. This module holds that decision: `app_plan` reads an app's settings once (the ones
Celery's sender also reads once, and those no app changes once it publishes), and
`fast_route` says, per call, where the message goes and with which retry policy, or None:
Celery's path publishes it then. Kept apart from the message building so that what the fast
path refuses can be read in one place.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, signals
from celery.app import task as celery_task
from kombu import Queue
from kombu.common import Broadcast
from kombu.entity import maybe_delivery_mode
from kombu.transport import redis as kombu_redis

from . import _compat
from ._app import settings_for

__all__ = ["FAST_OPTIONS", "AppPlan", "Route", "app_plan", "fast_route"]

#: The only publish options the fast path handles; any other one goes through Celery.
FAST_OPTIONS = frozenset({"queue", "serializer", "retry", "retry_policy"})
#: Execution options of the task class the fast path handles (others must be None).
_HANDLED_EXEC_OPTIONS = frozenset({"queue", "serializer"})
#: Signals whose receivers may change a message: with any receiver, Celery's path publishes.
_BEFORE_PUBLISH = signals.before_task_publish
_AFTER_PUBLISH = signals.after_task_publish
_TASK_SENT: Any = getattr(signals, "task_sent", None)  # deprecated, still sent by Celery 5
#: Seconds a publish may take when the app's settings cannot say (they always can, once read).
DEFAULT_PUBLISH_TIMEOUT_S = 1.0
#: AMQP's delivery mode 2, kombu's default.
PERSISTENT_DELIVERY_MODE = 2
_SHADOW_NAME = celery_task.Task.shadow_name
_CELERY_APPLY_ASYNC = celery_task.Task.__dict__["apply_async"]
#: False when an integration had wrapped ``Task.apply_async`` before this module was imported.
_APPLY_ASYNC_IS_CELERYS = (
    getattr(getattr(_CELERY_APPLY_ASYNC, "__code__", None), "co_filename", None)
    == celery_task.__file__
)


@dataclass(slots=True)
class AppPlan:
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
class Route:
    queue: Any  # kombu.Queue
    delivery_mode: int
    retry: bool
    retry_policy: dict[str, Any]
    parent: Any  # the worker task this call runs in, if any
    plan: AppPlan


_app_plans: weakref.WeakKeyDictionary[Celery, AppPlan] = weakref.WeakKeyDictionary()


def app_plan(app: Any) -> AppPlan:
    plan = _app_plans.get(app)
    if plan is None:
        plan = _makeapp_plan(app)
        _app_plans[app] = plan
    return plan


def _makeapp_plan(app: Any) -> AppPlan:
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
        return AppPlan(
            supported=False,
            redis_broker=redis_broker,
            protocol=protocol,
            repr_maxlevels=repr_maxlevels,
            acquire_timeout_s=_compat.pool_acquire_timeout_s(conf),
            publish_timeout_s=publish_timeout_s,
        )
    return AppPlan(
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


def fast_route(
    task: Any, app: Any, options: dict[str, Any], kwargs: Mapping[str, Any]
) -> Route | None:
    """The route of a call the fast path reproduces exactly, else None."""
    if (
        not options.keys() <= FAST_OPTIONS
        or options.get("serializer", "json") != "json"
        or "queue" not in options
    ):
        return None
    plan = app_plan(app)
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
    return Route(
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


def _queue_delivery_mode(queue: Any, plan: AppPlan) -> int | None:
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
