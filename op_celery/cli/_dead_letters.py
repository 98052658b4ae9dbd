"""``op-celery dead-letters``: list, replay or purge events given up for good."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import click

from .._enqueue import publish_dead_letter
from .._exceptions import PublishError
from ..dead_letters import DeadLetter, DeadLetterStore
from ._main import command_settings, main, say_where, table

__all__ = ["dead_letters"]


@main.group("dead-letters")
def dead_letters() -> None:
    """List, replay or purge events given up for good.

    An event is dead-lettered when the API refuses it (400, 401, 403), when its retries are
    used up, or when its message is not a valid event. --error matches the error type
    (AuthenticationError), the HTTP status (401) or a word of the error text.
    """


def _filters(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--error", help="Only these: error type, HTTP status or a word.")(f)
    return click.option("--project", help="Only dead letters of this project.")(f)


def _store(*, broker: bool = False) -> DeadLetterStore:
    """The dead letters of op-celery's Redis, after saying which Redis (and broker) that is."""
    settings = command_settings()
    say_where(settings, broker=broker, redis_too=True)
    return DeadLetterStore(settings)


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


@dead_letters.command("list")
@_filters
@click.option("--limit", type=click.IntRange(min=1), help="At most this many, oldest first.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of full dead letters.")
def list_dead_letters(
    project: str | None, error: str | None, limit: int | None, as_json: bool
) -> None:
    """Dead letters, oldest first: id, operation, project, error type, status, attempts, time.

    With --json: one JSON array of every field (the event's arguments, the error text...), for
    scripts.
    """
    from dataclasses import asdict

    letters = list(_store().list(project, error, limit))
    if as_json:
        click.echo(json.dumps([asdict(x) for x in letters], indent=2))
        return
    if not letters:
        click.echo("No dead letters" + (" match." if project or error else "."))
        return
    rows = [
        [x.id, x.operation, x.project, x.error_type, "-" if x.status is None else str(x.status),
         str(x.attempts), _when(x.failed_at)]
        for x in letters
    ]  # fmt: skip
    headers = ["id", "operation", "project", "error_type", "status", "attempts", "failed_at"]
    for line in table(headers, rows):
        click.echo(line)


@dead_letters.command()
@_filters
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def replay(project: str | None, error: str | None, yes: bool) -> None:
    """Re-enqueue matching dead letters for the workers, with their event ids, each on the
    queue it came from.

    Each is removed as it is enqueued, so running replay twice enqueues nothing twice, and an
    event delivered after all is not sent again. Invalid events and broken messages cannot be
    replayed: they stay until purged.
    """
    store = _store(broker=True)
    matching = list(store.list(project, error))
    replayable = sum(1 for x in matching if x.replayable)
    kept = len(matching) - replayable
    note = f"; {kept} not replayable (invalid events), left for purge" if kept else ""
    if not replayable:
        click.echo("No replayable dead letters match" + note + ".")
        return
    if not yes:
        click.confirm(f"Re-enqueue {replayable} dead letters?", abort=True)
    done = 0
    with click.progressbar(length=replayable, label="Replaying") as bar:

        def progress(_: DeadLetter) -> None:
            nonlocal done
            done += 1
            bar.update(1)

        try:
            count = store.replay(project, error, publish=publish_dead_letter, progress=progress)
        except PublishError:
            raise click.ClickException(
                f"the broker did not answer: {done} of {replayable} re-enqueued, the rest "
                "are still dead letters; run replay again once the broker is up"
            ) from None
    click.echo(f"Re-enqueued {count} dead letters{note}.")


@dead_letters.command()
@_filters
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(project: str | None, error: str | None, yes: bool) -> None:
    """Delete matching dead letters for good (asks first unless --yes)."""
    store = _store()
    count = sum(1 for _ in store.list(project, error))
    if not count:
        click.echo("No dead letters match.")
        return
    if not yes:
        click.confirm(f"Delete {count} dead letters for good?", abort=True)
    click.echo(f"Deleted {store.purge(project, error)} dead letters.")
