"""Every private name of Celery, kombu and redis-py that op-celery uses, fenced in one module.

op-celery reads a few internals of the projects under it: to publish Celery's own message
without Celery's per-call cost (``_publish``), to find kombu's keys and read kombu's stored
messages for the outbox sweeper (``_outbox``), to tell which Celery app a call publishes through
(``_app``), and to guard the worker's message consumer (``_consumer``: poison messages, a
broker that goes away, a Redis that refuses writes). Each such use is one
function here, and its comment says:

- the private name it reads (also kept in a module constant, so a test can take it away);
- the versions it was checked against: the floors op-celery declares and the newest it was
  tested with (:data:`CHECKED`), read in each version's source;
- what happens when the name is missing: a public fallback that gives the same result, or,
  where there is none, the feature steps aside with one log line saying why (the publish fast
  path leaves the call to Celery's own ``apply_async``; the outbox sweeper judges nothing).

``tests/test_compat.py`` asserts, for each name, that it still exists with the shape used here
(so an upgrade that changes one fails there first, loudly) and that its fallback works.

The publish fast path writes Celery's message byte for byte, which only a test can confirm for
a given version: it runs only with the Celery and kombu versions of :data:`CHECKED` (any patch
release of the newest minor included); with others, :func:`fast_publish_support` says no and
every call takes Celery's path, about 5 times slower per enqueue, never wrong.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import celery
import kombu
import redis
from celery import Celery
from celery.app import amqp as celery_amqp
from celery.app import app_or_default
from celery.worker import state as worker_state
from kombu.exceptions import OperationalError
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.utils.uuid import uuid

__all__ = [
    "CHECKED",
    "Support",
    "active_apps",
    "add_consumer_connection_errors",
    "amqp_is_celerys",
    "callback_publish_retry",
    "default_app",
    "exec_options",
    "fast_publish_support",
    "forget_delivered",
    "next_delivery_tag",
    "pool_acquire_timeout_s",
    "redis_channel_support",
    "redis_client",
    "redis_key_prefix",
    "redis_message_keys",
    "redis_qos",
    "redis_queue_key",
    "redis_unacked_keys",
    "repr_maxlevels",
    "reraise_as_library_errors",
    "revoked_here",
    "step_aside",
    "task_dumps_pydantic_arguments",
    "task_id_of_queued",
    "task_id_of_unacked",
    "task_is_v2_compat",
    "thread_current_app",
    "worker_should_stop",
    "worker_stopping",
    "wrap_consumer_connect",
    "wrap_decode_error_handler",
    "wrap_task_strategies",
]

log = logging.getLogger("op_celery")

#: The versions every name below was checked against (read in each one's source, and run by
#: the test suite at both ends): (oldest, newest). The oldest are the floors pyproject.toml
#: declares (``tests/test_compat.py`` says when they part); celery 5.6.0, the floor, was checked
#: by running the suite there (scripts/test-floors). celery 5.5 and kombu 5.5-5.6, named
#: in the notes below, were read and run too but are under the floors: before kombu 5.7 a
#: worker sweeps unacked messages back only every ~100 s (no ``unacked_restore_throttle``).
CHECKED: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "celery": ((5, 6, 0), (5, 7, 0)),
    "kombu": ((5, 7, 0), (5, 7, 0)),
    "redis": ((6, 4, 0), (8, 1, 0)),
}


def _version(text: str) -> tuple[int, ...]:
    """``"5.7.0rc1"`` -> (5, 7, 0): the leading numbers of a version string."""
    numbers: list[int] = []
    for part in text.split("."):
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        numbers.append(int(digits))
        if digits != part:
            break
    return tuple(numbers)


#: The versions installed, as their modules say.
CELERY_VERSION_TEXT = str(getattr(celery, "__version__", ""))
KOMBU_VERSION_TEXT = str(getattr(kombu, "__version__", ""))
REDIS_VERSION_TEXT = str(getattr(redis, "__version__", ""))
CELERY_VERSION = _version(CELERY_VERSION_TEXT)
KOMBU_VERSION = _version(KOMBU_VERSION_TEXT)
REDIS_VERSION = _version(REDIS_VERSION_TEXT)


def _within(name: str, version: tuple[int, ...]) -> bool:
    """Whether ``version`` is from the oldest checked one to the newest's minor release."""
    oldest, newest = CHECKED[name]
    return oldest <= version and version[:2] <= newest[:2]


def _checked(name: str) -> str:
    oldest, newest = CHECKED[name]
    return f"{'.'.join(map(str, oldest))}–{'.'.join(map(str, newest[:2]))}.x"


_MISSING: Any = object()


def _has(owner: Any, name: str) -> bool:
    return getattr(owner, name, _MISSING) is not _MISSING


_stepped_aside: set[tuple[str, str]] = set()
_stepped_aside_lock = threading.Lock()


def step_aside(feature: str, reason: str, fallback: str) -> None:
    """Log, once per process and reason, that ``feature`` is off and what happens instead."""
    with _stepped_aside_lock:
        if (feature, reason) in _stepped_aside:
            return
        _stepped_aside.add((feature, reason))
    log.warning("op_celery: %s is off: %s; %s", feature, reason, fallback)


@dataclass(frozen=True, slots=True)
class Support:
    """Whether a feature that needs private names can run here, and if not, why."""

    ok: bool
    reason: str = ""


# --- Celery: which app is current. ------------------------------------------------------------
# Celery offers no public "which apps exist" or "is an app current in this thread" test:
# ``celery.current_app`` silently makes a fallback app pointed at amqp://localhost.

#: ``celery._state``: Celery's module of current and default apps. Checked: celery 5.5.0, 5.5.3,
#: 5.6.3, 5.7.0 (same module in each). Fallback: :func:`celery.app.app_or_default`, below.
CELERY_STATE_MODULE = "celery._state"
#: ``celery._state._tls``: a ``threading.local`` whose ``current_app`` is this thread's app.
CELERY_STATE_TLS = "_tls"
#: ``celery._state.default_app``: the app made default (``set_default()``), else None.
CELERY_STATE_DEFAULT_APP = "default_app"
#: ``celery._state._get_active_apps()``: a weak set of every app created.
CELERY_STATE_ACTIVE_APPS = "_get_active_apps"


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


#: The module itself, imported once (None if this Celery has none).
_CELERY_STATE: Any = _import(CELERY_STATE_MODULE)


def _celery_state() -> Any:
    return _CELERY_STATE


def _is_fallback_app(app: Any) -> bool:
    """Celery's own fallback app (``Celery("default")``), made when nothing else was current."""
    return getattr(app, "main", None) == "default"


def thread_current_app() -> Celery | None:
    """This thread's current Celery app, or None.

    Private: ``celery._state._tls.current_app``. Checked: celery 5.5.0, 5.5.3, 5.6.3, 5.7.0.
    Fallback: ``celery.app.app_or_default()`` (public), unless that is Celery's fallback app;
    it also answers with the default app where no app is current in this thread.
    """
    tls = getattr(_celery_state(), CELERY_STATE_TLS, None)
    if tls is not None and _has(tls, "current_app"):
        current: Celery | None = tls.current_app
        return current
    app: Celery = app_or_default()
    return None if _is_fallback_app(app) else app


def default_app() -> Celery | None:
    """The app made default with ``set_default()``, or None (also when that is Celery's
    fallback app).

    Private: ``celery._state.default_app``. Checked: celery 5.5.0, 5.5.3, 5.6.3, 5.7.0.
    Fallback: None (then :func:`thread_current_app`'s fallback finds the default app).
    """
    app: Celery | None = getattr(_celery_state(), CELERY_STATE_DEFAULT_APP, None)
    return None if app is None or _is_fallback_app(app) else app


def active_apps() -> list[Celery]:
    """Every Celery app that exists, but Celery's fallback app.

    Private: ``celery._state._get_active_apps()``. Checked: celery 5.5.0, 5.5.3, 5.6.3, 5.7.0.
    Fallback: an empty list (a thread without a current app then publishes through the
    default app, else the package's).
    """
    state = _celery_state()
    get = getattr(state, CELERY_STATE_ACTIVE_APPS, None)
    if not callable(get):
        return []
    fallback = getattr(state, CELERY_STATE_DEFAULT_APP, None)
    return [app for app in get() if not (app is fallback and _is_fallback_app(app))]


# --- Celery: its publish path, as the fast path reproduces it. -------------------------------

#: ``Task._get_exec_options()``: the task's execution options, cached per task. Checked: celery
#: 5.5.0, 5.5.3, 5.6.3, 5.7.0 (the same 12 attributes in each).
TASK_EXEC_OPTIONS = "_get_exec_options"
#: The attributes Celery's ``extract_exec_options`` reads (celery 5.5.0 to 5.7.0).
EXEC_OPTION_NAMES = (
    "queue",
    "routing_key",
    "exchange",
    "priority",
    "expires",
    "serializer",
    "delivery_mode",
    "compression",
    "time_limit",
    "soft_time_limit",
    "immediate",
    "mandatory",
)


def exec_options(task: Any) -> Mapping[str, Any]:
    """The execution options Celery's ``apply_async`` merges under a call's options.

    Private: ``Task._get_exec_options()`` (the same mapping object until the task changes).
    Checked: celery 5.5.0, 5.5.3, 5.6.3, 5.7.0. Fallback: the same public task attributes, read now
    (a new mapping on every call).
    """
    get = getattr(task, TASK_EXEC_OPTIONS, None)
    if callable(get):
        options: Mapping[str, Any] = get()
        return options
    return {name: getattr(task, name, None) for name in EXEC_OPTION_NAMES}


#: ``celery.app.amqp._callback_publish_retry``: a ContextVar, true while a worker publishes a
#: task's callbacks (then Celery retries each message on its own). New in celery 5.7.0; absent
#: in 5.5.0, 5.5.3 and 5.6.3, which have no such mode.
CALLBACK_PUBLISH_RETRY = "_callback_publish_retry"
#: The first Celery version with that mode.
CALLBACK_PUBLISH_RETRY_SINCE = (5, 7)


def callback_publish_retry() -> bool:
    """Whether Celery is publishing a worker's callbacks right now (its retry differs then).

    Private: ``celery.app.amqp._callback_publish_retry``. Checked: celery 5.7.0 (absent in
    5.5.0, 5.5.3 and 5.6.3: False there is exact). Fallback: :func:`fast_publish_support` says no on
    a Celery from 5.7 on without it, so this is not asked.
    """
    var = getattr(celery_amqp, CALLBACK_PUBLISH_RETRY, None)
    return var is not None and bool(var.get())


#: The methods of Celery's ``AMQP`` that build and send a task message; an app whose AMQP class
#: overrides one publishes something else. ``_create_task_sender`` is private. Checked: celery
#: 5.5.0, 5.5.3, 5.6.3, 5.7.0.
AMQP_SENDER_METHODS = ("as_task_v2", "send_task_message", "_create_task_sender")


def amqp_is_celerys(amqp: Any) -> bool:
    """Whether ``amqp`` (``app.amqp``) builds and sends task messages with Celery's code.

    Private: ``AMQP._create_task_sender``. Checked: celery 5.5.0, 5.5.3, 5.6.3, 5.7.0. Fallback: a
    name Celery no longer has is not compared (the public ones still are).
    """
    kind = type(amqp)
    base = celery_amqp.AMQP
    return all(
        getattr(kind, name, None) is getattr(base, name, None)
        for name in AMQP_SENDER_METHODS
        if _has(base, name)
    )


#: ``Task.__v2_compat__``: set by Celery's old task base class, whose publish differs. Checked:
#: celery 5.5.0, 5.5.3, 5.6.3, 5.7.0 (False on ``Task``).
TASK_V2_COMPAT = "__v2_compat__"


def task_is_v2_compat(task: Any) -> bool:
    """Whether ``task`` derives from Celery's old (3.x) task base class.

    Private: ``Task.__v2_compat__``. Checked: celery 5.5.0, 5.5.3, 5.6.3, 5.7.0. Fallback: False (no
    such base class is left to derive from).
    """
    return bool(getattr(task, TASK_V2_COMPAT, False))


#: ``Task._dump_pydantic_arguments``: set on a ``pydantic=True`` task, whose apply_async then
#: dumps model arguments. New in celery 5.7.0 (None on ``Task``); absent in 5.5.0, 5.5.3 and 5.6.3,
#: which dump nothing in the caller.
TASK_DUMP_PYDANTIC = "_dump_pydantic_arguments"


def task_dumps_pydantic_arguments(task: Any) -> bool:
    """Whether Celery's ``apply_async`` rewrites the arguments of ``task`` before publishing.

    Private: ``Task._dump_pydantic_arguments``. Checked: celery 5.7.0 (absent in 5.5.0,
    5.5.3 and 5.6.3: False there is exact). Fallback: False.
    """
    return getattr(task, TASK_DUMP_PYDANTIC, None) is not None


#: Celery's ``saferepr`` depth for argsrepr/kwargsrepr before ``task_repr_maxlevels`` (5.7).
SAFEREPR_DEFAULT_MAXLEVELS = 3


def repr_maxlevels(conf: Any) -> int:
    """The nesting depth Celery's argsrepr/kwargsrepr render to.

    Not private, but versioned: the setting ``task_repr_maxlevels`` is new in celery 5.7.0;
    5.5.0 to 5.6.3 call ``saferepr`` with its default depth, 3.
    """
    value = conf.get("task_repr_maxlevels", SAFEREPR_DEFAULT_MAXLEVELS)
    return SAFEREPR_DEFAULT_MAXLEVELS if value is None else int(value)


def pool_acquire_timeout_s(conf: Any) -> float | None:
    """How long Celery waits for a connection of its broker pool before giving up, in seconds
    (None: as long as it takes).

    Not private, but versioned: the setting ``broker_pool_acquire_timeout`` is new in celery
    5.7.0; 5.5.0 to 5.6.3 wait without a limit.
    """
    value = conf.get("broker_pool_acquire_timeout")
    return None if value is None else float(value)


# --- kombu: its Redis channel. ----------------------------------------------------------------

#: ``Channel._q_for_pri(queue, priority)``: the Redis list of ``queue``'s messages of that
#: priority; ``Channel._get_message_priority(message, reverse)``: the priority kombu reads off
#: a message. Checked: kombu 5.5.2, 5.5.4, 5.6.2, 5.7.0. No fallback: a wrong list would lose
#: messages, so without them the fast path and the outbox sweeper step aside.
KOMBU_QUEUE_FOR_PRIORITY = "_q_for_pri"
KOMBU_MESSAGE_PRIORITY = "_get_message_priority"
#: Public attributes of kombu's Redis channel these functions also read (all checked as above).
KOMBU_REDIS_CHANNEL_ATTRIBUTES = ("pool", "priority_steps", "unacked_key", "default_priority")
#: ``Channel._next_delivery_tag()``: a new message's delivery tag, ``kombu.utils.uuid.uuid()``
#: in kombu 5.5.2, 5.5.4, 5.6.2 and 5.7.0. Fallback: that same function.
KOMBU_NEXT_DELIVERY_TAG = "_next_delivery_tag"


def _redis_channel_missing() -> str:
    """The first name op-celery needs that kombu's Redis channel lacks, else ""."""
    channel = kombu_redis.Channel
    for name in (KOMBU_QUEUE_FOR_PRIORITY, KOMBU_MESSAGE_PRIORITY):
        if not callable(getattr(channel, name, None)):
            return name
    for name in KOMBU_REDIS_CHANNEL_ATTRIBUTES:
        if not _has(channel, name):
            return name
    return ""


def redis_queue_key(channel: Any, queue: str, priority: int) -> str:
    """kombu's Redis list for messages of ``queue`` with message property ``priority``,
    without the broker's key prefix.

    Private: ``Channel._get_message_priority``, ``Channel._q_for_pri``. Checked: kombu 5.5.2, 5.5.4,
    5.6.2, 5.7.0. No fallback (see :func:`fast_publish_support`).
    """
    probe = {"properties": {"priority": priority}}
    level = getattr(channel, KOMBU_MESSAGE_PRIORITY)(probe, reverse=False)
    key: str = getattr(channel, KOMBU_QUEUE_FOR_PRIORITY)(queue, level)
    return key


def redis_message_keys(channel: Any, queue: str) -> tuple[list[str], str]:
    """Where kombu keeps ``queue``'s messages, with the broker's key prefix: its lists (one per
    priority step) and the unacked hash (delivery tag -> [message, exchange, routing key]).

    Private: ``Channel._q_for_pri``; public attributes ``priority_steps``, ``unacked_key``.
    Checked: kombu 5.5.2, 5.5.4, 5.6.2, 5.7.0. No fallback (see :func:`redis_channel_support`).
    """
    prefix = redis_key_prefix(channel)
    for_priority = getattr(channel, KOMBU_QUEUE_FOR_PRIORITY)
    lists = dict.fromkeys(prefix + for_priority(queue, step) for step in channel.priority_steps)
    return list(lists), prefix + channel.unacked_key


#: The channel's sorted set of unacked delivery tags by the time each was taken (what kombu's
#: visibility-timeout sweep reads). Public attribute, as ``unacked_key``. Checked: kombu 5.7.0.
KOMBU_UNACKED_INDEX_KEY = "unacked_index_key"


def redis_unacked_keys(channel: Any) -> tuple[str, str] | None:
    """kombu's unacked hash and its index (sorted by the time a message was taken), with the
    broker's key prefix: where a message taken off a queue must be written so that kombu's
    visibility-timeout sweep gives it back if its taker dies. None when the channel lacks
    either name (then nothing may take messages outside kombu: ``_drain`` steps aside).

    Public attributes ``unacked_key``, ``unacked_index_key``. Checked: kombu 5.7.0.
    """
    hash_key = getattr(channel, "unacked_key", None)
    index_key = getattr(channel, KOMBU_UNACKED_INDEX_KEY, None)
    if not isinstance(hash_key, str) or not isinstance(index_key, str):
        return None
    prefix = redis_key_prefix(channel)
    return prefix + hash_key, prefix + index_key


def next_delivery_tag(channel: Any) -> str:
    """A delivery tag for a new message, as kombu's virtual channel makes them.

    Private: ``Channel._next_delivery_tag()``. Checked: kombu 5.5.2, 5.5.4, 5.6.2, 5.7.0. Fallback:
    ``kombu.utils.uuid.uuid()``, what each of those returns.
    """
    make = getattr(channel, KOMBU_NEXT_DELIVERY_TAG, None)
    tag: str = make() if callable(make) else uuid()
    return tag


def redis_client(channel: Any) -> redis.Redis:
    """A plain redis-py client on the connection pool of kombu's Redis ``channel``: the same
    server, credentials and socket options, with no key prefix (see :func:`redis_key_prefix`).

    Public attribute ``Channel.pool`` (a replacement for the private ``Channel._create_client``,
    whose client adds the prefix to some keys and not others). Checked: kombu 5.5.2, 5.5.4,
    5.6.2, 5.7.0. No fallback (see :func:`fast_publish_support`).
    """
    return redis.Redis(connection_pool=channel.pool)


def redis_key_prefix(channel: Any) -> str:
    """The broker's ``global_keyprefix`` transport option, which kombu puts in front of its keys.

    Public: the documented transport option, as the channel holds it. Checked: kombu 5.5.2, 5.5.4,
    5.6.2, 5.7.0.
    """
    return str(getattr(channel, "global_keyprefix", "") or "")


#: ``Connection._reraise_as_library_errors()``: kombu's context manager that
#: :func:`reraise_as_library_errors` reimplements (not called; the test compares the two).
KOMBU_RERAISE_AS_LIBRARY_ERRORS = "_reraise_as_library_errors"


@contextmanager
def reraise_as_library_errors(connection: Any) -> Iterator[None]:
    """Raise a recoverable connection or channel error of ``connection``'s transport as kombu's
    ``OperationalError``, as ``Producer.publish`` does around its publish.

    Public reimplementation of kombu's private ``Connection._reraise_as_library_errors`` (the
    same code in kombu 5.5.2, 5.5.4, 5.6.2 and 5.7.0; ``tests/test_compat.py`` compares the two).
    """
    try:
        yield
    except OperationalError:
        raise
    except connection.recoverable_connection_errors as exc:
        raise OperationalError(str(exc)) from exc
    except connection.recoverable_channel_errors as exc:
        raise OperationalError(str(exc)) from exc


# --- kombu: the messages it stores in Redis. --------------------------------------------------
# kombu's Redis transport stores a message as the JSON of a dict ("body", "content-encoding",
# "content-type", "headers", "properties"); its unacked hash holds the JSON of
# [message, exchange, routing key]. Checked: kombu 5.5.2, 5.5.4, 5.6.2, 5.7.0 (``Channel._put``,
# ``QoS.append``). Celery's protocol 2 puts the task id in headers["id"] (its protocol 1, in the
# body); both set properties["correlation_id"] to it.


def _task_id_of(message: Any) -> str | None:
    if not isinstance(message, dict):
        return None
    headers = message.get("headers")
    if isinstance(headers, dict):
        task_id = headers.get("id")
        if isinstance(task_id, str):
            return task_id
    properties = message.get("properties")
    if isinstance(properties, dict):
        task_id = properties.get("correlation_id")
        if isinstance(task_id, str):
            return task_id
    return None


def task_id_of_queued(raw: bytes | str) -> str | None:
    """The task id of a message as it waits on one of kombu's Redis lists; None if ``raw`` is
    not such a message (JSON of another shape, or not JSON)."""
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    return _task_id_of(message)


def task_id_of_unacked(raw: bytes | str) -> str | None:
    """The task id of a message as kombu keeps it in its unacked hash; None if ``raw`` is not
    such an entry."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(entry, list) or not entry:
        return None
    return _task_id_of(entry[0])


# --- Celery's worker consumer (the poison guard). ---------------------------------------------

#: ``Consumer.strategies``: task name -> the function the consumer calls per message, filled by
#: the Tasks bootstep and looked up per message. Checked: celery 5.5.0, 5.5.3, 5.6.3, 5.7.0.
CONSUMER_STRATEGIES = "strategies"
#: ``Consumer.on_decode_error(message, exc)``: what the consumer calls for an undecodable
#: message (it logs and acks), looked up on the consumer when the task consumer is made.
#: Checked: celery 5.5.0, 5.5.3, 5.6.3, 5.7.0.
CONSUMER_ON_DECODE_ERROR = "on_decode_error"


def wrap_task_strategies(consumer: Any, wrap: Callable[[str, Any], Any]) -> bool:
    """Replace each task's strategy in the worker ``consumer`` by ``wrap(name, strategy)``
    (which may return the strategy unchanged); False if this Celery's consumer has none.

    Private: ``Consumer.strategies``, a dict the message handler reads per message, so an entry
    replaced in place takes effect. Checked: celery 5.5.0, 5.5.3, 5.6.3, 5.7.0. Fallback: nothing is
    wrapped (False): Celery handles every message itself.
    """
    strategies = getattr(consumer, CONSUMER_STRATEGIES, None)
    if not isinstance(strategies, dict):
        return False
    for name, strategy in list(strategies.items()):
        strategies[name] = wrap(name, strategy)
    return True


def wrap_decode_error_handler(consumer: Any, handler: Callable[[Any, Exception], None]) -> bool:
    """Have the worker ``consumer`` call ``handler(message, exc)`` before its own handling of a
    message it cannot decode; False if it has no such handler.

    Semi-private: ``Consumer.on_decode_error``, which the task consumer captures when the Tasks
    bootstep starts, so this must run before (from a consumer bootstep's ``__init__``).
    Checked: celery 5.5.0, 5.5.3, 5.6.3, 5.7.0. Fallback: nothing is wrapped (False).
    """
    original = getattr(consumer, CONSUMER_ON_DECODE_ERROR, None)
    if not callable(original):
        return False

    def on_decode_error(message: Any, exc: Exception) -> None:
        handler(message, exc)
        original(message, exc)

    setattr(consumer, CONSUMER_ON_DECODE_ERROR, on_decode_error)
    return True


#: ``Consumer.connection_errors``: the errors after which Celery's consumer reconnects and
#: starts its steps again rather than stop the worker ("Unrecoverable error"). Set from the
#: transport's in ``Consumer.__init__`` before the consumer steps are made, read again by
#: ``Consumer.start`` at each (re)start, and captured by each task's strategy for its acks.
#: Checked: celery 5.6.0, 5.7.0 (the same code in both).
CONSUMER_CONNECTION_ERRORS = "connection_errors"


def add_consumer_connection_errors(consumer: Any, errors: tuple[type[BaseException], ...]) -> bool:
    """Have the worker ``consumer`` reconnect after ``errors`` too, as after a lost connection;
    False if this Celery's consumer has no such tuple.

    Semi-private: ``Consumer.connection_errors`` (see :data:`CONSUMER_CONNECTION_ERRORS`), so
    this must run before the consumer starts (from a consumer step's ``__init__``). Only this
    consumer changes: kombu's transport classes, which other code reads, are left as they are.
    Fallback: nothing is added (False); a worker meeting one of ``errors`` in its consumer
    then stops, as without op-celery, and its supervisor must start it again.
    """
    current = getattr(consumer, CONSUMER_CONNECTION_ERRORS, None)
    if not isinstance(current, tuple):
        return False
    missing = tuple(error for error in errors if error not in current)
    setattr(consumer, CONSUMER_CONNECTION_ERRORS, current + missing)
    return True


#: ``Consumer.connect()``: public, what the Connection step calls for the consumer's
#: connection, at start and at each restart. Checked: celery 5.6.0, 5.7.0.
CONSUMER_CONNECT = "connect"


def wrap_consumer_connect(consumer: Any, before: Callable[[], None]) -> bool:
    """Have the worker ``consumer`` call ``before()`` each time it is about to connect (at start
    and after each lost connection), before anything of the connection is used; False if it
    has no ``connect``.

    Public method, replaced on this one consumer instance. Before, not after: Celery's
    ``connect`` itself already writes to a Redis broker (kombu's ``register_with_event_loop``
    takes the unacked-restore lock). Checked: celery 5.6.0, 5.7.0. Fallback: nothing is
    wrapped (False).
    """
    original = getattr(consumer, CONSUMER_CONNECT, None)
    if not callable(original):
        return False

    def connect() -> Any:
        before()
        return original()

    setattr(consumer, CONSUMER_CONNECT, connect)
    return True


#: ``celery.worker.state.maybe_shutdown()``: raises the worker's shutdown (``WorkerShutdown``,
#: ``WorkerTerminate``) once a signal asked for it; Celery's consumer calls it between
#: reconnection attempts. Public module function, not documented. Checked: celery 5.6.0,
#: 5.7.0. Fallback: no check (a wait ends at its own pace, then the worker stops).
WORKER_MAYBE_SHUTDOWN = "maybe_shutdown"


def worker_should_stop() -> None:
    """Raise Celery's worker shutdown if a signal asked for one; else return."""
    check = getattr(worker_state, WORKER_MAYBE_SHUTDOWN, None)
    if callable(check):
        check()


def worker_stopping() -> bool:
    """Whether a signal asked this worker process to stop (warm or cold), without raising.

    Public module attributes ``celery.worker.state.should_stop`` / ``should_terminate`` (None
    until a signal sets an exit code), not documented. Checked: celery 5.6.0, 5.7.0. Fallback:
    False (a loop then ends at its own budget).
    """
    return any(
        getattr(worker_state, name, None) not in (None, False)
        for name in ("should_stop", "should_terminate")
    )


def revoked_here(task_id: str) -> bool:
    """Whether this process knows ``task_id`` as revoked (``celery.worker.state.revoked``, the
    set the worker's consumer checks before it runs a message; a prefork pool's children are
    not told of revokes). Public module attribute, not documented. Checked: celery 5.6.0,
    5.7.0. Fallback: False.
    """
    revoked = getattr(worker_state, "revoked", None)
    try:
        return revoked is not None and task_id in revoked
    except TypeError:
        return False


#: The QoS methods of kombu's Redis channel that push back or settle unacked messages
#: (``restore_visible``: its periodic sweep of messages past the visibility timeout, run
#: from a timer of the worker's event loop and from ``register_with_event_loop``).
#: Checked: kombu 5.5.2, 5.5.4, 5.6.2, 5.7.0 (``restore_visible`` and its use from the event
#: loop: kombu 5.7.0).
KOMBU_QOS_METHODS = ("restore_unacked_once", "ack", "reject", "restore_visible")
#: ``kombu.transport.virtual.QoS.ack``: the virtual QoS's own ack, which only forgets a
#: delivered message in this process (the Redis QoS's ``ack`` first removes it from Redis'
#: unacked hash, then calls it). Public method of the base class, called on a Redis QoS.
#: Checked: kombu 5.7.0.
KOMBU_VIRTUAL_QOS_ACK = "ack"


def forget_delivered(qos: Any, delivery_tag: Any) -> None:
    """Have a Redis ``qos`` forget a message it delivered, without touching Redis: the
    message stays in the unacked hash (and comes back after the visibility timeout), and it
    no longer counts against the prefetch limit, which would otherwise stop this channel
    taking messages for good. Semi-private, see :data:`KOMBU_VIRTUAL_QOS_ACK`. Fallback: none
    needed while kombu's Redis QoS derives from the virtual one (asserted by a test)."""
    getattr(kombu_virtual.QoS, KOMBU_VIRTUAL_QOS_ACK)(qos, delivery_tag)


#: The loggers through which kombu reports, with a traceback, a failed timer of the worker's
#: event loop (``Error in timer``) and a failed refresh of expiring bindings
#: (``maybe_refresh_binding_expiry``, kombu 5.7.0, once a second per channel). Checked:
#: kombu 5.7.0.
KOMBU_TIMER_LOGGERS = ("kombu.asynchronous.hub", "kombu.transport.redis")


#: The method of kombu's Redis channel that makes a new redis-py client on every call.
KOMBU_CHANNEL_CREATE_CLIENT = "_create_client"


def reuse_channel_client(channel: Any) -> bool:
    """Have kombu's Redis ``channel`` make its synchronous redis-py client once per connection
    pool instead of once per call; False if it has no such method.

    kombu's QoS writes the unacked bookkeeping of every message (``append``) and removes it on
    every ack through ``conn_or_acquire()``, which builds a whole ``redis.Redis`` (its response
    callbacks, a prefixed subclass with ``global_keyprefix``) each time: about 8 % of a
    worker's CPU per event. The client holds no state but its pool, which it shares, and a
    redis-py client is safe to use from many threads, so one per pool does the same.

    Semi-private: ``Channel._create_client(asynchronous=False)`` and ``Channel.pool``. Checked:
    kombu 5.5.2, 5.5.4, 5.6.2, 5.7.0. Fallback: kombu's own, a client per call (False).
    """
    original = getattr(channel, KOMBU_CHANNEL_CREATE_CLIENT, None)
    if not callable(original) or getattr(original, "_op_reused", False):
        return False
    cached: list[Any] = [None, None]  # [pool, client]
    lock = threading.Lock()

    def create_client(asynchronous: bool = False) -> Any:
        if asynchronous:
            return original(asynchronous=True)
        pool = channel.pool  # a new one after the channel reconnects: a new client for it
        with lock:
            if cached[0] is not pool:
                cached[1] = original()
                cached[0] = pool
            return cached[1]

    create_client._op_reused = True  # type: ignore[attr-defined]
    setattr(channel, KOMBU_CHANNEL_CREATE_CLIENT, create_client)
    return True


def redis_qos(consumer: Any) -> Any:
    """The QoS of the worker ``consumer``'s kombu channel when it is a Redis one, else None.

    Semi-private: ``Consumer.task_consumer.channel.qos`` and its methods
    :data:`KOMBU_QOS_METHODS`. Checked: celery 5.5.0–5.7.0, kombu 5.5.2–5.7.0. Fallback: None.
    """
    task_consumer = getattr(consumer, "task_consumer", None)
    qos = getattr(getattr(task_consumer, "channel", None), "qos", None)
    if qos is None or not all(callable(getattr(qos, name, None)) for name in KOMBU_QOS_METHODS):
        return None
    return qos


# --- What can run here. -----------------------------------------------------------------------


@cache
def fast_publish_support() -> Support:
    """Whether ``_publish``'s fast path can reproduce Celery's message with the Celery and kombu
    installed: versions within :data:`CHECKED` and every private name it needs present."""
    if not _within("celery", CELERY_VERSION):
        return Support(False, f"celery {CELERY_VERSION_TEXT} is not a version it was checked "
                       f"with ({_checked('celery')})")  # fmt: skip
    if not _within("kombu", KOMBU_VERSION):
        return Support(False, f"kombu {KOMBU_VERSION_TEXT} is not a version it was checked "
                       f"with ({_checked('kombu')})")  # fmt: skip
    missing = _redis_channel_missing()
    if missing:
        return Support(False, f"kombu {KOMBU_VERSION_TEXT}'s Redis channel has no {missing}")
    if CELERY_VERSION[:2] >= CALLBACK_PUBLISH_RETRY_SINCE and not _has(
        celery_amqp, CALLBACK_PUBLISH_RETRY
    ):
        return Support(False, f"celery {CELERY_VERSION_TEXT} has no "
                       f"celery.app.amqp.{CALLBACK_PUBLISH_RETRY}")  # fmt: skip
    return Support(True)


@cache
def redis_channel_support() -> Support:
    """Whether kombu's Redis channel has what the outbox reads (its pool, key names and
    lists), which the outbox's writes and its sweeper need."""
    missing = _redis_channel_missing()
    if missing:
        return Support(False, f"kombu {KOMBU_VERSION_TEXT}'s Redis channel has no {missing}")
    return Support(True)
