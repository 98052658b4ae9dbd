"""The demo's processes and their cleanup: the workers, the embedded Redis, the broker keys,
the environment, and SIGTERM handled as Ctrl-C is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType

import redis

from .. import _embedded
from .._settings import EMBEDDED_URL, Settings, _redis_url_of
from ._result import DemoError

__all__ = [
    "POLL_INTERVAL_S",
    "Workers",
    "broker_client",
    "delete_keys",
    "embedded_pid",
    "environ",
    "interruptible",
    "shut_down_embedded",
]

#: Seconds a stopped worker gets to finish before its process group is killed.
WORKER_STOP_TIMEOUT_S = 10.0
#: Seconds between two looks at the counters while events are delivered.
POLL_INTERVAL_S = 0.1
#: Lines of a worker's log shown when it fails.
LOG_TAIL_LINES = 25
#: Periods of the window in which the held rate is measured, when the run lasts that long.


class Workers:
    """``celery -A op_celery.worker worker`` processes, each the leader of its own session."""

    def __init__(self, count: int, concurrency: int, env: dict[str, str], log_dir: Path) -> None:
        self._count = count
        self._concurrency = concurrency
        self._env = env
        self._log_dir = log_dir
        self.processes: list[tuple[subprocess.Popen[bytes], Path]] = []

    @property
    def pids(self) -> list[int]:
        return [process.pid for process, _ in self.processes]

    def start(self, deadline: float) -> None:
        run = uuid.uuid4().hex[:6]
        for i in range(1, self._count + 1):
            log_path = self._log_dir / f"worker-{i}.log"
            command = [
                sys.executable, "-m", "celery", "-A", "op_celery.worker", "worker",
                "--pool", "threads", "--concurrency", str(self._concurrency),
                "--loglevel", "INFO", "--without-gossip", "--without-mingle",
                "--without-heartbeat", "--include", "op_celery._demo",
                "--hostname", f"op-celery-demo-{i}-{run}@%h",
            ]  # fmt: skip
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    command, env=self._env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
            self.processes.append((process, log_path))
        waiting = list(self.processes)
        while waiting:
            self.check_alive()
            waiting = [(p, path) for p, path in waiting if " ready." not in _read(path)]
            if waiting and time.monotonic() > deadline:
                raise DemoError(f"a worker was not ready in time; its log:\n{_tail(waiting[0][1])}")
            time.sleep(POLL_INTERVAL_S)

    def check_alive(self) -> None:
        for process, log in self.processes:
            if process.poll() is not None:
                raise DemoError(
                    f"worker {process.pid} exited with status {process.returncode}; its log:\n"
                    f"{_tail(log)}"
                )

    def stop(self) -> None:
        """SIGTERM each worker, wait, then SIGKILL the process group of any still running."""
        for process, _ in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT_S
        for process, _ in self.processes:
            with suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
            # The worker leads its own session: its group is exactly what it started.
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(path: Path) -> str:
    return "\n".join(_read(path).splitlines()[-LOG_TAIL_LINES:])


def embedded_pid(db_path: Path) -> int | None:
    return _embedded.server_pid(db_path)


def shut_down_embedded(db_path: Path) -> None:
    """Stop the demo's embedded Redis now, unsaved (its database is the demo's own), and its
    watchdog; the demo's directory, removed afterwards, holds the rest of its files."""
    _embedded.shut_down(db_path, save=False)


def delete_keys(client: redis.Redis, prefix: str) -> None:
    escaped = "".join(f"\\{ch}" if ch in "*?[]\\" else ch for ch in prefix)
    try:
        keys = list(client.scan_iter(match=escaped + "*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
    except redis.RedisError:
        pass  # best effort: the broker went away; the keys are namespaced to this run


def broker_client(settings: Settings) -> redis.Redis | None:
    url = _redis_url_of(settings.broker_url)
    if url is None or url == EMBEDDED_URL:
        return None
    return redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0)


@contextmanager
def environ(overrides: Mapping[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def interruptible() -> Iterator[Callable[[], None]]:
    """SIGTERM raises KeyboardInterrupt as Ctrl-C does, so cleanup runs; the yielded function
    makes both signals wait while cleaning up. Handlers are restored at the end."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, on_term)

    def shield() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    try:
        yield shield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
