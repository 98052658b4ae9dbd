"""Render deploy/grafana/op-celery.json from a real run, as a picture (docs/dashboard.png).

What it runs, in about 100 s: the stand-in OpenPanel server in its own process (a rate limit of
``--server-limit`` requests per second per client, with its x-ratelimit headers), one
``celery -A op_celery.worker worker --pool threads`` serving its metrics on a free port
(``OP_CELERY_METRICS_PORT``), and a real Prometheus (Debian's ``prometheus`` binary, on a free
port, its data in a temporary folder) scraping the worker every second. This process enqueues
track events of two projects and identify events for ``--seconds`` seconds, with, along the way:
a burst the server's limit makes wait, 429s with ``retry-after`` (a pause of the pool), 503s and
dropped connections (retries), and 400s (dead letters). Then every query of the dashboard is
asked of that Prometheus over the run (Grafana's variables replaced: ``$job`` and ``$project``
by ``.*``, ``$__rate_interval`` by ``--rate-interval``, ``$__range`` by the run's length), and
the panels are drawn with matplotlib where the dashboard's ``gridPos`` puts them. Stat panels
show their last value, as Grafana's ``lastNotNull`` does. The picture's moment is the end of the
load; the worker then gets up to 20 s to deliver the rest, for the counts printed at the end.

Needs ``prometheus`` on PATH (``apt-get install prometheus``; its service is not started) and
matplotlib (``pip install matplotlib``; not a dependency of the package). Every process is
stopped by its PID and every Redis key of the run (a private prefix) deleted at the end.

    python benchmarks/render_dashboard.py [--seconds 60] [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from _harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    DEFAULT_REDIS_URL,
    STARTUP_TIMEOUT_S,
    Worker,
    _stop,
    broker_env,
    clean_env,
    describe_machine,
    redis_namespace,
    stand_in_server,
)

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "op-celery.json"
#: The second project's client on the stand-in (``project="shop"``).
SHOP_CLIENT_ID = "4c2a9e0f-3b1d-4e5f-8a7b-6c5d4e3f2a1b"
SHOP_CLIENT_SECRET = "sec_bench_shop_9a8b"
#: Seconds between two Prometheus scrapes of the worker.
SCRAPE_INTERVAL_S = 1
#: Seconds the worker gets after the load to deliver what is left, for the final counts.
DRAIN_TIMEOUT_S = 20.0
BODY_400 = '{"status":400,"error":"Error","message":"body/payload/profileId Invalid input"}'
BODY_429 = '{"status":429,"error":"Too Many Requests","message":"You have exceeded the rate limit"}'


def http_json(url: str, timeout: float = 10.0) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as answer:
        return json.loads(answer.read())


def answers(url: str) -> bool:
    try:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=1).close()
        return True
    except OSError:
        return False


def wait_for(url: str, what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not answers(url):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer at {url} in {STARTUP_TIMEOUT_S:g} s")
        time.sleep(0.1)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def prometheus(metrics_port: int) -> Iterator[str]:
    """A Prometheus scraping the worker's metrics every second; yields its URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("needs the prometheus binary: apt-get install prometheus")
    folder = Path(tempfile.mkdtemp(prefix="op-celery-prometheus-"))
    config = folder / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n"
        f"  evaluation_interval: {SCRAPE_INTERVAL_S}s\n"
        "scrape_configs:\n  - job_name: op-celery\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    port = free_port()
    command = [
        binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ]  # fmt: skip
    log = (folder / "prometheus.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/-/ready", "prometheus")
        yield url
    finally:
        _stop(process, group=False)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def enqueue_load(stand_in_control: Any, seconds: float, rate: float, burst: int) -> int:
    """Enqueue events for ``seconds`` at ``rate``/s, with the faults of the module's
    docstring at fixed moments; returns how many events were enqueued."""
    import op_celery

    faults = [
        (0.25, "burst", lambda: None),
        (0.45, "429s", lambda: stand_in_control.fail_next(
            6, status=429, body=BODY_429,
            headers={"retry-after": "4", "content-type": "application/json"},
        )),
        (0.62, "503s", lambda: stand_in_control.fail_next(30, status=503, body="unavailable")),
        (0.70, "dropped connections", lambda: stand_in_control.drop_next(8)),
        (0.85, "400s", lambda: stand_in_control.fail_next(
            5, status=400, body=BODY_400, headers={"content-type": "application/json"}
        )),
    ]  # fmt: skip
    start = time.monotonic()
    sent = 0
    n = 0
    while (elapsed := time.monotonic() - start) < seconds:
        while faults and elapsed >= faults[0][0] * seconds:
            _, name, inject = faults.pop(0)
            if name == "burst":
                for i in range(burst):
                    op_celery.track.delay("page_view", properties={"burst": i})
                sent += burst
            else:
                inject()
            print(f"  t={elapsed:5.1f} s: {name}", flush=True)
        project = "shop" if n % 5 == 4 else "default"
        if n % 7 == 6:
            op_celery.identify.delay(f"user-{n % 50}", email=f"u{n % 50}@example.com")
        else:
            op_celery.track.delay(
                "checkout_completed", properties={"n": n}, profile_id=f"user-{n % 50}",
                project=project,
            )  # fmt: skip
        sent += 1
        n += 1
        time.sleep(max(0.0, start + n / rate - time.monotonic()))
    return sent


def query_range(prometheus_url: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode(
        {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": "1"}
    )
    answer = http_json(f"{prometheus_url}/api/v1/query_range?{params}")
    if answer.get("status") != "success":
        raise RuntimeError(f"prometheus refused {expr!r}: {answer}")
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def substitute(expr: str, rate_interval: str, range_s: float) -> str:
    values = {
        "$__rate_interval": rate_interval, "$__range": f"{int(range_s)}s",
        "$job": ".*", "$project": ".*",
    }  # fmt: skip
    for variable, value in values.items():
        expr = expr.replace(variable, value)
    return expr


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), template) or "value"


def fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "No data"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    if unit in ("ops", "reqps"):
        return f"{value:.1f} /s"
    return f"{value:.0f}"


def render(
    prometheus_url: str,
    start: float,
    end: float,
    zero: float,
    rate_interval: str,
    out: Path,
    title: str,
) -> dict[str, float]:
    """Draw every panel of the dashboard from ``start`` to ``end`` (times shown from ``zero``);
    returns the stat panels' values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    background, panel_bg, text, grid = "#111217", "#181b1f", "#ccccdc", "#2c3235"
    figure = plt.figure(figsize=(16, rows * 0.42 + 0.6), facecolor=background)
    figure.suptitle(title, color=text, fontsize=11, x=0.01, y=0.995, ha="left")
    top = 1 - 0.5 / (rows * 0.42 + 0.6)
    colors = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9"]
    stats: dict[str, float] = {}
    for panel in panels:
        grid_pos = panel["gridPos"]
        stat = panel["type"] == "stat"
        left, pad_x, pad_y = (0.004, 0.004, 0.006) if stat else (0.032, 0.006, 0.022)
        box = [
            grid_pos["x"] / 24 + left,
            top - (grid_pos["y"] + grid_pos["h"]) / rows * top + pad_y + (0 if stat else 0.012),
            grid_pos["w"] / 24 - left - pad_x,
            grid_pos["h"] / rows * top - 2 * pad_y - (0 if stat else 0.012),
        ]
        defaults = panel["fieldConfig"]["defaults"]
        unit = defaults.get("unit", "short")
        series: list[tuple[str, list[float], list[float]]] = []
        for target in panel["targets"]:
            expr = substitute(target["expr"], rate_interval, end - start)
            for result in query_range(prometheus_url, expr, start, end):
                times = [float(t) - zero for t, _ in result["values"]]
                values = [float(v) for _, v in result["values"]]
                series.append((legend(target["legendFormat"], result["metric"]), times, values))
        axes = figure.add_axes(box, facecolor=panel_bg)
        for spine in axes.spines.values():
            spine.set_color(grid)
        if stat:
            axes.set_xticks([])
            axes.set_yticks([])
            # Grafana's lastNotNull of the first series.
            known = [v for v in (series[0][2] if series else []) if not math.isnan(v)]
            value = known[-1] if known else float("nan")
            stats[panel["title"]] = value
            color = "#73bf69"
            for step in defaults["thresholds"]["steps"]:
                if step["value"] is not None and not math.isnan(value) and value >= step["value"]:
                    color = {"orange": "#ff9830", "red": "#f2495c"}.get(step["color"], color)
            axes.text(0.04, 0.8, panel["title"], color=text, fontsize=9, transform=axes.transAxes)
            axes.text(0.5, 0.3, fmt(value, unit), color=color, fontsize=20, ha="center",
                      weight="bold", transform=axes.transAxes)  # fmt: skip
            continue
        axes.set_title(panel["title"], color=text, fontsize=9, loc="left", pad=3)
        custom = defaults["custom"]
        bars = custom["drawStyle"] == "bars"
        stacked = custom.get("stacking", {}).get("mode") == "normal"
        below: dict[float, float] = {}
        for index, (name, times, values) in enumerate(series):
            color = colors[index % len(colors)]
            if stacked:  # on the values of the series drawn before, as Grafana stacks
                bottoms = [below.get(t, 0.0) for t in times]
                values = [
                    b + (0.0 if math.isnan(v) else v) for b, v in zip(bottoms, values, strict=True)
                ]
                below.update(zip(times, values, strict=True))
            else:
                bottoms = [0.0] * len(times)
            if bars:
                heights = [v - b for v, b in zip(values, bottoms, strict=True)]
                axes.bar(times, heights, bottom=bottoms, width=1.0, color=color, label=name)
            else:
                axes.plot(times, values, color=color, linewidth=1.2, label=name)
                if stacked:
                    axes.fill_between(times, bottoms, values, color=color, alpha=0.15)
        if not series:
            axes.text(0.5, 0.5, "No data", color=text, ha="center", transform=axes.transAxes)
        axes.set_xlim(start - zero, end - zero)
        axes.set_ylim(bottom=0)
        axes.tick_params(colors=text, labelsize=7)
        axes.grid(color=grid, linewidth=0.5)
        axes.set_ylabel({"s": "seconds", "ops": "per second"}.get(unit, ""), color=text,
                        fontsize=7)  # fmt: skip
        if grid_pos["y"] + grid_pos["h"] == rows:
            axes.set_xlabel("seconds since the load started", color=text, fontsize=7)
        if series:
            axes.legend(loc="upper left", fontsize=7, facecolor=panel_bg, edgecolor=grid,
                        labelcolor=text, ncol=min(len(series), 4))  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80, facecolor=background)
    return stats


def counter_total(prometheus_url: str, expr: str, at: float) -> dict[str, float]:
    params = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
    answer = http_json(f"{prometheus_url}/api/v1/query?{params}")
    return {
        ",".join(f"{k}={v}" for k, v in sorted(r["metric"].items())): float(r["value"][1])
        for r in answer["data"]["result"]
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load")
    parser.add_argument("--rate", type=float, default=8.0, help="events enqueued per second")
    parser.add_argument("--burst", type=int, default=200, help="events of the burst")
    parser.add_argument("--server-limit", type=int, default=25, help="stand-in requests/s")
    parser.add_argument("--rate-interval", default="5s", help="for $__rate_interval")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    args = parser.parse_args()
    machine = describe_machine()
    print(machine)
    print(" ".join(["python", *sys.argv]), flush=True)
    with ExitStack() as stack:
        namespace = stack.enter_context(redis_namespace(args.redis_url))
        stand_in = stack.enter_context(stand_in_server())
        stand_in.control.add_client(SHOP_CLIENT_ID, SHOP_CLIENT_SECRET)
        stand_in.control.set_rate_limit(args.server_limit, 1.0, headers="all")
        queue = namespace.queue("dashboard")
        env = broker_env(namespace, queue)
        os.environ.update(env)  # this process enqueues
        metrics_port = free_port()
        worker_env = clean_env({
            **env, "OPENPANEL_CLIENT_ID": CLIENT_ID, "OPENPANEL_CLIENT_SECRET": CLIENT_SECRET,
            "OPENPANEL_API_URL": stand_in.url, "OPENPANEL_SHOP_CLIENT_ID": SHOP_CLIENT_ID,
            "OPENPANEL_SHOP_CLIENT_SECRET": SHOP_CLIENT_SECRET,
            "OP_CELERY_METRICS_PORT": str(metrics_port), "OP_CELERY_RETRY_BACKOFF": "0.5",
        })  # fmt: skip
        worker = stack.enter_context(Worker("op_celery.worker", queue, "threads", 8, worker_env))
        wait_for(f"http://127.0.0.1:{metrics_port}/metrics", "the worker's metrics")
        prometheus_url = stack.enter_context(prometheus(metrics_port))
        time.sleep(2 * SCRAPE_INTERVAL_S)  # a first scrape of the zeros
        start = time.time()
        print(f"load: {args.rate:g} events/s for {args.seconds:g} s", flush=True)
        sent = enqueue_load(stand_in.control, args.seconds, args.rate, args.burst)
        end = time.time()
        time.sleep(SCRAPE_INTERVAL_S + 0.5)  # the last scrape of the load
        worker.check_alive()
        stats = render(
            prometheus_url, start - 5, end, start, args.rate_interval, args.out,
            f"op-celery dashboard, rendered from a real run ({machine.split(',')[0]}): "
            f"{sent} events in {args.seconds:g} s, stand-in limit {args.server_limit}/s, "
            "a burst, 429s, 503s, dropped connections, 400s",
        )  # fmt: skip
        at_picture = {
            "delivered": counter_total(
                prometheus_url, "sum(op_celery_events_delivered_total)", end
            ),
            "retried": counter_total(
                prometheus_url, "sum by (reason) (op_celery_events_retried_total)", end
            ),
            "throttled": counter_total(
                prometheus_url, "sum(op_celery_events_throttled_total)", end
            ),
            "dead_lettered": counter_total(
                prometheus_url, "sum by (error_type) (op_celery_events_dead_lettered_total)", end
            ),
        }
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        dead = sum(at_picture["dead_lettered"].values())
        while stand_in.control.stats()["received"] + dead < sent:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        final = stand_in.control.stats()
        counts = stand_in.control.counts()
    print(f"picture: {args.out}")
    print("stat panels at the end of the load:")
    for title, value in stats.items():
        print(f"  {title}: {value:.4g}")
    print("counters at the end of the load (Prometheus):", json.dumps(at_picture))
    statuses = dict(sorted(counts.items()))
    print(f"enqueued {sent}; the stand-in accepted {final['received']} (answers by status: "
          f"{statuses}, dropped connections {final.get('dropped', 0)})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
