"""Does one project's throttled backlog delay another project's events on the same queue? (issue 14)

The question: project ``slow`` is limited to ``--slow-rate`` (5/s) and has ``--backlog`` (5,000)
events waiting on the queue; project ``default`` has no limit and sends ``--fast-rate`` (19)
events per second for ``--seconds`` (60), starting when the backlog is on the queue. How long
does a ``default`` event take from ``.delay()`` to the server, and at what rate do they arrive?
Target of issue 14: the unthrottled project's median latency under the backlog stays under 1 s.
``--project-queue`` gives the throttled project a queue of its own (``OP_CELERY_PROJECT_QUEUES``).

Method: the stand-in OpenPanel server in its own process, accepting both projects' client ids;
``--backlog`` ``slow`` track events enqueued on a fresh queue, then one ``celery -A
op_celery.worker worker`` (``--pool``, ``--concurrency``) started, then ``default`` events
enqueued at ``--fast-rate`` by this process, each carrying its ``.delay()`` time; latency is
the stand-in's arrival time of the request minus that time (one machine, one clock). Also
reported: the worker's CPU seconds (``/proc``, the worker's process group), the ``slow``
project's delivered rate (it should be its limit) and the ``default`` events' rate. Every process
started is stopped by its PID and every Redis key written (under a private prefix) is deleted.

    python benchmarks/fairness.py [--backlog 5000] [--seconds 60] [--label after]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from _harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    DEFAULT_REDIS_URL,
    Worker,
    broker_env,
    clean_env,
    describe_machine,
    median,
    percentile,
    redis_namespace,
    stand_in_server,
)

#: The throttled project's client (the stand-in accepts it too).
SLOW_CLIENT_ID = "1c8f5d2b-6e3a-4b4c-8d9e-8f7a6b5c4d3e"
SLOW_SECRET = "sec_bench_slow"


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its reaped children (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(value) for value in fields[11:15]) / ticks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--backlog", type=int, default=5000)
    parser.add_argument("--slow-rate", default="5/s")
    parser.add_argument("--fast-rate", type=float, default=19.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--pool", default="threads")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--backlog-mode",
        choices=["upfront", "streaming"],
        default="upfront",
        help="upfront: the backlog is on the queue before the worker starts (workers were "
        "down); streaming: it builds up while the run lasts (the project sends faster than "
        "its limit), mixed with the other project's events",
    )
    parser.add_argument(
        "--project-queue",
        action="store_true",
        help="route the throttled project to a queue of its own (OP_CELERY_PROJECT_QUEUES=slow)",
    )
    parser.add_argument("--label", default="")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    with redis_namespace(args.redis_url) as namespace, stand_in_server() as stand_in:
        stand_in.control.add_client(SLOW_CLIENT_ID, SLOW_SECRET)
        queue = namespace.queue("fairness")
        settings = {
            **broker_env(namespace, queue),
            "OPENPANEL_CLIENT_ID": CLIENT_ID,
            "OPENPANEL_CLIENT_SECRET": CLIENT_SECRET,
            "OPENPANEL_SLOW_CLIENT_ID": SLOW_CLIENT_ID,
            "OPENPANEL_SLOW_CLIENT_SECRET": SLOW_SECRET,
            "OPENPANEL_SLOW_RATE_LIMIT": args.slow_rate,
            "OPENPANEL_API_URL": stand_in.url,
            **({"OP_CELERY_PROJECT_QUEUES": "slow"} if args.project_queue else {}),
        }
        os.environ.update(settings)
        import op_celery

        upfront = args.backlog if args.backlog_mode == "upfront" else 0
        for n in range(upfront):
            op_celery.track.delay("backlog_event", properties={"n": n}, project="slow")
        slow_per_s = (args.backlog - upfront) / args.seconds
        slow_sent = upfront
        worker = Worker(
            "op_celery.worker", queue, args.pool, args.concurrency, clean_env(settings)
        ).start()
        try:
            started = time.time()
            sent = 0
            while time.time() - started < args.seconds:
                due = started + sent / args.fast_rate
                while slow_per_s and slow_sent < (due - started) * slow_per_s:
                    op_celery.track.delay(
                        "backlog_event", properties={"n": slow_sent}, project="slow"
                    )
                    slow_sent += 1
                if due > time.time():
                    time.sleep(due - time.time())
                op_celery.track.delay("fast_event", properties={"sent_at": time.time()})
                sent += 1
            deadline = time.time() + 60
            while time.time() < deadline:
                fast = [
                    r for r in stand_in.control.received() if r.payload.get("name") == "fast_event"
                ]
                if len(fast) >= sent:
                    break
                time.sleep(0.5)
            ended = time.time()
            worker.check_alive()
            worker_cpu_s = cpu_s(worker.pid)
        finally:
            worker.stop()
        received = stand_in.control.received()
    fast = [r for r in received if r.payload.get("name") == "fast_event"]
    slow = [r for r in received if r.payload.get("name") == "backlog_event"]
    latencies = [r.at - float(r.payload["properties"]["sent_at"]) for r in fast]
    slow_span = (max(r.at for r in slow) - min(r.at for r in slow)) if len(slow) > 1 else 0.0
    figures = {
        "label": args.label,
        "backlog": args.backlog,
        "backlog_mode": args.backlog_mode,
        "project_queue": args.project_queue,
        "slow_rate": args.slow_rate,
        "fast_sent": sent,
        "fast_delivered": len(fast),
        "fast_median_latency_s": round(median(latencies), 4) if latencies else None,
        "fast_p90_latency_s": round(percentile(latencies, 0.9), 4) if latencies else None,
        "fast_max_latency_s": round(max(latencies), 4) if latencies else None,
        "fast_rate_per_s": round(len(fast) / (ended - started), 2),
        "slow_delivered": len(slow),
        "slow_rate_per_s": round((len(slow) - 1) / slow_span, 2) if slow_span else None,
        "worker_cpu_s": round(worker_cpu_s, 2),
        "run_s": round(ended - started, 1),
    }
    if args.json:
        print(json.dumps(figures))
        return
    print(describe_machine())
    print(f"pool {args.pool} -c {args.concurrency}; {' '.join(sys.argv[1:])}")
    for key, value in figures.items():
        print(f"  {key:24} {value}")


if __name__ == "__main__":
    main()
