"""What one acquire costs, and whether limiters over-admit under contention.

(a) Sequential acquires per second from one process, each limiter against the same Redis, all
    granted: op-celery's :class:`RateLimiter`, ``limits`` (moving window, sliding window
    counter), ``pyrate-limiter`` (``RedisBucket``, and its GCRA ``StateBucket`` on a
    ``RedisStateStore``), and the floor: a registered ``return 1`` script, one bare ``EVALSHA``.
    ``EVALSHA`` of the same script with op-celery's two keys and two arguments shows what
    passing them costs. Rounds are interleaved; the median and the best round are kept, and
    each is also given as a ratio to the floor's. Commands per acquire are counted on the client.
    (a') Redis's own time per call (``INFO commandstats``) for the floor and for op-celery's
    script, on a private ``redis-server`` started for it, if one is on ``PATH``.

(b) Four processes contend for one key at ``--rate`` per second for ``--seconds`` each.
    Every process acquires without blocking; when refused, op-celery's processes sleep the wait
    the limiter answers, the others poll every 1 ms (their non-blocking calls give no wait).
    Reported: admissions per full 1 s window (aligned to the second) against the rate, the most
    admissions in any 1 s window, and how many a server counting ``rate`` per fixed 1 s window
    would refuse with 429. ``op-celery rate=L-1`` is set one request per window below the
    server's limit, which with the default burst of 2 keeps every window at or under it.
    op-celery's admission times are the Redis clock of each admission
    (``Acquisition.admitted_at_s``); the others' are the local clock when the call returned
    (same host as Redis), so their window maxima can be off by one.

Needs ``pip install limits pyrate-limiter`` and a Redis at ``--url``. Runs in about a minute
with the defaults and deletes every key it wrote (prefix ``op-celery-bench-*``).

    python benchmarks/acquire_cost.py [--url redis://127.0.0.1:6379/0] [--rate 100]
"""

from __future__ import annotations

import argparse
import bisect
import multiprocessing
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import limits
import limits.storage
import limits.strategies
import pyrate_limiter
import redis

from op_celery._limiter import RateLimiter
from op_celery._rates import DEFAULT_BURST, Rate

#: Acquires per timed round in (a).
ROUND_OPS = 500
#: Interleaved rounds per limiter in (a).
ROUNDS = 30
#: Calls per script when measuring Redis's own time per call in (a).
SERVER_CALLS = 20_000
#: Rate in (a), per second: high enough that every sequential acquire is granted.
COST_RATE_PER_S = 100_000
#: Poll interval of limiters that give no wait, in seconds.
POLL_S = 0.001
#: Processes contending in (b).
PROCESSES = 4

Acquire = Callable[[], bool]


# -- the contenders ----------------------------------------------------------------------------


def make_acquire(
    name: str, url: str, prefix: str, rate_per_s: int, burst: int
) -> tuple[Acquire, Any]:
    """An acquire callable for ``name`` at ``rate_per_s`` and ``burst`` (for the limiters that
    have one) on key prefix ``prefix``, and the redis client it uses (to count round trips)."""
    if name.startswith("op-celery"):
        client = redis.Redis.from_url(url)
        ours = RateLimiter(client, prefix=prefix)
        rate = Rate(limit=rate_per_s, period_s=1.0)
        return (lambda: ours.acquire("bench", rate, burst).granted), client
    if name.startswith("bare EVALSHA"):
        client = redis.Redis.from_url(url)
        sha = client.script_load("return 1")
        if name == "bare EVALSHA":
            return (lambda: client.evalsha(sha, 0) == 1), client
        keys = (f"{prefix}:{{bench}}:bucket".encode(), f"{prefix}:{{bench}}:pause".encode())
        return (lambda: client.evalsha(sha, 2, *keys, 10, 0) == 1), client
    if name.startswith("limits"):
        storage = limits.storage.RedisStorage(url, key_prefix=prefix)
        strategy = {
            "limits moving window": limits.strategies.MovingWindowRateLimiter,
            "limits sliding window counter": limits.strategies.SlidingWindowCounterRateLimiter,
        }[name](storage)
        item = limits.RateLimitItemPerSecond(rate_per_s)
        return (lambda: strategy.hit(item, "bench")), storage.get_connection()
    if name.startswith("pyrate"):
        client = redis.Redis.from_url(url)
        rates = [pyrate_limiter.Rate(rate_per_s, pyrate_limiter.Duration.SECOND, burst=burst)]
        bucket: pyrate_limiter.AbstractBucket
        if name == "pyrate RedisBucket":
            bucket = pyrate_limiter.RedisBucket.init(rates, client, f"{prefix}:pyrate")
        else:
            store = pyrate_limiter.RedisStateStore(client, f"{prefix}:pyrate-gcra")
            bucket = pyrate_limiter.StateBucket(rates, pyrate_limiter.GCRA(), store)
        limiter = pyrate_limiter.Limiter(bucket)
        return (lambda: bool(limiter.try_acquire("bench", blocking=False))), client
    raise ValueError(name)


COST_CONTENDERS = [
    "bare EVALSHA",
    "bare EVALSHA, 2 keys + 2 args",
    "op-celery",
    "limits moving window",
    "limits sliding window counter",
    "pyrate RedisBucket",
    "pyrate GCRA StateBucket",
]
CONTENTION_CONTENDERS = [
    "op-celery",
    "op-celery rate=L-1",
    "op-celery burst=1",
    "op-celery burst=L",
    "limits moving window",
    "limits sliding window counter",
    "pyrate RedisBucket",
    "pyrate GCRA StateBucket",
]


def round_trips_per_acquire(acquire: Acquire, client: Any, ops: int = 200) -> float:
    """Commands sent per acquire, counted by wrapping the client's ``execute_command``."""
    sent = 0
    real = client.execute_command

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal sent
        sent += 1
        return real(*args, **kwargs)

    client.execute_command = counting
    try:
        for _ in range(ops):
            acquire()
    finally:
        del client.execute_command
    return sent / ops


def cost(url: str, prefix: str) -> list[str]:
    """Part (a): median microseconds per sequential acquire, per contender."""
    acquires = {}
    trips = {}
    for name in COST_CONTENDERS:
        # pyrate's clock ticks in milliseconds: a burst of 1 would refuse the second acquire
        # within a millisecond, so (a) gives every limiter a burst that never refuses.
        acquire, client = make_acquire(
            name, url, f"{prefix}-a", COST_RATE_PER_S, burst=COST_RATE_PER_S
        )
        for _ in range(200):
            assert acquire(), f"{name} refused during warm-up"
        trips[name] = round_trips_per_acquire(acquire, client)
        acquires[name] = acquire
    per_op_us: dict[str, list[float]] = {name: [] for name in COST_CONTENDERS}
    for _ in range(ROUNDS):
        for name, acquire in acquires.items():
            refused = 0
            started = time.perf_counter()
            for _ in range(ROUND_OPS):
                if not acquire():
                    refused += 1
            elapsed = time.perf_counter() - started
            assert not refused, f"{name} refused {refused} in (a)"
            per_op_us[name].append(elapsed / ROUND_OPS * 1e6)
    floor_median = statistics.median(per_op_us["bare EVALSHA"])
    floor_best = min(per_op_us["bare EVALSHA"])
    lines = [
        "| limiter | acquires/s (median round) | µs per acquire: median (best) of rounds "
        "| × bare EVALSHA: median (best) | commands per acquire |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in COST_CONTENDERS:
        median, best = statistics.median(per_op_us[name]), min(per_op_us[name])
        lines.append(
            f"| {name} | {1e6 / median:,.0f} | {median:.1f} ({best:.1f}) "
            f"| {median / floor_median:.2f} ({best / floor_best:.2f}) | {trips[name]:g} |"
        )
    return lines


# -- contention --------------------------------------------------------------------------------


def contend(
    name: str,
    url: str,
    prefix: str,
    rate_per_s: int,
    burst: int,
    start: Any,
    seconds: float,
    results: Any,
) -> None:
    """One of the contending processes: acquire until ``seconds`` are over."""
    admitted: list[float] = []
    if name.startswith("op-celery"):
        ours = RateLimiter(redis.Redis.from_url(url), prefix=prefix)
        rate = Rate(limit=rate_per_s, period_s=1.0)
        start.wait()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            answer = ours.acquire("bench", rate, burst)
            if answer.granted:
                assert answer.admitted_at_s is not None
                admitted.append(answer.admitted_at_s)
            else:
                time.sleep(min(answer.wait_s, max(0.0, deadline - time.monotonic())))
    else:
        acquire, _ = make_acquire(name, url, prefix, rate_per_s, burst)
        start.wait()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if acquire():
                admitted.append(time.time())
            else:
                time.sleep(POLL_S)
    results.put(admitted)


def limiter_rate(name: str, rate_per_s: int) -> int:
    """The rate a contender is set to in (b): the server's, or one less per window."""
    return rate_per_s - 1 if name.endswith("rate=L-1") else rate_per_s


def contention_burst(name: str, rate_per_s: int) -> int:
    """The burst a contender runs with in (b): its name says, else op-celery's default."""
    if name.endswith("burst=L"):
        return rate_per_s
    if name.endswith("burst=1"):
        return 1
    return DEFAULT_BURST


def max_in_any_window(times: list[float], window_s: float) -> int:
    times = sorted(times)
    return max(
        (bisect.bisect_left(times, t + window_s) - i for i, t in enumerate(times)), default=0
    )


def contention(url: str, prefix: str, rate_per_s: int, seconds: float) -> list[str]:
    """Part (b): admissions of PROCESSES processes on one key, per contender."""
    context = multiprocessing.get_context("spawn")
    lines = [
        f"| limiter ({PROCESSES} processes, {rate_per_s}/s, {seconds:g} s each) | burst "
        "| admitted (first to last) | per full 1 s window: mean (min–max) | % of rate "
        f"| max in any 1 s window | 429s from a fixed-window server of {rate_per_s}/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for index, name in enumerate(CONTENTION_CONTENDERS):
        key_prefix = f"{prefix}-b{index}"
        burst = contention_burst(name, rate_per_s)
        start = context.Event()
        results = context.Queue()
        workers = [
            context.Process(
                target=contend,
                args=(
                    name,
                    url,
                    key_prefix,
                    limiter_rate(name, rate_per_s),
                    burst,
                    start,
                    seconds,
                    results,
                ),
            )
            for _ in range(PROCESSES)
        ]
        for worker in workers:
            worker.start()
        time.sleep(1.0)  # let the spawned interpreters import before the start signal
        start.set()
        times = sorted(t for _ in workers for t in results.get(timeout=seconds + 60))
        for worker in workers:
            worker.join(timeout=30)
        per_window = Counter(int(t) for t in times)
        refused = sum(max(0, count - rate_per_s) for count in per_window.values())
        # The first and last windows are cut by the start and the end of the run.
        full = [per_window[second] for second in sorted(per_window)[1:-1]] or [0]
        mean = statistics.mean(full)
        has_burst = name.startswith(("op-celery", "pyrate GCRA"))
        lines.append(
            f"| {name} | {burst if has_burst else '–'} "
            f"| {len(times)} ({times[-1] - times[0] if times else 0:.2f} s) "
            f"| {mean:.1f} ({min(full)}–{max(full)}) | {100 * mean / rate_per_s:.1f} % "
            f"| {max_in_any_window(times, 1.0)} "
            f"| {refused} ({100 * refused / max(1, len(times)):.2f} %) |"
        )
    return lines


def server_cost() -> list[str]:
    """Part (a'): Redis's own microseconds per EVALSHA (INFO commandstats) on a private
    redis-server, so nobody else's commands count; started here and killed by its PID."""
    executable = shutil.which("redis-server")
    if executable is None:
        return ["(skipped: no redis-server on PATH)"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [executable, "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        sha = client.script_load("return 1")
        ours = RateLimiter(client)
        rate = Rate(limit=COST_RATE_PER_S, period_s=1.0)
        calls: dict[str, Callable[[], object]] = {
            "bare EVALSHA": lambda: client.evalsha(sha, 0),
            "op-celery acquire": lambda: ours.acquire("bench", rate, COST_RATE_PER_S),
        }
        lines = ["| script | Redis µs per EVALSHA |", "|---|---:|"]
        for name, call in calls.items():
            call()
            client.config_resetstat()
            for _ in range(SERVER_CALLS):
                call()
            stats = client.info("commandstats")["cmdstat_evalsha"]
            lines.append(f"| {name} | {stats['usec_per_call']:.2f} |")
        client.close()
        return lines
    finally:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rate", type=int, default=100, help="per second, part (b)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per limiter, part (b)")
    arguments = parser.parse_args()
    prefix = f"op-celery-bench-{secrets.token_hex(4)}"
    client = redis.Redis.from_url(arguments.url)
    try:
        print(
            f"Python {platform.python_version()}, redis-py {redis.__version__}, "
            f"Redis {client.info('server')['redis_version']}, limits {limits.__version__}, "
            f"pyrate-limiter {pyrate_limiter.__version__}, {multiprocessing.cpu_count()} CPUs\n"
        )
        print("(a) sequential acquires, one process\n")
        print("\n".join(cost(arguments.url, prefix)), end="\n\n", flush=True)
        print("(a') time spent inside Redis, private redis-server\n")
        print("\n".join(server_cost()), end="\n\n", flush=True)
        print("(b) contention on one key\n")
        print("\n".join(contention(arguments.url, prefix, arguments.rate, arguments.seconds)))
    finally:
        keys = list(client.scan_iter(match=f"*{prefix}*"))
        if keys:
            client.delete(*keys)
        print(f"\ndeleted {len(keys)} keys")


if __name__ == "__main__":
    main()
