"""``op-celery demo``: the whole path on this machine (``op_celery._demo`` runs it)."""

from __future__ import annotations

import click

from ._main import main

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
@click.pass_context
def demo(
    ctx: click.Context,
    events: int,
    workers: int,
    concurrency: int,
    rate_limit: str | None,
    timeout: float,
) -> None:
    """Run the whole path on this machine and print what happened.

    Starts only what is missing: the embedded Redis when no broker is configured, worker
    processes (celery -A op_celery.worker worker), and a stand-in OpenPanel server with a few
    injected faults unless OPENPANEL_CLIENT_ID and OPENPANEL_CLIENT_SECRET are set (then the
    real API gets the events). Enqueues events of every type, follows their delivery, prints a
    summary and stops everything it started, also on Ctrl-C. Exits 1 if not all deliverable
    events were delivered.
    """
    from .._demo import DemoError, DemoOptions, run_demo
    from .._rates import parse_rate

    if rate_limit is not None:
        parse_rate(rate_limit, setting="--rate-limit")  # a bad rate is said before anything starts
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
