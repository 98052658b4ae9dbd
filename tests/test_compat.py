"""Every private Celery/kombu/redis-py name ``_compat`` reads is still there, in the installed
versions, with the shape it is read in; and each one's fallback gives the same answer when the
name is taken away (by renaming the constant ``_compat`` reads it through).

These tests run against the versions installed: ``scripts/test`` runs them at the newest
versions, ``scripts/test-floors`` at the floors ``pyproject.toml`` declares.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import celery
import kombu
import pytest
import redis
from celery import Celery, Task
from celery.app import amqp as celery_amqp
from celery.app import app_or_default
from celery.app.defaults import DEFAULTS
from celery.app.task import extract_exec_options
from celery.concurrency.solo import TaskPool as SoloPool
from celery.utils.saferepr import saferepr
from celery.utils.timer2 import Timer
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from kombu import Connection, Producer, Queue
from kombu.exceptions import OperationalError
from kombu.transport import redis as kombu_redis
from packaging.requirements import Requirement

from op_celery import _compat

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def echo() -> None:
    """The body of the tests' tasks (never run)."""


#: A name no Celery or kombu has: what a constant of ``_compat`` is renamed to, to take it away.
GONE = "_op_celery_no_such_name"


def declared_floor(package: str) -> tuple[int, ...]:
    """The lower bound ``pyproject.toml`` declares for ``package`` in [project] dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        requirement = Requirement(line)
        if requirement.name == package:
            [floor] = [s.version for s in requirement.specifier if s.operator == ">="]
            return (*_compat._version(floor), 0, 0)[:3]
    raise AssertionError(f"{package} is not in pyproject.toml's dependencies")


# --- The versions. ----------------------------------------------------------------------------


@pytest.mark.parametrize("package", ["celery", "kombu", "redis"])
def test_the_oldest_version_checked_is_the_floor_pyproject_declares(package: str) -> None:
    oldest, _ = _compat.CHECKED[package]
    assert oldest == declared_floor(package), (
        f"pyproject.toml's floor of {package} changed: check _compat's names in that version "
        "and update CHECKED (scripts/test-floors runs the suite there)"
    )


@pytest.mark.parametrize(
    ("package", "installed"),
    [("celery", _compat.CELERY_VERSION), ("kombu", _compat.KOMBU_VERSION)],
)
def test_the_installed_celery_and_kombu_are_versions_checked(
    package: str, installed: tuple[int, ...]
) -> None:
    # A release past the newest checked turns the fast path off: this fails first, so that
    # someone reads the names below in the new release's source and extends CHECKED.
    assert _compat._within(package, installed), (
        f"{package} {'.'.join(map(str, installed))} is not within _compat.CHECKED "
        f"({_compat._checked(package)}): check its private names and update CHECKED"
    )


def test_the_fast_path_runs_on_the_installed_versions() -> None:
    assert _compat.fast_publish_support() == _compat.Support(True)
    assert _compat.redis_channel_support() == _compat.Support(True)


def test_version_reads_the_leading_numbers() -> None:
    assert _compat._version("5.7.0rc1") == (5, 7, 0)
    assert _compat._version("5.5") == (5, 5)
    assert _compat._version("8.1.0.post1") == (8, 1, 0)
    assert _compat._version("") == ()


def test_a_version_past_the_newest_minor_is_not_within_the_checked_ones() -> None:
    oldest, newest = _compat.CHECKED["celery"]
    assert _compat._within("celery", oldest)
    assert _compat._within("celery", (*newest[:2], 99))
    assert not _compat._within("celery", (newest[0], newest[1] + 1, 0))
    assert not _compat._within("celery", (*oldest[:2], oldest[2] - 1) if oldest[2] else (5, 4, 9))


# --- celery._state: which app is current. -----------------------------------------------------


def in_thread(function: Callable[[], Any]) -> Any:
    """``function()`` run in a new thread (whose current app is its own), its result."""
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(function()))
    thread.start()
    thread.join(timeout=30)
    [result] = results
    return result


@pytest.fixture
def app(redis_url: str, key_prefix: str) -> Iterator[Celery]:
    """A user's Celery app on the shared Redis under a private key prefix, not made current."""
    made = Celery(f"compat-{uuid.uuid4().hex[:6]}", set_as_current=False)
    made.conf.update(
        broker_url=redis_url,
        broker_transport_options={"global_keyprefix": key_prefix},
        task_default_queue=f"compat-{uuid.uuid4().hex[:8]}",
    )
    yield made
    made.close()


def test_celery_state_has_the_names_read() -> None:
    state = _compat._celery_state()
    assert state is sys.modules[_compat.CELERY_STATE_MODULE]
    assert isinstance(getattr(state, _compat.CELERY_STATE_TLS), threading.local)
    assert hasattr(getattr(state, _compat.CELERY_STATE_TLS), "current_app")
    assert hasattr(state, _compat.CELERY_STATE_DEFAULT_APP)
    assert callable(getattr(state, _compat.CELERY_STATE_ACTIVE_APPS))


def test_thread_current_app_is_the_app_made_current_in_that_thread_only(app: Celery) -> None:
    def current_after_set_current() -> Celery | None:
        app.set_current()
        return _compat.thread_current_app()

    assert in_thread(current_after_set_current) is app
    assert in_thread(_compat.thread_current_app) is not app


def test_thread_current_app_falls_back_to_app_or_default(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_compat, "_CELERY_STATE", None)

    def current_after_set_current() -> Celery | None:
        app.set_current()
        return _compat.thread_current_app()

    assert in_thread(current_after_set_current) is app
    fallback = in_thread(app_or_default)
    expected = None if fallback.main == "default" else fallback
    assert in_thread(_compat.thread_current_app) is expected


def test_default_app_is_the_app_set_default_and_none_without_the_state(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _compat._celery_state()
    before = getattr(state, _compat.CELERY_STATE_DEFAULT_APP)
    app.set_default()
    try:
        assert _compat.default_app() is app
        monkeypatch.setattr(_compat, "_CELERY_STATE", None)
        assert _compat.default_app() is None
    finally:
        state.set_default_app(before)


def test_active_apps_holds_every_app_made_and_is_empty_without_the_state(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert app in _compat.active_apps()
    assert all(isinstance(each, Celery) for each in _compat.active_apps())
    monkeypatch.setattr(_compat, "_CELERY_STATE", None)
    assert _compat.active_apps() == []


# --- Celery's publish path. -------------------------------------------------------------------


def test_exec_options_is_celerys_mapping_cached_per_task(app: Celery) -> None:
    task = app.task(shared=False, name="compat.echo", queue="q1", priority=3)(echo)
    assert callable(getattr(Task, _compat.TASK_EXEC_OPTIONS))
    options = _compat.exec_options(task)
    assert options is _compat.exec_options(task)
    assert dict(options) == dict(extract_exec_options(task))
    assert set(options) == set(_compat.EXEC_OPTION_NAMES)
    assert (options["queue"], options["priority"]) == ("q1", 3)


def test_exec_options_falls_back_to_the_task_attributes(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = app.task(shared=False, name="compat.echo", queue="q1", priority=3)(echo)
    expected = dict(_compat.exec_options(task))
    monkeypatch.setattr(_compat, "TASK_EXEC_OPTIONS", GONE)
    assert dict(_compat.exec_options(task)) == expected


def test_callback_publish_retry_reads_celerys_context_variable_where_it_has_one() -> None:
    var = getattr(celery_amqp, _compat.CALLBACK_PUBLISH_RETRY, None)
    if _compat.CELERY_VERSION[:2] < _compat.CALLBACK_PUBLISH_RETRY_SINCE:
        assert var is None  # no such mode before 5.7: False is exact
        assert _compat.callback_publish_retry() is False
        return
    assert isinstance(var, contextvars.ContextVar)
    assert _compat.callback_publish_retry() is False

    def while_set() -> bool:
        var.set(True)
        return _compat.callback_publish_retry()

    assert contextvars.copy_context().run(while_set) is True
    assert _compat.callback_publish_retry() is False


def test_a_celery_from_5_7_without_the_callback_mode_turns_the_fast_path_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_compat, "CALLBACK_PUBLISH_RETRY", GONE)
    monkeypatch.setattr(_compat, "CELERY_VERSION", (*_compat.CALLBACK_PUBLISH_RETRY_SINCE, 0))
    _compat.fast_publish_support.cache_clear()
    try:
        support = _compat.fast_publish_support()
        assert not support.ok
        assert GONE in support.reason
        assert _compat.callback_publish_retry() is False
    finally:
        monkeypatch.undo()
        _compat.fast_publish_support.cache_clear()


def test_amqp_is_celerys_tells_celerys_sender_from_an_override(app: Celery) -> None:
    for name in _compat.AMQP_SENDER_METHODS:
        assert _compat._has(celery_amqp.AMQP, name), name
    assert _compat.amqp_is_celerys(app.amqp)

    class Custom(celery_amqp.AMQP):  # type: ignore[misc]
        def send_task_message(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

    assert not _compat.amqp_is_celerys(Custom(app))


def test_amqp_is_celerys_compares_only_the_names_celery_has(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_compat, "AMQP_SENDER_METHODS", (*_compat.AMQP_SENDER_METHODS, GONE))
    assert _compat.amqp_is_celerys(app.amqp)


def test_task_is_v2_compat_reads_celerys_marker(app: Celery) -> None:
    assert getattr(Task, _compat.TASK_V2_COMPAT) is False
    task = app.task(shared=False, name="compat.echo")(echo)
    assert _compat.task_is_v2_compat(task) is False
    assert _compat.task_is_v2_compat(SimpleNamespace(**{_compat.TASK_V2_COMPAT: True}))
    assert _compat.task_is_v2_compat(object()) is False  # the fallback


def test_task_dumps_pydantic_arguments_only_for_a_pydantic_task_from_celery_5_7(
    app: Celery,
) -> None:
    plain = app.task(shared=False, name="compat.plain")(echo)
    models = app.task(shared=False, name="compat.models", pydantic=True)(echo)
    assert _compat.task_dumps_pydantic_arguments(plain) is False
    if _compat.CELERY_VERSION[:2] < (5, 7):
        assert not hasattr(Task, _compat.TASK_DUMP_PYDANTIC)  # the caller dumps nothing there
        assert _compat.task_dumps_pydantic_arguments(models) is False
    else:
        assert getattr(Task, _compat.TASK_DUMP_PYDANTIC) is None
        assert _compat.task_dumps_pydantic_arguments(models) is True


def test_repr_maxlevels_is_celerys_setting_or_saferepr_default(app: Celery) -> None:
    default = inspect.signature(saferepr).parameters["maxlevels"].default
    assert default == _compat.SAFEREPR_DEFAULT_MAXLEVELS
    if _compat.CELERY_VERSION[:2] >= (5, 7):
        assert "task_repr_maxlevels" in DEFAULTS
        assert _compat.repr_maxlevels(app.conf) == app.conf.task_repr_maxlevels == default
        app.conf.task_repr_maxlevels = 5
        assert _compat.repr_maxlevels(app.conf) == 5
    else:
        assert "task_repr_maxlevels" not in DEFAULTS
        assert _compat.repr_maxlevels(app.conf) == default


def test_pool_acquire_timeout_is_celerys_setting_from_5_7(app: Celery) -> None:
    assert _compat.pool_acquire_timeout_s(app.conf) is None
    if _compat.CELERY_VERSION[:2] >= (5, 7):
        assert "broker_pool_acquire_timeout" in DEFAULTS
        app.conf.broker_pool_acquire_timeout = 2
        assert _compat.pool_acquire_timeout_s(app.conf) == 2.0
    else:
        assert "broker_pool_acquire_timeout" not in DEFAULTS


# --- kombu's Redis channel and the messages it stores. ----------------------------------------


@pytest.fixture
def channel(app: Celery) -> Iterator[Any]:
    """kombu's Redis channel of ``app``'s broker connection."""
    with app.connection_for_write() as connection:
        yield connection.default_channel


def held(channel: Any, queue: str) -> Any:
    """Take the next message of ``queue`` without acking it: kombu keeps it in its unacked hash."""
    message = channel.basic_get(queue, no_ack=False)
    assert message is not None
    return message


def test_kombus_redis_channel_has_the_names_read() -> None:
    for name in (_compat.KOMBU_QUEUE_FOR_PRIORITY, _compat.KOMBU_MESSAGE_PRIORITY):
        assert callable(getattr(kombu_redis.Channel, name)), name
    assert callable(getattr(kombu_redis.Channel, _compat.KOMBU_NEXT_DELIVERY_TAG))
    for name in _compat.KOMBU_REDIS_CHANNEL_ATTRIBUTES:
        assert hasattr(kombu_redis.Channel, name), name
    assert _compat._redis_channel_missing() == ""


def test_a_channel_without_a_name_turns_the_fast_path_and_outbox_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_compat, "KOMBU_QUEUE_FOR_PRIORITY", GONE)
    assert _compat._redis_channel_missing() == GONE
    _compat.fast_publish_support.cache_clear()
    _compat.redis_channel_support.cache_clear()
    try:
        assert not _compat.fast_publish_support().ok
        assert GONE in _compat.redis_channel_support().reason
    finally:
        monkeypatch.undo()
        _compat.fast_publish_support.cache_clear()
        _compat.redis_channel_support.cache_clear()


@pytest.mark.parametrize("priority", [0, 5, 9])
def test_redis_queue_key_is_the_list_kombu_puts_a_message_of_that_priority_on(
    app: Celery, channel: Any, redis_client: redis.Redis, key_prefix: str, priority: int
) -> None:
    queue = app.conf.task_default_queue
    result = app.send_task("compat.echo", priority=priority)
    key = key_prefix + _compat.redis_queue_key(channel, queue, priority)
    [raw] = redis_client.lrange(key, 0, -1)
    assert _compat.task_id_of_queued(raw) == result.id


def test_redis_message_keys_are_where_kombu_keeps_a_queues_messages(
    app: Celery, channel: Any, redis_client: redis.Redis, key_prefix: str
) -> None:
    queue = app.conf.task_default_queue
    lists, unacked = _compat.redis_message_keys(channel, queue)
    assert all(key.startswith(key_prefix) for key in [*lists, unacked])
    waiting = app.send_task("compat.echo", priority=9)
    taken = app.send_task("compat.echo")
    queued = [raw for key in lists for raw in redis_client.lrange(key, 0, -1)]
    assert {_compat.task_id_of_queued(raw) for raw in queued} == {waiting.id, taken.id}
    message = held(channel, queue)
    entries = redis_client.hgetall(unacked)
    assert {_compat.task_id_of_unacked(raw) for raw in entries.values()} == {message.headers["id"]}
    message.ack()


def test_a_message_of_celerys_protocol_1_is_found_by_its_correlation_id(
    app: Celery, channel: Any, redis_client: redis.Redis, key_prefix: str
) -> None:
    app.conf.task_protocol = 1
    queue = app.conf.task_default_queue
    result = app.send_task("compat.echo")
    [raw] = redis_client.lrange(key_prefix + _compat.redis_queue_key(channel, queue, 0), 0, -1)
    assert _compat.task_id_of_queued(raw) == result.id


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"headers": 3}', b"42", b'"text"'])
def test_a_stored_value_of_another_shape_has_no_task_id(raw: bytes) -> None:
    assert _compat.task_id_of_queued(raw) is None
    assert _compat.task_id_of_unacked(raw) is None
    assert _compat.task_id_of_unacked(b"[" + raw + b"]") is None


def test_next_delivery_tag_is_kombus_and_the_fallback_makes_the_same_kind(
    channel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tags = {_compat.next_delivery_tag(channel) for _ in range(3)}
    monkeypatch.setattr(_compat, "KOMBU_NEXT_DELIVERY_TAG", GONE)
    tags |= {_compat.next_delivery_tag(channel) for _ in range(3)}
    assert len(tags) == 6
    assert all(str(uuid.UUID(tag)) == tag for tag in tags)


def test_redis_client_talks_to_the_brokers_redis_without_its_key_prefix(
    channel: Any, redis_client: redis.Redis, key_prefix: str
) -> None:
    assert isinstance(channel.pool, redis.ConnectionPool)
    client = _compat.redis_client(channel)
    assert _compat.redis_key_prefix(channel) == key_prefix
    client.set(key_prefix + "compat-probe", b"1")
    assert redis_client.get(key_prefix + "compat-probe") == b"1"


def test_redis_key_prefix_is_empty_without_the_transport_option(redis_url: str) -> None:
    with Connection(redis_url) as connection:
        assert _compat.redis_key_prefix(connection.default_channel) == ""


def test_reraise_as_library_errors_raises_what_kombus_own_raises(redis_url: str) -> None:
    connection = Connection(redis_url)
    kombus = getattr(connection, _compat.KOMBU_RERAISE_AS_LIBRARY_ERRORS)  # the original
    errors = [*connection.recoverable_connection_errors, *connection.recoverable_channel_errors]
    assert errors
    for error in [*errors, OperationalError, ValueError]:
        raised: list[BaseException] = []
        for context in (kombus, lambda: _compat.reraise_as_library_errors(connection)):
            try:
                with context():
                    raise error("broken pipe")
            except BaseException as exc:
                raised.append(exc)
        ours, theirs = raised[1], raised[0]
        assert (type(ours), str(ours)) == (type(theirs), str(theirs)), error
        assert type(ours.__cause__) is type(theirs.__cause__), error


# --- Celery's worker consumer. ----------------------------------------------------------------


@pytest.fixture
def consumer(app: Celery) -> Iterator[Any]:
    """Celery's worker consumer for ``app``, made but not started (no broker connection)."""
    app.task(shared=False, name="compat.echo")(echo)
    timer = Timer()
    made = Consumer(
        lambda *_: None,
        app=app,
        timer=timer,
        hostname=f"compat-{uuid.uuid4().hex[:6]}@test",
        # What the consumer and the strategies read of the worker (WorkController) that makes
        # it; a real one would send worker_init, which the metrics tests listen to.
        controller=SimpleNamespace(use_eventloop=False, state=worker_state),
        pool=SoloPool(),
    )
    made.update_strategies()  # what the Tasks step does when it starts
    yield made
    timer.stop()


def test_wrapped_strategies_are_what_the_consumers_message_handler_calls(
    app: Celery, consumer: Any, channel: Any
) -> None:
    assert isinstance(getattr(consumer, _compat.CONSUMER_STRATEGIES), dict)
    calls: list[tuple[str, Any]] = []

    def wrap(name: str, strategy: Any) -> Any:
        def guarded(message: Any, *args: Any, **kwargs: Any) -> None:
            calls.append((name, message))

        return guarded if name == "compat.echo" else strategy

    assert _compat.wrap_task_strategies(consumer, wrap) is True
    result = app.send_task("compat.echo")
    message = held(channel, app.conf.task_default_queue)
    consumer.create_task_handler()(message)
    assert [(name, m.headers["id"]) for name, m in calls] == [("compat.echo", result.id)]
    message.ack()


def test_wrap_task_strategies_wraps_nothing_without_the_dict() -> None:
    assert _compat.wrap_task_strategies(SimpleNamespace(), lambda n, s: s) is False


def test_the_wrapped_decode_error_handler_runs_before_celerys(
    app: Celery, consumer: Any, channel: Any, redis_client: redis.Redis, caplog: Any
) -> None:
    queue = app.conf.task_default_queue
    Producer(channel).publish(
        b"{not json", routing_key=queue, declare=[Queue(queue)],
        content_type="application/json", content_encoding="utf-8",
    )  # fmt: skip
    message = held(channel, queue)
    seen: list[tuple[Any, Exception]] = []
    assert _compat.wrap_decode_error_handler(consumer, lambda m, e: seen.append((m, e))) is True
    error = ValueError("undecodable")
    with caplog.at_level(logging.CRITICAL, logger="celery.worker.consumer.consumer"):
        getattr(consumer, _compat.CONSUMER_ON_DECODE_ERROR)(message, error)
    assert seen == [(message, error)]
    assert message.acknowledged  # Celery's own handler ran after ours
    assert "undecodable" in caplog.text
    _, unacked = _compat.redis_message_keys(channel, queue)
    assert redis_client.hlen(unacked) == 0


def test_wrap_decode_error_handler_wraps_nothing_without_one() -> None:
    assert _compat.wrap_decode_error_handler(SimpleNamespace(), lambda m, e: None) is False


def test_redis_qos_is_the_task_consumers_channels_with_the_methods_wrapped(channel: Any) -> None:
    qos = channel.qos
    for name in _compat.KOMBU_QOS_METHODS:
        assert callable(getattr(qos, name)), name
    consumer = SimpleNamespace(task_consumer=SimpleNamespace(channel=channel))
    assert _compat.redis_qos(consumer) is qos
    assert _compat.redis_qos(SimpleNamespace(task_consumer=None)) is None


def test_a_reused_channel_client_is_made_once_per_pool_and_acks_through_it(
    app: Celery, channel: Any, redis_client: redis.Redis
) -> None:
    assert callable(getattr(kombu_redis.Channel, _compat.KOMBU_CHANNEL_CREATE_CLIENT))
    assert _compat.reuse_channel_client(channel) is True
    assert _compat.reuse_channel_client(channel) is False  # once per channel
    with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
        assert first is second
    queue = app.conf.task_default_queue
    app.send_task("compat.echo")
    held(channel, queue).ack()  # the QoS writes and removes the unacked entry through it
    _, unacked = _compat.redis_message_keys(channel, queue)
    assert redis_client.hlen(unacked) == 0
    channel._pool = None  # a new pool (kombu makes one after a reconnection): a new client
    with channel.conn_or_acquire() as third:
        assert third is not first


def test_reuse_channel_client_leaves_a_channel_without_the_method_as_it_is() -> None:
    assert _compat.reuse_channel_client(SimpleNamespace()) is False


def test_the_versions_read_are_the_installed_ones() -> None:
    assert celery.__version__ == _compat.CELERY_VERSION_TEXT
    assert kombu.__version__ == _compat.KOMBU_VERSION_TEXT
    assert redis.__version__ == _compat.REDIS_VERSION_TEXT


# --- Surviving a Redis that refuses writes. ---------------------------------------------------


def test_the_consumers_connection_errors_take_more_for_that_consumer_only(consumer: Any) -> None:
    added = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)
    assert isinstance(consumer.connection_errors, tuple)  # what Celery's consumer has
    assert _compat.add_consumer_connection_errors(consumer, added) is True
    assert set(added) <= set(consumer.connection_errors)
    plain = SimpleNamespace(connection_errors=(OSError,))
    assert _compat.add_consumer_connection_errors(plain, added) is True
    assert _compat.add_consumer_connection_errors(plain, added) is True  # not twice
    assert plain.connection_errors == (OSError, *added)
    # kombu's transport, which every other connection reads, is left as it was.
    assert redis.exceptions.OutOfMemoryError not in kombu_redis.Transport.connection_errors
    assert _compat.add_consumer_connection_errors(SimpleNamespace(), added) is False


def test_the_wrapped_connect_runs_the_hook_before_celerys_connect(consumer: Any) -> None:
    assert callable(getattr(Consumer, _compat.CONSUMER_CONNECT))
    calls: list[str] = []
    consumer.connect = lambda: calls.append("connect") or "connection"
    assert _compat.wrap_consumer_connect(consumer, lambda: calls.append("before")) is True
    assert consumer.connect() == "connection"
    assert calls == ["before", "connect"]
    assert _compat.wrap_consumer_connect(SimpleNamespace(), lambda: None) is False


def test_worker_should_stop_raises_celerys_shutdown_once_a_signal_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from celery.exceptions import WorkerShutdown

    assert callable(getattr(worker_state, _compat.WORKER_MAYBE_SHUTDOWN))
    _compat.worker_should_stop()  # nothing asked: returns
    monkeypatch.setattr(worker_state, "should_stop", 0)
    with pytest.raises(WorkerShutdown):
        _compat.worker_should_stop()


def test_forget_delivered_frees_the_prefetch_slot_and_leaves_the_message_unacked_in_redis(
    app: Celery, channel: Any, redis_client: redis.Redis, key_prefix: str
) -> None:
    from kombu.transport import virtual as kombu_virtual

    assert issubclass(kombu_redis.QoS, kombu_virtual.QoS)
    queue = app.conf.task_default_queue
    app.send_task("compat.echo")
    message = held(channel, queue)
    qos = channel.qos
    qos.prefetch_count = 1
    assert not qos.can_consume()
    _compat.forget_delivered(qos, message.delivery_tag)
    assert qos.can_consume()
    assert redis_client.hexists(key_prefix + channel.unacked_key, message.delivery_tag)


def test_the_kombu_loggers_filtered_are_kombus() -> None:
    import kombu.asynchronous.hub

    names = {kombu.asynchronous.hub.logger.name, kombu_redis.logger.name}
    assert set(_compat.KOMBU_TIMER_LOGGERS) == names
