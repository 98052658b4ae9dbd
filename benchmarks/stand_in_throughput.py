"""How many requests per second does the stand-in OpenPanel server answer?

The question: is `op_celery.testing.StandInServer` fast enough never to be the bottleneck of a
benchmark (target: well over 1,000 requests/s on keep-alive connections)?

Method: start ``python -m op_celery.testing`` in its own process (as the other benchmarks do),
then send a bounded number of valid ``track`` events from a few threads, one
``requests.Session`` (one keep-alive connection) each, and report requests/s and latency
percentiles. The client shares the machine's cores with the server, so the number is a lower
bound on what the server alone can do; on Linux the script also reads the server process's CPU
time, whose inverse estimates the server's own capacity on one core. ``--in-process`` runs the
server in this process instead (server and client then also share one GIL).

    python benchmarks/stand_in_throughput.py [--requests 20000] [--threads 4] [--in-process]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import requests

from op_celery.testing import StandInControl, StandInServer

CLIENT_ID = "5b2c6a0e-3f4d-4e8a-9b1c-2d3e4f5a6b7c"
SECRET = "sec_benchmark"
#: Longest wait for the server process to print its URL, in seconds.
STARTUP_TIMEOUT_SECONDS = 15.0


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid``, from /proc (Linux only; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def server_in_subprocess() -> Iterator[tuple[str, int]]:
    """Run the stand-in in its own process; yield its URL and pid; SIGTERM it afterwards."""
    command = [sys.executable, "-m", "op_celery.testing", "--port", "0"]
    command += ["--client", f"{CLIENT_ID}:{SECRET}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        line = process.stdout.readline()  # the server prints this line once it listens
        if not line.startswith("OPENPANEL_API_URL=") or time.monotonic() > deadline:
            raise RuntimeError(f"stand-in did not start: {line!r}")
        yield line.strip().split("=", 1)[1], process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def server_in_process() -> Iterator[tuple[str, int]]:
    with StandInServer({CLIENT_ID: SECRET}) as server:
        yield server.url, os.getpid()


def run(url: str, total: int, threads: int) -> tuple[float, list[float], int]:
    """Send ``total`` events from ``threads`` sessions; (seconds, latencies, failures)."""
    per_thread = total // threads
    latencies: list[list[float]] = [[] for _ in range(threads)]
    failures = [0] * threads
    barrier = threading.Barrier(threads + 1)
    headers = {"openpanel-client-id": CLIENT_ID, "openpanel-client-secret": SECRET}
    body = {"type": "track", "payload": {"name": "benchmark", "properties": {"n": 1}}}

    def worker(index: int) -> None:
        session = requests.Session()
        session.trust_env = False  # no proxy lookups for loopback traffic
        session.post(f"{url}/track", json=body, headers=headers)  # open the connection
        barrier.wait()
        mine = latencies[index]
        for _ in range(per_thread):
            started = time.perf_counter()
            response = session.post(f"{url}/track", json=body, headers=headers)
            mine.append(time.perf_counter() - started)
            if response.status_code != 200:
                failures[index] += 1
        session.close()

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - started
    return elapsed, [x for chunk in latencies for x in chunk], sum(failures)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="total, bounded")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--in-process", action="store_true")
    args = parser.parse_args()

    start_server = server_in_process if args.in_process else server_in_subprocess
    with start_server() as (url, pid):
        cpu_before = cpu_seconds(pid)
        elapsed, latencies, failures = run(url, args.requests, args.threads)
        cpu_after = cpu_seconds(pid)
        stats = StandInControl(url).stats()
    sent = len(latencies)
    quantiles = statistics.quantiles(latencies, n=100)
    print(f"server: {'in-process' if args.in_process else 'own process'}, cpus: {os.cpu_count()}")
    print(f"threads: {args.threads}, requests: {sent}, non-200: {failures}")
    # The stats request itself came on one more connection.
    connections = stats["connections"] - 1
    print(f"connections the senders opened: {connections} (keep-alive: 1 per thread)")
    print(f"throughput: {sent / elapsed:,.0f} requests/s over {elapsed:.2f} s")
    print(f"latency: p50 {quantiles[49] * 1000:.2f} ms, p99 {quantiles[98] * 1000:.2f} ms")
    if cpu_before is not None and cpu_after is not None and not args.in_process:
        per_request = (cpu_after - cpu_before) / sent
        print(
            f"server CPU: {per_request * 1e6:.0f} us/request, so about "
            f"{1 / per_request:,.0f} requests/s per core if the senders were free"
        )
    return 0 if failures == 0 and connections == args.threads else 1


if __name__ == "__main__":
    sys.exit(main())
