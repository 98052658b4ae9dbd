"""What does a web request pay for ``op_celery.track.delay()``?

The question: is op-celery's enqueue as cheap as Celery's own (target: at most 1.2 times a bare
Celery task's ``.delay()``; goal: at most half of it), and how does it compare with what a user
would pick instead?

Method: one thread times single calls (``time.perf_counter`` around each) of, interleaved in
rounds so that load from other processes falls on all of them alike:

- ``op-celery``: ``op_celery.track.delay(...)``, validation and the fast publish path;
- ``op-celery, Celery path``: the same call published by Celery's ``apply_async`` (what
  op-celery did before ``op_celery._publish``; forced with ``exchange=None``, an option the
  fast path leaves to Celery and that changes nothing in Celery's message);
- ``bare Celery``: ``.delay()`` of a plain ``@app.task`` on the same app and broker, given the
  same arguments (the same properties dict);
- ``posthog capture()``: posthog-python's in-process queue, its consumer thread posting to the
  stand-in (flushed after each of its chunks, outside the timing);
- ``requests.post``: a blocking POST to the stand-in on a new connection per event, as the
  ``openpanel`` 0.0.1 SDK does (``--post-calls`` of them: each leaves a socket in TIME_WAIT);
- ``Redis PING``: one round trip to the broker, the floor of any enqueue.

``--python-only`` answers every LPUSH inside this process (redis-py's ``execute_command`` is
patched), which leaves the Python cost of each enqueue without the broker round trip.

Each run reports the median and p99 of every contender's calls and the ratios to bare Celery;
the summary gives the median of the runs. Then a burst of ``--calls`` posthog captures on a
fresh client with default settings counts how many its bounded queue drops. The stand-in runs
in its own process (``python -m op_celery.testing``); all keys go under a private prefix of the
shared Redis and are deleted at the end.

    python benchmarks/enqueue.py [--calls 20000] [--rounds 20] [--runs 3] [--post-calls 4000]
    python benchmarks/enqueue.py --python-only
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
import requests
from _harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    DEFAULT_REDIS_URL,
    Namespace,
    broker_env,
    describe_machine,
    median,
    percentile,
    redis_namespace,
    stand_in_server,
)

NAME = "checkout_completed"
PROPERTIES: dict[str, Any] = {
    "value": 129.5,
    "currency": "EUR",
    "items": 3,
    "plan": "pro",
    "coupon": None,
    "path": "/checkout/complete",
}
PROFILE_ID = "user-42"
CLIENT_IP = "203.0.113.7"
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0"
#: Untimed calls of each contender before the first round (connections, caches).
WARMUP_CALLS = 300


@dataclass
class Contender:
    name: str
    call: Callable[[], object]
    calls_per_round: int
    after_chunk: Callable[[], None] = lambda: None
    latencies: list[float] = field(default_factory=list)


def time_calls(call: Callable[[], object], count: int, out: list[float]) -> None:
    clock = time.perf_counter
    for _ in range(count):
        started = clock()
        call()
        out.append(clock() - started)


def make_contenders(
    args: argparse.Namespace, namespace: Namespace, stand_in_url: str
) -> tuple[list[Contender], Callable[[], None]]:
    """The contenders, and a function that closes what they opened."""
    import posthog
    from celery import Celery

    import op_celery
    from op_celery._app import configure_app, package_app, settings_for
    from op_celery._outbox import DUE_KEY, RECORDS_KEY

    app = package_app()
    # The same app without the outbox, to measure what the outbox adds to an enqueue. The
    # package app is made the default, so that op_celery.track still publishes through it.
    app.set_default()
    no_outbox_app = Celery("opc_bench_no_outbox", set_as_current=False)
    no_outbox_app.conf.op_celery_outbox = False
    configure_app(no_outbox_app, settings_for(no_outbox_app))
    no_outbox_track = no_outbox_app.tasks["op_celery.track"]
    op_queue = os.environ["OP_CELERY_QUEUE"]
    bare_queue = namespace.queue("bare")

    as_task: Callable[[Callable[..., None]], Any] = app.task(
        name="opc_bench.bare_track", ignore_result=True, queue=bare_queue
    )

    @as_task
    def bare_track(
        name: str,
        properties: dict[str, Any] | None = None,
        profile_id: str | None = None,
        client_ip: str | None = None,
        user_agent: str | None = None,
    ) -> None:
        """What a user would write without op-celery (never run here)."""

    def clear_queues() -> None:
        # The outbox's records too: in a deployment, workers delete them as events finish.
        outbox = [RECORDS_KEY.format(queue=op_queue), DUE_KEY.format(queue=op_queue)]
        namespace.delete(op_queue, bare_queue, *outbox)

    ph = posthog.Posthog("phc_benchmark", host=stand_in_url)
    quiet_posthog()
    ping = redis.Redis.from_url(args.redis_url)
    body = {
        "type": "track",
        "payload": {"name": NAME, "properties": PROPERTIES, "profileId": PROFILE_ID},
    }
    headers = {"openpanel-client-id": CLIENT_ID, "openpanel-client-secret": CLIENT_SECRET}
    per_round = args.calls // args.rounds
    call_kwargs: dict[str, Any] = {
        "properties": PROPERTIES,
        "profile_id": PROFILE_ID,
        "client_ip": CLIENT_IP,
        "user_agent": USER_AGENT,
    }

    contenders = [
        Contender(
            "op-celery",
            lambda: op_celery.track.delay(NAME, **call_kwargs),
            per_round,
            clear_queues,
        ),
        Contender(
            "op-celery, outbox off",
            lambda: no_outbox_track.delay(NAME, **call_kwargs),
            per_round,
            clear_queues,
        ),
        Contender(
            "op-celery, Celery path",
            lambda: op_celery.track.apply_async((NAME,), call_kwargs, exchange=None),
            per_round,
            clear_queues,
        ),
        Contender(
            "bare Celery", lambda: bare_track.delay(NAME, **call_kwargs), per_round, clear_queues
        ),
        Contender(
            "posthog capture()",
            lambda: ph.capture(NAME, distinct_id=PROFILE_ID, properties=PROPERTIES),
            per_round,
            lambda: ph.flush(),
        ),
        Contender(
            "requests.post (openpanel 0.0.1)",
            lambda: requests.post(f"{stand_in_url}/track", json=body, headers=headers, timeout=10),
            args.post_calls // args.rounds,
        ),
        Contender("Redis PING", ping.ping, per_round),
    ]

    def close() -> None:
        ph.shutdown()
        ping.close()
        clear_queues()

    return contenders, close


def quiet_posthog() -> None:
    # Each client sets the "posthog" logger's level; it would log every 404 from the stand-in
    # (which has no /batch/) and every dropped event.
    logging.getLogger("posthog").disabled = True


def answer_lpush_locally() -> None:
    """Make redis-py answer LPUSH (alone, in a pipeline, or in the outbox's script) without
    sending it, so only the Python work is timed."""
    real: Any = redis.Redis.execute_command
    real_execute: Any = redis.client.Pipeline.execute

    def execute_command(self: redis.Redis, *args: Any, **options: Any) -> Any:
        if args and args[0] in ("LPUSH", "EVALSHA"):  # EVALSHA: the outbox's push
            return 1
        return real(self, *args, **options)

    def execute(self: redis.client.Pipeline, raise_on_error: bool = True) -> Any:
        commands = self.command_stack
        if any(args and args[0] == "LPUSH" for args, _ in commands):
            answers = [1] * len(commands)
            self.reset()
            return answers
        return real_execute(self, raise_on_error)

    redis.Redis.execute_command = execute_command  # type: ignore[method-assign]
    redis.client.Pipeline.execute = execute  # type: ignore[method-assign]


def check_paths(contenders: list[Contender]) -> None:
    """Make sure the op-celery contenders take the fast path, but the "Celery path" one."""
    from op_celery import _publish

    real = _publish._send
    calls: list[int] = []

    def counting(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return real(*a, **k)

    _publish._send = counting
    by_name = {c.name: c for c in contenders}
    try:
        by_name["op-celery"].call()
        by_name["op-celery, outbox off"].call()
        by_name["op-celery, Celery path"].call()
    finally:
        _publish._send = real
    if len(calls) != 2:
        raise RuntimeError("the fast path was not taken as expected; the comparison is void")


def run_once(contenders: list[Contender], rounds: int) -> dict[str, dict[str, float]]:
    for contender in contenders:
        contender.latencies = []
    for round_index in range(rounds):
        shift = round_index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            gc.collect()
            time_calls(contender.call, contender.calls_per_round, contender.latencies)
            contender.after_chunk()
    return {
        c.name: {
            "calls": len(c.latencies),
            "median_us": median(c.latencies) * 1e6,
            "p99_us": percentile(c.latencies, 0.99) * 1e6,
        }
        for c in contenders
    }


def posthog_burst(stand_in_url: str, calls: int) -> tuple[int, float]:
    """Captures dropped by a fresh client (default settings) in a burst; and the burst's time."""
    import posthog

    ph = posthog.Posthog("phc_burst", host=stand_in_url)
    quiet_posthog()
    dropped = 0
    started = time.perf_counter()
    for _ in range(calls):
        if ph.capture(NAME, distinct_id=PROFILE_ID, properties=PROPERTIES) is None:
            dropped += 1
    elapsed = time.perf_counter() - started
    ph.shutdown()
    return dropped, elapsed


def print_table(title: str, stats: dict[str, dict[str, float]]) -> None:
    bare = stats["bare Celery"]
    ping = stats["Redis PING"]["median_us"]
    print(f"\n{title}")
    print(f"{'contender':34s} {'calls':>6s} {'median µs':>10s} {'p99 µs':>9s} "
          f"{'÷bare med':>9s} {'÷bare p99':>9s} {'PINGs':>6s}")  # fmt: skip
    for name, row in stats.items():
        print(
            f"{name:34s} {row['calls']:6.0f} {row['median_us']:10.1f} {row['p99_us']:9.1f} "
            f"{row['median_us'] / bare['median_us']:9.2f} {row['p99_us'] / bare['p99_us']:9.2f} "
            f"{row['median_us'] / ping:6.1f}"
        )


@dataclass
class Summary:
    runs: list[dict[str, dict[str, float]]]

    def medians(self) -> dict[str, dict[str, float]]:
        names = self.runs[0].keys()
        keys = ("calls", "median_us", "p99_us")
        return {n: {k: median([run[n][k] for run in self.runs]) for k in keys} for n in names}

    def ratio(self, key: str) -> Iterator[float]:
        for run in self.runs:
            yield run["op-celery"][key] / run["bare Celery"][key]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="timed calls per contender")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved chunks per run")
    parser.add_argument("--runs", type=int, default=3, help="repeated runs; medians reported")
    parser.add_argument("--post-calls", type=int, default=4_000, help="requests.post per run")
    parser.add_argument(
        "--python-only",
        action="store_true",
        help="answer every LPUSH in this process (no round trip): the Python cost alone",
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    if min(args.calls, args.rounds, args.runs, args.post_calls) < 1:
        parser.error("sizes must be positive")

    print(describe_machine())
    print(" ".join(["python", *sys.argv]))
    with redis_namespace(args.redis_url) as namespace, stand_in_server() as stand_in:
        # Before the package app is made: it reads its settings from the environment.
        os.environ.update(broker_env(namespace, namespace.queue("op")))
        contenders, close = make_contenders(args, namespace, stand_in.url)
        try:
            check_paths(contenders)
            if args.python_only:
                contenders = [
                    c for c in contenders if "posthog" not in c.name and "post" not in c.name
                ]
                answer_lpush_locally()
            for contender in contenders:
                time_calls(
                    contender.call,
                    WARMUP_CALLS // 3 if "post" in contender.name else WARMUP_CALLS,
                    [],
                )
                contender.after_chunk()
            summary = Summary([])
            for run in range(args.runs):
                stats = run_once(contenders, args.rounds)
                summary.runs.append(stats)
                stand_in.control.reset()  # it keeps every request in memory
                print_table(f"run {run + 1} of {args.runs}", stats)
        finally:
            close()
        dropped, burst_s = (0, 0.0) if args.python_only else posthog_burst(stand_in.url, args.calls)

    medians = summary.medians()
    print_table(f"median of {args.runs} runs", medians)
    med_ratio = median(list(summary.ratio("median_us")))
    p99_ratio = median(list(summary.ratio("p99_us")))
    print(
        f"\nop-celery ÷ bare Celery: median {med_ratio:.2f}, p99 {p99_ratio:.2f} "
        f"(target ≤ 1.2, goal ≤ 0.5)"
    )
    if not args.python_only:
        print(
            f"posthog burst of {args.calls:,} captures in {burst_s:.2f} s on a fresh client: "
            f"{dropped:,} dropped by its queue (max_queue_size 10,000)"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "machine": describe_machine(),
                    "argv": sys.argv,
                    "runs": summary.runs,
                    "medians": medians,
                    "ratio_median": med_ratio,
                    "ratio_p99": p99_ratio,
                    "posthog_burst": {"calls": args.calls, "dropped": dropped, "seconds": burst_s},
                },
                out,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
