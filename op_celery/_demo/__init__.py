"""``op-celery demo``: the whole path on one machine, starting only what is missing.

- **Broker.** With no broker setting, the embedded Redis (``op_celery._embedded``) on a private
  database in a temporary directory, shut down at the end (an embedded server outlives its
  clients, so it is stopped explicitly). With a broker setting, that broker, under a private key
  prefix and queue whose keys are deleted at the end.
- **Workers.** ``celery -A op_celery.worker worker`` subprocesses (threads pool) with the same
  environment, so they find the same broker; stopped by PID.
- **API.** The stand-in server (``op_celery.testing.StandInServer``) in this process, with a few
  injected faults (two 503s, one 429 with ``retry-after: 1``) so retries show; unless
  ``OPENPANEL_CLIENT_ID`` and ``OPENPANEL_CLIENT_SECRET`` are set: then the real API gets the
  events, and nothing is injected.

Events of every type are enqueued through the tasks' ``apply_async``; what happens to them is
counted by the workers themselves: they import this package (``--include op_celery._demo``) with
:data:`COUNTERS_ENV` set, which connects :mod:`op_celery.signals` receivers that count
deliveries, retries (by reason), 429s, limiter waits and dead letters in one Redis hash. Those
counts work against the real API too, where the stand-in's records are not available.

Limits: the demo cannot clean up after a SIGKILL of its own process (workers and the embedded
server would be left running); Ctrl-C and SIGTERM are handled. The achieved rate is measured
from the first to the last accepted request, and the rate held over the busiest few periods,
by the times the workers' signals report (one machine, one clock).

One module per part: ``_result`` (options, the plan of events, the summary), ``_counters`` (the
workers' side), ``_processes`` (what the demo starts and stops) and ``_run`` (the run itself).
"""

from __future__ import annotations

import os

from ._counters import COUNTERS_ENV, install_counters
from ._result import (
    DEFAULT_CONCURRENCY,
    DEFAULT_EVENTS,
    DEFAULT_TIMEOUT_S,
    DEFAULT_WORKERS,
    MIN_EVENTS,
    DemoError,
    DemoOptions,
    DemoResult,
    plan_events,
)
from ._run import remote_api, run_demo

__all__ = [
    "COUNTERS_ENV",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_EVENTS",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_WORKERS",
    "MIN_EVENTS",
    "DemoError",
    "DemoOptions",
    "DemoResult",
    "install_counters",
    "plan_events",
    "remote_api",
    "run_demo",
]

if os.environ.get(COUNTERS_ENV):  # in the demo's workers, which import this package
    install_counters()
