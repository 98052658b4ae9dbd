"""Run a stand-in OpenPanel server in the foreground.

``python -m op_celery.testing --port 0 --client CLIENT_ID:SECRET [--client ...]
[--rate-limit 50/1s [--rate-limit-headers all|retry-after|none]] [--profile-flush 10]`` prints
one line,
``OPENPANEL_API_URL=http://127.0.0.1:PORT``, flushed, then serves until SIGTERM or SIGINT and
exits 0. Drive it with `StandInControl`; ``--help`` lists the control endpoints.

While it serves it prints one line per request (see `op_celery.testing._log`) when its standard
output is a terminal, or always with ``--log-requests``; ``--quiet`` turns the lines off. A
script that reads only the first line of a pipe therefore never fills that pipe.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from op_celery._exceptions import ConfigurationError
from op_celery._rates import parse_rate
from op_celery.testing._control import CONTROL_ENDPOINTS, CONTROL_PREFIX
from op_celery.testing._model import PROFILE_FLUSH_INTERVAL_S, RATE_LIMIT_HEADER_MODES
from op_celery.testing._server import StandInServer


def parse_rate_limit(text: str) -> tuple[int, float]:
    """``"50/1s"`` -> ``(50, 1.0)``, in the package's one rate notation (`op_celery._rates`).

    ``"50/s"``, ``"100/10s"``, ``"5/500ms"``, ``"1000/1m"``, ``"100/h"``; a bare ``"50"`` is per
    second. Raises `argparse.ArgumentTypeError` with `parse_rate`'s message otherwise, so
    ``OPENPANEL_RATE_LIMIT`` and ``--rate-limit`` accept exactly the same texts.
    """
    try:
        rate = parse_rate(text, setting="--rate-limit")
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return rate.limit, rate.period_s


def parse_client(text: str) -> tuple[str, str]:
    """``"CLIENT_ID:SECRET"`` -> ``(client_id, secret)``; the secret may contain colons."""
    client_id, sep, secret = text.partition(":")
    if not sep or not client_id or not secret:
        raise argparse.ArgumentTypeError(f"expected CLIENT_ID:SECRET, got {text!r}")
    return client_id, secret


def control_endpoints_help() -> str:
    """The control endpoints, for ``--help``: method, name and body, then what it does."""
    lines = [f"control endpoints under {CONTROL_PREFIX} (JSON in and out; StandInControl"]
    lines.append("calls them; they are never delayed, faulted, rate-limited or recorded):")
    for method, name, body, does in CONTROL_ENDPOINTS:
        if body:
            lines += [f"  {method:<4} {name:<11} {body}", f"  {'':<16} {does}"]
        else:
            lines.append(f"  {method:<4} {name:<11} {does}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m op_celery.testing",
        description="Run a stand-in OpenPanel server on 127.0.0.1. It prints\n"
        "OPENPANEL_API_URL=... once it listens, then one line per request it answers\n"
        "(time, method, path, status, client id, event type and name; never the secret).",
        epilog=control_endpoints_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 picks a free one")
    parser.add_argument(
        "--client",
        action="append",
        type=parse_client,
        default=[],
        metavar="CLIENT_ID:SECRET",
        help="a client the server accepts; repeatable",
    )
    parser.add_argument(
        "--rate-limit",
        type=parse_rate_limit,
        default=None,
        metavar="LIMIT/WINDOW",
        help="fixed window per client id, e.g. 50/s or 100/10s (as OPENPANEL_RATE_LIMIT); "
        "default: none",
    )
    parser.add_argument(
        "--rate-limit-headers",
        choices=RATE_LIMIT_HEADER_MODES,
        default="all",
        help="with --rate-limit: 'all' sends x-ratelimit-limit/-remaining/-reset on every "
        "answer and retry-after on 429s, as @fastify/rate-limit does; 'retry-after' only "
        "retry-after on 429s, as many proxies do; 'none' a bare 429 (default: all)",
    )
    parser.add_argument(
        "--profile-flush",
        type=float,
        default=PROFILE_FLUSH_INTERVAL_S,
        metavar="SECONDS",
        help="how long a profile write takes to be visible to increment/decrement, as the "
        "server's profile buffer flush makes it (default: the server's 10); 0: at once",
    )
    lines = parser.add_mutually_exclusive_group()
    lines.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print no line per request (default: print them when stdout is a terminal)",
    )
    lines.add_argument(
        "--log-requests",
        action="store_true",
        help="print a line per request even when stdout is not a terminal (a pipe, a file)",
    )
    args = parser.parse_args(argv)
    log_requests = args.log_requests or (not args.quiet and sys.stdout.isatty())

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server = StandInServer(
            dict(args.client),
            rate_limit=args.rate_limit,
            rate_limit_headers=args.rate_limit_headers,
            port=args.port,
            request_log=sys.stdout if log_requests else None,
            profile_flush_s=args.profile_flush,
        )
    except ValueError as exc:
        parser.error(str(exc))
    with server:
        print(f"OPENPANEL_API_URL={server.url}", flush=True)
        # The handler runs in the main thread between waits; Event.wait returns once it sets.
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
