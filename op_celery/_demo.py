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
counted by the workers themselves: they import this module (``--include op_celery._demo``) with
:data:`COUNTERS_ENV` set, which connects :mod:`op_celery.signals` receivers that count
deliveries, retries (by reason), 429s, limiter waits and dead letters in one Redis hash. Those
counts work against the real API too, where the stand-in's records are not available.

Limits: the demo cannot clean up after a SIGKILL of its own process (workers and the embedded
server would be left running); Ctrl-C and SIGTERM are handled. The achieved rate is measured
from the first to the last accepted request, and the rate held over the busiest few periods,
by the times the workers' signals report (one machine, one clock).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, cast

import click
import redis
from celery import Celery

from . import _embedded, signals
from ._app import configure_app, settings_for
from ._events import OPERATIONS
from ._exceptions import ConfigurationError, OpenPanelError
from ._process import pid_alive
from ._redis import redact_url, redis_for
from ._settings import EMBEDDED_URL, Settings, _redis_url_of, load_settings
from ._tasks import OpenPanelTask
from .dead_letters import DeadLetterStore
from .testing import StandInServer
from .testing.__main__ import parse_rate_limit

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
    "parse_rate",
    "plan_events",
    "run_demo",
]

#: Events enqueued by default.
DEFAULT_EVENTS = 300
#: Fewest events: enough for one of every type and a few tracks.
MIN_EVENTS = 10
#: Worker processes started by default.
DEFAULT_WORKERS = 2
#: Threads per worker process by default.
DEFAULT_CONCURRENCY = 4
#: Seconds the whole demo may take (start, delivery) before it gives up.
DEFAULT_TIMEOUT_S = 120.0
#: Seconds a stopped worker gets to finish before its process group is killed.
WORKER_STOP_TIMEOUT_S = 10.0
#: Seconds the embedded Redis gets to exit after SHUTDOWN before it is killed.
EMBEDDED_STOP_TIMEOUT_S = 5.0
#: Seconds between two looks at the counters while events are delivered.
POLL_INTERVAL_S = 0.1
#: Lines of a worker's log shown when it fails.
LOG_TAIL_LINES = 25
#: Periods of the window in which the held rate is measured, when the run lasts that long.
BUSIEST_WINDOW_PERIODS = 5
#: Environment variable that makes a worker importing this module count events in Redis.
COUNTERS_ENV = "OP_CELERY_DEMO_COUNTERS"
#: Faults injected into the stand-in: two 503s, then one 429 asking to wait 1 s.
INJECTED_503S = 2
INJECTED_429_RETRY_AFTER_S = 1

_TRACK_NAMES = ("page_view", "signup", "add_to_cart", "checkout_completed", "search")


class DemoError(Exception):
    """The demo could not run (a worker died, the broker does not answer, ...)."""


@dataclass(frozen=True)
class DemoOptions:
    events: int = DEFAULT_EVENTS
    workers: int = DEFAULT_WORKERS
    concurrency: int = DEFAULT_CONCURRENCY
    #: A rate such as ``"50/s"``: the workers' limit (``OPENPANEL_RATE_LIMIT``), and the
    #: stand-in's server-side limit, so a limiter that does not hold it shows up as 429s.
    rate_limit: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass
class DemoResult:
    """What the demo saw. ``deliverable`` excludes alias events: OpenPanel refuses them."""

    enqueued: int = 0
    by_operation: dict[str, int] = field(default_factory=dict)
    deliverable: int = 0
    delivered: int = 0
    retried_by_reason: dict[str, int] = field(default_factory=dict)
    throttled_429: int = 0
    limiter_waits: int = 0
    dead_letters_by_type: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    rate_per_s: float | None = None
    rate_limit: str | None = None
    #: The limit as (requests, period in seconds).
    rate_limit_parsed: tuple[int, float] | None = None
    #: The rate actually held: the most requests sent in any span of ``busiest_window_s``.
    busiest_count: int | None = None
    busiest_window_s: float | None = None
    timed_out: bool = False

    @property
    def retried(self) -> int:
        return sum(self.retried_by_reason.values())

    @property
    def dead_letters(self) -> int:
        return sum(self.dead_letters_by_type.values())

    @property
    def all_delivered(self) -> bool:
        return not self.timed_out and self.delivered >= self.deliverable

    def summary_lines(self) -> list[str]:
        def counts(values: Mapping[str, int]) -> str:
            ordered = sorted(values.items(), key=lambda item: (-item[1], item[0]))
            return ", ".join(f"{key} {value}" for key, value in ordered)

        aliases = self.by_operation.get("alias", 0)
        lines = [
            "Summary",
            f"  enqueued      {self.enqueued:>6}  ({counts(self.by_operation)})",
            f"  delivered     {self.delivered:>6}  of {self.deliverable} deliverable"
            + (
                f" ({aliases} alias: OpenPanel answers 'Alias is not supported')" if aliases else ""
            ),
            f"  retried       {self.retried:>6}"
            + (f"  ({counts(self.retried_by_reason)})" if self.retried else ""),
            f"  throttled     {self.throttled_429:>6}  429 answers seen",
            f"  dead letters  {self.dead_letters:>6}"
            + (f"  ({counts(self.dead_letters_by_type)})" if self.dead_letters else ""),
        ]
        if self.rate_limit is not None:
            lines.append(
                f"  limiter waits {self.limiter_waits:>6}  (events held back by the limit)"
            )
        if self.rate_per_s is None:
            lines.append("  rate               -  (fewer than two deliveries)")
        else:
            rate = (
                f"  rate          {self.rate_per_s:>6.1f}  events/s, first to last accepted request"
            )
            if self.rate_limit_parsed is not None:
                limit, period_s = self.rate_limit_parsed
                rate += (
                    f" ({self.rate_per_s * period_s / limit:.0%} of the {self.rate_limit} limit)"
                )
            lines.append(rate)
        if self.rate_limit_parsed and self.busiest_count and self.busiest_window_s:
            limit, period_s = self.rate_limit_parsed
            window_s = self.busiest_window_s
            held = self.busiest_count / window_s
            lines.append(
                f"  rate held     {held:>6.1f}  events/s in the busiest {window_s:g} s "
                f"({held * period_s / limit:.0%} of the {self.rate_limit} limit)"
            )
        lines.append(f"  took          {self.elapsed_s:>6.1f}  s")
        if self.all_delivered:
            lines.append(f"All {self.deliverable} deliverable events were delivered.")
        else:
            why = "timed out" if self.timed_out else "some were given up"
            lines.append(
                f"Not all delivered ({why}): {self.delivered} of {self.deliverable}; see "
                "`op-celery dead-letters list` in a run of your own"
            )
        return lines


def parse_rate(text: str) -> tuple[int, float]:
    """``"50/s"``, ``"100/10s"`` -> ``(limit, period_s)``; :class:`ConfigurationError` if not.

    Uses the limiter's parser (``op_celery._rates``) when it is installed, else the
    stand-in's, which wants a count before the unit (``50/1s``): ``50/s`` is rewritten so.
    """
    try:
        from importlib import import_module

        rates = import_module("op_celery._rates")
    except ImportError:
        rates = None
    if rates is not None:
        rate = rates.parse_rate(text, setting="--rate-limit")
        return int(rate.limit), float(rate.period_s)
    import argparse
    import re

    try:
        return parse_rate_limit(re.sub(r"/\s*(?=[a-z])", "/1", text.strip()))
    except argparse.ArgumentTypeError as exc:
        raise ConfigurationError(f"--rate-limit: {exc}") from None


def plan_events(count: int) -> list[tuple[str, dict[str, Any]]]:
    """``count`` events of every type: identifies first (so the profiles exist), mostly
    tracks, and the increments, decrements, group assignment and one alias at the end."""
    if count < MIN_EVENTS:
        raise ValueError(f"the demo needs at least {MIN_EVENTS} events, got {count}")
    profiles = [f"demo-user-{i}" for i in range(1, max(2, count // 30) + 1)]
    head: list[tuple[str, dict[str, Any]]] = [
        (
            "identify",
            {"profile_id": p, "first_name": "Demo", "email": f"{p}@example.com"},
        )
        for p in profiles
    ]
    head.append(
        ("group", {"id": "demo-team", "type": "team", "name": "Demo team", "properties": {}})
    )
    tail: list[tuple[str, dict[str, Any]]] = [
        ("assign_group", {"group_ids": ["demo-team"], "profile_id": profiles[0]})
    ]
    tail += [
        ("increment", {"profile_id": p, "property": "visits", "value": 1})
        for p in profiles[: max(1, count // 60)]
    ]
    tail += [
        ("decrement", {"profile_id": p, "property": "credits", "value": 2})
        for p in profiles[: max(1, count // 120)]
    ]
    tail.append(("alias", {"profile_id": profiles[0], "alias": "demo-alias-1"}))
    tracks: list[tuple[str, dict[str, Any]]] = [
        (
            "track",
            {
                "name": _TRACK_NAMES[i % len(_TRACK_NAMES)],
                "properties": {"demo": True, "n": i},
                "profile_id": profiles[i % len(profiles)],
            },
        )
        for i in range(count - len(head) - len(tail))
    ]
    return head + tracks + tail


# -- the workers' side: counters -------------------------------------------------------------


def counters_key(settings: Settings) -> str:
    return f"{settings.key_prefix}:demo:counters"


def _times_key(settings: Settings) -> str:
    return f"{settings.key_prefix}:demo:delivered-at"


def _bump(sender: Any, *fields: str, sent_at: float | None = None) -> None:
    try:
        settings = settings_for(sender.app)
        key = counters_key(settings)
        pipe = redis_for(settings).pipeline(transaction=False)
        for name in fields:
            pipe.hincrby(key, name, 1)
        if sent_at is not None:
            pipe.rpush(_times_key(settings), repr(sent_at))
        pipe.execute()
    except (OpenPanelError, redis.RedisError):
        pass  # counting is the demo's business; delivery goes on


def _on_delivered(sender: Any, latency_s: float | None = None, **_: Any) -> None:
    # When the request left: the limiter admitted it just before, so this is what it spaced.
    _bump(sender, "delivered", sent_at=time.time() - (latency_s or 0.0))


def _on_retried(sender: Any, reason: str = "", **_: Any) -> None:
    fields = [f"retried:{reason or 'unknown'}"]
    if reason == "RateLimited":
        fields.append("throttled_429")
    _bump(sender, *fields)


def _on_throttled(sender: Any, **_: Any) -> None:
    _bump(sender, "limiter_waits")


def _on_dead_lettered(sender: Any, **_: Any) -> None:
    _bump(sender, "dead")


def install_counters() -> None:
    """Count what happens to events in Redis (the demo's workers do it at import)."""
    for sig, receiver in (
        (signals.event_delivered, _on_delivered),
        (signals.event_retried, _on_retried),
        (signals.event_throttled, _on_throttled),
        (signals.event_dead_lettered, _on_dead_lettered),
    ):
        sig.connect(receiver, weak=False, dispatch_uid=f"op-celery-demo:{receiver.__name__}")


@dataclass(frozen=True)
class _Counts:
    delivered: int = 0
    dead: int = 0
    retried_by_reason: dict[str, int] = field(default_factory=dict)
    throttled_429: int = 0
    limiter_waits: int = 0

    @classmethod
    def read(cls, client: redis.Redis, key: str) -> _Counts:
        raw = cast("dict[bytes, bytes]", client.hgetall(key))
        values = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            delivered=int(values.get("delivered", 0)),
            dead=int(values.get("dead", 0)),
            retried_by_reason={
                k.split(":", 1)[1]: int(v) for k, v in values.items() if k.startswith("retried:")
            },
            throttled_429=int(values.get("throttled_429", 0)),
            limiter_waits=int(values.get("limiter_waits", 0)),
        )


def busiest_span(times: list[float], span_s: float) -> int:
    """The most of ``times`` that fall in any half-open span ``[t, t + span_s)``."""
    ordered = sorted(times)
    best = start = 0
    for end, moment in enumerate(ordered):
        while ordered[start] <= moment - span_s:
            start += 1
        best = max(best, end - start + 1)
    return best


# -- the demo's side: processes and cleanup --------------------------------------------------


class _Workers:
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
                "--without-heartbeat", "--include", __name__,
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


def _embedded_pid(db_path: Path) -> int | None:
    server = _embedded._servers.get(str(db_path))
    pid = getattr(server, "pid", 0) if server is not None else 0
    return int(pid) or None


def _shut_down_embedded(db_path: Path) -> None:
    """Stop the demo's embedded Redis (it would outlive its clients) and remove its files."""
    server = _embedded._servers.pop(str(db_path), None)
    if server is None:
        return
    pid = int(server.pid or 0)
    socket_dir = os.path.dirname(str(server.socket_file))
    with suppress(redis.RedisError):  # it went down as asked, or was down already
        server.shutdown(nosave=True)
    deadline = time.monotonic() + EMBEDDED_STOP_TIMEOUT_S
    while pid and pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid and pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(socket_dir, ignore_errors=True)


def _delete_keys(client: redis.Redis, prefix: str) -> None:
    escaped = "".join(f"\\{ch}" if ch in "*?[]\\" else ch for ch in prefix)
    try:
        keys = list(client.scan_iter(match=escaped + "*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
    except redis.RedisError:
        pass  # best effort: the broker went away; the keys are namespaced to this run


def _broker_client(settings: Settings) -> redis.Redis | None:
    url = _redis_url_of(settings.broker_url)
    if url is None or url == EMBEDDED_URL:
        return None
    return redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0)


@contextmanager
def _environ(overrides: Mapping[str, str]) -> Iterator[None]:
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
def _interruptible() -> Iterator[Callable[[], None]]:
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
    rate = parse_rate(options.rate_limit) if options.rate_limit else None
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
            echo(
                f"OPENPANEL_CLIENT_ID is set: the demo sends {options.events} events to the REAL "
                f"OpenPanel API at {api.api_url} (client {api.client_id}); they will appear in "
                "that project. Unset OPENPANEL_CLIENT_ID and OPENPANEL_CLIENT_SECRET to use the "
                "stand-in server instead."
            )
        else:
            client_id, secret = str(uuid.uuid4()), "sec_demo_" + uuid.uuid4().hex
            stand_in = StandInServer({client_id: secret})
            stack.enter_context(stand_in)
            stand_in.fail_next(INJECTED_503S, 503)
            stand_in.fail_next(1, 429, headers={"retry-after": str(INJECTED_429_RETRY_AFTER_S)})
            overrides.update(
                OPENPANEL_CLIENT_ID=client_id,
                OPENPANEL_CLIENT_SECRET=secret,
                OPENPANEL_API_URL=stand_in.url,
            )
        stack.enter_context(_environ(overrides))
        shield = stack.enter_context(_interruptible())
        # This process says which broker it uses below; the package's warning would repeat it.
        quiet = logging.NullHandler()
        logging.getLogger("op_celery").addHandler(quiet)
        stack.callback(logging.getLogger("op_celery").removeHandler, quiet)

        settings = load_settings()
        app = Celery("op-celery-demo", set_as_current=False)
        broker = _broker_client(settings)
        if embedded:
            stack.callback(_shut_down_embedded, db_path)
        else:
            if broker is not None:
                stack.callback(_delete_keys, broker, settings.broker_key_prefix)
            if settings.redis_url is not None:
                stack.callback(_delete_keys, redis_for(settings), settings.key_prefix + ":")
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
                f"  broker   embedded Redis, pid {_embedded_pid(db_path)} (no broker configured; "
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
        workers = _Workers(options.workers, options.concurrency, env, workdir)
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

        counts = _Counts()
        with click.progressbar(length=result.enqueued, label="Delivering") as bar:
            shown = 0
            while True:
                counts = _Counts.read(counters, key)
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
        times = [
            float(x) for x in cast("list[bytes]", counters.lrange(_times_key(settings), 0, -1))
        ]
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


if os.environ.get(COUNTERS_ENV):  # in the demo's workers, which import this module
    install_counters()
