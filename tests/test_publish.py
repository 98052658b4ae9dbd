"""The fast publish path: Celery's own message, delivered by a real worker, retried like Celery."""

from __future__ import annotations

import contextlib
import enum
import json
import os
import random
import socket
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, Task, signals
from celery._state import _task_stack
from celery.utils.saferepr import saferepr
from kombu import Queue
from kombu.exceptions import OperationalError

import op_celery
from op_celery import _app, _compat, _publish, _publish_bound, _reprs, _tasks
from op_celery._enqueue import task_for
from op_celery.testing import StandInServer

from ._support import WorkerProcess

UA = "Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0"
#: A policy without waits: the tests count attempts, they do not time them.
NO_WAIT_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0, "interval_max": 0}

#: Calls that exercise what the message carries: unicode, quotes, backslashes, line breaks,
#: nesting past saferepr's levels, and properties long enough to be truncated in kwargsrepr.
CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("track", ("signup",), {"properties": {"plan": "pro"}, "profile_id": "u1"}),
    (
        "track",
        ("checkout_completed",),
        {
            "properties": {
                "quote": 'it\'s "fine"',
                "path": "C:\\temp\\x",
                "lines": "a\nb\tc",
                "unicode": "café ☕ 日本",
                "nested": {"a": [1, {"b": {"c": [2.5, None, True]}}]},
                "empty": {"d": {}, "l": []},
            },
            "profile_id": 42,
            "groups": ["acme", "beta"],
            "timestamp": datetime(2026, 11, 26, 9, 30, tzinfo=timezone.utc),
            "client_ip": "203.0.113.7",
            "user_agent": UA,
        },
    ),
    ("track", ("big",), {"properties": {f"key{i}": "v" * 40 for i in range(40)}}),
    ("identify", ("u1",), {"first_name": "Ada", "email": "ada@example.com"}),
    ("increment", ("u1", "logins"), {"value": 2}),
    ("assign_group", (["acme"],), {"profile_id": "u1"}),
]


def queue_key(env: dict[str, str]) -> str:
    return env["OP_CELERY_BROKER_KEY_PREFIX"] + env["OP_CELERY_QUEUE"]


def pop_all(redis_client: redis.Redis, key: str) -> list[bytes]:
    """The messages of a queue, oldest first, and empty it."""
    raw = list(reversed(redis_client.lrange(key, 0, -1)))
    redis_client.delete(key)
    return raw


def without_delivery_tag(raw: bytes) -> bytes:
    tag = json.loads(raw)["properties"]["delivery_tag"]
    return raw.replace(tag.encode(), b"<delivery-tag>")


class Spy:
    """Records the calls of one function and passes them on."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return self.function(*args, **kwargs)


@pytest.fixture
def fast_sends(monkeypatch: pytest.MonkeyPatch) -> Spy:
    """Counts the publishes that took the fast path."""
    spy = Spy(_publish._send)
    monkeypatch.setattr(_publish, "_send", spy)
    return spy


@pytest.fixture
def publish_calls(monkeypatch: pytest.MonkeyPatch) -> Spy:
    """What ``OpenPanelTask.apply_async`` hands to ``publish``."""
    spy = Spy(_publish.publish)
    # Where the task class lives (``_tasks``, or the module it moves to) looks ``publish`` up.
    monkeypatch.setattr(sys.modules[_tasks.OpenPanelTask.__module__], "publish", spy)
    return spy


def celery_publish(task: Any, kwargs: dict[str, Any], options: dict[str, Any], **extra: Any) -> Any:
    """Publish through Celery's own ``Task.apply_async``, as before the fast path."""
    return Task.apply_async(task, (), kwargs, **extra, **options)


@pytest.mark.parametrize(("operation", "args", "kwargs"), CALLS)
def test_the_message_is_byte_for_byte_what_celery_sends(
    producer: Celery,
    redis_client: redis.Redis,
    env: dict[str, str],
    fast_sends: Spy,
    publish_calls: Spy,
    operation: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    task = task_for(operation)
    task.apply_async(args, {**kwargs, "event_id": "e" * 32}, task_id="task-1")
    assert len(fast_sends.calls) == 1
    [(call_args, _)] = publish_calls.calls
    _, message, options, *_ = call_args
    celery_publish(task, message, options, task_id="task-1")
    fast, celery = pop_all(redis_client, queue_key(env))
    assert without_delivery_tag(fast) == without_delivery_tag(celery)


@pytest.fixture
def custom_producer(env: dict[str, str]) -> Iterator[Callable[..., Celery]]:
    """A user's app like `producer`'s, with extra configuration."""
    apps: list[Celery] = []

    def make(**conf: Any) -> Celery:
        app = Celery("custom-app", set_as_current=True)
        transport_options = conf.pop("broker_transport_options", {})
        app.conf.update(
            {
                "broker_url": env["OP_CELERY_BROKER_URL"],
                "broker_transport_options": {
                    "global_keyprefix": env["OP_CELERY_BROKER_KEY_PREFIX"],
                    **transport_options,
                },
                "op_celery_queue": env["OP_CELERY_QUEUE"],
                "task_ignore_result": True,
                **conf,
            }
        )
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()
    _app.reset_settings()


def test_the_message_matches_celery_with_an_unencoded_body(
    custom_producer: Callable[..., Celery],
    redis_client: redis.Redis,
    env: dict[str, str],
    fast_sends: Spy,
    publish_calls: Spy,
) -> None:
    custom_producer(broker_transport_options={"body_encoding": "utf-8"})
    kwargs = {"properties": {"quote": 'say "hi"', "café": "☕"}, "event_id": "e" * 32}
    task_for("track").apply_async(("signup",), kwargs, task_id="task-2")
    [(call_args, _)] = publish_calls.calls
    _, message, options, *_ = call_args
    celery_publish(task_for("track"), message, options, task_id="task-2")
    fast, celery = pop_all(redis_client, queue_key(env))
    assert json.loads(fast)["properties"]["body_encoding"] == "utf-8"
    assert without_delivery_tag(fast) == without_delivery_tag(celery)
    assert len(fast_sends.calls) == 1


def test_a_queue_given_as_a_declaration_gets_celerys_message(
    producer: Celery,
    redis_client: redis.Redis,
    env: dict[str, str],
    fast_sends: Spy,
    publish_calls: Spy,
) -> None:
    queue = Queue(env["OP_CELERY_QUEUE"])
    task = task_for("track")
    task.apply_async(("declared",), {"event_id": "e" * 32}, task_id="task-3", queue=queue)
    [(call_args, _)] = publish_calls.calls
    _, message, options, *_ = call_args
    celery_publish(task, message, options, task_id="task-3")
    fast, celery = pop_all(redis_client, queue_key(env))
    assert without_delivery_tag(fast) == without_delivery_tag(celery)
    assert len(fast_sends.calls) == 1


@pytest.mark.parametrize(
    "queue",
    [
        pytest.param(lambda name: Queue(name, expires=600), id="expires"),
        pytest.param(
            lambda name: Queue(name, queue_arguments={"x-expires": 600_000}), id="x-expires"
        ),
        pytest.param(lambda name: Queue(name, auto_delete=True), id="auto-delete"),
    ],
)
def test_a_queue_kombu_declares_on_every_publish_goes_through_celery(
    custom_producer: Callable[..., Celery],
    redis_client: redis.Redis,
    env: dict[str, str],
    fast_sends: Spy,
    queue: Callable[[str], Queue],
) -> None:
    # kombu (5.7 on) renews an expiring queue's TTL on each publish; the fast path leaves that
    # to it rather than copying one more of its internals.
    declared = queue(env["OP_CELERY_QUEUE"])
    custom_producer(task_queues=[declared])
    op_celery.track.delay("expiring", event_id="e" * 32)
    key = queue_key(env)
    if _compat.KOMBU_VERSION >= (5, 7) and not declared.auto_delete:
        assert 0 < redis_client.pttl(key) <= 600_000
    [raw] = pop_all(redis_client, key)
    assert json.loads(raw)["headers"]["task"] == "op_celery.track"
    assert fast_sends.calls == []


def test_a_publish_from_a_running_task_carries_its_parent_and_root_ids(
    producer: Celery, redis_client: redis.Redis, env: dict[str, str], fast_sends: Spy
) -> None:
    parent = task_for("identify")
    parent.push_request(id="parent-task", root_id="root-task", called_directly=False)
    _task_stack.push(parent)
    try:
        message = {"name": "from-a-task", "event_id": "f" * 32}
        options = {"queue": env["OP_CELERY_QUEUE"], "serializer": "json"}
        task = task_for("track")
        base = super(_tasks.OpenPanelTask, task)
        result = _publish.publish(task, message, options, base)
        celery_publish(task, message, options, task_id=result.id)
    finally:
        _task_stack.pop()
        parent.pop_request()
    fast, celery = pop_all(redis_client, queue_key(env))
    headers = json.loads(fast)["headers"]
    assert (headers["parent_id"], headers["root_id"]) == ("parent-task", "root-task")
    assert without_delivery_tag(fast) == without_delivery_tag(celery)
    assert len(fast_sends.calls) == 1


def test_a_fast_path_message_is_delivered_by_a_real_worker(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    fast_sends: Spy,
) -> None:
    start_worker()
    op_celery.identify.delay("u1", first_name="Ada", user_agent=UA)
    assert stand_in.wait_for(1, timeout=20)
    for i in range(20):
        op_celery.track.delay(
            f"event-{i}", properties={"i": i, "q": "it's"}, profile_id="u1", user_agent=UA
        )
    op_celery.increment.delay("u1", "logins", value=3)
    assert len(fast_sends.calls) == 22
    assert stand_in.wait_for(22, timeout=30)
    received = stand_in.received
    tracks = sorted((r for r in received if r.type == "track"), key=lambda r: r.payload["name"])
    assert [r.payload["properties"]["i"] for r in tracks] == sorted(range(20), key=str)
    assert all(r.headers["user-agent"] == UA for r in tracks)
    increments = [r for r in received if r.type == "increment"]
    assert [r.payload for r in increments] == [
        {"profileId": "u1", "property": "logins", "value": 3}
    ]


@pytest.fixture
def flaky_lpush(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], list[int]]:
    """Make the broker drop the connection on the next ``n`` LPUSH commands; returns a list
    whose length is the number of LPUSH attempts made."""
    attempts: list[int] = []
    failures = [0]
    real = redis.Redis.execute_command

    def execute_command(self: redis.Redis, *args: Any, **options: Any) -> Any:
        if args and args[0] == "LPUSH":
            attempts.append(1)
            if len(attempts) <= failures[0]:
                raise redis.ConnectionError("injected: connection reset by the broker")
        return real(self, *args, **options)

    monkeypatch.setattr(redis.Redis, "execute_command", execute_command)

    def arm(n: int) -> list[int]:
        attempts.clear()
        failures[0] = n
        return attempts

    return arm


def _both_paths(env: dict[str, str]) -> list[tuple[str, Callable[[dict[str, Any]], Any]]]:
    task = task_for("track")
    options = {
        "queue": env["OP_CELERY_QUEUE"],
        "serializer": "json",
        "retry": True,
        "retry_policy": NO_WAIT_POLICY,
    }
    base = super(_tasks.OpenPanelTask, task)
    return [
        ("fast", lambda message: _publish.publish(task, message, dict(options), base)),
        ("celery", lambda message: celery_publish(task, message, dict(options))),
    ]


@pytest.mark.parametrize(("failures", "outcome"), [(1, "enqueued"), (2, "OperationalError")])
def test_a_dropped_broker_connection_is_retried_as_celery_retries_it(
    producer: Celery,
    redis_client: redis.Redis,
    env: dict[str, str],
    flaky_lpush: Callable[[int], list[int]],
    fast_sends: Spy,
    failures: int,
    outcome: str,
) -> None:
    # kombu's Connection.ensure reconnects after a connection error and tries again; with the
    # Redis transport, an error that persists after a successful reconnect is raised at once.
    results = {}
    for name, publish in _both_paths(env):
        attempts = flaky_lpush(failures)
        try:
            publish({"name": f"via-{name}", "event_id": name * 8})
        except OperationalError as exc:
            assert "injected" in str(exc)
            result = "OperationalError"
        else:
            [raw] = pop_all(redis_client, queue_key(env))
            assert f"'name': 'via-{name}'" in json.loads(raw)["headers"]["kwargsrepr"]
            result = "enqueued"
        results[name] = (result, len(attempts))
    assert results["fast"] == results["celery"] == (outcome, 2)
    assert pop_all(redis_client, queue_key(env)) == []
    assert len(fast_sends.calls) == 1


def test_a_broker_that_refuses_connections_raises_what_celery_raises(
    custom_producer: Callable[..., Celery], fast_sends: Spy
) -> None:
    custom_producer(broker_url=f"redis://127.0.0.1:{closed_port()}/0")
    task = task_for("track")
    options = {"queue": "q", "serializer": "json", "retry": True, "retry_policy": NO_WAIT_POLICY}
    message = {"name": "nowhere", "event_id": "e" * 32}
    errors = []
    for publish in (
        lambda: _publish.publish(task, message, dict(options), super(_tasks.OpenPanelTask, task)),
        lambda: celery_publish(task, message, dict(options)),
    ):
        with pytest.raises(OperationalError) as caught:
            publish()
        errors.append(str(caught.value))
    fast, celery = errors
    assert fast == celery and "refused" in fast.lower()
    assert len(fast_sends.calls) == 1


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class CuttableProxy:
    """A TCP proxy to Redis whose connections can all be cut, as a broker restart does; with
    ``reply_delay_s``, it holds every reply of Redis that long (a slow broker)."""

    def __init__(self, host: str, port: int, reply_delay_s: float = 0.0) -> None:
        self.target = (host, port)
        self.reply_delay_s = reply_delay_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.closed = False
        self.accepted = 0
        self._start(self._accept)

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
                self.accepted += 1
            self._start(self._pipe, client, upstream)
            self._start(self._pipe, upstream, client, self.reply_delay_s)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, delay_s: float = 0.0) -> None:
        try:
            while data := source.recv(65536):
                if delay_s:
                    time.sleep(delay_s)
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self.cut()
        for thread in self.threads:
            thread.join(5)


@pytest.fixture
def proxied_producer(env: dict[str, str], redis_url: str) -> Iterator[CuttableProxy]:
    """A user's app whose broker connections go through a `CuttableProxy`."""
    parts = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs
    proxy = CuttableProxy(parts.get("host", "127.0.0.1"), parts.get("port", 6379))
    app = Celery("proxied-app", set_as_current=True)
    app.conf.update(
        broker_url=f"redis://127.0.0.1:{proxy.port}/{parts.get('db', 0)}",
        broker_transport_options={"global_keyprefix": env["OP_CELERY_BROKER_KEY_PREFIX"]},
        op_celery_queue=env["OP_CELERY_QUEUE"],
        task_ignore_result=True,
    )
    try:
        yield proxy
    finally:
        app.close()
        _app.reset_settings()
        proxy.close()


def test_publishing_goes_on_after_the_broker_drops_every_connection(
    proxied_producer: CuttableProxy,
    redis_client: redis.Redis,
    env: dict[str, str],
    fast_sends: Spy,
) -> None:
    for name, publish in _both_paths(env):
        publish({"name": f"{name}-before", "event_id": name * 8})
        proxied_producer.cut()
        publish({"name": f"{name}-after", "event_id": name * 8})
    names = [
        json.loads(raw)["headers"]["kwargsrepr"].split("'")[3]
        for raw in pop_all(redis_client, queue_key(env))
    ]
    assert names == ["fast-before", "fast-after", "celery-before", "celery-after"]
    assert proxied_producer.accepted >= 3  # reconnected after each cut
    assert len(fast_sends.calls) == 2


def test_calls_the_fast_path_does_not_reproduce_go_through_celery(
    producer: Celery, redis_client: redis.Redis, env: dict[str, str], fast_sends: Spy
) -> None:
    seen: list[str] = []

    def on_publish(sender: str | None = None, **_: Any) -> None:
        seen.append(str(sender))

    op_celery.track.apply_async(("later",), countdown=60)
    op_celery.track.apply_async(("labelled",), headers={"x-trace": "abc"})
    op_celery.track.apply_async(("soon",), expires=600)
    signals.before_task_publish.connect(on_publish)
    try:
        op_celery.track.delay("observed")
    finally:
        signals.before_task_publish.disconnect(on_publish)
    assert fast_sends.calls == []
    later, labelled, soon, observed = (
        json.loads(raw)["headers"] for raw in pop_all(redis_client, queue_key(env))
    )
    assert later["eta"] is not None
    assert labelled["x-trace"] == "abc"
    assert soon["expires"] is not None
    assert "'observed'" in observed["kwargsrepr"]
    assert seen == ["op_celery.track"]


def test_another_queue_is_published_to_on_the_fast_path(
    producer: Celery, redis_client: redis.Redis, env: dict[str, str], fast_sends: Spy
) -> None:
    other = env["OP_CELERY_QUEUE"] + "-other"
    op_celery.track.apply_async(("elsewhere",), queue=other)
    [raw] = pop_all(redis_client, env["OP_CELERY_BROKER_KEY_PREFIX"] + other)
    assert json.loads(raw)["properties"]["delivery_info"]["routing_key"] == other
    assert len(fast_sends.calls) == 1


# --- The publish bound: OP_CELERY_PUBLISH_TIMEOUT, whatever the broker does. -------------------

#: The bound the tests set, and what a call may take beyond it: the last attempt's wait and the
#: spool's write. A call that hangs (a silent broker on an app without socket timeouts) or takes
#: a multiple of the bound (kombu's retries, each as long as the app's socket timeout) is caught.
BOUND_S = 1.0
MARGIN_S = 1.0


class SilentBroker:
    """A TCP server that accepts every connection and never answers, as a broker stuck behind
    a failed-over address or a full firewall table does."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()
        self.thread.join(5)


@pytest.fixture(params=["refused", "silent", "slow"])
def unanswering_broker(request: pytest.FixtureRequest, redis_url: str) -> Iterator[str]:
    """The URL of a broker that refuses connections, accepts and never answers, or answers
    each reply after twice the bound (a Redis stalled by a fork or a long script)."""
    if request.param == "refused":
        yield f"redis://127.0.0.1:{closed_port()}/0"
        return
    if request.param == "silent":
        silent = SilentBroker()
        try:
            yield f"redis://127.0.0.1:{silent.port}/0"
        finally:
            silent.close()
        return
    parts = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs
    slow = CuttableProxy(parts.get("host", "127.0.0.1"), parts.get("port", 6379), 2 * BOUND_S)
    try:
        yield f"redis://127.0.0.1:{slow.port}/{parts.get('db', 0)}"
    finally:
        slow.close()


def _delay_in_thread(call: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``call`` in a thread (so a hang cannot hang the test); its time and its result."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:  # the outcome is what the test looks at
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BOUND_S + MARGIN_S)
    return time.monotonic() - started, outcome[0] if outcome else None


@pytest.mark.parametrize("options", [{}, {"countdown": 30}], ids=["fast-path", "celery-path"])
def test_delay_on_a_users_app_gives_up_within_the_publish_timeout_whatever_the_broker_does(
    unanswering_broker: str, options: dict[str, Any]
) -> None:
    # Raising rather than spooling: a spool's flusher thread would outlive the test.
    app = Celery("user-app-unanswering", set_as_current=True)
    app.conf.update(
        broker_url=unanswering_broker,
        op_celery_publish_timeout=BOUND_S,
        op_celery_on_publish_failure="raise",
        task_ignore_result=True,
    )
    try:
        elapsed, result = _delay_in_thread(
            lambda: op_celery.track.apply_async(("unanswered",), **options)
        )
    finally:
        app.close()
        _app.reset_settings()
    assert result is not None, f"still waiting after {elapsed:.1f} s"
    assert isinstance(result, op_celery.PublishError), result
    assert elapsed < BOUND_S + MARGIN_S


def test_the_users_own_tasks_and_consumers_keep_the_apps_broker_settings(
    producer: Celery, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    # op-celery's timeouts are on its own pool; the app's connections are as the app says.
    producer.conf.broker_transport_options = {
        **producer.conf.broker_transport_options,
        "socket_timeout": 30.0,
    }

    @producer.task(name="proj.own_task")
    def own_task() -> None:
        pass

    op_celery.track.delay("ours")
    op_celery.track.apply_async(("ours-via-celery",), countdown=30)
    own_task.apply_async(queue=env["OP_CELERY_QUEUE"])
    with producer.connection_for_read() as consumer:
        assert consumer.transport_options["socket_timeout"] == 30.0
    assert producer.pool.connection.transport_options["socket_timeout"] == 30.0
    assert "errback" not in producer.pool.connection.transport_options
    ours = _publish_bound.publish_pools(producer).connections.connection.transport_options
    attempt_s = _app.settings_for(producer).publish_timeout_s * _publish_bound.ATTEMPT_SHARE
    assert ours["socket_timeout"] == ours["socket_connect_timeout"] == attempt_s
    assert len(redis_client.lrange(queue_key(env), 0, -1)) == 3


#: Run in a fresh interpreter: the package's own app, configured from the environment only.
PACKAGE_APP_SCRIPT = """
import json, time
import op_celery
started = time.monotonic()
op_celery.track.delay("unanswered")
print(json.dumps({"elapsed": time.monotonic() - started}))
"""


def test_delay_on_the_packages_app_spools_within_the_publish_timeout_whatever_the_broker_does(
    unanswering_broker: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OP_CELERY_", "OPENPANEL_"))}
    env.update(
        OP_CELERY_BROKER_URL=unanswering_broker,
        OP_CELERY_PUBLISH_TIMEOUT=str(BOUND_S),
        OP_CELERY_SPOOL_DIR=str(tmp_path),
    )
    done = subprocess.run(
        [sys.executable, "-c", PACKAGE_APP_SCRIPT], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    elapsed = json.loads(done.stdout.splitlines()[-1])["elapsed"]
    assert elapsed < BOUND_S + MARGIN_S
    assert len(list(tmp_path.glob("*.json"))) == 1


# --- kwargsrepr: the text copy of the arguments, as Celery's saferepr renders it. ------------


class Level(enum.IntEnum):
    HIGH = 1


class Label(str):
    pass


_ALPHABET = string.ascii_letters + string.digits + " '\"\\\n\t\x00\x7fé日☕{}[]:,."


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth < 5 and roll < 0.25:
        return {_random_text(rng): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if depth < 5 and roll < 0.4:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return rng.choice(
        [
            _random_text(rng),
            rng.randint(-(10**12), 10**12),
            rng.uniform(-1e6, 1e6),
            rng.choice([True, False, None]),
            0.1,
            1e300,
        ]
    )


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.choice([0, 1, 5, 20, 200])))


def test_kwargsrepr_renders_exactly_what_saferepr_renders() -> None:
    rng = random.Random(20261126)
    for _ in range(3000):
        kwargs = {_random_text(rng): _random_json(rng) for _ in range(rng.randint(0, 8))}
        maxsize = rng.choice([1024, 1024, 200, 20, 1])
        maxlevels = rng.choice([3, 3, 0, 1, 2, 5])
        assert _reprs.kwargsrepr(kwargs, maxsize, maxlevels) == saferepr(
            kwargs, maxsize, maxlevels=maxlevels
        ), (kwargs, maxsize, maxlevels)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"level": Level.HIGH},
        {"name": Label("x")},
        {"pair": (1, 2)},
        {1: "int key"},
        {"when": datetime(2026, 1, 1, tzinfo=timezone.utc)},
        {"long": "x" * 2000},
    ],
)
def test_kwargsrepr_leaves_other_values_to_saferepr(kwargs: dict[Any, Any]) -> None:
    assert _reprs.kwargsrepr(kwargs, 1024, 3) == saferepr(kwargs, 1024, maxlevels=3)
