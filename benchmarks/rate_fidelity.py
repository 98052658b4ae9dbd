"""Does a pool of workers hold a server's rate limit while workers join and leave? (issue 3)

The question: against a server that allows ``L`` requests per 1 s window per client id, does
op-celery's shared limiter deliver at least 98 % of ``L`` with fewer than 0.1 % 429s, whatever
the number of workers, where Celery's own per-worker ``rate_limit`` holds only while the pool
stays as tuned?

Method: the stand-in OpenPanel server runs in its own process (``python -m op_celery.testing``)
with a fixed window of ``L`` per 1 s per client id. Each configuration gets a fresh queue holding
its backlog, then two ``celery worker`` processes (``--pool``, ``--concurrency``, the same flags
for every configuration) start; counted from the first request the stand-in sees, a third worker
starts at T/3 and the first worker gets SIGTERM at 2T/3, where T = ``--backlog-factor`` seconds,
the time the backlog of ``--backlog-factor`` x L events takes at exactly L. Configurations:

- ``op-celery:RATE``: ``celery -A op_celery.worker worker`` with ``OPENPANEL_RATE_LIMIT=RATE``,
  one limit shared by every worker through Redis. 429s are retried; the run ends when every
  event of the backlog was accepted (or at ``--timeout``).
- ``celery:RATE``: ``celery -A naive_app worker`` (``naive_app.py``): one ``requests.post`` per
  event, no retry (a 429 is an event lost), Celery's ``rate_limit=RATE`` per worker, with
  kombu's timer bug worked around (see ``naive_app.py``; ``celery-unfixed:RATE`` runs without the
  workaround). Their backlog is made large enough to keep every worker busy until T, when the run
  ends; what is left on the queue is dropped.

Measured from the stand-in's own record of every request (status and arrival time): accepted
requests per second in steady state (from 2 s after the first request to 2 s before the end of
the run), as a share of L; the same per phase (2 workers, 3 workers, 2 workers again; each phase
without its first 2 s, when a worker starts or stops); 429s; and for op-celery whether every event
arrived exactly once. The machine's cores are shared by the workers, the stand-in, Redis, this
script and whatever else runs there. Every process started is stopped by its PID and every Redis
key written (under a private prefix) is deleted, also on errors and Ctrl-C.

    python benchmarks/rate_fidelity.py [--limit 50] [--backlog-factor 30] [--pool threads]
        [--concurrency 4] [--configs op-celery:50/s,op-celery:495/10s,celery:50/s,celery:25/s]
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

#: Seconds left out of the steady-state rate at the start and at the end of a run.
EDGE_S = 2.0
#: Seconds left out at the start of a phase: a joining worker starts, a leaving one drains.
SETTLE_S = 2.0
#: Longest a configuration runs, counted from its first request, in seconds.
DEFAULT_TIMEOUT_S = 60.0
#: Longest wait for the first request after the first two workers were started, in seconds.
FIRST_REQUEST_TIMEOUT_S = 30.0
#: Seconds between two looks at the stand-in and the workers.
POLL_S = 0.1
#: Extra share of events a naive configuration is given beyond what its workers can take by T.
NAIVE_BACKLOG_SLACK = 1.2
#: The operation's targets (issue 3).
TARGET_SHARE = 0.98
TARGET_429_SHARE = 0.001
EVENT_NAME = "rate_fidelity"

KINDS = ("op-celery", "celery", "celery-unfixed")


@dataclass(frozen=True)
class Config:
    """One configuration: ``kind:rate``, e.g. ``op-celery:495/10s`` or ``celery:25/s``."""

    kind: str
    rate: str

    @classmethod
    def parse(cls, text: str) -> Config:
        kind, sep, rate = text.partition(":")
        if not sep or kind not in KINDS or not rate:
            raise argparse.ArgumentTypeError(f"expected KIND:RATE, KIND one of {KINDS}: {text!r}")
        return cls(kind, rate)

    @property
    def is_op_celery(self) -> bool:
        return self.kind == "op-celery"

    def __str__(self) -> str:
        if self.is_op_celery:
            return f"op-celery, OPENPANEL_RATE_LIMIT={self.rate} shared"
        unfixed = " (timer bug not worked around)" if self.kind == "celery-unfixed" else ""
        return f"Celery rate_limit={self.rate} per worker{unfixed}"


def default_configs(limit: int) -> list[Config]:
    """op-celery at L and at 99 % of L, Celery's rate_limit at L and at L/2 per worker."""
    return [
        Config("op-celery", f"{limit}/s"),
        Config("op-celery", f"{limit * 99 // 10}/10s"),
        Config("celery", f"{limit}/s"),
        Config("celery", f"{limit // 2}/s"),
    ]


@dataclass
class Run:
    """What happened during one configuration, in wall-clock seconds (``time.time()``)."""

    config: str
    backlog: int
    first_at: float
    join_at: float
    leave_at: float
    left_at: float  # when the leaving worker had exited
    end_at: float
    requests: list[Received]
    left_on_queue: int
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


def config_env(
    config: Config, namespace: Namespace, queue: str, stand_in: StandIn, index: int
) -> dict[str, str]:
    env = {
        **broker_env(namespace, queue),
        # A limiter of its own per configuration: no pause or schedule carried over.
        "OP_CELERY_KEY_PREFIX": f"{namespace.prefix}op-celery-{index}",
        "OPENPANEL_CLIENT_ID": CLIENT_ID,
        "OPENPANEL_CLIENT_SECRET": CLIENT_SECRET,
        "OPENPANEL_API_URL": stand_in.url,
    }
    if config.is_op_celery:
        env["OPENPANEL_RATE_LIMIT"] = config.rate
    else:
        env["NAIVE_RATE_LIMIT"] = config.rate
        env["NAIVE_HUB_FIX"] = "0" if config.kind == "celery-unfixed" else "1"
    return clean_env(env)


def backlog_for(config: Config, limit: int, factor: float) -> int:
    """``factor`` x L events; for Celery's rate_limit enough to keep 3 workers busy until T."""
    backlog = math.ceil(factor * limit)
    if not config.is_op_celery:
        per_worker = celery_rate(config.rate)
        backlog = max(backlog, math.ceil(3 * per_worker * factor * NAIVE_BACKLOG_SLACK))
    return backlog


def worker_problems(worker: Worker) -> list[str]:
    """The ERROR/CRITICAL lines of a worker's log (read before ``stop`` deletes it)."""
    try:
        text = worker.log_path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if "ERROR" in line or "CRITICAL" in line]


def run_config(
    config: Config,
    index: int,
    args: argparse.Namespace,
    namespace: Namespace,
    stand_in: StandIn,
) -> Run:
    limit: int = args.limit
    period_s = float(args.backlog_factor)  # T: the backlog's duration at exactly L
    queue = namespace.queue(f"rate-{index}")
    status_key = f"{namespace.prefix}naive-status"
    client = redis.Redis.from_url(namespace.redis_url)
    try:
        client.delete(status_key)
        namespace.delete(queue)
        backlog = backlog_for(config, limit, args.backlog_factor)
        enqueue(config, queue, backlog)
        stand_in.control.reset()  # keeps the rate limit, forgets requests and windows
        env = config_env(config, namespace, queue, stand_in, index)
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
            join_at = leave_at = left_at = math.nan
            timed_out = False
            while True:
                now = time.time()
                elapsed = now - first_at
                if math.isnan(join_at) and elapsed >= period_s / 3:
                    workers.append(started(worker()))
                    join_at = time.time()
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
                    if elapsed > args.timeout:
                        timed_out = True
                        break
                elif elapsed >= period_s:
                    break
                time.sleep(POLL_S)
            end_at = time.time()
        # Every worker has stopped here: nothing more reaches the stand-in.
        requests = sorted(stand_in.control.requests(), key=lambda r: r.at)
        left_on_queue = int(client.llen(f"{namespace.prefix}{queue}"))
        raw_counts: dict[bytes, bytes] = client.hgetall(status_key)  # type: ignore[assignment]
        naive_counts = {key.decode(): int(value) for key, value in raw_counts.items()}
        if config.is_op_celery and requests:
            end_at = requests[-1].at  # the run ends with its last request
        else:  # the run ends at T; what the workers sent while stopping is not counted
            requests = [r for r in requests if r.at <= end_at]
        return Run(
            config=str(config),
            backlog=backlog,
            first_at=requests[0].at if requests else first_at,
            join_at=join_at,
            leave_at=leave_at,
            left_at=left_at,
            end_at=end_at,
            requests=requests,
            left_on_queue=left_on_queue,
            naive_counts=naive_counts,
            worker_errors=errors,
            timed_out=timed_out,
        )
    finally:
        client.delete(status_key)
        namespace.delete(queue)
        client.close()


# --- What the stand-in saw. --------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    config: str
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
    left_on_queue: int
    leave_s: float
    naive_counts: dict[str, int]
    worker_errors: list[str]
    timed_out: bool
    accepted_per_second: list[int]
    too_many_per_second: list[int]
    too_many_at_s: list[float]  # seconds after the first request


def per_s(times: list[float], start: float, end: float) -> float:
    if not end > start:
        return math.nan
    return sum(1 for t in times if start <= t < end) / (end - start)


def analyse(run: Run, limit: int) -> Figures:
    accepted = [r for r in run.requests if 200 <= r.status < 300]
    accepted_at = [r.at for r in accepted]
    too_many_at = [r.at for r in run.requests if r.status == 429]
    others = Counter(r.status for r in run.requests if r.status != 429 and r.status // 100 != 2)
    numbers = [r.payload.get("properties", {}).get("n") for r in accepted]
    distinct = len(set(numbers))
    first, end = run.first_at, run.end_at
    steady = per_s(accepted_at, first + EDGE_S, end - EDGE_S)
    phases = (
        per_s(accepted_at, first + EDGE_S, run.join_at),
        per_s(accepted_at, run.join_at + SETTLE_S, run.leave_at),
        per_s(accepted_at, run.leave_at + SETTLE_S, end - EDGE_S),
    )
    seconds = max(0, math.ceil(end - first))
    accepted_series = [0] * seconds
    too_many_series = [0] * seconds
    for series, times in ((accepted_series, accepted_at), (too_many_series, too_many_at)):
        for t in times:
            slot = int(t - first)
            if 0 <= slot < seconds:
                series[slot] += 1
    total = len(run.requests)
    return Figures(
        config=run.config,
        backlog=run.backlog,
        seconds=end - first,
        steady_per_s=steady,
        share_of_limit=steady / limit,
        phase_per_s=phases,
        requests=total,
        accepted=len(accepted),
        too_many=len(too_many_at),
        too_many_share=len(too_many_at) / total if total else math.nan,
        other_statuses=dict(others),
        distinct_accepted=distinct,
        duplicates=len(accepted) - distinct,
        left_on_queue=run.left_on_queue,
        leave_s=run.left_at - run.leave_at,
        naive_counts=run.naive_counts,
        worker_errors=run.worker_errors,
        timed_out=run.timed_out,
        accepted_per_second=accepted_series,
        too_many_per_second=too_many_series,
        too_many_at_s=[round(t - first, 3) for t in too_many_at],
    )


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


def table(results: list[tuple[Config, Figures]], limit: int) -> str:
    head = (
        f"| configuration (L = {limit}/1 s) | backlog | run s | steady accepted/s | % of L | "
        "2 workers /s | 3 workers /s | 2 again /s | 429s (share of requests) | accepted |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for config, f in results:
        phases = " | ".join(f"{rate:.1f}" for rate in f.phase_per_s)
        lines.append(
            f"| {config} | {f.backlog:,} | {f.seconds:.1f} | {f.steady_per_s:.1f} | "
            f"{100 * f.share_of_limit:.1f} % | {phases} | "
            f"{f.too_many:,} ({100 * f.too_many_share:.2f} %) | "
            f"{delivered(f, config.is_op_celery)} |"
        )
    return "\n".join(lines)


def verdict(config: Config, f: Figures) -> str:
    met = f.share_of_limit >= TARGET_SHARE and f.too_many_share < TARGET_429_SHARE
    complete = f.distinct_accepted == f.backlog and not f.timed_out
    return (
        f"{config}: {100 * f.share_of_limit:.1f} % of L, {100 * f.too_many_share:.2f} % 429s: "
        f"target (>= {100 * TARGET_SHARE:.0f} % of L, < {100 * TARGET_429_SHARE:.1f} % 429s) "
        f"{'met' if met else 'MISSED'}; every event delivered: {'yes' if complete else 'NO'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=50, help="L: the stand-in's limit per 1 s")
    parser.add_argument(
        "--backlog-factor", type=float, default=30, help="backlog = this x L events; T seconds"
    )
    parser.add_argument("--pool", default="threads", choices=("threads", "prefork", "solo"))
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--configs",
        type=lambda text: [Config.parse(part) for part in text.split(",") if part],
        default=None,
        help="comma-separated KIND:RATE (KIND op-celery, celery or celery-unfixed); default: "
        "op-celery:L/s, op-celery at 0.99 L (per 10 s), celery:L/s, celery:(L/2)/s",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per op-celery run"
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.limit < 2 or args.backlog_factor < 3 * (EDGE_S + SETTLE_S) or args.concurrency < 1:
        parser.error(f"need --limit >= 2, --backlog-factor >= {3 * (EDGE_S + SETTLE_S):g}")
    configs: list[Config] = args.configs or default_configs(args.limit)

    machine = describe_machine()
    print(machine)
    print(" ".join(["python", *sys.argv]))
    print(
        f"stand-in limit {args.limit}/1 s per client id; {args.pool} pool, concurrency "
        f"{args.concurrency}; 2 workers, a 3rd at T/3, the 1st stopped at 2T/3, "
        f"T = {args.backlog_factor:g} s",
        flush=True,
    )
    results: list[tuple[Config, Figures]] = []
    with redis_namespace(args.redis_url) as namespace, stand_in_server() as stand_in:
        stand_in.control.set_rate_limit(args.limit, 1.0)  # as --rate-limit L/1s
        os.environ.update(broker_env(namespace, namespace.queue("unused")))
        for index, config in enumerate(configs):
            started = time.monotonic()
            run = run_config(config, index, args, namespace, stand_in)
            figures = analyse(run, args.limit)
            results.append((config, figures))
            phases = ", ".join(f"{rate:.1f}" for rate in figures.phase_per_s)
            print(
                f"{config}: {figures.steady_per_s:.1f}/s steady "
                f"({100 * figures.share_of_limit:.1f} % of L; phases {phases}), "
                f"{figures.too_many} 429s of {figures.requests} requests, "
                f"{delivered(figures, config.is_op_celery)}; "
                f"the leaving worker exited {figures.leave_s:.1f} s after SIGTERM; "
                f"{time.monotonic() - started:.0f} s wall",
                flush=True,
            )
            print(f"  accepted per second: {figures.accepted_per_second}")
            if figures.too_many:
                print(f"  429s per second:     {figures.too_many_per_second}")
            for line in figures.worker_errors[:5]:
                print(f"  worker: {line}")

    print()
    print(table(results, args.limit))
    print()
    for config, figures in results:
        if config.is_op_celery:
            print(verdict(config, figures))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "machine": machine,
                    "argv": sys.argv,
                    "results": [asdict(figures) for _, figures in results],
                },
                out,
                indent=2,
            )
    complete = all(f.distinct_accepted == f.backlog for config, f in results if config.is_op_celery)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
