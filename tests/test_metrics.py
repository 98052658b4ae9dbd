"""Prometheus metrics (``op_celery.metrics``): the package's signals counted in a registry, the
server started in the process that runs the tasks, and a real worker scraped over HTTP."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import prometheus_client
import pytest
from celery import Celery
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.concurrency.solo import TaskPool as SoloPool
from celery.concurrency.thread import TaskPool as ThreadPool
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import op_celery
from op_celery import ConfigurationError, metrics, signals
from op_celery.testing import StandInServer

from ._support import WORKER_START_TIMEOUT_S, WorkerProcess, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def registry() -> CollectorRegistry:
    """A registry of its own holding the metrics; counts are read as differences, since the
    metric objects (and so their values) are the module's."""
    registry = CollectorRegistry()
    metrics.install(registry)
    return registry


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def delivered(**overrides: Any) -> None:
    """Send ``event_delivered`` as the task does."""
    kwargs: dict[str, Any] = dict(
        operation="track", project="default", event_id=uuid.uuid4().hex, status=200,
        latency_s=0.01, age_s=1.5,
    )  # fmt: skip
    kwargs.update(overrides)
    signals.event_delivered.send(sender=None, **kwargs)


def test_a_delivery_counts_by_project_and_operation_and_observes_latency_and_age(
    registry: CollectorRegistry,
) -> None:
    by_track = {"project": "default", "operation": "track"}
    before = value(registry, "op_celery_events_delivered_total", **by_track)
    latency_count = value(registry, "op_celery_send_latency_seconds_count")
    latency_sum = value(registry, "op_celery_send_latency_seconds_sum")
    age_le_2_5 = value(registry, "op_celery_event_age_seconds_bucket", le="2.5")
    age_le_1 = value(registry, "op_celery_event_age_seconds_bucket", le="1.0")

    signals.event_delivered.send(
        sender=None, operation="track", project="default", event_id="x", status=200,
        latency_s=0.01, age_s=1.5,
    )  # fmt: skip

    assert value(registry, "op_celery_events_delivered_total", **by_track) == before + 1
    assert value(registry, "op_celery_send_latency_seconds_count") == latency_count + 1
    assert value(registry, "op_celery_send_latency_seconds_sum") == pytest.approx(
        latency_sum + 0.01
    )
    assert value(registry, "op_celery_event_age_seconds_bucket", le="2.5") == age_le_2_5 + 1
    assert value(registry, "op_celery_event_age_seconds_bucket", le="1.0") == age_le_1


def test_projects_and_operations_are_counted_apart(registry: CollectorRegistry) -> None:
    shop = {"project": "shop", "operation": "identify"}
    default = {"project": "default", "operation": "identify"}
    before_shop = value(registry, "op_celery_events_delivered_total", **shop)
    before_default = value(registry, "op_celery_events_delivered_total", **default)
    delivered(project="shop", operation="identify", age_s=None)
    delivered(project="shop", operation="identify", age_s=None)
    assert value(registry, "op_celery_events_delivered_total", **shop) == before_shop + 2
    assert value(registry, "op_celery_events_delivered_total", **default) == before_default


def test_an_event_without_a_timestamp_is_not_observed_in_the_age(
    registry: CollectorRegistry,
) -> None:
    ages = value(registry, "op_celery_event_age_seconds_count")
    latencies = value(registry, "op_celery_send_latency_seconds_count")
    delivered(operation="identify", age_s=None)
    assert value(registry, "op_celery_event_age_seconds_count") == ages
    assert value(registry, "op_celery_send_latency_seconds_count") == latencies + 1


def test_a_worker_clock_behind_the_callers_counts_as_age_zero(
    registry: CollectorRegistry,
) -> None:
    smallest = value(registry, "op_celery_event_age_seconds_bucket", le="0.1")
    total = value(registry, "op_celery_event_age_seconds_sum")
    delivered(age_s=-3.0)
    assert value(registry, "op_celery_event_age_seconds_bucket", le="0.1") == smallest + 1
    assert value(registry, "op_celery_event_age_seconds_sum") == total


def test_retries_count_by_reason(registry: CollectorRegistry) -> None:
    server = value(registry, "op_celery_events_retried_total", reason="ServerError")
    network = value(registry, "op_celery_events_retried_total", reason="NetworkError")
    for reason in ("ServerError", "ServerError", "NetworkError"):
        signals.event_retried.send(
            sender=None, operation="track", project="default", event_id="x", reason=reason,
            countdown_s=0.5,
        )  # fmt: skip
    assert value(registry, "op_celery_events_retried_total", reason="ServerError") == server + 2
    assert value(registry, "op_celery_events_retried_total", reason="NetworkError") == network + 1


def test_throttling_counts_events_and_the_seconds_they_wait(registry: CollectorRegistry) -> None:
    events = value(registry, "op_celery_events_throttled_total")
    waited = value(registry, "op_celery_throttle_wait_seconds_total")
    for wait_s in (0.25, 1.5):
        signals.event_throttled.send(
            sender=None, operation="track", project="default", event_id="x", wait_s=wait_s
        )
    assert value(registry, "op_celery_events_throttled_total") == events + 2
    assert value(registry, "op_celery_throttle_wait_seconds_total") == pytest.approx(waited + 1.75)


def test_dead_letters_count_by_error_type(registry: CollectorRegistry) -> None:
    before = value(registry, "op_celery_events_dead_lettered_total", error_type="InvalidPayload")
    signals.event_dead_lettered.send(
        sender=None, operation="track", project="default", event_id="x",
        error_type="InvalidPayload", status=400,
    )  # fmt: skip
    after = value(registry, "op_celery_events_dead_lettered_total", error_type="InvalidPayload")
    assert after == before + 1


@pytest.mark.parametrize("reason", ["bot", "duplicate", "filtered"])
def test_each_answer_the_server_did_not_store_has_a_counter_of_its_own(
    registry: CollectorRegistry, reason: str
) -> None:
    labels = {"project": "shop", "operation": "identify"}
    names = [f"op_celery_events_{x}_total" for x in ("bot", "duplicate", "filtered")]
    before = {name: value(registry, name, **labels) for name in names}
    delivered_before = value(registry, "op_celery_events_delivered_total", **labels)
    signals.event_dropped.send(
        sender=None, operation="identify", project="shop", event_id=uuid.uuid4().hex,
        reason=reason, status=202, message="Googlebot (Search bot)",
    )  # fmt: skip
    for name in names:
        expected = before[name] + (1 if name == f"op_celery_events_{reason}_total" else 0)
        assert value(registry, name, **labels) == expected
    assert value(registry, "op_celery_events_delivered_total", **labels) == delivered_before


def test_installing_again_counts_each_event_once(registry: CollectorRegistry) -> None:
    metrics.install(registry)
    metrics.install(registry)
    metrics.install()
    before = value(registry, "op_celery_events_delivered_total", project="p", operation="track")
    delivered(project="p")
    after = value(registry, "op_celery_events_delivered_total", project="p", operation="track")
    assert after == before + 1


def test_one_install_fills_every_registry_it_was_given(registry: CollectorRegistry) -> None:
    other = CollectorRegistry()
    metrics.install(other)
    delivered(project="both")
    labels = {"project": "both", "operation": "track"}
    assert value(other, "op_celery_events_delivered_total", **labels) == value(
        registry, "op_celery_events_delivered_total", **labels
    )
    assert value(other, "op_celery_events_delivered_total", **labels) >= 1


def test_the_metric_names_are_the_documented_ones() -> None:
    registry = CollectorRegistry()
    metrics.install(registry)
    names = {family.name for family in registry.collect()}
    assert names == {
        "op_celery_events_delivered",
        "op_celery_events_bot",
        "op_celery_events_duplicate",
        "op_celery_events_filtered",
        "op_celery_events_retried",
        "op_celery_events_throttled",
        "op_celery_throttle_wait_seconds",
        "op_celery_events_dead_lettered",
        "op_celery_send_latency_seconds",
        "op_celery_event_age_seconds",
        "op_celery_rate_limit_per_second",
        "op_celery_rate_limit_paused_seconds",
    }
    for name in names:
        assert f"``{name}" in (metrics.__doc__ or "")


# Serving: which process starts the server. The worker's signals are called directly with a
# stand-in of the worker, and the server start is recorded instead of listening.


@pytest.fixture
def serving(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """Record (port, pid) for every server start; restore the module's serving state."""
    starts: list[tuple[int, int]] = []
    monkeypatch.setattr(
        prometheus_client,
        "start_http_server",
        lambda port, **_: starts.append((port, os.getpid())),
    )
    saved = (metrics._serve, metrics._served_by_pid)
    metrics._serve, metrics._served_by_pid = None, None
    yield starts
    metrics._serve, metrics._served_by_pid = saved
    os.environ.pop(metrics._CHILD_SERVES_ENV, None)


def worker_stand_in(pool_cls: object, concurrency: object) -> SimpleNamespace:
    return SimpleNamespace(pool_cls=pool_cls, concurrency=concurrency)


@pytest.mark.parametrize("pool", [ThreadPool, "threads", SoloPool, "solo", "gevent"])
def test_a_pool_that_runs_tasks_in_the_worker_serves_from_the_worker(
    serving: list[tuple[int, int]], pool: object
) -> None:
    metrics.install(start_http_server_port=19808)
    metrics._on_worker_init(sender=worker_stand_in(pool, 8))
    metrics._on_worker_process_init(sender="celery@host")  # the solo pool sends it too
    assert serving == [(19808, os.getpid())]


@pytest.mark.parametrize("pool", [PreforkPool, "prefork", "processes"])
def test_a_prefork_pool_of_one_child_serves_from_the_child(
    serving: list[tuple[int, int]], pool: object
) -> None:
    metrics.install(start_http_server_port=19808)
    metrics._on_worker_init(sender=worker_stand_in(pool, 1))
    assert serving == []
    metrics._on_worker_process_init(sender="celery@host")
    assert serving == [(19808, os.getpid())]


def test_a_prefork_pool_of_several_children_serves_nowhere_and_says_why(
    serving: list[tuple[int, int]], caplog: pytest.LogCaptureFixture
) -> None:
    metrics.install(start_http_server_port=19808)
    with caplog.at_level(logging.WARNING, logger="op_celery"):
        metrics._on_worker_init(sender=worker_stand_in(PreforkPool, 4))
        metrics._on_worker_process_init(sender="celery@host")
    assert serving == []
    assert "PROMETHEUS_MULTIPROC_DIR" in caplog.text
    assert "--pool threads" in caplog.text


def test_without_a_port_no_server_starts(serving: list[tuple[int, int]]) -> None:
    metrics.install()
    metrics._on_worker_init(sender=worker_stand_in(ThreadPool, 8))
    assert serving == []


def test_serving_on_a_second_port_is_refused(serving: list[tuple[int, int]]) -> None:
    metrics.install(start_http_server_port=19808)
    metrics.install(start_http_server_port=19808)
    with pytest.raises(ConfigurationError, match="already serves on port 19808"):
        metrics.install(start_http_server_port=19809)
    with pytest.raises(ConfigurationError, match="port number"):
        metrics.install(start_http_server_port=0)


def test_a_busy_port_is_logged_and_does_not_stop_the_worker(
    serving: list[tuple[int, int]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def busy(port: int, **_: object) -> None:
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(prometheus_client, "start_http_server", busy)
    metrics.install(start_http_server_port=19808)
    with caplog.at_level(logging.ERROR, logger="op_celery"):
        metrics._on_worker_init(sender=worker_stand_in(ThreadPool, 8))
    assert "cannot serve the metrics on port 19808" in caplog.text


def test_the_environment_switch_installs_on_its_port(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, int | None]] = []
    monkeypatch.setattr(
        metrics, "install", lambda registry=None, *, start_http_server_port=None: calls.append(
            (registry, start_http_server_port)
        )
    )  # fmt: skip
    assert metrics.install_from_env({}) is False
    assert metrics.install_from_env({"OP_CELERY_METRICS_PORT": " "}) is False
    assert calls == []
    assert metrics.install_from_env({"OP_CELERY_METRICS_PORT": "9808"}) is True
    assert calls == [(None, 9808)]
    for wrong in ("http", "70000", "-1"):
        with pytest.raises(ConfigurationError, match="OP_CELERY_METRICS_PORT"):
            metrics.install_from_env({"OP_CELERY_METRICS_PORT": wrong})


# Imports: the extra is optional.


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != metrics.METRICS_PORT_ENV}
    env["OP_CELERY_BROKER_URL"] = "redis://127.0.0.1:6379/0"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=60,
    )  # fmt: skip


def test_without_prometheus_client_the_import_says_which_extra_to_install() -> None:
    result = run_python(
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "try:\n"
        "    import op_celery.metrics\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'op-celery[prometheus]'" in result.stdout


def test_importing_the_package_or_its_worker_does_not_import_prometheus() -> None:
    result = run_python(
        "import sys\n"
        "import op_celery, op_celery.worker\n"
        "print(sorted(m for m in sys.modules if m.startswith(('prometheus', 'op_celery.metrics'))))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# End to end: a real worker whose module installs the metrics, scraped over HTTP.


class MetricsWorker(WorkerProcess):
    """``celery -A tests.metrics_worker_app worker``: the package's app plus ``install()``."""

    APP = "tests.metrics_worker_app"

    def start(self) -> None:
        command = [
            sys.executable, "-m", "celery", "-A", self.APP, "worker",
            "--pool", self.pool, "--concurrency", self.concurrency, "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--hostname", f"test-{uuid.uuid4().hex[:8]}@%h",
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                start_new_session=True,
            )  # fmt: skip
        if not wait_until(
            lambda: (
                " ready." in self.log or self.process is None or self.process.poll() is not None
            ),
            timeout=WORKER_START_TIMEOUT_S,
        ):
            self.stop()
            raise RuntimeError(f"worker not ready in {WORKER_START_TIMEOUT_S} s:\n{self.log}")
        if self.process.poll() is not None:
            raise RuntimeError(f"worker exited at start:\n{self.log}")


@pytest.fixture
def start_metrics_worker(
    env: dict[str, str],
) -> Iterator[Callable[..., tuple[MetricsWorker, int]]]:
    started: list[MetricsWorker] = []

    def start(pool: str, concurrency: int) -> tuple[MetricsWorker, int]:
        port = free_port()
        worker = MetricsWorker(
            {**env, "TEST_METRICS_PORT": str(port), "CONCURRENCY": str(concurrency)}, pool=pool
        )
        started.append(worker)
        worker.start()
        return worker, port

    yield start
    for worker in started:
        worker.stop()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


DELIVERED_TRACK = (
    "op_celery_events_delivered_total",
    (("operation", "track"), ("project", "default")),
)


def delivered_count(port: int) -> float:
    try:
        return scrape(port).get(DELIVERED_TRACK, 0.0)
    except (urllib.error.URLError, ConnectionError):
        return -1.0


@pytest.mark.parametrize(
    ("pool", "concurrency"), [("threads", 4), ("prefork", 1)], ids=["threads", "prefork-1"]
)
def test_a_worker_serves_its_counts_over_http(
    producer: Celery,
    stand_in: StandInServer,
    start_metrics_worker: Callable[..., tuple[MetricsWorker, int]],
    pool: str,
    concurrency: int,
) -> None:
    worker, port = start_metrics_worker(pool, concurrency)
    # Nothing delivered yet; the server is up once the worker is (prefork: once its child is).
    assert wait_until(lambda: delivered_count(port) == 0.0, timeout=10), worker.log
    for n in range(3):
        op_celery.track.delay(f"metrics_{n}")
    assert stand_in.wait_for(3, timeout=20)
    assert wait_until(lambda: delivered_count(port) == 3.0, timeout=10), worker.log
    samples = scrape(port)
    assert samples[("op_celery_send_latency_seconds_count", ())] == 3
    assert samples[("op_celery_event_age_seconds_count", ())] == 3
    assert 0 < samples[("op_celery_event_age_seconds_sum", ())] < 60
    # Served from the process that ran the tasks: the worker itself, or its prefork child.
    serving_line = next(line for line in worker.log.splitlines() if "serving the metrics" in line)
    child_serves = f"(pid {worker.pid})" not in serving_line
    assert child_serves == (pool == "prefork"), serving_line


def test_a_prefork_worker_of_several_children_serves_nothing_and_logs_why(
    producer: Celery,
    start_metrics_worker: Callable[..., tuple[MetricsWorker, int]],
) -> None:
    worker, port = start_metrics_worker("prefork", 2)
    assert "no metrics server on port" in worker.log
    time.sleep(0.5)  # the children have started; none of them may listen
    assert delivered_count(port) == -1.0


def test_the_pace_in_use_and_the_pause_are_gauges_read_from_the_limiter(
    registry: CollectorRegistry, stand_in: StandInServer, redis_url: str, key_prefix: str
) -> None:
    from op_celery._delivery import Attempt, delivery_for
    from op_celery._events import build_event, normalize_call
    from op_celery._settings import load_settings

    from ._support import CLIENT_ID, CLIENT_SECRET

    stand_in.set_rate_limit(100, 10)  # x-ratelimit-* on every answer
    settings = load_settings(
        env={
            "OPENPANEL_CLIENT_ID": CLIENT_ID,
            "OPENPANEL_CLIENT_SECRET": CLIENT_SECRET,
            "OPENPANEL_API_URL": stand_in.url,
            "OP_CELERY_REDIS_URL": redis_url,
            "OP_CELERY_KEY_PREFIX": key_prefix + "op-celery",
        }
    )
    from op_celery import _delivery

    _delivery._deliveries.clear()  # this process's other tests' pipelines are not this one's
    delivery = delivery_for(settings)
    delivery.deliver(build_event("track", normalize_call("track", ("g",), {})), Attempt())
    pace = value(registry, "op_celery_rate_limit_per_second", project="default", source="headers")
    assert pace == pytest.approx(9.9, rel=1e-3)  # 100 per 10 s, less the 1 % headroom
    delivery.limiter.pause(CLIENT_ID, 5)
    assert 4 < value(registry, "op_celery_rate_limit_paused_seconds", project="default") <= 5
