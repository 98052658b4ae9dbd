"""What the enqueue, delivery and memory benchmarks share: a stand-in OpenPanel server in its own
process, ``celery worker`` subprocesses, a private namespace on the shared Redis, percentiles.

Every process a benchmark starts is stopped by its PID (workers by their process group, since
a prefork worker has children), and every Redis key it wrote is deleted, also on Ctrl-C.
"""

from __future__ import annotations

import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import redis

from op_celery.testing import StandInControl

#: The stand-in's accepted client (a lower-case UUID, as OpenPanel requires) and its secret.
CLIENT_ID = "0b7e4c1a-5d2f-4a3b-9c8d-7e6f5a4b3c2d"
CLIENT_SECRET = "sec_bench_0f1e2d"
#: Default broker; ``--redis-url`` overrides it.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: Longest wait for a subprocess to say it is ready, in seconds.
STARTUP_TIMEOUT_S = 30.0
#: Longest wait for a process to exit after SIGTERM before SIGKILL, in seconds.
STOP_TIMEOUT_S = 15.0

BENCHMARKS_DIR = Path(__file__).resolve().parent


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (0..1) by linear interpolation; ``values`` need not be sorted."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def describe_machine() -> str:
    """One line: date, CPU count, load, Python and the versions that matter here."""
    from importlib.metadata import version

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs "
        f"(load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}), Python {platform.python_version()}, "
        f"celery {version('celery')}, kombu {version('kombu')}, redis-py {version('redis')}"
    )


# --- The shared Redis. ------------------------------------------------------------------------


@dataclass(frozen=True)
class Namespace:
    """A private key prefix and queue-name stem on the shared Redis."""

    redis_url: str
    prefix: str  # broker keys: OP_CELERY_BROKER_KEY_PREFIX / global_keyprefix
    stem: str  # queue names start with it

    def queue(self, name: str) -> str:
        return f"{self.stem}-{name}"

    def delete(self, *queues: str) -> None:
        client = redis.Redis.from_url(self.redis_url)
        try:
            keys = [f"{self.prefix}{queue}" for queue in queues]
            if keys:
                client.delete(*keys)
        finally:
            client.close()


@contextmanager
def redis_namespace(redis_url: str) -> Iterator[Namespace]:
    """A fresh namespace; every key under its prefix is deleted afterwards."""
    token = uuid.uuid4().hex[:8]
    namespace = Namespace(redis_url, f"opc-bench-{token}:", f"opc-bench-{token}")
    client = redis.Redis.from_url(redis_url)
    client.ping()
    try:
        yield namespace
    finally:
        keys = list(client.scan_iter(match=f"{namespace.prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
        client.close()


def broker_env(namespace: Namespace, queue: str) -> dict[str, str]:
    """Settings of op-celery (and of the naive app) for one queue of the namespace."""
    return {
        "OP_CELERY_BROKER_URL": namespace.redis_url,
        "OP_CELERY_BROKER_KEY_PREFIX": namespace.prefix,
        "OP_CELERY_KEY_PREFIX": namespace.prefix + "op-celery",
        "OP_CELERY_QUEUE": queue,
    }


# --- Subprocesses. -----------------------------------------------------------------------------


def _stop(process: subprocess.Popen[bytes] | subprocess.Popen[str], group: bool) -> None:
    if process.poll() is not None:
        return
    try:
        if group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.terminate()
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
        process.wait(STOP_TIMEOUT_S)
    except ProcessLookupError:
        pass


@dataclass(frozen=True)
class StandIn:
    url: str
    pid: int
    control: StandInControl


@contextmanager
def stand_in_server() -> Iterator[StandIn]:
    """``python -m op_celery.testing`` in its own process, with no rate limit."""
    command = [sys.executable, "-m", "op_celery.testing", "--port", "0"]
    command += ["--client", f"{CLIENT_ID}:{CLIENT_SECRET}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # printed once it listens
        if not line.startswith("OPENPANEL_API_URL="):
            raise RuntimeError(f"the stand-in did not start: {line!r}")
        url = line.strip().split("=", 1)[1]
        yield StandIn(url, process.pid, StandInControl(url))
    finally:
        _stop(process, group=False)


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This environment without op-celery/OpenPanel/Celery settings, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OPENPANEL_", "OP_CELERY_", "CELERY_"))
    }
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    path = [str(BENCHMARKS_DIR), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    return env


class Worker:
    """One ``celery -A <app> worker`` subprocess in its own process group, stopped by PID."""

    def __init__(
        self,
        app: str,
        queue: str,
        pool: str,
        concurrency: int,
        env: Mapping[str, str],
        loglevel: str = "WARNING",
        cwd: str | None = None,
    ) -> None:
        self.command = [
            sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queue,
            "--pool", pool, "--concurrency", str(concurrency), "--loglevel", loglevel,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--hostname", f"bench-{uuid.uuid4().hex[:8]}@%h",
        ]  # fmt: skip
        self.env = dict(env)
        #: The directory it runs in: ``python -m`` imports from there before PYTHONPATH.
        self.cwd = cwd
        handle, name = tempfile.mkstemp(prefix="op-celery-bench-worker-", suffix=".log")
        os.close(handle)
        self.log_path = Path(name)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.cwd,
            )  # fmt: skip
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"worker exited:\n{self.log_path.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process, group=True)
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (Linux ``/proc``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_for_received(control: StandInControl, count: int, timeout_s: float) -> int:
    """Poll the stand-in until ``count`` requests were accepted; returns the count reached."""
    deadline = time.monotonic() + timeout_s
    received = 0
    while time.monotonic() < deadline:
        received = control.stats()["received"]
        if received >= count:
            break
        time.sleep(0.1)
    return received
