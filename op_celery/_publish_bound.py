"""Bounding a publish by ``OP_CELERY_PUBLISH_TIMEOUT``: the package's broker pools, a deadline.

A ``.delay()`` must not hold a web request for longer than the publish bound, whatever the
broker does: refuse, never answer, or answer slowly. Both publish paths (``_publish``) take
their connections from the package's own pool per app (`publish_pools`), made from the app's
broker settings with each attempt's waits limited to a share of the bound, and run under a
per-thread deadline (`bound`, set by `bounded` or inline by ``publish``) that `take` and
kombu's retry errback (`deadline_errback`) read. The app's own tasks and its workers'
consumers keep the app's settings.

Where a publish can wait (kombu 5.5 to 5.7, redis-py 5 to 8, py-amqp 5):

- for a connection of the pool: ``broker_pool_acquire_timeout``, else without a limit;
- for the TCP connection: ``socket_connect_timeout`` (Redis), ``connect_timeout`` (AMQP);
- for each reply: ``socket_timeout`` (Redis: the handshake, kombu's PING of a new channel,
  the push), ``read_timeout``/``write_timeout`` (AMQP; its handshake is bounded by
  ``connect_timeout``); without them (a user's app, by default) a broker that accepts the
  connection and never answers holds the caller forever;
- between attempts: kombu's ``Connection.ensure`` and ``_ensure_connection`` retry as the
  retry policy says, each attempt as long as the timeouts above allow.

So: the package's pool gives each attempt ATTEMPT_SHARE of the bound, and the policy's
errback (`deadline_errback`, also what kombu copies into the pool's transport options for
reconnecting) gives up before an attempt that could end past the bound.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu import Connection
from kombu.exceptions import LimitExceeded, OperationalError
from kombu.pools import ProducerPool

from ._publish_plan import AppPlan, app_plan

__all__ = [
    "PublishPools",
    "acquire",
    "bound",
    "bounded",
    "deadline_errback",
    "publish_pools",
    "take",
]

#: Share of ``OP_CELERY_PUBLISH_TIMEOUT`` one attempt of a publish may wait for the broker: for
#: its TCP connection, and for each of its replies. A broker that accepts the connection and
#: never answers then costs one share per attempt, and `deadline_errback` starts no attempt
#: that could end after the bound.
ATTEMPT_SHARE = 0.25

#: The bound of the publish running in this thread: ``deadline`` (monotonic seconds, None
#: outside a publish) and ``attempt_s`` (what one attempt may wait).
bound = threading.local()


@contextmanager
def bounded(timeout_s: float) -> Iterator[None]:
    """Give this thread's publish ``timeout_s`` seconds from now (an outer bound stays)."""
    outer = getattr(bound, "deadline", None)
    if outer is None:
        bound.deadline = time.monotonic() + timeout_s
        bound.attempt_s = timeout_s * ATTEMPT_SHARE
    try:
        yield
    finally:
        if outer is None:
            bound.deadline = None


def deadline_errback(exc: BaseException, interval: float) -> None:
    """kombu's retry errback: raise ``exc`` (kombu reports it as ``OperationalError``) when the
    next attempt, after ``interval`` seconds of sleep, could end past this thread's bound.

    One function for every call, reading the bound of the publish running in this thread, so
    the copy kombu keeps in the pool's transport options is never a stale call's; outside a
    publish (no bound) it lets kombu retry as its policy says.
    """
    deadline = getattr(bound, "deadline", None)
    if deadline is not None and time.monotonic() + interval + bound.attempt_s > deadline:
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
    bound_s = app_plan(app).publish_timeout_s
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
def acquire(pool: Any, plan: AppPlan) -> Iterator[Any]:
    """A connection (or producer) of ``pool``, as `take` lends it, released afterwards."""
    resource = take(pool, plan)
    try:
        yield resource
    finally:
        resource.release()


def take(pool: Any, plan: AppPlan) -> Any:
    """A connection (or producer) of ``pool``, waiting at most what is left of the bound and
    of ``broker_pool_acquire_timeout``; the caller releases it."""
    deadline = getattr(bound, "deadline", None)
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
