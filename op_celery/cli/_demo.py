"""``op-celery demo``: the whole path on this machine (``op_celery._demo`` runs it)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import click

from ._main import main, requested_app

__all__ = ["demo"]


@main.command()
@click.option(
    "--events", type=click.IntRange(min=10), default=300, show_default=True,
    help="Events to enqueue: mostly track, and one or more of every other type.",
)  # fmt: skip
@click.option(
    "--workers", type=click.IntRange(1, 16), default=2, show_default=True,
    help="Worker processes to start.",
)  # fmt: skip
@click.option(
    "--concurrency", type=click.IntRange(1, 64), default=4, show_default=True,
    help="Threads per worker.",
)  # fmt: skip
@click.option(
    "--rate-limit", metavar="RATE",
    help="Hold this rate, e.g. 50/s or 100/10s: the workers' shared limit "
    "(OPENPANEL_RATE_LIMIT); the summary shows how well it was held. Default: none.",
)  # fmt: skip
@click.option(
    "--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
    help="Seconds the whole demo may take.",
)  # fmt: skip
@click.option(
    "--real", is_flag=True,
    help="Send to the real project of OPENPANEL_CLIENT_ID without asking first.",
)  # fmt: skip
@click.pass_context
def demo(
    ctx: click.Context,
    events: int,
    workers: int,
    concurrency: int,
    rate_limit: str | None,
    timeout: float,
    real: bool,
) -> None:
    """Run the whole path on this machine and print what happened.

    Starts only what is missing: the embedded Redis when no broker is configured, worker
    processes (celery -A op_celery.worker worker), and a stand-in OpenPanel server with a few
    injected faults unless OPENPANEL_CLIENT_ID and OPENPANEL_CLIENT_SECRET are set: then that
    project gets the events, once you say yes to the question the demo asks when its API
    (OPENPANEL_API_URL, default the cloud) is not on this machine, or with --real. Enqueues
    events of every type, follows their delivery, prints a summary and stops everything it
    started, also on Ctrl-C. Exits 1 if not all deliverable events were delivered.
    """
    from .._demo import DemoError, DemoOptions, run_demo
    from .._rates import parse_rate

    if requested_app():
        raise click.UsageError(
            "the demo runs its own app and workers, not yours: run it without -A (it uses "
            "OP_CELERY_BROKER_URL if set, else the embedded Redis)"
        )
    if rate_limit is not None:
        parse_rate(rate_limit, setting="--rate-limit")  # a bad rate is said before anything starts
    _confirm_real_project(os.environ, events, real)
    options = DemoOptions(events, workers, concurrency, rate_limit, timeout)
    try:
        result = run_demo(options)
    except DemoError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("\nInterrupted: everything the demo started was stopped.", err=True)
        ctx.exit(130)
    for line in result.summary_lines():
        click.echo(line)
    if not result.all_delivered:
        ctx.exit(1)


def _confirm_real_project(env: Mapping[str, str], events: int, real: bool) -> None:
    """Ask before demo events go to a real project (credentials set, an API not on this
    machine), unless ``--real``; no answer (a script, a pipe) is a no."""
    if real and not (env.get("OPENPANEL_CLIENT_ID") and env.get("OPENPANEL_CLIENT_SECRET")):
        raise click.UsageError(
            "--real sends to the project of OPENPANEL_CLIENT_ID and OPENPANEL_CLIENT_SECRET: "
            "set both, or leave --real out to use the stand-in server"
        )
    from .._demo import remote_api

    url = remote_api(env)
    if url is None or real:
        return
    question = (
        f"OPENPANEL_CLIENT_ID and OPENPANEL_CLIENT_SECRET are set: send {events} demo events "
        f"to the real project of client {env['OPENPANEL_CLIENT_ID']} at {url}?"
    )
    try:
        if click.confirm(question, default=False):
            return
    except click.Abort:  # no answer: end the question's line
        click.echo()
    raise click.ClickException(
        "demo not started: nothing was sent. Pass --real to send to that project, or unset "
        "OPENPANEL_CLIENT_ID and OPENPANEL_CLIENT_SECRET to use the stand-in server"
    )
