"""A worker with a backlog takes the next events off the queue itself (issue 12).

Celery and kombu spend, per message, more CPU than the HTTP request that delivers it: a BRPOP,
the unacked bookkeeping (a pipeline), the request and tracer, two log lines and the ack (another
pipeline). Messages stay on the Redis list only while every consumer's prefetch is full, so a
message still there when a task finishes is one the pool is behind on. Then the task that just
finished its event takes the next one itself (``lua/drain.lua``: out of the list and into
kombu's unacked hash and index in one step, as kombu takes it, so the visibility-timeout sweep
gives it back if this process dies), runs it exactly as the worker would (the same task, under
a request made from the message's headers: same retries, same countdowns, same dead letters),
and settles it in the call that takes the next one. It does so for at most ``DRAIN_BUDGET_S``
per task, so the messages kombu already prefetched wait no longer than that.

Only what can run at once is taken (``lua/drain.lua``): the package's tasks, no ETA (retries
and countdowns go through Celery's own timers), no expiry, no callbacks, chains or groups
(``_Taken.of``). A message taken that is not one of these, or that this process knows revoked,
goes back to the head of the queue for kombu's consumer.

Not used (every message goes through Celery) with a broker that is not Redis, with task events
on (``-E``: Flower sees each task), with a time limit (a long drain would be cut), or with
``OP_CELERY_DRAIN=off``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.exceptions import Ignore
from celery.exceptions import Retry as CeleryRetry
from celery.signals import worker_init

from . import _compat
from ._app import settings_for
from ._lua import Script, bulk
from ._outbox import BROKER_ERRORS
from ._publish import queue_access, redis_broker

__all__ = ["DRAIN_BUDGET_S", "drain"]

log = logging.getLogger("op_celery")

#: Seconds one task may spend on events it took off the queue after its own: long enough that
#: Celery's cost per message is spread over hundreds of events, short enough that the messages
#: kombu prefetched for this worker are not held up.
DRAIN_BUDGET_S = 1.0

#: Whether this worker sends task events (``-E``, ``worker_send_task_events``), set at
#: ``worker_init``: then every message goes through Celery, so that monitors see each task.
_task_events = False


@worker_init.connect(weak=False)
def _note_task_events(sender: Any = None, **_: Any) -> None:
    global _task_events
    _task_events = bool(getattr(sender, "task_events", False))


@dataclass(frozen=True)
class _Taken:
    """A message taken off a queue: what running it and giving it back need."""

    raw: bytes
    tag: str
    name: str
    task_id: str
    kwargs: dict[str, Any]
    request: dict[str, Any]

    @classmethod
    def of(cls, raw: bytes, hostname: str | None) -> _Taken | None:
        """The message as Celery's worker would run it, or None when it must go through Celery
        (callbacks, errbacks, a chain, chord or group, arguments, or a body not protocol 2)."""
        try:
            message = json.loads(raw)
            headers, properties = message["headers"], message["properties"]
            args, kwargs, embed = json.loads(base64.b64decode(message["body"]))
        except (ValueError, TypeError, KeyError):
            return None
        if args or not isinstance(kwargs, dict) or not isinstance(embed, dict):
            return None
        if any(embed.get(name) for name in ("callbacks", "errbacks", "chain", "chord")):
            return None
        if headers.get("group") or not isinstance(headers.get("task"), str):
            return None
        info = properties.get("delivery_info") or {}
        request = {
            **headers,
            **embed,
            "args": [],
            "kwargs": kwargs,
            "delivery_info": {
                "exchange": info.get("exchange", ""),
                "routing_key": info.get("routing_key"),
                "priority": properties.get("priority"),
                "redelivered": False,
            },
            "reply_to": properties.get("reply_to"),
            "correlation_id": properties.get("correlation_id"),
            "hostname": hostname,
            "is_eager": False,
            "called_directly": False,
        }
        tag = properties["delivery_tag"]
        return cls(raw, tag, headers["task"], headers["id"], kwargs, request)


class _Queue:
    """One queue's Redis client and keys, and the script that settles and takes."""

    def __init__(self, app: Celery, queue: str, names: list[str]) -> None:
        client, key, unacked = queue_access(app, queue)
        if unacked is None:
            raise LookupError("kombu's Redis channel has no unacked index")
        self.client = client
        self.keys = (key, *unacked)
        self.names = names
        self.script = Script(client, "drain.lua")
        # The command packed once but for its three per-call arguments (``Script.call_packed``:
        # redis-py's command building costs about what the round trip does).
        self._pool = client.connection_pool
        head = self.script.packed_head(len(self.keys), 3 + len(names))
        self._head = head + b"".join(bulk(key.encode()) for key in self.keys)
        self._names = b"".join(bulk(name.encode()) for name in names)

    def take(self, settle: str, more: bool) -> bytes | None:
        """Settle ``settle`` (a finished message's tag, or ""), then take the next message if
        ``more``; None when there is none this worker should take."""
        now, flag = repr(time.time()), "1" if more else "0"
        packed = b"".join(
            (
                self._head,
                bulk(now.encode()),
                bulk(settle.encode()),
                bulk(flag.encode()),
                self._names,
            )
        )
        raw = self.script.call_packed(
            self._pool, packed, self.keys, (now, settle, flag, *self.names)
        )
        if isinstance(raw, str):
            return raw.encode("utf-8")
        return raw if isinstance(raw, bytes) else None

    def give_back(self, taken: _Taken) -> None:
        """Put a taken message back where kombu's consumer takes the next one (as kombu gives
        back what it held), out of the unacked hash."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(self.keys[1], taken.tag).zrem(self.keys[2], taken.tag)
        pipe.rpush(self.keys[0], taken.raw)
        pipe.execute()


_queues: weakref.WeakKeyDictionary[Celery, dict[str, _Queue | None]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _queue_for(app: Celery, queue: str) -> _Queue | None:
    known = _queues.get(app)
    if known is not None and queue in known:
        return known[queue]
    names = sorted(name for name in app.tasks if name.startswith("op_celery."))
    made: _Queue | None
    try:
        made = _Queue(app, queue, names)
    except LookupError as exc:
        log.info("op_celery: events are not taken off the queue by tasks here: %s", exc)
        made = None
    with _lock:
        _queues.setdefault(app, {})[queue] = made
    return made


def _usable(task: Any) -> bool:
    app = task.app
    if _task_events or not settings_for(app).drain or not redis_broker(app):
        return False
    conf = app.conf
    if conf.task_time_limit or conf.task_soft_time_limit:
        return False
    if task.time_limit or task.soft_time_limit or any(task.request.timelimit or ()):
        return False
    return _compat.redis_channel_support().ok


def drain(task: Any, queue: str, run: str = "run_one") -> int:
    """After ``task`` finished its event from ``queue``: take and run the queue's next
    messages for up to :data:`DRAIN_BUDGET_S`, each with the ``run`` method of its own task,
    until one is retried; how many were run."""
    if not _usable(task):
        return 0
    try:
        taker = _queue_for(task.app, queue)
    except BROKER_ERRORS as exc:
        log.debug("op_celery: queue %s not drained: %s", queue, exc)
        return 0
    if taker is None:
        return 0
    deadline = time.monotonic() + DRAIN_BUDGET_S
    hostname = task.request.hostname
    tasks: Mapping[str, Any] = task.app.tasks
    settle, done = "", 0
    try:
        while True:
            more = time.monotonic() < deadline and not _compat.worker_stopping()
            raw = taker.take(settle, more)
            settle = ""
            if raw is None:
                break
            taken = _Taken.of(raw, hostname)
            target = tasks.get(taken.name) if taken is not None else None
            if taken is None or target is None or _compat.revoked_here(taken.task_id):
                _give_back(taker, raw, taken)
                break
            try:
                ran = _run(target, taken, run)
            except BaseException:  # the worker stopping (SystemExit and kin): back it goes
                with contextlib.suppress(*BROKER_ERRORS):
                    _give_back(taker, raw, taken)
                raise
            if ran is None:
                _give_back(taker, raw, taken)
                break
            settle, done = taken.tag, done + 1
            if not ran:
                taker.take(settle, more=False)
                break  # a retry: the server or Redis is struggling; Celery paces the rest
    except BROKER_ERRORS as exc:
        # What was taken is in kombu's unacked hash: the visibility timeout gives it back, and
        # the ledger drops a copy of a delivered event.
        log.info("op_celery: stopped taking events off queue %s: %s", queue, exc)
    if done:
        # Celery logs no "received"/"succeeded" line for these: one line says where they went.
        log.info("op_celery: %d more events of queue %s taken off it and run by this task",
                 done, queue)  # fmt: skip
    return done


def _run(target: Any, taken: _Taken, run: str) -> bool | None:
    """Run a taken message as the worker would: True when it ended (delivered, answered,
    dead-lettered), False when Celery's retry or countdown was published for it (the message
    is done too), None if it must go back to the queue (an error nothing mapped)."""
    target.push_request(**taken.request)
    try:
        getattr(target, run)(**taken.kwargs)
    except CeleryRetry:
        return False
    except Ignore:
        return True  # a dead letter
    except Exception:
        log.exception("op_celery: event message %s given back to the queue", taken.task_id)
        return None
    finally:
        target.pop_request()
    return True


def _give_back(taker: _Queue, raw: bytes, taken: _Taken | None) -> None:
    if taken is None:
        # Not one this code can read: found by the tag the script read, as kombu would.
        try:
            tag = json.loads(raw)["properties"]["delivery_tag"]
        except (ValueError, TypeError, KeyError):
            return  # unreachable: the script took it for its tag
        taken = _Taken(raw, tag, "", "", {}, {})
    taker.give_back(taken)
