"""How many events per second does a worker pool deliver?

The question: does op-celery's worker deliver at least 0.9 times what a naive Celery task
doing a bare ``requests.post`` delivers, with the same pool settings, and does its throughput
grow with the number of workers? Which pool and concurrency should the README recommend?

Method: the stand-in OpenPanel server runs in its own process (``python -m op_celery.testing``,
no rate limit). For each configuration (pool, concurrency, worker processes) and each of
op-celery (``celery -A op_celery.worker worker``) and the naive task
(``celery -A _naive_app worker``, see ``_naive_app.py``): ``--events`` track events are
enqueued on a fresh queue, the worker(s) are started with ``--pool``, ``--concurrency`` and
``--loglevel WARNING``, and the stand-in's arrival times give the delivery rate, counted from
the first ``--skip`` fraction of arrivals on (worker start-up and pool ramp-up excluded).
op-celery and the naive task alternate which goes first. ``--latency-ms`` makes the stand-in
answer late, as a distant API does: then concurrency, not CPU, bounds the rate. Every worker,
the stand-in and every Redis key of the run (under a private prefix) are removed at the end.

op-celery does per event what the naive task does not: validation on the worker, a
delivered-events ledger (a claim and a mark: two Redis round trips), the outbox (one more, to
forget the event's record; measured apart as ``op-celery-outbox-off``), late acknowledgement,
keep-alive connections.
The machine's cores are shared by the workers, the stand-in, Redis and this script.

    python benchmarks/delivery.py [--events 4000] [--repeat 3] [--configs prefork:1,threads:4x2]
    python benchmarks/delivery.py --latency-ms 50 --events 1500 --configs threads:8,threads:32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

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
    median,
    redis_namespace,
    stand_in_server,
)

DEFAULT_CONFIGS = (
    "prefork:1,prefork:2,prefork:4,threads:1,threads:2,threads:4,threads:8,threads:4x2"
)
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0"
PROPERTIES = {"value": 129.5, "currency": "EUR", "items": 3, "path": "/checkout/complete"}
#: Seconds to wait, per event, for a configuration to deliver everything (plus a fixed 60 s).
TIMEOUT_PER_EVENT_S = 0.05


@dataclass(frozen=True)
class Config:
    pool: str
    concurrency: int
    processes: int

    @classmethod
    def parse(cls, text: str) -> Config:
        """``pool:concurrency`` or ``pool:concurrencyxprocesses`` (``threads:4x2``)."""
        pool, _, rest = text.partition(":")
        concurrency, _, processes = rest.partition("x")
        if pool not in ("prefork", "threads", "solo") or not concurrency.isdigit():
            raise argparse.ArgumentTypeError(f"expected POOL:N or POOL:NxP, got {text!r}")
        return cls(pool, int(concurrency), int(processes or 1))

    def __str__(self) -> str:
        extra = f" x {self.processes} processes" if self.processes > 1 else ""
        return f"{self.pool} -c {self.concurrency}{extra}"


#: op-celery's worker with OP_CELERY_OUTBOX=off: what the outbox costs the worker.
OUTBOX_OFF = "op-celery-outbox-off"
#: What each configuration runs, in an order rotated per configuration and run.
KINDS = ["op-celery", OUTBOX_OFF, "naive"]


def enqueue(kind: str, queue: str, count: int) -> None:
    import op_celery
    from op_celery._app import package_app

    app = package_app()
    for i in range(count):
        properties = {**PROPERTIES, "n": i}
        if kind.startswith("op-celery"):
            kwargs = {
                "properties": properties,
                "profile_id": f"user-{i % 100}",
                "user_agent": USER_AGENT,
            }
            op_celery.track.apply_async(("checkout_completed",), kwargs, queue=queue)
        else:
            body = {
                "type": "track",
                "payload": {
                    "name": "checkout_completed",
                    "properties": properties,
                    "profileId": f"user-{i % 100}",
                },
            }
            app.send_task(
                "naive.track", kwargs={"body": body, "user_agent": USER_AGENT}, queue=queue
            )


def worker_env(namespace: Namespace, queue: str, stand_in: StandIn) -> dict[str, str]:
    return clean_env(
        {
            **broker_env(namespace, queue),
            "OPENPANEL_CLIENT_ID": CLIENT_ID,
            "OPENPANEL_CLIENT_SECRET": CLIENT_SECRET,
            "OPENPANEL_API_URL": stand_in.url,
        }
    )


def measure(
    kind: str,
    config: Config,
    args: argparse.Namespace,
    namespace: Namespace,
    stand_in: StandIn,
) -> dict[str, Any]:
    events, skip = args.events, args.skip
    queue = namespace.queue(f"{kind}-{config.pool}-{config.concurrency}")
    namespace.delete(queue)
    enqueue(kind, queue, events)
    stand_in.control.reset()  # also clears the latency
    if args.latency_ms:
        stand_in.control.set_latency(args.latency_ms / 1000)
    app = "op_celery.worker" if kind.startswith("op-celery") else "_naive_app"
    env = worker_env(namespace, queue, stand_in)
    if kind == OUTBOX_OFF:
        env["OP_CELERY_OUTBOX"] = "off"  # the worker forgets no records: the outbox's cost
    timeout_s = 60 + events * TIMEOUT_PER_EVENT_S
    with ExitStack() as stack:
        workers = [
            stack.enter_context(Worker(app, queue, config.pool, config.concurrency, env))
            for _ in range(config.processes)
        ]
        deadline = time.monotonic() + timeout_s
        while stand_in.control.stats()["received"] < events:
            if time.monotonic() > deadline:
                break
            for worker in workers:
                worker.check_alive()
            time.sleep(0.2)
    stats = stand_in.control.stats()
    arrivals = sorted(r.at for r in stand_in.control.received())
    namespace.delete(queue)
    first = int(len(arrivals) * skip)
    span = arrivals[-1] - arrivals[first] if len(arrivals) > first + 1 else float("nan")
    rate = (len(arrivals) - 1 - first) / span if span > 0 else float("nan")
    return {
        "delivered": stats["received"],
        "requests": stats["requests"],
        "events_per_s": rate,
        "seconds": arrivals[-1] - arrivals[0] if arrivals else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=4_000, help="events per configuration")
    parser.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help="comma-separated POOL:CONCURRENCY[xPROCESSES], e.g. prefork:2,threads:4x2",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of every configuration")
    parser.add_argument(
        "--skip", type=float, default=0.05, help="fraction of first arrivals not counted"
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="the stand-in waits this long before each answer, as a distant API would",
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    configs = [Config.parse(text) for text in args.configs.split(",") if text]
    if args.events < 10 or args.repeat < 1 or not 0 <= args.skip < 0.5:
        parser.error("need --events >= 10, --repeat >= 1 and 0 <= --skip < 0.5")

    print(describe_machine())
    print(" ".join(["python", *sys.argv]))
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with redis_namespace(args.redis_url) as namespace, stand_in_server() as stand_in:
        os.environ.update(broker_env(namespace, namespace.queue("unused")))
        for run in range(args.repeat):
            for index, config in enumerate(configs):
                shift = (index + run) % len(KINDS)
                kinds = KINDS[shift:] + KINDS[:shift]
                row = results.setdefault(str(config), {kind: [] for kind in KINDS})
                for kind in kinds:
                    figures = measure(kind, config, args, namespace, stand_in)
                    row[kind].append(figures)
                    print(
                        f"run {run + 1}, {config}, {kind}: {figures['events_per_s']:.0f} "
                        f"events/s ({figures['delivered']} delivered, "
                        f"{figures['requests']} requests)",
                        flush=True,
                    )

    latency = f", stand-in latency {args.latency_ms:g} ms" if args.latency_ms else ""
    print(f"\nmedian events/s of {args.repeat} run(s), {args.events:,} events each{latency}")
    print(
        f"{'configuration':28s} {'op-celery':>10s} {'outbox off':>11s} {'naive':>8s} "
        f"{'ratio':>6s} {'outbox off ratio':>17s}"
    )
    summary: dict[str, dict[str, float]] = {}
    for name, row in results.items():
        op = median([r["events_per_s"] for r in row["op-celery"]])
        off = median([r["events_per_s"] for r in row[OUTBOX_OFF]])
        naive = median([r["events_per_s"] for r in row["naive"]])
        summary[name] = {
            "op-celery": op, OUTBOX_OFF: off, "naive": naive, "ratio": op / naive,
            "outbox_off_ratio": off / naive,
        }  # fmt: skip
        print(
            f"{name:28s} {op:10.0f} {off:11.0f} {naive:8.0f} {op / naive:6.2f} {off / naive:17.2f}"
        )
    lost = [
        (name, kind)
        for name, row in results.items()
        for kind, runs in row.items()
        for r in runs
        if r["delivered"] < args.events
    ]
    if lost:
        print(f"INCOMPLETE (timed out): {lost}")
    if args.json:
        with open(args.json, "w") as out:
            figures = {"argv": sys.argv, "runs": results, "summary": summary}
            json.dump({"machine": describe_machine(), **figures}, out, indent=2)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
