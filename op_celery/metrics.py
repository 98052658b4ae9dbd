"""Prometheus metrics of the workers, counted from the package's signals (``op_celery.signals``).

    pip install 'op-celery[prometheus]'

In the module your worker runs (``celery -A yourproject worker``)::

    import op_celery.metrics
    op_celery.metrics.install(start_http_server_port=9808)

and Prometheus scrapes ``http://<worker>:9808/metrics``. The package's own worker does this when
``OP_CELERY_METRICS_PORT`` is set (:func:`install_from_env`). :func:`install` connects the
receivers once per process (calling it again changes nothing) and registers the metrics in
``registry`` (default: prometheus-client's global ``REGISTRY``); without a port nothing listens,
and you expose the registry as you like.

The metrics:

``op_celery_events_delivered_total{project, operation}``
    Events the API accepted.
``op_celery_events_bot_total{project, operation}``
    Events the server dropped as a bot's (202 ``{"bot": ...}``); finished, no dead letter.
``op_celery_events_duplicate_total{project, operation}``
    Events the server answered ``200 Duplicate event``: it had stored a copy moments ago.
``op_celery_events_filtered_total{project, operation}``
    Events the project's own filters refused (401 "... blocked by project filter").
``op_celery_events_retried_total{reason}``
    Retries scheduled; ``reason`` is the error's class name (``ServerError``, ``RateLimited``...).
``op_celery_events_throttled_total`` and ``op_celery_throttle_wait_seconds_total``
    Events the shared rate limit put back on the queue, and the seconds they were told to wait.
``op_celery_events_dead_lettered_total{error_type}``
    Events given up and stored as dead letters.
``op_celery_send_latency_seconds`` (histogram)
    The HTTP call to the API, for delivered events.
``op_celery_rate_limit_per_second{project, source}`` (gauge)
    The pace every worker's acquire uses for the project right now: the lower of the configured
    ``OPENPANEL_RATE_LIMIT`` (``source="configured"``) and the rate learned from the server
    (``source="headers"``: its x-ratelimit headers; ``"429s"``: backing off from 429s). Read
    from the limiter's Redis at each scrape, for the projects this process has delivered for;
    a project the pool sends at full speed (nothing configured or learned) has no sample.
``op_celery_rate_limit_paused_seconds{project}`` (gauge)
    Seconds until the project's pause after a 429 ends (0 when not paused); read likewise.
``op_celery_event_age_seconds`` (histogram)
    At delivery, the time since the event's timestamp: since ``.delay()`` unless the caller gave
    ``timestamp=``. Only ``track`` carries a timestamp, so only ``track`` events are observed; a
    worker clock behind the web server's counts as 0.

Where the HTTP server runs: the counts live in the process that runs the tasks, so the server
starts there, when the worker starts (Celery's ``worker_init``, or ``worker_process_init`` in a
pool child):

- ``--pool threads`` (what the package's worker runs), ``solo``, ``gevent``, ``eventlet``: in the
  worker process. Several workers on one host need a port each.
- ``--pool prefork --concurrency 1``: in the pool's child. A replaced child starts counting from
  zero again, which Prometheus' ``rate()`` takes as a counter reset.
- ``--pool prefork`` with several children: no server, and a warning in the worker's log. Each
  child counts on its own and one port would show one of them. Use ``--pool threads`` (delivery
  waits on the network, not the CPU), or set Prometheus' multiprocess mode up yourself
  (``PROMETHEUS_MULTIPROC_DIR`` in the worker's environment, a ``MultiProcessCollector`` served
  from the main process) and call ``install()`` without a port.

Call :func:`install` before the worker starts, as above: at import of the worker module. In a
process that is not a Celery worker no server starts; call ``prometheus_client.start_http_server``
yourself. The server listens on all interfaces, as Prometheus exporters do.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from celery import signals as celery_signals

from . import signals
from ._delivery import rate_statuses
from ._exceptions import ConfigurationError

try:
    import prometheus_client
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
    from prometheus_client.core import GaugeMetricFamily
except ImportError as exc:
    raise ImportError(
        "op_celery.metrics needs prometheus-client: pip install 'op-celery[prometheus]'"
    ) from exc

__all__ = [
    "EVENTS_BOT",
    "EVENTS_DEAD_LETTERED",
    "EVENTS_DELIVERED",
    "EVENTS_DUPLICATE",
    "EVENTS_FILTERED",
    "EVENTS_RETRIED",
    "EVENTS_THROTTLED",
    "EVENT_AGE",
    "EVENT_AGE_BUCKETS_S",
    "METRICS",
    "METRICS_PORT_ENV",
    "RATE_LIMIT",
    "SEND_LATENCY",
    "SEND_LATENCY_BUCKETS_S",
    "THROTTLE_WAIT",
    "install",
    "install_from_env",
]

log = logging.getLogger("op_celery")

#: The environment variable that makes the package's worker serve the metrics on that port.
METRICS_PORT_ENV = "OP_CELERY_METRICS_PORT"
#: Histogram buckets of the HTTP call, in seconds; the default read timeout is 10 s.
SEND_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Histogram buckets of an event's age at delivery, in seconds: from a prompt delivery through
#: retries and rate limiting (OpenPanel's sessions last 15 minutes) to a broker outage.
EVENT_AGE_BUCKETS_S = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0, 21600.0,
)  # fmt: skip
#: Set by the worker's main process for its prefork child that serves the metrics; an
#: environment variable so that a child started as a fresh interpreter (spawn) sees it too.
_CHILD_SERVES_ENV = "_OP_CELERY_METRICS_CHILD_SERVES"
_PREFORK_POOL = "celery.concurrency.prefork:TaskPool"
#: Its names in ``--pool`` (``celery.concurrency.ALIASES``).
_PREFORK_ALIASES = ("prefork", "processes")

# Made without a registry; install() registers them where it is told.
EVENTS_DELIVERED = Counter(
    "op_celery_events_delivered",
    "Events the OpenPanel API accepted.",
    ["project", "operation"],
    registry=None,
)
EVENTS_BOT = Counter(
    "op_celery_events_bot",
    "Events the OpenPanel server dropped as a bot's (202).",
    ["project", "operation"],
    registry=None,
)
EVENTS_DUPLICATE = Counter(
    "op_celery_events_duplicate",
    "Events the OpenPanel server answered as duplicates of a copy it had stored (200).",
    ["project", "operation"],
    registry=None,
)
EVENTS_FILTERED = Counter(
    "op_celery_events_filtered",
    "Events the OpenPanel project's own filters refused (401 blocked by project filter).",
    ["project", "operation"],
    registry=None,
)
EVENTS_RETRIED = Counter(
    "op_celery_events_retried",
    "Retries scheduled, by the class name of the error that caused them.",
    ["reason"],
    registry=None,
)
EVENTS_THROTTLED = Counter(
    "op_celery_events_throttled",
    "Events the shared rate limit put back on the queue to wait.",
    registry=None,
)
THROTTLE_WAIT = Counter(
    "op_celery_throttle_wait_seconds",
    "Seconds the shared rate limit told put-back events to wait.",
    registry=None,
)
EVENTS_DEAD_LETTERED = Counter(
    "op_celery_events_dead_lettered",
    "Events given up and stored as dead letters, by the class name of the error.",
    ["error_type"],
    registry=None,
)
SEND_LATENCY = Histogram(
    "op_celery_send_latency_seconds",
    "Duration of the HTTP call that delivered an event.",
    buckets=SEND_LATENCY_BUCKETS_S,
    registry=None,
)
EVENT_AGE = Histogram(
    "op_celery_event_age_seconds",
    "Time from an event's timestamp (its .delay(), by default) to its delivery (track only).",
    buckets=EVENT_AGE_BUCKETS_S,
    registry=None,
)


class _RateLimitCollector:
    """The pace in use and the pause, per project, read from the limiter's Redis at a scrape."""

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families())

    def collect(self) -> list[GaugeMetricFamily]:
        rate, paused = self._families()
        seen: set[str] = set()
        for project, status in rate_statuses():
            if project in seen:  # two settings objects of one project: one series, the first
                continue
            seen.add(project)
            if status["in_use_per_second"] is not None and status["in_use_source"] is not None:
                rate.add_metric([project, status["in_use_source"]], status["in_use_per_second"])
            paused.add_metric([project], status["paused_s"])
        return [rate, paused]

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "op_celery_rate_limit_per_second",
                "The pace of the workers' shared rate limit: configured, or learned from the "
                "server's headers or its 429s, whichever is lower.",
                labels=["project", "source"],
            ),
            GaugeMetricFamily(
                "op_celery_rate_limit_paused_seconds",
                "Seconds until the project's pause after a 429 ends.",
                labels=["project"],
            ),
        )


#: The rate-limit gauges (a collector: they are read from Redis when scraped).
RATE_LIMIT = _RateLimitCollector()
#: Every metric of this module, in the order they are registered.
METRICS = (
    EVENTS_DELIVERED,
    EVENTS_BOT,
    EVENTS_DUPLICATE,
    EVENTS_FILTERED,
    EVENTS_RETRIED,
    EVENTS_THROTTLED,
    THROTTLE_WAIT,
    EVENTS_DEAD_LETTERED,
    SEND_LATENCY,
    EVENT_AGE,
    RATE_LIMIT,
)

_lock = threading.Lock()
_registries: list[CollectorRegistry] = []
_receivers_connected = False
#: The port and registry install() was asked to serve, and the process serving them.
_serve: tuple[int, CollectorRegistry] | None = None
_served_by_pid: int | None = None


def _on_delivered(
    operation: str = "",
    project: str = "",
    latency_s: float | None = None,
    age_s: float | None = None,
    **_: Any,
) -> None:
    EVENTS_DELIVERED.labels(project=project, operation=operation).inc()
    if latency_s is not None:
        SEND_LATENCY.observe(latency_s)
    if age_s is not None:
        EVENT_AGE.observe(max(0.0, age_s))


#: The counter of each reason of ``signals.event_dropped``.
_DROPPED = {"bot": EVENTS_BOT, "duplicate": EVENTS_DUPLICATE, "filtered": EVENTS_FILTERED}


def _on_dropped(operation: str = "", project: str = "", reason: str = "", **_: Any) -> None:
    counter = _DROPPED.get(reason)
    if counter is not None:
        counter.labels(project=project, operation=operation).inc()


def _on_retried(reason: str = "", **_: Any) -> None:
    EVENTS_RETRIED.labels(reason=reason).inc()


def _on_throttled(wait_s: float | None = None, **_: Any) -> None:
    EVENTS_THROTTLED.inc()
    if wait_s is not None and wait_s > 0:
        THROTTLE_WAIT.inc(wait_s)


def _on_dead_lettered(error_type: str = "", **_: Any) -> None:
    EVENTS_DEAD_LETTERED.labels(error_type=error_type).inc()


def install(
    registry: CollectorRegistry | None = None, *, start_http_server_port: int | None = None
) -> None:
    """Count the workers' events in Prometheus metrics; see the module's docstring.

    Registers the metrics in ``registry`` (default: ``prometheus_client.REGISTRY``; once per
    registry) and connects the receivers to ``op_celery.signals`` (once per process). With
    ``start_http_server_port``, the worker serves that registry on the port from the process
    that runs the tasks, once the worker starts. A second call with another port or registry to
    serve raises :class:`~op_celery.ConfigurationError`.
    """
    global _receivers_connected, _serve
    registry = REGISTRY if registry is None else registry
    with _lock:
        if start_http_server_port is not None:
            _check_port(start_http_server_port, "start_http_server_port")
            wanted = (start_http_server_port, registry)
            if _serve is not None and (_serve[0] != wanted[0] or _serve[1] is not registry):
                raise ConfigurationError(
                    f"op_celery.metrics already serves on port {_serve[0]}; install() cannot "
                    f"serve a second time (port {start_http_server_port})"
                )
        if not any(known is registry for known in _registries):
            for metric in METRICS:
                registry.register(metric)
            _registries.append(registry)
        if not _receivers_connected:
            receivers = (
                (signals.event_delivered, _on_delivered, "delivered"),
                (signals.event_dropped, _on_dropped, "dropped"),
                (signals.event_retried, _on_retried, "retried"),
                (signals.event_throttled, _on_throttled, "throttled"),
                (signals.event_dead_lettered, _on_dead_lettered, "dead_lettered"),
            )
            for signal, receiver, name in receivers:
                signal.connect(receiver, weak=False, dispatch_uid=f"op_celery.metrics.{name}")
            _receivers_connected = True
        if start_http_server_port is not None and _serve is None:
            _serve = (start_http_server_port, registry)
            celery_signals.worker_init.connect(
                _on_worker_init, weak=False, dispatch_uid="op_celery.metrics.worker_init"
            )
            celery_signals.worker_process_init.connect(
                _on_worker_process_init,
                weak=False,
                dispatch_uid="op_celery.metrics.worker_process_init",
            )
            celery_signals.worker_ready.connect(
                _on_worker_ready, weak=False, dispatch_uid="op_celery.metrics.worker_ready"
            )


def install_from_env(
    env: Mapping[str, str] | None = None, registry: CollectorRegistry | None = None
) -> bool:
    """:func:`install` serving on ``OP_CELERY_METRICS_PORT`` if it is set (the package's worker
    calls this); returns whether it was set. Raises :class:`~op_celery.ConfigurationError` for
    a value that is not a port."""
    value = (os.environ if env is None else env).get(METRICS_PORT_ENV, "").strip()
    if not value:
        return False
    try:
        port = int(value)
    except ValueError:
        raise ConfigurationError(
            f"{METRICS_PORT_ENV} must be a port number, got {value!r}"
        ) from None
    _check_port(port, METRICS_PORT_ENV)
    install(registry, start_http_server_port=port)
    return True


def _check_port(port: int, name: str) -> None:
    if not 0 < port < 65536:
        raise ConfigurationError(f"{name} must be a port number from 1 to 65535, got {port!r}")


def _is_prefork(pool_cls: object) -> bool:
    # By name: importing the pool module here would precede a gevent/eventlet monkey-patch.
    if isinstance(pool_cls, str):
        return pool_cls in _PREFORK_ALIASES or pool_cls == _PREFORK_POOL
    return isinstance(pool_cls, type) and any(
        f"{cls.__module__}:{cls.__qualname__}" == _PREFORK_POOL for cls in pool_cls.__mro__
    )


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """In the worker's main process, before the pool starts: serve here, or leave it to the one
    prefork child, or (several children) serve nowhere and say why."""
    os.environ.pop(_CHILD_SERVES_ENV, None)
    pool_cls = getattr(sender, "pool_cls", None)
    if not _is_prefork(pool_cls):
        _start_server()
        return
    concurrency = getattr(sender, "concurrency", None)
    if concurrency == 1:
        os.environ[_CHILD_SERVES_ENV] = "1"
        return
    port = _serve[0] if _serve is not None else None
    log.warning(
        "op_celery.metrics: no metrics server on port %s: the prefork pool runs %s children, "
        "each counting its own events, and one port would show only one of them. Run the "
        "worker with --pool threads (or --concurrency 1), or use Prometheus' multiprocess mode "
        "(PROMETHEUS_MULTIPROC_DIR) and serve it yourself",
        port,
        concurrency,
    )


def _on_worker_process_init(**_: Any) -> None:
    """In a prefork child (and, on Celery 5.7, in a solo worker, already served)."""
    if os.environ.get(_CHILD_SERVES_ENV) == "1" and _start_server():
        _log_serving()


def _on_worker_ready(**_: Any) -> None:
    """In the worker's main process, whose logging was not set up yet at ``worker_init``."""
    if _served_by_pid == os.getpid():
        _log_serving()


def _log_serving() -> None:
    if _serve is not None:
        log.info(
            "op_celery.metrics: serving the metrics on port %d (pid %d)", _serve[0], os.getpid()
        )


def _start_server() -> bool:
    """Serve the metrics from this process, once; whether it started now."""
    global _served_by_pid
    with _lock:
        if _serve is None or _served_by_pid == os.getpid():
            return False
        port, registry = _serve
        try:
            prometheus_client.start_http_server(port, registry=registry)
        except OSError as exc:
            # Metrics are not worth stopping the deliveries for.
            log.error("op_celery.metrics: cannot serve the metrics on port %d: %s", port, exc)
            return False
        _served_by_pid = os.getpid()
        return True
