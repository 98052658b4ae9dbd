"""With no broker configured, producer and worker meet on the embedded Redis; no server outlives
the processes that use it, and a try-out's events never reach another destination."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from op_celery._embedded import default_db_path, destination
from op_celery._settings import EMBEDDED_URL, load_settings
from op_celery.testing import StandInServer

from ._support import CLIENT_ID, WorkerProcess, worker_env

#: Seconds a test waits for a server or watchdog to be gone before it fails.
GONE_TIMEOUT_S = 30.0

#: A process that uses the embedded Redis, prints its socket and server pid, then sleeps.
USER_SCRIPT = (
    "import time, redis; from op_celery._embedded import embedded_redis; "
    "s = embedded_redis(); print(s, redis.Redis(unix_socket_path=s).info()['process_id'], "
    "flush=True); time.sleep(600)"
)


def test_no_broker_setting_means_the_embedded_redis() -> None:
    settings = load_settings(env={})
    assert settings.broker_url == EMBEDDED_URL
    assert settings.redis_url == EMBEDDED_URL
    assert settings.broker_url_source == "default"


def test_the_default_database_is_one_per_destination_and_names_no_secret() -> None:
    cache = {"XDG_CACHE_HOME": "/c"}
    real = {**cache, "OPENPANEL_CLIENT_ID": CLIENT_ID, "OPENPANEL_CLIENT_SECRET": "s1"}
    assert default_db_path(cache) == Path("/c/op-celery/embedded-redis.db")
    assert default_db_path(real) != default_db_path(cache)
    assert default_db_path({**real, "OPENPANEL_CLIENT_SECRET": "other"}) == default_db_path(real)
    stand_in = {**real, "OPENPANEL_API_URL": "http://127.0.0.1:9999"}
    assert default_db_path(stand_in) not in (default_db_path(real), default_db_path(cache))
    shop = {**cache, "OPENPANEL_SHOP_CLIENT_ID": "shop-id"}
    assert default_db_path(shop) not in (default_db_path(real), default_db_path(cache))
    assert "s1" not in destination(real) and CLIENT_ID in destination(real)
    assert default_db_path({**real, "OP_CELERY_EMBEDDED_DB": "/x.db"}) == Path("/x.db")


@pytest.fixture
def try_out_env(tmp_path: Path) -> dict[str, str]:
    """An environment with no broker and no OpenPanel setting, its files under ``tmp_path``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENPANEL_", "OP_CELERY_", "CELERY_")) and k != "REDIS_URL"
    }
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), TMPDIR=str(tmp_path), PYTHONUNBUFFERED="1")
    return env


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _left_running(tmp_path: Path) -> list[str]:
    """Processes whose command line or working directory is under ``tmp_path``: the embedded
    server (it runs in its database's directory) and its watchdog."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if (str(tmp_path) in cmdline or cwd.startswith(str(tmp_path))) and _alive(int(entry.name)):
            found.append(f"{entry.name}: {cmdline}")
    return found


def _wait_until_nothing_left(tmp_path: Path) -> list[str]:
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while (left := _left_running(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def users(try_out_env: dict[str, str], tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()
    for line in _left_running(tmp_path):  # pragma: no cover - only when a test failed
        os.kill(int(line.split(":")[0]), signal.SIGKILL)


def _start_user(env: dict[str, str], users: list[subprocess.Popen[str]]) -> tuple[str, int]:
    process = subprocess.Popen(
        [sys.executable, "-c", USER_SCRIPT], env=env, stdout=subprocess.PIPE, text=True
    )
    users.append(process)
    assert process.stdout is not None
    socket, pid = process.stdout.readline().split()
    return socket, int(pid)


def test_the_server_ends_with_the_last_process_using_it_even_when_each_is_killed(
    try_out_env: dict[str, str], tmp_path: Path, users: list[subprocess.Popen[str]]
) -> None:
    socket, server = _start_user(try_out_env, users)
    joined_socket, joined_server = _start_user(try_out_env, users)
    assert (joined_socket, joined_server) == (socket, server)  # one server, two users

    users[0].send_signal(signal.SIGKILL)  # the one that started it, no cleanup possible
    users[0].wait()
    assert redis.Redis(unix_socket_path=socket).ping()  # still there for the other user

    users[1].send_signal(signal.SIGKILL)
    users[1].wait()
    assert _wait_until_nothing_left(tmp_path) == []
    assert not _alive(server)


def test_a_command_that_started_the_embedded_redis_leaves_no_server_behind(
    try_out_env: dict[str, str], tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "op_celery.cli", "status"],
        env=try_out_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "embedded Redis" in done.stdout
    assert _wait_until_nothing_left(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("tmp")] == []  # its socket's


def test_a_script_and_a_worker_with_no_broker_setting_deliver_through_the_embedded_redis(
    stand_in: StandInServer, tmp_path: Path
) -> None:
    env = worker_env(stand_in.url, "unused", "")
    for name in ("OP_CELERY_BROKER_URL", "OP_CELERY_BROKER_KEY_PREFIX"):
        env.pop(name)
    env["OP_CELERY_EMBEDDED_DB"] = str(tmp_path / "embedded.db")
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    worker = WorkerProcess(env)
    worker.start()
    try:
        script = "import op_celery; op_celery.track.delay('embedded-ok')"
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
        assert stand_in.wait_for(1, timeout=30), worker.log
    finally:
        worker.stop()
    assert stand_in.received[0].payload["name"] == "embedded-ok"
    assert _wait_until_nothing_left(tmp_path) == []  # the worker's end ended the server


def test_events_of_a_try_out_without_credentials_never_reach_a_worker_that_has_them(
    stand_in: StandInServer, try_out_env: dict[str, str], tmp_path: Path
) -> None:
    enqueue = "import sys, op_celery; op_celery.track.delay(sys.argv[1])"
    subprocess.run(
        [sys.executable, "-c", enqueue, "try-out"], env=try_out_env, check=True, timeout=60
    )
    assert _wait_until_nothing_left(tmp_path) == []  # saved and stopped: the try-out is over

    env = {**worker_env(stand_in.url, "unused", ""), **try_out_env}
    for name in ("OP_CELERY_BROKER_URL", "OP_CELERY_BROKER_KEY_PREFIX"):
        env.pop(name)
    worker = WorkerProcess(env)
    worker.start()
    try:
        subprocess.run([sys.executable, "-c", enqueue, "real"], env=env, check=True, timeout=60)
        assert stand_in.wait_for(1, timeout=30), worker.log
    finally:
        worker.stop()
    assert [r.payload["name"] for r in stand_in.received] == ["real"]
    assert _wait_until_nothing_left(tmp_path) == []
    assert (tmp_path / "cache" / "op-celery" / "embedded-redis.db").exists()  # kept, apart


def test_a_named_database_holding_events_for_another_destination_is_refused(
    try_out_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**try_out_env, "OP_CELERY_EMBEDDED_DB": str(tmp_path / "named.db")}
    enqueue = "import op_celery; op_celery.track.delay('try-out')"
    subprocess.run([sys.executable, "-c", enqueue], env=env, check=True, timeout=60)

    with_credentials = {**env, "OPENPANEL_CLIENT_ID": CLIENT_ID, "OPENPANEL_CLIENT_SECRET": "s"}
    join = "from op_celery._embedded import embedded_redis; embedded_redis()"
    refused = subprocess.run(
        [sys.executable, "-c", join], env=with_credentials, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert refused.returncode == 1
    error = refused.stderr.strip().splitlines()[-1]
    assert "ConfigurationError: the embedded Redis database" in error
    assert "holds events enqueued for another destination (no OpenPanel credentials)" in error
    assert f"would send them to client {CLIENT_ID}" in error and "delete" in error
    assert _wait_until_nothing_left(tmp_path) == []  # the refusal left no server either
