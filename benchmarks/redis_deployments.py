"""The package's Redis past one server: what the ledger costs on each deployment, and what a
failover behind Sentinel does to a running pool.

(a) Cost, one process, sequential calls: a ledger claim + mark (``Ledger.claim`` then
    ``Ledger.record``, two ``EVALSHA``) and a limiter acquire, against a bare ``PING`` and a
    ``GET`` of one key (routed by slot on a cluster, as the scripts are) of the same client,
    on a private standalone ``redis-server``, a 3-master Redis Cluster, and a master + replica
    behind 3 sentinels (``tests/_deployments.py``), all on this host. Rounds
    interleave the operations; the median round is kept. On the cluster the limiter's acquire
    is the ordinary script call (no single connection pool to pack the command on).

(b) Failover: ``--events`` track events enqueued on the shared Redis (a private prefix), two
    ``celery -A op_celery.worker worker`` processes (threads) at ``OPENPANEL_RATE_LIMIT``
    ``--rate``, the stand-in counting that limit per fixed window (429 above it), and the
    package's Redis (ledger, limiter, dead letters) a master + replica behind 3 sentinels. The
    master is SIGKILLed (``--graceful``: ``SENTINEL FAILOVER``, which leaves it running until
    the sentinels demote it) once ``--kill-after`` of the events were delivered. Reported: events
    delivered, duplicates, 429s, dead letters, retries logged for an unavailable Redis, the
    longest gap between two deliveries, and how long the sentinels took to promote.

    python benchmarks/redis_deployments.py [--events 3000] [--rate 100] [--kill-after 0.3]

Every process it starts is stopped by PID and every key it wrote on the shared Redis deleted.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests._deployments: the deployments the tests start

from _harness import (  # noqa: E402
    CLIENT_ID,
    CLIENT_SECRET,
    DEFAULT_REDIS_URL,
    StandIn,
    Worker,
    _stop,
    clean_env,
    describe_machine,
    redis_namespace,
)

from op_celery import _redis  # noqa: E402
from op_celery._ledger import Ledger  # noqa: E402
from op_celery._limiter import RateLimiter  # noqa: E402
from op_celery._rates import parse_rate  # noqa: E402
from op_celery._settings import load_settings  # noqa: E402
from op_celery.dead_letters import DeadLetterStore  # noqa: E402
from op_celery.testing import StandInControl  # noqa: E402
from tests._deployments import Cluster, SentinelGroup  # noqa: E402
from tests._support import RedisServer  # noqa: E402

#: Calls per operation in one round of (a), and rounds.
ROUND_OPS = 300
ROUNDS = 9
#: Worker threads per worker in (b).
CONCURRENCY = 8


def _timed(call: Callable[[], Any], count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        call()
    return (time.perf_counter() - started) / count * 1e6


def cost(name: str, url: str, with_limiter: bool, **env: str) -> dict[str, float]:
    """Median µs per PING, per claim + mark, per acquire on ``url``."""
    _redis._clients.clear()
    settings = load_settings(
        env={"OP_CELERY_REDIS_URL": url, "OP_CELERY_KEY_PREFIX": f"opc-bench-{name}", **env}
    )
    client = _redis.redis_for(settings)
    ledger = Ledger(settings)
    limiter = RateLimiter(client, prefix=settings.key_prefix) if with_limiter else None
    rate = parse_rate("1000000/s")
    counter = iter(range(10**9))

    def claim_and_mark() -> None:
        event_id = f"bench-{next(counter)}"
        ledger.claim(event_id, ttl_s=30)
        ledger.record(event_id)

    operations: dict[str, Callable[[], Any]] = {
        "ping": client.ping,
        # A keyed command: on a cluster the client routes it by slot, as it routes the scripts.
        "get": lambda: client.get(f"{settings.key_prefix}:{{bench-{next(counter)}}}:delivered"),
        "claim+mark": claim_and_mark,
    }
    if limiter is not None:
        operations["acquire"] = lambda: limiter.acquire("bench-client", rate)
    for call in operations.values():  # warm up: connections, scripts loaded
        _timed(call, 50)
    rounds: dict[str, list[float]] = {key: [] for key in operations}
    for _ in range(ROUNDS):
        for key, call in operations.items():
            rounds[key].append(_timed(call, ROUND_OPS))
    return {key: statistics.median(values) for key, values in rounds.items()}


def part_a() -> None:
    print("(a) µs per call, median of", ROUNDS, "rounds of", ROUND_OPS)
    rows = []
    with RedisServer() as server:
        rows.append(("standalone", cost("standalone", server.url, True)))
    with Cluster() as cluster:
        rows.append(("cluster (3 masters)", cost("cluster", cluster.url, True)))
    with SentinelGroup() as group:
        rows.append(("sentinel (1+1, 3 sentinels)", cost("sentinel", group.url, True)))
    print("| deployment | PING | GET | claim + mark | ÷ 2 GET | acquire | ÷ GET |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in rows:
        ping, get, both = row["ping"], row["get"], row["claim+mark"]
        acquire = row.get("acquire")
        acquire_text = "n/a | n/a" if acquire is None else f"{acquire:.0f} | {acquire / get:.2f}×"
        print(f"| {name} | {ping:.0f} | {get:.0f} | {both:.0f} | {both / (2 * get):.2f}× "
              f"| {acquire_text} |")  # fmt: skip


@contextmanager
def limited_stand_in(rate: str) -> Iterator[StandIn]:
    command = [sys.executable, "-m", "op_celery.testing", "--port", "0", "--quiet"]
    command += ["--client", f"{CLIENT_ID}:{CLIENT_SECRET}", "--rate-limit", rate]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("OPENPANEL_API_URL="):
            raise RuntimeError(f"the stand-in did not start: {line!r}")
        url = line.strip().split("=", 1)[1]
        yield StandIn(url, process.pid, StandInControl(url))
    finally:
        _stop(process, group=False)


def part_b(events: int, rate: int, kill_after: float, broker_url: str, graceful: bool) -> None:
    how = "SENTINEL FAILOVER" if graceful else "SIGKILL"
    if kill_after >= 1:
        how = "left alone (no failover)"
    print(f"(b) {events} events at {rate}/s, 2 workers x {CONCURRENCY} threads, the package's "
          f"Redis behind Sentinel, its master: {how} at {kill_after:.0%} delivered")  # fmt: skip
    from celery import Celery

    import op_celery

    with (
        SentinelGroup() as group,
        limited_stand_in(f"{rate}/s") as stand_in,
        redis_namespace(broker_url) as namespace,
    ):
        queue = namespace.queue("failover")
        env = clean_env(
            {
                "OPENPANEL_CLIENT_ID": CLIENT_ID,
                "OPENPANEL_CLIENT_SECRET": CLIENT_SECRET,
                "OPENPANEL_API_URL": stand_in.url,
                "OPENPANEL_RATE_LIMIT": f"{rate}/s",
                "OP_CELERY_BROKER_URL": broker_url,
                "OP_CELERY_BROKER_KEY_PREFIX": namespace.prefix,
                "OP_CELERY_REDIS_URL": group.url,
                "OP_CELERY_KEY_PREFIX": namespace.prefix + "op-celery",
                "OP_CELERY_QUEUE": queue,
            }
        )
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env["PYTHONPATH"]])
        app = Celery("failover-producer", set_as_current=True)
        app.conf.update(
            broker_url=broker_url,
            broker_transport_options={"global_keyprefix": namespace.prefix},
            op_celery_queue=queue,
            task_ignore_result=True,
        )
        for i in range(events):
            op_celery.track.delay(f"fo-{i}", properties={"i": i})
        workers = [Worker("op_celery.worker", queue, "threads", CONCURRENCY, env) for _ in "ab"]
        for worker in workers:
            worker.command[worker.command.index("WARNING")] = "INFO"
            worker.start()
        try:
            control = stand_in.control
            started = time.monotonic()
            while control.stats()["received"] < events * min(kill_after, 1.0):
                time.sleep(0.05)
                if time.monotonic() - started > 600:
                    raise RuntimeError("no progress")
            promoted_s = float("nan")
            if kill_after < 1:
                old = group.master_port()
                killed_at = time.monotonic()
                if graceful:
                    group.failover()  # SENTINEL FAILOVER: the old master lives on, to be demoted
                else:
                    group.kill(old)
                group.wait_for_new_master(old)
                promoted_s = time.monotonic() - killed_at
            deadline = time.monotonic() + max(120.0, 3 * events / rate)
            while time.monotonic() < deadline:
                names = {r.payload["name"] for r in control.received()}
                if len(names) >= events:
                    break
                time.sleep(0.5)
            time.sleep(2.0)  # late duplicates, if any
            received = control.received()
            counts = control.counts()
            logs = "".join(w.log_path.read_text(errors="replace") for w in workers)
        finally:
            for worker in workers:
                worker.stop()
            app.close()
        _redis._clients.clear()
        settings = load_settings(
            env={
                "OP_CELERY_REDIS_URL": group.url,
                "OP_CELERY_KEY_PREFIX": env["OP_CELERY_KEY_PREFIX"],
            }
        )
        dead = len(DeadLetterStore(settings))
    names = [r.payload["name"] for r in received]
    times = sorted(r.at for r in received)
    gap = max((b - a for a, b in itertools.pairwise(times)), default=0.0)
    requests = sum(counts.values())
    print(f"delivered {len(set(names))} of {events}; duplicates {len(names) - len(set(names))}; "
          f"429s {counts.get(429, 0)} of {requests} requests "
          f"({counts.get(429, 0) / max(1, requests):.2%}); dead letters {dead}")  # fmt: skip
    if kill_after < 1:
        print(f"sentinels promoted the replica {promoted_s:.1f} s after the {how}")
    print(f"longest gap between two deliveries {gap:.2f} s; run {times[-1] - times[0]:.1f} s")
    unavailable = logs.count("StorageUnavailable") + logs.count("LimiterUnavailable")
    retries, given_up = logs.count("retry: Retry in"), logs.count("given up")
    print(f"worker logs: {unavailable} lines naming an unavailable Redis, {retries} retries, "
          f"{given_up} given up")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--kill-after", type=float, default=0.3, help="1 or more: no failover")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="the shared broker")
    parser.add_argument("--part", choices=["a", "b", "ab"], default="ab")
    parser.add_argument("--graceful", action="store_true", help="SENTINEL FAILOVER, no SIGKILL")
    args = parser.parse_args()
    print(describe_machine())
    if "a" in args.part:
        part_a()
    if "b" in args.part:
        part_b(args.events, args.rate, args.kill_after, args.redis_url, args.graceful)


if __name__ == "__main__":
    main()
