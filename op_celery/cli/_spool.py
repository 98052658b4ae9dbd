"""``op-celery spool``: re-publish the events kept on disk while the broker was down."""

from __future__ import annotations

import click

from .._enqueue import republish, spool_for
from .._exceptions import PublishError
from ._main import broker_description, command_settings, main, say_where

__all__ = ["spool"]


@main.group()
def spool() -> None:
    """Re-publish events kept on disk while the broker was down.

    .delay() writes an event to the spool (OP_CELERY_SPOOL_DIR) when the broker does not answer
    within OP_CELERY_PUBLISH_TIMEOUT, and re-publishes it by itself once the broker is back.
    """


@spool.command()
def flush() -> None:
    """Re-publish the spooled events now, oldest first (processes also do it by themselves
    every few seconds once the broker answers)."""
    settings = command_settings()
    say_where(settings, broker=True)
    events = spool_for(settings)
    total = len(events)
    if not total:
        click.echo(f"The spool {events.directory} is empty: nothing to re-publish.")
        return
    done = 0
    with click.progressbar(length=total, label="Re-publishing") as bar:

        def progress() -> None:
            nonlocal done
            done += 1
            bar.update(1)

        try:
            count = events.flush(republish, progress=progress)
        except PublishError:
            raise click.ClickException(
                f"the broker at {broker_description(settings)} still does not answer: "
                f"{done} of {total} spooled events re-published, the rest stay in "
                f"{events.directory}; run `op-celery spool flush` again once it is up"
            ) from None
    click.echo(f"Re-published {count} spooled events from {events.directory}.")
