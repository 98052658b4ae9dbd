"""``run_demo``: start what is missing, enqueue, follow the delivery, stop what it started."""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import click
import redis
from celery import Celery

from .._app import configure_app, settings_for
from .._events import OPERATIONS
from .._exceptions import ConfigurationError
from .._rates import parse_rate
from .._redis import redact_url, redis_for
from .._settings import DEFAULT_API_URL, EMBEDDED_URL, load_settings
from .._tasks import OpenPanelTask
from ..dead_letters import DeadLetterStore
from ..testing import StandInServer
from ._counters import COUNTERS_ENV, Counts, busiest_span, counters_key, times_key
from ._processes import (
    POLL_INTERVAL_S,
    Workers,
    broker_client,
    delete_keys,
    embedded_pid,
    environ,
    interruptible,
    shut_down_embedded,
)
from ._result import DemoError, DemoOptions, DemoResult, plan_events

__all__ = ["INJECTED_429_RETRY_AFTER_S", "INJECTED_503S", "remote_api", "run_demo"]

#: Periods of the window in which the held rate is measured, when the run lasts that long.
BUSIEST_WINDOW_PERIODS = 5
#: Environment variable that makes a worker importing this module count events in Redis.
#: Faults injected into the stand-in: two 503s, then one 429 asking to wait 1 s.
INJECTED_503S = 2
INJECTED_429_RETRY_AFTER_S = 1


def remote_api(env: Mapping[str, str]) -> str | None:
    """The API URL the demo would send to when it is a real project's: credentials are set and
    the API (``OPENPANEL_API_URL``, default the cloud) is not on this machine; else None."""
    if not (env.get("OPENPANEL_CLIENT_ID") and env.get("OPENPANEL_CLIENT_SECRET")):
        return None
    url = env.get("OPENPANEL_API_URL") or DEFAULT_API_URL
    host = urlsplit(url).hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    return None if local else url


def _real_api(env: Mapping[str, str]) -> bool:
    client_id, secret = env.get("OPENPANEL_CLIENT_ID"), env.get("OPENPANEL_CLIENT_SECRET")
    if bool(client_id) != bool(secret):
        raise ConfigurationError(
            "set both OPENPANEL_CLIENT_ID and OPENPANEL_CLIENT_SECRET to run the demo against "
            "the real OpenPanel API, or neither to use the stand-in server"
        )
    return bool(client_id)


def run_demo(options: DemoOptions, echo: Callable[[str], None] = click.echo) -> DemoResult:
    """Start what is missing, enqueue ``options.events`` events, follow their delivery, stop
    everything it started (also on Ctrl-C or SIGTERM) and return what it saw."""
    started = time.monotonic()
    deadline = started + options.timeout_s
    rate = None
    if options.rate_limit:
        parsed = parse_rate(options.rate_limit, setting="--rate-limit")
        rate = (parsed.limit, parsed.period_s)
    base = load_settings()
    real_api = _real_api(os.environ)
    plan = plan_events(options.events)
    result = DemoResult(rate_limit=options.rate_limit)
    result.rate_limit_parsed = rate
    run = uuid.uuid4().hex[:8]

    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="op-celery-demo-"))
        stack.callback(shutil.rmtree, workdir, True)
        overrides = {
            "OP_CELERY_QUEUE": f"openpanel-demo-{run}",
            "OP_CELERY_BROKER_KEY_PREFIX": f"{base.broker_key_prefix}op-celery-demo-{run}:",
            "OP_CELERY_KEY_PREFIX": f"{base.key_prefix}:demo-{run}",
            "OP_CELERY_ON_PUBLISH_FAILURE": "raise",
            "OP_CELERY_SPOOL_DIR": str(workdir / "spool"),
        }
        embedded = base.broker_url == EMBEDDED_URL
        db_path = workdir / "embedded-redis.db"
        if embedded:
            overrides["OP_CELERY_EMBEDDED_DB"] = str(db_path)
        if rate is not None:
            overrides["OPENPANEL_RATE_LIMIT"] = str(options.rate_limit)

        stand_in: StandInServer | None = None
        if real_api:
            api = base.project("default")
            where = "the REAL OpenPanel API" if remote_api(os.environ) else "the OpenPanel API"
            echo(
                f"OPENPANEL_CLIENT_ID is set: the demo sends {options.events} events to {where} "
                f"at {api.api_url} (client {api.client_id}); they will appear in that project. "
                "Unset OPENPANEL_CLIENT_ID and OPENPANEL_CLIENT_SECRET to use the stand-in "
                "server instead."
            )
        else:
            client_id, secret = str(uuid.uuid4()), "sec_demo_" + uuid.uuid4().hex
            # Profiles visible at once: the demo measures delivery, and waiting out the
            # server's 10 s profile flush would only add idle seconds to its last increments.
            stand_in = StandInServer({client_id: secret}, profile_flush_s=0)
            stack.enter_context(stand_in)
            stand_in.fail_next(INJECTED_503S, 503)
            stand_in.fail_next(1, 429, headers={"retry-after": str(INJECTED_429_RETRY_AFTER_S)})
            overrides.update(
                OPENPANEL_CLIENT_ID=client_id,
                OPENPANEL_CLIENT_SECRET=secret,
                OPENPANEL_API_URL=stand_in.url,
            )
        stack.enter_context(environ(overrides))
        shield = stack.enter_context(interruptible())
        # This process says which broker it uses below; the package's warning would repeat it.
        quiet = logging.NullHandler()
        logging.getLogger("op_celery").addHandler(quiet)
        stack.callback(logging.getLogger("op_celery").removeHandler, quiet)

        settings = load_settings()
        app = Celery("op-celery-demo", set_as_current=False)
        broker = broker_client(settings)
        if embedded:
            stack.callback(shut_down_embedded, db_path)
        else:
            if broker is not None:
                stack.callback(delete_keys, broker, settings.broker_key_prefix)
            if settings.redis_url is not None:
                stack.callback(delete_keys, redis_for(settings), settings.key_prefix + ":")
        stack.callback(app.close)
        configure_app(app, settings)  # starts the embedded Redis when no broker is configured
        settings = settings_for(app)
        store = DeadLetterStore(settings)
        counters = redis_for(settings)
        key = counters_key(settings)
        if broker is not None:
            try:
                broker.ping()
            except redis.RedisError as exc:
                raise DemoError(
                    f"the broker at {redact_url(settings.broker_url)} does not answer "
                    f"({type(exc).__name__}): start it, or unset OP_CELERY_BROKER_URL (and "
                    "CELERY_BROKER_URL, REDIS_URL) to let the demo use the embedded Redis"
                ) from None

        rate_text = f"rate limit {options.rate_limit}" if options.rate_limit else "no rate limit"
        echo(
            f"op-celery demo: {options.events} events, {options.workers} workers × "
            f"{options.concurrency} threads, {rate_text}"
        )
        if embedded:
            echo(
                f"  broker   embedded Redis, pid {embedded_pid(db_path)} (no broker configured; "
                f"a private database in {workdir}, removed at the end)"
            )
        else:
            echo(
                f"  broker   {redact_url(base.broker_url)} ({base.broker_url_source}), private "
                f"queue {settings.queue} and key prefix {settings.broker_key_prefix}"
            )
        if stand_in is not None:
            echo(
                f"  API      stand-in OpenPanel server at {stand_in.url}, faults injected: "
                f"{INJECTED_503S} × 503, 1 × 429 with retry-after {INJECTED_429_RETRY_AFTER_S}"
            )

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env[COUNTERS_ENV] = "1"
        workers = Workers(options.workers, options.concurrency, env, workdir)
        stack.callback(workers.stop)
        stack.callback(shield)  # runs first on the way out: cleanup is not interrupted
        try:
            workers.start(deadline)
        finally:
            if workers.pids:
                echo(f"  workers  pids {', '.join(map(str, workers.pids))}")

        tasks = {name: cast(OpenPanelTask, app.tasks[f"op_celery.{name}"]) for name in OPERATIONS}
        enqueue_started = time.monotonic()
        for operation, kwargs in plan:
            tasks[operation].apply_async((), kwargs)
        by_operation = Counter(operation for operation, _ in plan)
        result.enqueued = len(plan)
        result.by_operation = dict(by_operation)
        result.deliverable = len(plan) - by_operation["alias"]
        echo(f"Enqueued {len(plan)} events in {time.monotonic() - enqueue_started:.1f} s")

        counts = Counts()
        with click.progressbar(length=result.enqueued, label="Delivering") as bar:
            shown = 0
            while True:
                counts = Counts.read(counters, key)
                done = min(result.enqueued, counts.delivered + counts.dead)
                bar.update(done - shown)
                shown = done
                if done >= result.enqueued:
                    break
                if time.monotonic() > deadline:
                    result.timed_out = True
                    break
                workers.check_alive()
                time.sleep(POLL_INTERVAL_S)
        result.elapsed_s = time.monotonic() - enqueue_started
        result.delivered = counts.delivered
        result.retried_by_reason = counts.retried_by_reason
        result.throttled_429 = counts.throttled_429
        result.limiter_waits = counts.limiter_waits
        result.dead_letters_by_type = dict(Counter(x.error_type for x in store.list()))
        times = [float(x) for x in cast("list[bytes]", counters.lrange(times_key(settings), 0, -1))]
        if len(times) >= 2 and max(times) > min(times):
            result.rate_per_s = (len(times) - 1) / (max(times) - min(times))
        if rate is not None and times:
            # Over several periods when the run is that long: the send times are the workers'
            # (taken after the fact), and one request of timing noise is 2 % of 50 in 1 s.
            periods = (
                BUSIEST_WINDOW_PERIODS
                if max(times) - min(times) >= BUSIEST_WINDOW_PERIODS * rate[1]
                else 1
            )
            result.busiest_window_s = periods * rate[1]
            result.busiest_count = busiest_span(times, result.busiest_window_s)
        started_here = ["the workers"]
        started_here += ["the stand-in"] if stand_in is not None else []
        started_here += ["the embedded Redis"] if embedded else []
        echo(f"Stopping {', '.join(started_here[:-1])} and {started_here[-1]}"
             if len(started_here) > 1 else f"Stopping {started_here[0]}")  # fmt: skip
    return result
