"""Does a worker's memory stay flat as it delivers events?

The question: is a worker's resident set size (RSS) after 100,000 events within 10 % of its RSS
after 10,000 (no growth per event: no cache, ledger or client state that keeps every event)?

Method: one ``celery -A op_celery.worker worker`` (``--pool threads --concurrency 4`` unless
told otherwise) delivers to the stand-in OpenPanel server, which runs in its own process.
Events are enqueued in chunks of ``--chunk``; after each chunk is fully delivered the stand-in
forgets what it received (it keeps every request in memory otherwise), and at every multiple of
``--checkpoint`` the worker's RSS is read from ``/proc`` (with the threads pool the worker is
one process). The run stops early at ``--max-seconds`` and says how far it got. The worker, the
stand-in and every Redis key of the run are removed at the end.

    python benchmarks/memory.py [--events 100000] [--checkpoint 10000] [--chunk 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from _harness import (
    DEFAULT_REDIS_URL,
    Worker,
    broker_env,
    describe_machine,
    redis_namespace,
    rss_kib,
    stand_in_server,
    wait_for_received,
)
from delivery import enqueue, worker_env

#: Longest wait for one chunk to be delivered, in seconds per event (plus a fixed 60 s).
CHUNK_TIMEOUT_PER_EVENT_S = 0.05


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--checkpoint", type=int, default=10_000, help="read RSS every N events")
    parser.add_argument("--chunk", type=int, default=5_000, help="events enqueued at a time")
    parser.add_argument("--pool", default="threads", choices=("threads", "solo"))
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="stop early after")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.checkpoint % args.chunk or args.events % args.checkpoint:
        parser.error("--checkpoint must be a multiple of --chunk, --events of --checkpoint")

    print(describe_machine())
    print(" ".join(["python", *sys.argv]))
    started = time.monotonic()
    readings: list[tuple[int, int]] = []  # (events delivered, RSS KiB)
    with redis_namespace(args.redis_url) as namespace, stand_in_server() as stand_in:
        queue = namespace.queue("memory")
        os.environ.update(broker_env(namespace, queue))
        env = worker_env(namespace, queue, stand_in)
        with Worker("op_celery.worker", queue, args.pool, args.concurrency, env) as worker:
            delivered = 0
            while delivered < args.events:
                if time.monotonic() - started > args.max_seconds:
                    print(f"stopped at {delivered:,} events: --max-seconds reached")
                    break
                enqueue("op-celery", queue, args.chunk)
                timeout_s = 60 + args.chunk * CHUNK_TIMEOUT_PER_EVENT_S
                got = wait_for_received(stand_in.control, args.chunk, timeout_s)
                worker.check_alive()
                if got < args.chunk:
                    raise RuntimeError(f"only {got} of a chunk of {args.chunk} delivered")
                stand_in.control.reset()
                delivered += args.chunk
                if delivered % args.checkpoint == 0:
                    rss = rss_kib(worker.pid)
                    readings.append((delivered, rss))
                    rate = delivered / (time.monotonic() - started)
                    print(f"{delivered:>8,} events: RSS {rss / 1024:7.1f} MiB ({rate:.0f}/s)")

    by_count = dict(readings)
    base = by_count.get(args.checkpoint)
    last_count, last_rss = readings[-1] if readings else (0, 0)
    if base is None or last_count <= args.checkpoint:
        print("not enough events delivered to compare")
        return 1
    growth = last_rss / base - 1
    print(
        f"\nRSS after {args.checkpoint:,} events: {base / 1024:.1f} MiB; after {last_count:,}: "
        f"{last_rss / 1024:.1f} MiB; growth {growth:+.1%} (target within ±10 %)"
    )
    if args.json:
        with open(args.json, "w") as out:
            figures = {"argv": sys.argv, "readings_kib": readings, "growth": growth}
            json.dump({"machine": describe_machine(), **figures}, out, indent=2)
    return 0 if abs(growth) <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
