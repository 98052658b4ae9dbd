"""What does ``await track.adelay()`` buy an async web app, against ``.delay()`` called in the
view and ``await run_in_threadpool(track.delay, ...)``?

Method: one Starlette app, one route per contender, each tracking one event per request. The
app is driven in-process (httpx's ``ASGITransport``, so no socket or server process adds
noise) by ``--requests`` requests per contender arriving at ``--rate`` per second on schedule
(an open loop, so a blocked event loop shows in the latencies of the requests it held up),
contenders interleaved in ``--rounds``. Measured per request: its latency (p50, p99); and the
event loop's lag: a ticker coroutine sleeps 5 ms at a time and records how late it wakes (p99,
max), which is what every other request on that loop waits for.

Two brokers: the shared Redis at 127.0.0.1:6379 (private key prefix, deleted at the end), and a
silent one (it takes connections and never answers), where each publish waits out
``OP_CELERY_PUBLISH_TIMEOUT`` (set to 0.2 s here) and then spools to a temporary directory.

    python benchmarks/adelay.py [--requests 2000] [--rate 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid

import httpx
import redis
from celery import Celery
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import op_celery
from op_celery import _app

REDIS_URL = "redis://127.0.0.1:6379/0"


async def view_delay(request: Request) -> PlainTextResponse:
    op_celery.track.delay("page_view", profile_id="u1")
    return PlainTextResponse("ok")


async def view_threadpool(request: Request) -> PlainTextResponse:
    await run_in_threadpool(op_celery.track.delay, "page_view", profile_id="u1")
    return PlainTextResponse("ok")


async def view_adelay(request: Request) -> PlainTextResponse:
    await op_celery.track.adelay("page_view", profile_id="u1")
    return PlainTextResponse("ok")


ROUTES = {"delay()": "/delay", "run_in_threadpool(delay)": "/threadpool", "adelay()": "/adelay"}
APP = Starlette(
    routes=[
        Route("/delay", view_delay),
        Route("/threadpool", view_threadpool),
        Route("/adelay", view_adelay),
    ]
)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def drive(path: str, requests: int, rate: float) -> tuple[list[float], list[float], float]:
    """``requests`` GETs of ``path`` arriving at ``rate`` per second (an open loop: a request
    arrives on schedule whether or not the app is done with the others), their latencies from
    their scheduled arrival (so time the loop spent blocked counts), the loop's lags, and the
    wall time."""
    lags: list[float] = []
    latencies: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            start = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - start - 0.005)

    transport = httpx.ASGITransport(app=APP)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://app", limits=limits
    ) as client:
        began = time.perf_counter()

        async def one(index: int) -> None:
            scheduled = began + index / rate
            wait = scheduled - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            response = await client.get(path)
            latencies.append(time.perf_counter() - scheduled)
            assert response.status_code == 200, response.text

        tick = asyncio.create_task(ticker())
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - began
        done.set()
        await tick
    return latencies, lags, wall


def configure(broker_url: str, prefix: str, spool: str) -> Celery:
    os.environ.update(
        OP_CELERY_BROKER_URL=broker_url,
        OP_CELERY_BROKER_KEY_PREFIX=prefix,
        OP_CELERY_QUEUE="adelay-bench",
        OP_CELERY_PUBLISH_TIMEOUT="0.2",
        OP_CELERY_SPOOL_DIR=spool,
    )
    app = Celery("adelay-bench", set_as_current=True)
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options={"global_keyprefix": prefix},
        task_ignore_result=True,
    )
    _app.reset_settings()
    return app


def silent_broker() -> tuple[socket.socket, str]:
    """A TCP port that takes connections (the kernel's backlog) and never answers: each
    publish waits out the publish bound, as on a hung broker or a black-holed network."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock, f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


def run(label: str, broker_url: str, requests: int, rate: float, rounds: int) -> None:
    prefix = f"opc-bench-adelay-{uuid.uuid4().hex[:8]}:"
    spool = tempfile.mkdtemp(prefix="op-celery-adelay-")
    app = configure(broker_url, prefix, spool)
    results: dict[str, tuple[list[float], list[float], list[float]]] = {
        name: ([], [], []) for name in ROUTES
    }
    try:
        op_celery.track.delay("warm_up")
        for path in ROUTES.values():  # every contender's threads and connections made
            asyncio.run(drive(path, 100, rate))
        for _ in range(rounds):
            for name, path in ROUTES.items():
                latencies, lags, wall = asyncio.run(drive(path, requests, rate))
                results[name][0].extend(latencies)
                results[name][1].extend(lags)
                results[name][2].append(wall)
    finally:
        app.close()
        shutil.rmtree(spool, ignore_errors=True)
        if broker_url == REDIS_URL:
            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
    arriving = "at once" if rate >= 1e9 else f"arriving at {rate:g}/s"
    print(f"\n{label}: {requests} requests {arriving}, x {rounds} rounds")
    print("| contender | request p50 | request p99 | loop lag p99 | loop lag max | requests/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (latencies, lags, walls) in results.items():
        print(
            f"| {name} | {statistics.median(latencies) * 1e3:.1f} ms "
            f"| {pct(latencies, 0.99) * 1e3:.1f} ms | {pct(lags, 0.99) * 1e3:.1f} ms "
            f"| {max(lags) * 1e3:.1f} ms | {len(latencies) / sum(walls):,.0f} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=500.0, help="arrivals per second")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--away-requests", type=int, default=60)
    parser.add_argument("--burst", type=int, default=300, help="requests in flight at once")
    args = parser.parse_args(argv)
    run("Broker up (Redis on loopback)", REDIS_URL, args.requests, args.rate, args.rounds)
    run(f"Broker up, bursts: {args.burst} requests arriving at once", REDIS_URL,
        args.burst, 1e9, args.rounds)  # fmt: skip
    silent, url = silent_broker()
    try:
        run("Broker silent (accepts, never answers; 0.2 s publish bound, then the spool)",
            url, args.away_requests, 20.0, 1)  # fmt: skip
    finally:
        silent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
