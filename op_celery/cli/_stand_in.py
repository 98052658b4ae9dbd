"""``op-celery stand-in``: a stand-in OpenPanel server in the foreground."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Sequence

import click

from ..testing._model import PROFILE_FLUSH_INTERVAL_S, RATE_LIMIT_HEADER_MODES
from ._main import main

__all__ = ["stand_in"]


def _check_client(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> list[str]:
    import argparse

    from ..testing.__main__ import parse_client

    for value in values:
        try:
            parse_client(value)
        except argparse.ArgumentTypeError as exc:
            raise click.BadParameter(str(exc)) from None
    return list(values)


def _check_rate(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    import argparse

    from ..testing.__main__ import parse_rate_limit

    if value is not None:
        try:
            parse_rate_limit(value)
        except argparse.ArgumentTypeError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _epilog() -> str:
    from ..testing.__main__ import control_endpoints_help

    return "\b\n" + control_endpoints_help()


@main.command("stand-in", epilog=_epilog())
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port on 127.0.0.1; 0 picks a free one.")  # fmt: skip
@click.option(
    "--client", "clients", multiple=True, metavar="CLIENT_ID:SECRET", callback=_check_client,
    help="A client the server accepts (the id a lower-case UUID); repeatable. Default: one "
    "made up and printed.",
)  # fmt: skip
@click.option(
    "--rate-limit", metavar="LIMIT/WINDOW", callback=_check_rate,
    help="Fixed window per client id, e.g. 50/s or 100/10s (as OPENPANEL_RATE_LIMIT). "
    "Default: none.",
)  # fmt: skip
@click.option(
    "--rate-limit-headers", type=click.Choice(RATE_LIMIT_HEADER_MODES), default="all",
    show_default=True,
    help="With --rate-limit: all (x-ratelimit-* on every answer, retry-after on 429s), "
    "retry-after (only that, on 429s) or none (a bare 429).",
)  # fmt: skip
@click.option(
    "--profile-flush", type=click.FloatRange(0), default=PROFILE_FLUSH_INTERVAL_S,
    show_default=True, metavar="SECONDS",
    help="How long a profile write takes to be visible to increment/decrement, as the "
    "server's profile buffer flush makes it; 0: at once.",
)  # fmt: skip
@click.option("-q", "--quiet", is_flag=True, help="Print no line per request.")
@click.option(
    "--log-requests", is_flag=True,
    help="Print a line per request even when standard output is not a terminal.",
)  # fmt: skip
def stand_in(
    port: int, clients: list[str], rate_limit: str | None, rate_limit_headers: str,
    profile_flush: float, quiet: bool, log_requests: bool,
) -> None:  # fmt: skip
    """Run a stand-in OpenPanel server in the foreground.

    It serves until Ctrl-C or SIGTERM, answers POST /track as OpenPanel does (validation, 401s,
    404 for unknown profiles, optional rate limit), and prints OPENPANEL_API_URL=... once it
    listens, then one line per request (time, method, path, status, client id, event type
    and name; never the secret) when standard output is a terminal, or with --log-requests.
    Point workers at it with that URL and a client's id and secret.
    """
    from ..testing import StandInServer
    from ..testing.__main__ import main as serve
    from ..testing.__main__ import parse_client

    if not clients:
        client_id, secret = str(uuid.uuid4()), "sec_" + uuid.uuid4().hex
        clients = [f"{client_id}:{secret}"]
        click.echo(f"OPENPANEL_CLIENT_ID={client_id}")
        click.echo(f"OPENPANEL_CLIENT_SECRET={secret}")
    try:  # the server's own checks (ids must be lower-case UUIDs), before it binds
        StandInServer(dict(parse_client(c) for c in clients))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--client") from None
    argv = ["--port", str(port), "--profile-flush", repr(profile_flush)]
    for client in clients:
        argv += ["--client", client]
    if rate_limit is not None:
        argv += ["--rate-limit", rate_limit, "--rate-limit-headers", rate_limit_headers]
    if quiet and log_requests:
        raise click.UsageError("--quiet and --log-requests contradict each other: give one")
    argv += ["--quiet"] if quiet else ["--log-requests"] if log_requests else []
    sys.stdout.flush()
    try:
        code = serve(argv)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None
    raise SystemExit(code)
