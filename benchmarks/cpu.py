"""How much CPU does delivering one event cost, next to a raw HTTP loop?

The question (issue 12): is op-celery's worker CPU per delivered event at most 3x that of a raw
urllib3 keep-alive loop POSTing the same events to the same server? CPU time, not wall time,
because the machine's cores are shared: another process's load stretches wall time but not the
CPU a process spends.

Method: the stand-in OpenPanel server runs in its own process (``python -m op_celery.testing``,
no rate limit). Measured, in one run, each ``--repeat`` times in a rotated order:

- ``op-celery``: ``--events`` track events enqueued with ``track.apply_async`` on a fresh queue,
  then ``celery -A op_celery.worker worker -l INFO`` with the package's defaults;
- ``naive``: the same events as a bare ``requests.post`` task (``_naive_app.py``), same worker
  options;
- ``op-celery-before`` (with ``--before CHECKOUT``): op-celery's worker from another checkout
  (an earlier commit), so that a change is measured against its parent in one run;
- ``celery-urllib3``: the same as a task that POSTs on a keep-alive urllib3 connection and does
  nothing else: Celery and kombu's own cost per message, plus the urllib3 loop's;
- ``requests``: one process POSTing the events in a loop on one ``requests.Session``;
- ``urllib3``: one process POSTing them in a loop on one keep-alive ``urllib3`` connection pool.

Each worker kind runs once per pool of ``--pools`` (``solo``, ``threads:4``, ``prefork:2``).
CPU is the delivering processes' ``utime + stime`` from ``/proc`` (a worker's whole process
group, prefork children included; a loop's own process), sampled when the stand-in has accepted
``--skip`` of the events (start-up, imports and connection set-up left out) and again when it
has accepted them all; CPU per event is the CPU between the samples over the events accepted
between them. "events/s per core" is its inverse: what one core would deliver if the process
had it alone. The stand-in, Redis and this script are not counted (they run for every kind).
Every process and every Redis key of the run are removed at the end.

    python benchmarks/cpu.py [--events 3000] [--repeat 3] [--pools solo,threads:4,prefork:2]
    python benchmarks/cpu.py --profile solo   # py-spy (GIL holder only: ~CPU) of a solo worker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import (
    BENCHMARKS_DIR,
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

USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0"
PROPERTIES = {"value": 129.5, "currency": "EUR", "items": 3, "path": "/checkout/complete"}
#: Seconds to wait, per event, for a kind to deliver everything (plus a fixed 60 s).
TIMEOUT_PER_EVENT_S = 0.05
#: How often the stand-in's count is polled while a kind runs, in seconds.
POLL_S = 0.05
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
WORKER_KINDS = ("op-celery", "op-celery-before", "naive", "celery-urllib3")
LOOP_KINDS = ("requests", "urllib3")


def body(i: int) -> dict[str, Any]:
    """The wire body of event ``i``, as op-celery sends it."""
    return {
        "type": "track",
        "payload": {
            "name": "checkout_completed",
            "properties": {**PROPERTIES, "n": i},
            "profileId": f"user-{i % 100}",
        },
    }


# --- CPU time from /proc. ----------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces), numbered from 3 (state) on.
    return text[text.rindex(")") + 2 :].split()


def group_cpu_s(pgid: int) -> tuple[float, float]:
    """(utime, stime), with those of reaped children, of every process in group ``pgid``, in
    seconds."""
    user = system = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        # fields[0] is field 3 (state): pgrp is field 5, utime, stime, cutime, cstime are
        # fields 14 to 17.
        if fields is None or int(fields[2]) != pgid:
            continue
        user += int(fields[11]) + int(fields[13])
        system += int(fields[12]) + int(fields[14])
    return user / CLOCK_TICKS_PER_S, system / CLOCK_TICKS_PER_S


# --- The raw loops (run as ``cpu.py --loop KIND``, in their own process). ------------------------


def run_loop(kind: str, url: str, events: int, skip: int) -> dict[str, float]:
    """POST ``events`` events; CPU and wall time of those after the first ``skip``."""
    headers = {
        "openpanel-client-id": CLIENT_ID,
        "openpanel-client-secret": CLIENT_SECRET,
        "user-agent": USER_AGENT,
        "content-type": "application/json",
    }
    track_url = url.rstrip("/") + "/track"
    if kind == "requests":
        import requests

        session = requests.Session()

        def post(i: int) -> int:
            return session.post(track_url, json=body(i), headers=headers, timeout=10).status_code

    else:
        import urllib3

        pool = urllib3.PoolManager(maxsize=1, timeout=urllib3.Timeout(connect=5, read=10))

        def post(i: int) -> int:
            data = json.dumps(body(i)).encode()
            return pool.request("POST", track_url, body=data, headers=headers).status

    for i in range(skip):
        post(i)
    start, start_wall = os.times(), time.monotonic()
    for i in range(skip, events):
        status = post(i)
        if status != 200:
            raise RuntimeError(f"the stand-in answered {status}")
    end = os.times()
    return {
        "cpu_s": end.user + end.system - start.user - start.system,
        "system_s": end.system - start.system,
        "wall_s": time.monotonic() - start_wall,
        "counted": events - skip,
    }


# --- One measurement. ---------------------------------------------------------------------------


def enqueue(kind: str, queue: str, count: int) -> None:
    import op_celery
    from op_celery._app import package_app

    app = package_app()
    with app.producer_or_acquire() as producer:
        for i in range(count):
            payload = body(i)["payload"]
            if kind.startswith("op-celery"):
                kwargs = {
                    "properties": payload["properties"],
                    "profile_id": payload["profileId"],
                    "user_agent": USER_AGENT,
                }
                op_celery.track.apply_async(
                    ("checkout_completed",), kwargs, queue=queue, producer=producer
                )
            else:
                app.send_task(
                    "naive.track" if kind == "naive" else "naive.track_urllib3",
                    kwargs={"body": body(i), "user_agent": USER_AGENT},
                    queue=queue,
                    producer=producer,
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


def measure_worker(
    kind: str, pool: str, args: argparse.Namespace, namespace: Namespace, stand_in: StandIn
) -> dict[str, float]:
    events, skip = args.events, int(args.events * args.skip)
    name, _, concurrency = pool.partition(":")
    queue = namespace.queue(f"{kind}-{name}")
    namespace.delete(queue)
    enqueue(kind, queue, events)
    stand_in.control.reset()
    app = "op_celery.worker" if kind.startswith("op-celery") else "_naive_app"
    env = worker_env(namespace, queue, stand_in)
    # ``python -m celery`` imports from its working directory first: the before kind runs in
    # the other checkout, every other kind in this one's.
    cwd = args.before if kind == "op-celery-before" else str(BENCHMARKS_DIR.parent)
    worker = Worker(app, queue, name, int(concurrency or 1), env, loglevel="INFO", cwd=cwd)
    deadline = time.monotonic() + 60 + events * TIMEOUT_PER_EVENT_S
    samples: list[tuple[int, tuple[float, float], float]] = []  # (accepted, cpu, monotonic)
    with worker:
        for target in (skip, events):
            while True:
                accepted = stand_in.control.stats()["received"]
                if accepted >= target:
                    samples.append((accepted, group_cpu_s(worker.pid), time.monotonic()))
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} on {pool}: {accepted} of {events} delivered")
                worker.check_alive()
                time.sleep(POLL_S)
    namespace.delete(queue)
    (n0, (user0, system0), t0), (n1, (user1, system1), t1) = samples
    cpu_s = user1 + system1 - user0 - system0
    return {"cpu_s": cpu_s, "system_s": system1 - system0, "wall_s": t1 - t0, "counted": n1 - n0}


def measure_loop(kind: str, args: argparse.Namespace, stand_in: StandIn) -> dict[str, float]:
    stand_in.control.reset()
    command = [sys.executable, __file__, "--loop", kind, "--url", stand_in.url]
    command += ["--events", str(args.events), "--skip", str(args.skip)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(output))


# --- Profile. -----------------------------------------------------------------------------------


def profile(args: argparse.Namespace) -> int:
    """An op-celery worker on ``args.profile`` under py-spy; prints where its time goes."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    name, _, concurrency = args.profile.partition(":")
    out = Path(tempfile.mkdtemp(prefix="op-celery-cpu-")) / "profile.txt"
    with redis_namespace(args.redis_url) as namespace, stand_in_server() as stand_in:
        os.environ.update(broker_env(namespace, namespace.queue("unused")))
        queue = namespace.queue("profile")
        enqueue("op-celery", queue, args.events)
        env = worker_env(namespace, queue, stand_in)
        with Worker("op_celery.worker", queue, name, int(concurrency or 1), env, "INFO") as worker:
            stand_in.control.wait_for(int(args.events * args.skip), timeout=60)
            spy = subprocess.Popen(
                [py_spy, "record", "--pid", str(worker.pid), "--format", "raw", "--output",
                 str(out), "--nonblocking", "--subprocesses", "--gil", "--rate", "200"],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                stand_in.control.wait_for(args.events, timeout=60 + args.events * 0.05)
            finally:
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
                spy.wait(30)
        namespace.delete(queue)
    print(f"collapsed stacks: {out}")
    summarise_profile(out)
    return 0


def summarise_profile(path: Path, top: int = 40) -> None:
    """Inclusive share of the samples per function (name and file), busiest first."""
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue  # a stack py-spy could not finish reading
        count = int(count_text)
        # "process N:"COMMAND";frame;frame... (py-spy records no idle thread without --idle)
        frames = stack.split('";', 1)[-1].split(";")
        total += count
        for frame in {f.split(" (")[0] + " " + f.split(" (")[-1].split(":")[0] for f in frames}:
            inclusive[frame] = inclusive.get(frame, 0) + count
    print(f"{total} busy samples")
    for frame, count in sorted(inclusive.items(), key=lambda item: -item[1])[:top]:
        print(f"{100 * count / total:5.1f} %  {frame}")


# --- Main. --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=3_000, help="events per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="runs of every measurement")
    parser.add_argument(
        "--pools", default="solo,threads:4,prefork:2", help="worker pools, POOL[:CONCURRENCY]"
    )
    parser.add_argument(
        "--kinds",
        default=",".join(kind for kind in WORKER_KINDS + LOOP_KINDS if kind != "op-celery-before"),
    )
    parser.add_argument(
        "--before",
        metavar="CHECKOUT",
        help="kind op-celery-before runs the worker of this checkout of op-celery (git worktree "
        "add --detach DIR COMMIT), on the same messages: an earlier commit in the same run",
    )
    parser.add_argument("--skip", type=float, default=0.1, help="fraction of events not counted")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--profile", metavar="POOL", help="profile op-celery's worker instead")
    parser.add_argument("--loop", choices=LOOP_KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        print(json.dumps(run_loop(args.loop, args.url, args.events, int(args.events * args.skip))))
        return 0
    if args.profile:
        return profile(args)
    kinds = [kind for kind in args.kinds.split(",") if kind]
    if "op-celery-before" in kinds and not args.before:
        parser.error("kind op-celery-before needs --before CHECKOUT")
    pools = [pool for pool in args.pools.split(",") if pool]
    names = [f"{kind} {pool}" for kind in kinds if kind in WORKER_KINDS for pool in pools]
    names += [kind for kind in kinds if kind in LOOP_KINDS]

    print(describe_machine())
    print(" ".join(["python", *sys.argv]))
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with redis_namespace(args.redis_url) as namespace, stand_in_server() as stand_in:
        os.environ.update(broker_env(namespace, namespace.queue("unused")))
        for run in range(args.repeat):
            shift = run % len(names)
            for name in names[shift:] + names[:shift]:
                kind, _, pool = name.partition(" ")
                if pool:
                    figures = measure_worker(kind, pool, args, namespace, stand_in)
                else:
                    figures = measure_loop(kind, args, stand_in)
                results[name].append(figures)
                per_event_ms = 1000 * figures["cpu_s"] / figures["counted"]
                system_pct = 100 * figures["system_s"] / figures["cpu_s"]
                print(
                    f"run {run + 1}, {name}: {per_event_ms:.3f} ms CPU per event "
                    f"({system_pct:.0f} % in the kernel, {figures['counted']:.0f} counted, "
                    f"{figures['counted'] / figures['wall_s']:.0f} events/s wall)",
                    flush=True,
                )

    # The machine is shared, and a loaded core costs every process more CPU per event (caches,
    # switches): each kind is compared with the urllib3 loop of the same run, and the median
    # of those ratios is reported next to the median of the CPU times.
    loops = results.get("urllib3", [])
    print(f"\nmedian of {args.repeat} run(s), {args.events:,} events each, the first "
          f"{args.skip:.0%} not counted; x urllib3: median of each run's ratio to the "
          "urllib3 loop of that run")  # fmt: skip
    print(f"{'delivering process':24s} {'CPU ms/event':>13s} {'x urllib3':>10s} "
          f"{'events/s per core':>18s} {'events/s wall':>14s}")  # fmt: skip
    summary: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        per_event_s = median([r["cpu_s"] / r["counted"] for r in runs])
        ratio = median(
            [
                (r["cpu_s"] / r["counted"]) / (loop["cpu_s"] / loop["counted"])
                for r, loop in zip(runs, loops, strict=False)
            ]
        )
        wall = median([r["counted"] / r["wall_s"] for r in runs])
        summary[name] = {
            "cpu_ms_per_event": 1000 * per_event_s, "x_urllib3": ratio,
            "events_per_core_s": 1 / per_event_s, "events_per_s_wall": wall,
        }  # fmt: skip
        print(
            f"{name:24s} {1000 * per_event_s:13.3f} {ratio:10.2f} "
            f"{1 / per_event_s:18.0f} {wall:14.0f}"
        )
    if args.json:
        with open(args.json, "w") as out:
            figures = {"argv": sys.argv, "runs": results, "summary": summary}
            json.dump({"machine": describe_machine(), **figures}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
