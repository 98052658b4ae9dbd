"""Does a pool of workers hold a server's rate limit while workers join and leave, also when
nobody told it the limit? (issues 3 and 10)

The question: against a server that allows ``L`` requests per window of ``W`` seconds per client
id, how much of ``L / W`` does the pool deliver, with how many 429s, dead letters and duplicates,
(a) with no limit configured (op-celery learns it: from the x-ratelimit headers, or from the
429s), (b) with the exact limit configured (``OPENPANEL_RATE_LIMIT``), (c) with Celery's own
per-worker ``rate_limit``? Targets of issue 10, with no limit configured: with headers >= 95 %
of ``L / W`` and < 1 % 429s; with ``retry-after`` only or nothing >= 90 % and < 3 %; in every
mode no event dead-lettered and each delivered once.

Method: the stand-in OpenPanel server runs in its own process (``python -m op_celery.testing``)
with a fixed window of ``L`` per ``W`` per client id, in one of its header modes (``all``:
x-ratelimit-* on every answer and retry-after on 429s, as ``@fastify/rate-limit``;
``retry-after``: only that, on 429s; ``none``: a bare 429). A scenario is ``L/Ws:MODE``, e.g.
``50/1s:all``; ``50/1s:all>25`` also changes the limit to 25 per window at T/2. Each
configuration gets a fresh queue holding its backlog, then two ``celery worker`` processes
(``--pool``, ``--concurrency``, the same flags for every configuration) start; counted from the
first request the stand-in sees, a third worker starts at T/3 and the first worker gets SIGTERM
at 2T/3, where T = ``--seconds``, the time the backlog takes at exactly ``L / W``.
Configurations:

- ``op-celery:none``: ``celery -A op_celery.worker worker`` with no ``OPENPANEL_RATE_LIMIT``.
- ``op-celery:exact`` (or ``op-celery:RATE``): the server's limit (or RATE) configured, shared by
  every worker through Redis. 429s are waited out; the run ends when every event of the backlog
  was accepted (or at ``--timeout``).
- ``celery:exact`` (or ``celery:RATE``): ``celery -A naive_app worker`` (``naive_app.py``): one
  ``requests.post`` per event, no retry (a 429 is an event lost), Celery's ``rate_limit`` per
  worker, with kombu's timer bug worked around (see ``naive_app.py``; ``celery-unfixed:RATE``
  runs without the workaround). Their backlog is made large enough to keep every worker busy
  until T, when the run ends; what is left on the queue is dropped.

Measured from the stand-in's own record of every request (status and arrival time): accepted
requests per second in steady state (from ``max(2 s, W)`` after the first request to 2 s before
the end of the run, or to the end of the last whole window when ``W`` is longer), as a share of
``L / W`` (in a change scenario, each half against its own limit); the same per phase (2
workers, 3 workers, 2 workers again); 429s; dead letters (the configuration's Redis namespace);
whether every event arrived exactly once; and convergence: the seconds from the first request
(and from the limit change) until the first span of ``max(3 s, W)`` with no 429 and at least 90
% of the limit. The accepted requests per second are drawn as a text plot (one character per
second, ``█`` = the limit; ``!`` under a second with 429s). The machine's cores are shared by
the workers, the stand-in, Redis, this script and whatever else runs there. Every process
started is stopped by its PID and every Redis key written (under a private prefix) is deleted,
also on errors and Ctrl-C.

    python benchmarks/rate_fidelity.py [--seconds 30] [--pool threads] [--concurrency 8]
        [--scenarios 50/1s:all,100/10s:all,...] [--configs op-celery:none,op-celery:exact,...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import redis
from _harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    DEFAULT_REDIS_URL,
    Namespace,
    StandIn,
    Worker,
    broker_env,
    clean_env,
    describe_machine,
    redis_namespace,
    stand_in_server,
)
from celery.utils.time import rate as celery_rate

from op_celery.testing import Received

#: Seconds left out of the steady-state rate at the start (at least one window) and at the end.
EDGE_S = 2.0
#: Seconds left out at the start of a phase: a joining worker starts, a leaving one drains.
SETTLE_S = 2.0
#: Longest a configuration runs, counted from its first request, as a multiple of T.
TIMEOUT_FACTOR = 3.0
#: Longest wait for the first request after the first two workers were started, in seconds.
FIRST_REQUEST_TIMEOUT_S = 30.0
#: Seconds between two looks at the stand-in and the workers.
POLL_S = 0.1
#: Extra share of events a naive configuration is given beyond what its workers can take by T.
NAIVE_BACKLOG_SLACK = 1.2
#: Share of the limit a span must reach to count as converged.
CONVERGED_SHARE = 0.9
EVENT_NAME = "rate_fidelity"
#: Issue 10's targets with no limit configured: (share of L/W at least, 429 share below).
TARGETS = {"all": (0.95, 0.01), "retry-after": (0.90, 0.03), "none": (0.90, 0.03)}
MODES = tuple(TARGETS)
KINDS = ("op-celery", "celery", "celery-unfixed")
DEFAULT_SCENARIOS = (
    "50/1s:all", "100/10s:all", "50/1s:retry-after", "50/1s:none", "100/10s:retry-after",
    "100/10s:none", "50/1s:all>25",
)  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    """The stand-in's limit: ``limit`` per ``window_s``, header ``mode``; ``then`` at T/2."""

    limit: int
    window_s: float
    mode: str
    then: int | None = None

    @classmethod
    def parse(cls, text: str) -> Scenario:
        rate, sep, mode = text.partition(":")
        mode, _, then = mode.partition(">")
        limit, _, window = rate.partition("/")
        try:
            scenario = cls(
                int(limit), float(window.rstrip("s") or 1), mode, int(then) if then else None
            )
        except ValueError:
            scenario = None
        if not sep or scenario is None or mode not in MODES:
            raise argparse.ArgumentTypeError(
                f"expected L/Ws:MODE[>L2], MODE one of {MODES}: {text!r}"
            )
        return scenario

    @property
    def per_s(self) -> float:
        return self.limit / self.window_s

    def rate(self, limit: int | None = None) -> str:
        """The limit in the package's notation, e.g. ``100/10s``."""
        window = f"{self.window_s:g}s" if self.window_s != 1 else "s"
        return f"{limit or self.limit}/{window}"

    def __str__(self) -> str:
        then = f", then {self.then} from T/2" if self.then else ""
        return f"{self.limit}/{self.window_s:g} s, headers {self.mode}{then}"


@dataclass(frozen=True)
class Config:
    """One configuration: ``kind:rate``, rate ``none`` (op-celery only), ``exact`` or a rate."""

    kind: str
    rate: str

    @classmethod
    def parse(cls, text: str) -> Config:
        kind, sep, rate = text.partition(":")
        if not sep or kind not in KINDS or not rate or (rate == "none" and kind != "op-celery"):
            raise argparse.ArgumentTypeError(f"expected KIND:RATE, KIND one of {KINDS}: {text!r}")
        return cls(kind, rate)

    @property
    def is_op_celery(self) -> bool:
        return self.kind == "op-celery"

    def rate_for(self, scenario: Scenario) -> str | None:
        if self.rate == "none":
            return None
        if self.rate != "exact":
            return self.rate
        if self.is_op_celery:
            return scenario.rate()
        return f"{scenario.per_s:g}/s"  # Celery's notation has no counted periods

    def describe(self, scenario: Scenario) -> str:
        rate = self.rate_for(scenario)
        if self.is_op_celery:
            return "op-celery, no limit set" if rate is None else f"op-celery, {rate} set"
        unfixed = " (timer bug not worked around)" if self.kind == "celery-unfixed" else ""
        return f"Celery rate_limit={rate} per worker{unfixed}"


def default_plan(scenarios: list[Scenario]) -> list[tuple[Scenario, Config]]:
    """No limit set everywhere; the exact limit and Celery's rate_limit beside it where the
    limit stays put and the window is 1 s or the headers are on."""
    plan = []
    for scenario in scenarios:
        plan.append((scenario, Config("op-celery", "none")))
        if scenario.then is None and (scenario.window_s == 1 or scenario.mode == "all"):
            plan.append((scenario, Config("op-celery", "exact")))
            if scenario.mode != "none":
                plan.append((scenario, Config("celery", "exact")))
    return plan


@dataclass
class Run:
    """What happened during one configuration, in wall-clock seconds (``time.time()``)."""

    config: str
    scenario: str
    backlog: int
    first_at: float
    join_at: float
    leave_at: float
    left_at: float  # when the leaving worker had exited
    change_at: float
    end_at: float
    requests: list[Received]
    left_on_queue: int
    dead_letters: int
    naive_counts: dict[str, int]
    worker_errors: list[str]
    timed_out: bool


# --- Running one configuration. ----------------------------------------------------------------


def enqueue(config: Config, queue: str, count: int) -> None:
    """Put ``count`` track events on ``queue``, numbered in ``properties["n"]``."""
    import op_celery
    from op_celery._app import package_app

    if config.is_op_celery:
        for n in range(count):
            op_celery.track.apply_async((EVENT_NAME,), {"properties": {"n": n}}, queue=queue)
        return
    app = package_app()
    with app.producer_or_acquire() as producer:
        for n in range(count):
            body = {"type": "track", "payload": {"name": EVENT_NAME, "properties": {"n": n}}}
            app.send_task("naive.track", kwargs={"body": body}, queue=queue, producer=producer)


def key_prefix(namespace: Namespace, index: int) -> str:
    # A limiter of its own per configuration: nothing learned or paused is carried over.
    return f"{namespace.prefix}op-celery-{index}"


def config_env(
    config: Config,
    scenario: Scenario,
    namespace: Namespace,
    queue: str,
    stand_in: StandIn,
    index: int,
) -> dict[str, str]:
    env = {
        **broker_env(namespace, queue),
        "OP_CELERY_KEY_PREFIX": key_prefix(namespace, index),
        "OPENPANEL_CLIENT_ID": CLIENT_ID,
        "OPENPANEL_CLIENT_SECRET": CLIENT_SECRET,
        "OPENPANEL_API_URL": stand_in.url,
    }
    rate = config.rate_for(scenario)
    if config.is_op_celery:
        if rate is not None:
            env["OPENPANEL_RATE_LIMIT"] = rate
    else:
        assert rate is not None
        env["NAIVE_RATE_LIMIT"] = rate
        env["NAIVE_HUB_FIX"] = "0" if config.kind == "celery-unfixed" else "1"
    return clean_env(env)


def backlog_for(config: Config, scenario: Scenario, seconds: float) -> int:
    """T seconds of events at the limit (each half at its own in a change scenario); for
    Celery's rate_limit enough to keep 3 workers busy until T."""
    if scenario.then is None:
        backlog = math.ceil(seconds * scenario.per_s)
    else:
        backlog = math.ceil(seconds / 2 * (scenario.limit + scenario.then) / scenario.window_s)
    if not config.is_op_celery:
        per_worker = celery_rate(config.rate_for(scenario))
        backlog = max(backlog, math.ceil(3 * per_worker * seconds * NAIVE_BACKLOG_SLACK))
    return backlog


def worker_problems(worker: Worker) -> list[str]:
    """The ERROR/CRITICAL lines of a worker's log (read before ``stop`` deletes it)."""
    try:
        text = worker.log_path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if "ERROR" in line or "CRITICAL" in line]


def run_config(
    scenario: Scenario,
    config: Config,
    index: int,
    args: argparse.Namespace,
    namespace: Namespace,
    stand_in: StandIn,
) -> Run:
    period_s = float(args.seconds)  # T: the backlog's duration at exactly the limit
    queue = namespace.queue(f"rate-{index}")
    status_key = f"{namespace.prefix}naive-status"
    dead_letters_key = f"{key_prefix(namespace, index)}:dead-letters"
    client = redis.Redis.from_url(namespace.redis_url)
    try:
        client.delete(status_key)
        namespace.delete(queue)
        backlog = backlog_for(config, scenario, period_s)
        enqueue(config, queue, backlog)
        stand_in.control.set_rate_limit(scenario.limit, scenario.window_s, headers=scenario.mode)
        stand_in.control.reset()  # keeps the rate limit, forgets requests and windows
        env = config_env(config, scenario, namespace, queue, stand_in, index)
        app = "op_celery.worker" if config.is_op_celery else "naive_app"

        def worker() -> Worker:
            return Worker(app, queue, args.pool, args.concurrency, env)

        errors: list[str] = []
        with ExitStack() as stack:

            def started(new: Worker) -> Worker:
                stack.callback(new.stop)
                stack.callback(lambda: errors.extend(worker_problems(new)))
                return new.start()

            workers = [started(worker()), started(worker())]
            leaving = workers[0]
            deadline = time.monotonic() + FIRST_REQUEST_TIMEOUT_S
            while stand_in.control.stats()["requests"] == 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{config}: no request within {FIRST_REQUEST_TIMEOUT_S} s")
                for each in workers:
                    each.check_alive()
                time.sleep(POLL_S / 2)
            first_at = time.time()
            join_at = leave_at = left_at = change_at = math.nan
            timed_out = False
            while True:
                now = time.time()
                elapsed = now - first_at
                if math.isnan(join_at) and elapsed >= period_s / 3:
                    workers.append(started(worker()))
                    join_at = time.time()
                if scenario.then and math.isnan(change_at) and elapsed >= period_s / 2:
                    stand_in.control.set_rate_limit(
                        scenario.then, scenario.window_s, headers=scenario.mode
                    )
                    change_at = time.time()
                if math.isnan(leave_at) and elapsed >= 2 * period_s / 3:
                    os.killpg(leaving.pid, signal.SIGTERM)  # warm shutdown, like a deploy
                    leave_at = time.time()
                if not math.isnan(leave_at) and math.isnan(left_at):
                    assert leaving.process is not None
                    if leaving.process.poll() is not None:
                        left_at = time.time()
                for each in workers:
                    if each is not leaving or math.isnan(leave_at):
                        each.check_alive()
                if config.is_op_celery:
                    if stand_in.control.stats()["received"] >= backlog:
                        break
                    if elapsed > TIMEOUT_FACTOR * period_s:
                        timed_out = True
                        break
                elif elapsed >= period_s:
                    break
                time.sleep(POLL_S)
            end_at = time.time()
        # Every worker has stopped here: nothing more reaches the stand-in.
        requests = sorted(stand_in.control.requests(), key=lambda r: r.at)
        left_on_queue = int(client.llen(f"{namespace.prefix}{queue}"))
        dead_letters = int(client.hlen(dead_letters_key))
        raw_counts: dict[bytes, bytes] = client.hgetall(status_key)  # type: ignore[assignment]
        naive_counts = {key.decode(): int(value) for key, value in raw_counts.items()}
        if config.is_op_celery and requests:
            end_at = requests[-1].at  # the run ends with its last request
        else:  # the run ends at T; what the workers sent while stopping is not counted
            requests = [r for r in requests if r.at <= end_at]
        return Run(
            config=config.describe(scenario),
            scenario=str(scenario),
            backlog=backlog,
            first_at=requests[0].at if requests else first_at,
            join_at=join_at,
            leave_at=leave_at,
            left_at=left_at,
            change_at=change_at,
            end_at=end_at,
            requests=requests,
            left_on_queue=left_on_queue,
            dead_letters=dead_letters,
            naive_counts=naive_counts,
            worker_errors=errors,
            timed_out=timed_out,
        )
    finally:
        client.delete(status_key)
        for key in client.scan_iter(match=f"{key_prefix(namespace, index)}*", count=1000):
            client.delete(key)
        namespace.delete(queue)
        client.close()


# --- What the stand-in saw. --------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    config: str
    scenario: str
    backlog: int
    seconds: float
    steady_per_s: float
    share_of_limit: float
    phase_per_s: tuple[float, float, float]
    requests: int
    accepted: int
    too_many: int
    too_many_share: float
    other_statuses: dict[int, int]
    distinct_accepted: int
    duplicates: int
    dead_letters: int
    left_on_queue: int
    leave_s: float
    converged_s: float
    reconverged_s: float
    naive_counts: dict[str, int]
    worker_errors: list[str]
    timed_out: bool
    accepted_per_second: list[int]
    too_many_per_second: list[int]
    limit_per_second: list[float]


def per_s(times: list[float], start: float, end: float) -> float:
    if not end > start:
        return math.nan
    return sum(1 for t in times if start <= t < end) / (end - start)


def converged_after(
    accepted_at: list[float], too_many_at: list[float], start: float, end: float, rate: float,
    span: float,
) -> float:  # fmt: skip
    """Seconds from ``start`` to the end of the first span (stepped by 0.5 s) of ``span``
    seconds with no 429 and at least CONVERGED_SHARE of ``rate``; NaN if none before ``end``."""
    t = start
    while t + span <= end:
        if not any(t <= x < t + span for x in too_many_at) and (
            per_s(accepted_at, t, t + span) >= CONVERGED_SHARE * rate
        ):
            return t + span - start
        t += 0.5
    return math.nan


def analyse(run: Run, scenario: Scenario) -> Figures:
    accepted = [r for r in run.requests if 200 <= r.status < 300]
    accepted_at = [r.at for r in accepted]
    too_many_at = [r.at for r in run.requests if r.status == 429]
    others = Counter(r.status for r in run.requests if r.status != 429 and r.status // 100 != 2)
    numbers = [r.payload.get("properties", {}).get("n") for r in accepted]
    distinct = len(set(numbers))
    first, end = run.first_at, run.end_at
    edge = max(EDGE_S, scenario.window_s)
    span = max(3.0, scenario.window_s)
    # Whole windows only, when they are longer than the edge: a run ends with its last request.
    if scenario.window_s > EDGE_S:
        stop = first + scenario.window_s * math.floor((end - first) / scenario.window_s)
    else:
        stop = end - EDGE_S
    if scenario.then is None:
        steady = per_s(accepted_at, first + edge, stop)
        share = steady / scenario.per_s
        reconverged = math.nan
    else:  # each half against its own limit, weighted by its length
        then_per_s = scenario.then / scenario.window_s
        before = per_s(accepted_at, first + edge, run.change_at) / scenario.per_s
        after = per_s(accepted_at, run.change_at + edge, stop) / then_per_s
        weights = (run.change_at - first - edge, stop - run.change_at - edge)
        share = (before * weights[0] + after * weights[1]) / sum(weights)
        steady = math.nan
        reconverged = converged_after(
            accepted_at, too_many_at, run.change_at, end, then_per_s, span
        )
    phases = (
        per_s(accepted_at, first + edge, run.join_at),
        per_s(accepted_at, run.join_at + SETTLE_S, run.leave_at),
        per_s(accepted_at, run.leave_at + SETTLE_S, stop),
    )
    seconds = max(0, math.ceil(end - first))
    accepted_series = [0] * seconds
    too_many_series = [0] * seconds
    for series, times in ((accepted_series, accepted_at), (too_many_series, too_many_at)):
        for t in times:
            slot = int(t - first)
            if 0 <= slot < seconds:
                series[slot] += 1
    limits = [
        scenario.then / scenario.window_s
        if scenario.then and not math.isnan(run.change_at) and first + i >= run.change_at
        else scenario.per_s
        for i in range(seconds)
    ]
    total = len(run.requests)
    return Figures(
        config=run.config,
        scenario=run.scenario,
        backlog=run.backlog,
        seconds=end - first,
        steady_per_s=steady,
        share_of_limit=share,
        phase_per_s=phases,
        requests=total,
        accepted=len(accepted),
        too_many=len(too_many_at),
        too_many_share=len(too_many_at) / total if total else math.nan,
        other_statuses=dict(others),
        distinct_accepted=distinct,
        duplicates=len(accepted) - distinct,
        dead_letters=run.dead_letters,
        left_on_queue=run.left_on_queue,
        leave_s=run.left_at - run.leave_at,
        converged_s=converged_after(accepted_at, too_many_at, first, end, scenario.per_s, span),
        reconverged_s=reconverged,
        naive_counts=run.naive_counts,
        worker_errors=run.worker_errors,
        timed_out=run.timed_out,
        accepted_per_second=accepted_series,
        too_many_per_second=too_many_series,
        limit_per_second=limits,
    )


_BARS = " ▁▂▃▄▅▆▇█"


def plot(figures: Figures, window_s: float) -> list[str]:
    """Two text lines: accepted per second against the limit (``█`` = the limit, ``^`` above
    it by more than 5 %), averaged over each window of ``window_s``; ``!`` under 429s."""
    step = max(1, round(window_s))
    bars, marks = [], []
    counts, limits = figures.accepted_per_second, figures.limit_per_second
    for i in range(0, len(counts), step):
        chunk = counts[i : i + step]
        share = sum(chunk) / len(chunk) / limits[i]
        bars.append("^" if share > 1.05 else _BARS[min(8, max(0, round(share * 8)))])
        marks.append("!" if any(figures.too_many_per_second[i : i + step]) else " ")
    unit = "s" if step == 1 else f"{step} s"
    return [
        f"accepted/{unit} ÷ limit |{''.join(bars)}|",
        f"429s {' ' * (len(unit) + 12)}|{''.join(marks)}|",
    ]


def delivered(figures: Figures, op_celery: bool) -> str:
    if op_celery:
        lost = figures.backlog - figures.distinct_accepted
        text = f"{figures.distinct_accepted:,}/{figures.backlog:,}"
        if lost:
            text += f" ({lost} missing)"
        if figures.duplicates:
            text += f" ({figures.duplicates} twice)"
        return text
    return f"{figures.accepted:,}; {figures.too_many:,} lost (no retry)"


def seconds_text(value: float) -> str:
    return "never" if math.isnan(value) else f"{value:.1f}"


def table(results: list[tuple[Scenario, Config, Figures]]) -> str:
    head = (
        "| server | configuration | run s | % of limit | 2 / 3 / 2 workers (/s) | "
        "429s (share of requests) | dead letters | accepted | converged after s |"
    )
    lines = [head, "|---|---|---:|---:|---|---:|---:|---|---:|"]
    for scenario, config, f in results:
        phases = " / ".join(f"{rate:.1f}" for rate in f.phase_per_s)
        converged = seconds_text(f.converged_s)
        if scenario.then:
            converged += f" (after the change: {seconds_text(f.reconverged_s)})"
        dead = str(f.dead_letters) if config.is_op_celery else "n/a"
        lines.append(
            f"| {scenario} | {f.config} | {f.seconds:.1f} | {100 * f.share_of_limit:.1f} % | "
            f"{phases} | {f.too_many:,} ({100 * f.too_many_share:.2f} %) | {dead} | "
            f"{delivered(f, config.is_op_celery)} | {converged} |"
        )
    return "\n".join(lines)


def verdict(scenario: Scenario, config: Config, f: Figures) -> str:
    share, too_many = TARGETS[scenario.mode]
    met = f.share_of_limit >= share and f.too_many_share < too_many
    complete = f.distinct_accepted == f.backlog and not f.timed_out and not f.duplicates
    return (
        f"{scenario} / {f.config}: {100 * f.share_of_limit:.1f} % of the limit, "
        f"{100 * f.too_many_share:.2f} % 429s: target (>= {100 * share:.0f} %, "
        f"< {100 * too_many:.0f} % 429s) {'met' if met else 'MISSED'}; dead letters "
        f"{f.dead_letters}; every event delivered once: {'yes' if complete else 'NO'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=30, help="T: the backlog's duration at the limit"
    )
    parser.add_argument("--pool", default="threads", choices=("threads", "prefork", "solo"))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--scenarios",
        type=lambda text: [Scenario.parse(part) for part in text.split(",") if part],
        default=[Scenario.parse(text) for text in DEFAULT_SCENARIOS],
        help=f"comma-separated L/Ws:MODE[>L2] (default {','.join(DEFAULT_SCENARIOS)})",
    )
    parser.add_argument(
        "--configs",
        type=lambda text: [Config.parse(part) for part in text.split(",") if part],
        default=None,
        help="comma-separated KIND:RATE (KIND op-celery, celery or celery-unfixed; RATE none, "
        "exact or a rate), run in every scenario; default: op-celery:none everywhere, and "
        "op-celery:exact and celery:exact beside it where that compares",
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.seconds < 3 * (EDGE_S + SETTLE_S) or args.concurrency < 1:
        parser.error(f"need --seconds >= {3 * (EDGE_S + SETTLE_S):g}")
    scenarios: list[Scenario] = args.scenarios
    if args.configs:
        plan = [(scenario, config) for scenario in scenarios for config in args.configs]
    else:
        plan = default_plan(scenarios)

    machine = describe_machine()
    print(machine)
    print(" ".join(["python", *sys.argv]))
    print(
        f"{args.pool} pool, concurrency {args.concurrency}; 2 workers, a 3rd at T/3, the 1st "
        f"stopped at 2T/3, T = {args.seconds:g} s",
        flush=True,
    )
    results: list[tuple[Scenario, Config, Figures]] = []
    with redis_namespace(args.redis_url) as namespace, stand_in_server() as stand_in:
        os.environ.update(broker_env(namespace, namespace.queue("unused")))
        for index, (scenario, config) in enumerate(plan):
            started = time.monotonic()
            run = run_config(scenario, config, index, args, namespace, stand_in)
            figures = analyse(run, scenario)
            results.append((scenario, config, figures))
            phases = ", ".join(f"{rate:.1f}" for rate in figures.phase_per_s)
            print(
                f"{scenario} / {figures.config}: {100 * figures.share_of_limit:.1f} % of the "
                f"limit (phases {phases}/s), {figures.too_many} 429s of {figures.requests} "
                f"requests, {figures.dead_letters} dead letters, "
                f"{delivered(figures, config.is_op_celery)}; converged after "
                f"{seconds_text(figures.converged_s)} s; {time.monotonic() - started:.0f} s wall",
                flush=True,
            )
            for line in plot(figures, scenario.window_s):
                print(f"  {line}")
            for line in figures.worker_errors[:5]:
                print(f"  worker: {line}")
        stand_in.control.set_rate_limit(None)

    print()
    print(table(results))
    print()
    for scenario, config, figures in results:
        if config.is_op_celery and config.rate == "none":
            print(verdict(scenario, config, figures))
    print()
    for scenario, config, figures in results:
        if config.is_op_celery and config.rate == "none":
            print(f"{scenario} / {figures.config}:")
            for line in plot(figures, scenario.window_s):
                print(f"    {line}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "machine": machine,
                    "argv": sys.argv,
                    "results": [asdict(figures) for _, _, figures in results],
                },
                out,
                indent=2,
            )
    complete = all(
        f.distinct_accepted == f.backlog for _, config, f in results if config.is_op_celery
    )
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
