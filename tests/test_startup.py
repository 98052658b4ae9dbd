"""A worker of a user's own app says at start what keeps it from serving op-celery's tasks, and
what the package's broker settings change on that app: real ``celery worker`` processes."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import op_celery
from op_celery import _app
from op_celery._app import adopt
from op_celery._startup import problems
from op_celery.testing import StandInServer

from ._support import WORKER_START_TIMEOUT_S, wait_until

RABBITMQ_URL = os.environ.get("OP_CELERY_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")

#: A user's Celery module: its app, configured with CONFIG, and op_celery imported.
MODULE = """
from celery import Celery
{import_line}

app = Celery({name!r})
app.conf.update({config!r})
"""
IMPORT_OP_CELERY = "import op_celery  # noqa: F401  (the tasks, and their start-up checks)"


class UserWorker:
    """``celery -A <user module> worker`` for a user's app configured with ``config``."""

    def __init__(
        self,
        tmp_path: Path,
        env: dict[str, str],
        config: dict[str, Any],
        *args: str,
        import_line: str = IMPORT_OP_CELERY,
    ) -> None:
        name = f"userproj_{uuid.uuid4().hex[:8]}"
        module = MODULE.format(name=name, config=config, import_line=import_line)
        (tmp_path / f"{name}.py").write_text(module)
        self.log_path = tmp_path / f"{name}.log"
        self.env = {k: v for k, v in env.items() if k != "OP_CELERY_BROKER_URL"}
        self.env.update(PYTHONPATH=str(tmp_path), C_FORCE_ROOT="1")  # accept_content=["pickle"]
        self.cwd = tmp_path
        self.command = [
            sys.executable, "-m", "celery", "-A", name, "worker", "--pool", "threads",
            "--concurrency", "2", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "--hostname", f"{name}@%h", *args,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> UserWorker:
        with self.log_path.open("wb") as log:
            self.process = process = subprocess.Popen(
                self.command, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while " ready." not in self.log:
            if process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"worker not ready:\n{self.log}")
            time.sleep(0.1)
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def run_user_worker(
    tmp_path: Path,
    env: dict[str, str],
    config: dict[str, Any],
    *args: str,
    import_line: str = IMPORT_OP_CELERY,
) -> str:
    """Start a `UserWorker`, wait until it is ready, stop it; return its log."""
    worker = UserWorker(tmp_path, env, config, *args, import_line=import_line)
    try:
        worker.start()
    finally:
        worker.stop()
    return worker.log


def op_celery_lines(log: str, level: str) -> list[str]:
    return re.findall(rf"{level}/MainProcess\] (op_celery: .*)", log)


@pytest.fixture
def redis_config(env: dict[str, str]) -> dict[str, Any]:
    """A user's app on the test's Redis, routing nothing: events go to the test's queue."""
    return {
        "broker_url": env["OP_CELERY_BROKER_URL"],
        "broker_transport_options": {"global_keyprefix": env["OP_CELERY_BROKER_KEY_PREFIX"]},
        "op_celery_queue": env["OP_CELERY_QUEUE"],
    }


def test_a_worker_that_does_not_consume_the_events_queue_says_which_worker_must_run(
    tmp_path: Path, env: dict[str, str], redis_config: dict[str, Any]
) -> None:
    # Its other settings are none of op_celery's business: it receives none of the events.
    config = {**redis_config, "accept_content": ["pickle"]}
    log = run_user_worker(tmp_path, env, config, "-Q", "someone-elses")
    queue = env["OP_CELERY_QUEUE"]
    assert op_celery_lines(log, "ERROR") == []
    assert (
        f"op_celery: this worker does not consume the queue {queue!r}, where op_celery's events "
        f"go: it delivers none of them, so a worker with -Q {queue} must run (or add it here: "
        f"-Q someone-elses,{queue})"
    ) in op_celery_lines(log, "WARNING")


def test_a_worker_of_the_events_queue_that_refuses_json_says_it_refuses_them_all(
    tmp_path: Path, env: dict[str, str], redis_config: dict[str, Any]
) -> None:
    config = {**redis_config, "accept_content": ["pickle"]}
    log = run_user_worker(tmp_path, env, config, "-Q", f"someone-elses,{env['OP_CELERY_QUEUE']}")
    assert op_celery_lines(log, "ERROR") == [
        "op_celery: this worker does not accept JSON (accept_content=['pickle']), and every "
        "op_celery event is JSON: it refuses them all; add 'json' to accept_content"
    ]


def test_a_worker_of_the_events_queue_that_never_imports_op_celery_says_so(
    tmp_path: Path, env: dict[str, str], redis_config: dict[str, Any]
) -> None:
    # The celery command loads op_celery_check (entry point), which imports no op_celery.
    queue = env["OP_CELERY_QUEUE"]
    log = run_user_worker(tmp_path, env, redis_config, "-Q", queue, import_line="")
    [error] = op_celery_lines(log, "ERROR")
    assert error.startswith(
        f"op_celery: this worker consumes the queue {queue!r}, where op_celery's events go, but "
        "never imports op_celery: it drops every event as an unregistered task; add "
        "`import op_celery` to the module that creates your Celery app ('userproj_"
    )
    assert "op_celery.track" not in log  # the check registered no task


def test_a_worker_of_other_queues_that_never_imports_op_celery_says_nothing(
    tmp_path: Path, env: dict[str, str], redis_config: dict[str, Any]
) -> None:
    log = run_user_worker(tmp_path, env, redis_config, "-Q", "someone-elses", import_line="")
    assert "op_celery" not in log


def _rabbitmq_answers() -> bool:
    host, port = RABBITMQ_URL.split("@")[1].split("/")[0].split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _rabbitmq_answers(), reason=f"no RabbitMQ at {RABBITMQ_URL}")
def test_a_rabbitmq_worker_without_a_redis_says_op_celery_needs_one(
    tmp_path: Path, env: dict[str, str]
) -> None:
    config = {"broker_url": RABBITMQ_URL, "op_celery_queue": env["OP_CELERY_QUEUE"]}
    log = run_user_worker(tmp_path, env, config, "-Q", env["OP_CELERY_QUEUE"])
    assert op_celery_lines(log, "ERROR") == [
        "op_celery: the broker amqp://guest:***@127.0.0.1:5672// is not Redis and "
        "OP_CELERY_REDIS_URL is not set: op_celery's ledger, rate limiter and dead letters need "
        "a Redis, so no event can be delivered; set OP_CELERY_REDIS_URL "
        "(e.g. redis://localhost:6379/0) on the workers"
    ]
    assert "guest:guest" not in log


def test_a_well_configured_users_worker_reports_nothing_wrong_and_what_the_package_set(
    tmp_path: Path, env: dict[str, str], redis_config: dict[str, Any]
) -> None:
    log = run_user_worker(tmp_path, env, redis_config, "-Q", env["OP_CELERY_QUEUE"])
    assert op_celery_lines(log, "ERROR") == []
    [note] = [line for line in op_celery_lines(log, "WARNING") if "visibility" in line]
    assert note.startswith("op_celery: visibility timeout 300 s set on app 'userproj_")


def test_a_users_own_visibility_timeout_is_kept_and_what_it_changes_is_said(
    tmp_path: Path, env: dict[str, str], redis_config: dict[str, Any]
) -> None:
    options = {**redis_config["broker_transport_options"], "visibility_timeout": 3600}
    config = {**redis_config, "broker_transport_options": options}
    log = run_user_worker(tmp_path, env, config, "-Q", env["OP_CELERY_QUEUE"])
    [note] = [line for line in op_celery_lines(log, "WARNING") if "visibility" in line]
    assert "3,600 s" in note and "kept" in note
    assert "come back after an hour, not 5 minutes" in note


def test_a_crashed_users_worker_hands_its_event_on_after_the_packages_visibility_timeout(
    tmp_path: Path,
    env: dict[str, str],
    redis_config: dict[str, Any],
    producer: Celery,
    stand_in: StandInServer,
) -> None:
    # The app sets no visibility timeout: with kombu's, the event would wait an hour.
    queue = env["OP_CELERY_QUEUE"]
    worker_env = {**env, "OP_CELERY_VISIBILITY_TIMEOUT": "10"}
    first = UserWorker(tmp_path, worker_env, redis_config, "-Q", queue).start()
    second = UserWorker(tmp_path, worker_env, redis_config, "-Q", queue)
    try:
        # Held unacked by the first worker until its countdown ends, when it is long dead.
        op_celery.track.apply_async(("survives-a-crash",), countdown=12)
        assert wait_until(lambda: " received" in first.log), first.log
        first.kill()
        second.start()
        assert stand_in.wait_for(1, timeout=60), second.log
    finally:
        first.kill()
        second.stop()
    assert [r.payload["name"] for r in stand_in.received] == ["survives-a-crash"]
    assert "visibility timeout 10 s set on app" in second.log


# --- adopt: what the package sets on a user's app, in-process. ---------------------------------


@pytest.fixture
def user_app(env: dict[str, str]) -> Iterator[Callable[..., Celery]]:
    made: list[Celery] = []

    def make(**config: Any) -> Celery:
        app = Celery(f"adopted-{len(made)}", set_as_current=False)
        app.conf.update(broker_url=env["OP_CELERY_BROKER_URL"], **config)
        made.append(app)
        return app

    yield make
    for app in made:
        app.close()
    _app.reset_settings()


def test_an_app_without_a_visibility_timeout_gets_the_packages_and_its_settings_follow(
    user_app: Callable[..., Celery],
) -> None:
    app = user_app()
    [note] = adopt(app)
    assert "300 s set" in note
    assert app.conf.broker_transport_options["visibility_timeout"] == 300.0
    assert _app.settings_for(app).max_countdown_s == 150.0


def test_an_apps_own_visibility_timeout_is_what_countdowns_and_the_ledger_follow(
    user_app: Callable[..., Celery],
) -> None:
    app = user_app(broker_transport_options={"visibility_timeout": 3600})
    adopt(app)
    assert app.conf.broker_transport_options == {"visibility_timeout": 3600}
    settings = _app.settings_for(app)
    assert settings.max_countdown_s == 1800.0
    assert settings.ledger_ttl_s > 3600


def test_an_app_with_its_own_late_acked_tasks_keeps_kombus_visibility_timeout(
    user_app: Callable[..., Celery],
) -> None:
    app = user_app()

    @app.task(name="proj.long_report", acks_late=True)
    def long_report() -> None:
        pass

    [note] = adopt(app)
    assert "acks 'proj.long_report' late" in note
    assert "visibility_timeout" not in (app.conf.broker_transport_options or {})


# --- problems: the checks themselves, in-process. ----------------------------------------------


def test_op_celerys_tasks_annotated_not_to_ack_late_are_reported(
    user_app: Callable[..., Celery], env: dict[str, str]
) -> None:
    app = user_app(
        task_annotations={"op_celery.track": {"acks_late": False}},
        op_celery_queue=env["OP_CELERY_QUEUE"],
    )
    found = problems(app, _app.settings_for(app), [env["OP_CELERY_QUEUE"]])
    assert found == [
        (
            logging.ERROR,
            "op_celery: op_celery.track are not acked late on this worker (task_annotations?): "
            "a worker killed mid-task loses the events it holds; leave acks_late to op_celery",
        )
    ]


def test_a_route_elsewhere_for_some_operations_names_them(
    user_app: Callable[..., Celery], env: dict[str, str]
) -> None:
    queue = env["OP_CELERY_QUEUE"]
    app = user_app(task_routes={"op_celery.identify": {"queue": "profiles"}}, op_celery_queue=queue)
    [(level, line)] = problems(app, _app.settings_for(app), [queue])
    assert level == logging.WARNING
    assert "'profiles', where op_celery's identify events go" in line


def test_a_worker_of_other_queues_is_not_given_the_projects_own_queues() -> None:
    from types import SimpleNamespace

    from op_celery._startup import _consume_project_queues

    app = Celery("other-queues", set_as_current=False)
    app.conf.update(op_celery_queue="op", op_celery_project_queues=["shop"])
    try:
        assert "op_celery.track" in app.tasks  # the package's tasks are on every app
        app.amqp.queues.select_add("reports")
        _consume_project_queues(instance=SimpleNamespace(app=app))
        assert "op.shop" not in app.amqp.queues.consume_from
        app.amqp.queues.select_add("op")
        _consume_project_queues(instance=SimpleNamespace(app=app))
        assert {"reports", "op", "op.shop"} <= set(app.amqp.queues.consume_from)
    finally:
        app.close()
        _app.reset_settings()


@pytest.mark.parametrize(("pool", "cancels"), [("threads", False), ("solo", False),
                                                ("prefork", True)])  # fmt: skip
def test_a_pool_that_cannot_stop_a_task_is_not_asked_to_on_a_lost_connection(
    pool: str, cancels: bool
) -> None:
    from op_celery._startup import _keep_what_the_pool_cannot_stop

    app = Celery(f"pools-{pool}", set_as_current=False)
    app.conf.worker_cancel_long_running_tasks_on_connection_loss = True
    _keep_what_the_pool_cannot_stop(app, pool)
    assert app.conf.worker_cancel_long_running_tasks_on_connection_loss is cancels
    app.close()
