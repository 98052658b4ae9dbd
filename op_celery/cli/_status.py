"""``op-celery status``: the queue, the dead letters, the spool and each project's limiter, and
the events the server answered without storing them (bots, duplicates, the project's filters).

Each part is read on its own, so a broker that does not answer still leaves the dead letters
shown, and a missing Redis still leaves the queue depth: what could not be read is said in its
place, and the command then exits 1. Only when nothing answered is it a one-line error.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections import Counter
from collections.abc import Mapping
from importlib import import_module
from types import ModuleType
from typing import Any

import click
import redis
from celery import Celery

from .._enqueue import queue_for, spool_for
from .._exceptions import LimiterUnavailable, OpenPanelError, StorageUnavailable
from .._outbox import outbox_keys
from .._settings import EMBEDDED_URL, Settings, _redis_url_of, redact_url
from ..dead_letters import DeadLetterStore
from ._main import (
    BROKER_TIMEOUT_S,
    broker_description,
    broker_url,
    command_app,
    command_settings,
    main,
    redis_description,
    redis_problem,
    table,
)

__all__ = ["status"]


def _broker_redis(url: str) -> redis.Redis:
    """A client of the broker's Redis (``url`` as ``_redis_url_of`` gives it)."""
    options: dict[str, Any] = {
        "socket_timeout": BROKER_TIMEOUT_S,
        "socket_connect_timeout": BROKER_TIMEOUT_S,
    }
    if url == EMBEDDED_URL:
        from .._embedded import embedded_redis

        return redis.Redis(unix_socket_path=embedded_redis(), **options)
    return redis.Redis.from_url(url, **options)


def _broker_key_prefix(settings: Settings, app: Celery | None) -> str:
    if settings.broker_key_prefix or app is None:
        return settings.broker_key_prefix
    options = app.conf.get("broker_transport_options") or {}
    return str(options.get("global_keyprefix") or "")


def _broker_problem(where: str, exc: BaseException) -> str:
    """What went wrong with a broker that is not Redis (kombu, py-amqp), by its real cause."""
    name = type(exc).__name__
    text = str(exc)
    if name == "AccessRefused":
        return f"{where} refused the login ({text}): fix the user and password in its URL"
    if name == "NotAllowed":
        return f"{where} refused the connection ({text}): check the virtual host in its URL"
    if isinstance(exc, (OSError, socket.timeout)) or name in ("OperationalError", "TimeoutError"):
        return f"{where} did not answer ({name}: {text}): start it, or fix its URL"
    return f"{where} answered with an error ({name}: {text}): check its URL"


def _queue_by_declare(url: str, queue: str, app: Celery | None) -> tuple[int | None, str | None]:
    """The queue's depth by a passive declare (RabbitMQ and other kombu brokers), and a note
    when the queue does not exist. Raises what the connection raises."""
    from kombu import Connection

    connection = (
        app.connection_for_read() if app is not None
        else Connection(url, connect_timeout=BROKER_TIMEOUT_S)
    )  # fmt: skip
    with connection:
        connection.connect()
        channel: Any = connection.channel()
        try:
            _, depth, _ = channel.queue_declare(queue=queue, passive=True)
        except connection.channel_errors as exc:
            if "NOT_FOUND" in str(exc) or getattr(exc, "code", None) == 404:
                return None, "the queue does not exist on the broker yet (no worker declared it)"
            raise
    return int(depth), None


def _broker_part(settings: Settings, app: Celery | None, problems: list[str]) -> dict[str, Any]:
    queue = queue_for(app, "op_celery.track", settings) if app is not None else settings.queue
    prefix = _broker_key_prefix(settings, app)
    url = broker_url(settings)
    broker: dict[str, Any] = {
        "url": broker_description(settings),
        "queue": queue,
        "queue_key": f"{prefix}{queue}",
        "queue_length": None,
        "unfinished": None,
        "note": None,
        "answered": False,
        # The queues of the projects in OP_CELERY_PROJECT_QUEUES, each read as the main one.
        "project_queues": [
            {"queue": name, "queue_length": None, "unfinished": None, "note": None}
            for name in settings.queues[1:]
        ],
    }
    where = f"the broker at {broker_description(settings)}"
    redis_url = _redis_url_of(url)
    if redis_url is None:
        try:
            broker["queue_length"], broker["note"] = _queue_by_declare(url, queue, app)
            for part in broker["project_queues"]:
                part["queue_length"], part["note"] = _queue_by_declare(url, part["queue"], app)
            broker["answered"] = True
        except Exception as exc:  # every transport's errors: said, not raised
            broker["note"] = _broker_problem(where, exc)
            problems.append(broker["note"])
        return broker
    try:
        client = _broker_redis(redis_url)
        for part in (broker, *broker["project_queues"]):
            part["queue_length"] = int(client.llen(f"{prefix}{part['queue']}"))
            if settings.outbox:
                # Events enqueued and not yet delivered or dead-lettered (``_outbox``).
                records, _ = outbox_keys(part["queue"], prefix)
                part["unfinished"] = int(client.hlen(records))
        broker["answered"] = True
    except redis.RedisError as exc:
        broker["note"] = redis_problem(where, exc, settings.broker_url_source)
        problems.append(broker["note"])
    return broker


def _dead_letters_part(settings: Settings, problems: list[str]) -> dict[str, Any]:
    part: dict[str, Any] = {"total": None, "by_project": {}, "by_error_type": {}}
    part.update(by_project_and_error_type=[], note=None)
    if settings.redis_url is None:
        part["note"] = (
            "not available: op-celery has no Redis here (the broker is not Redis); set "
            "OP_CELERY_REDIS_URL, which its workers need too"
        )
        problems.append(part["note"])
        return part
    try:
        letters = list(DeadLetterStore(settings).list())
    except (redis.RedisError, StorageUnavailable) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, redis.RedisError) else exc
        where = f"Redis at {redis_description(settings)}"
        part["note"] = "not available: " + redis_problem(where, cause, "OP_CELERY_REDIS_URL")
        problems.append(part["note"])
        return part
    pairs = Counter((x.project, x.error_type) for x in letters)
    part.update(
        total=len(letters),
        by_project=dict(Counter(x.project for x in letters)),
        by_error_type=dict(Counter(x.error_type for x in letters)),
        by_project_and_error_type=[
            {"project": project, "error_type": error, "count": count}
            for (project, error), count in sorted(pairs.items())
        ],
    )
    return part


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
    from .._redis import redis_for

    entry: dict[str, Any] = {"name": name, "client_id": None, "api_url": None}
    entry.update(rate_limit=None, limiter=None, pace=None, not_stored=None, note=None)
    try:
        project = settings.project(name)
    except OpenPanelError as exc:
        entry["note"] = str(exc)
        return entry
    entry.update(client_id=project.client_id, api_url=redact_url(project.api_url))
    entry["rate_limit"] = project.rate_limit
    entry["pace"] = _pace(settings, name)
    entry["not_stored"] = _not_stored(settings, name)
    if not project.rate_limit:
        entry["note"] = "no rate limit set" + (
            "; the pool learns the API's from its answers" if entry["pace"] else ""
        )
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
    if settings.redis_url is None:
        entry["note"] = "limiter state not available: no Redis for op-celery"
        return entry
    try:
        limiter = limiter_module.RateLimiter(redis_for(settings), prefix=settings.key_prefix)
        state = limiter.state(project.client_id, rate, burst)
    except (redis.RedisError, StorageUnavailable, LimiterUnavailable) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, redis.RedisError) else exc
        entry["note"] = "limiter state not available: " + redis_problem(
            "its Redis", cause, "OP_CELERY_REDIS_URL"
        )
        return entry
    entry["limiter"] = {
        "paused_s": state["paused_s"],
        "backlog_s": state["backlog_s"],
        "available": state["available"],
        "burst": burst,
    }
    return entry


def _pace(settings: Settings, name: str) -> dict[str, Any] | None:
    """The project's pace as the workers share it: configured, learned (from the API's
    x-ratelimit headers or from its 429s), the one in use, and the pause; None if unreadable."""
    from .._delivery import delivery_for

    if settings.redis_url is None:
        return None
    try:
        return dict(delivery_for(settings).rate_status(name))
    except (OpenPanelError, redis.RedisError):
        return None


def _not_stored(settings: Settings, name: str) -> dict[str, int] | None:
    """The project's events the server answered without storing them, by reason (bot,
    duplicate, filtered), as the workers counted them in the ledger; None if unreadable."""
    from .._ledger import Ledger

    if settings.redis_url is None:
        return None
    try:
        return Ledger(settings).tallies(name)
    except (OpenPanelError, redis.RedisError):
        return None


def _describe_not_stored(counts: Mapping[str, int]) -> str:
    return (
        f"not stored by the server: {counts.get('bot', 0)} bot, "
        f"{counts.get('duplicate', 0)} duplicate, {counts.get('filtered', 0)} filtered"
    )


def _describe_pace(pace: Mapping[str, Any]) -> str:
    def rate(value: float | None) -> str:
        return "unpaced" if value is None else f"{value:.4g}/s"

    learned = "nothing learned yet"
    if pace.get("learned_source") == "headers":
        learned = f"learned {pace.get('learned_limit')} from the API's headers"
    elif pace.get("learned_source") == "429s":
        learned = f"learned {rate(pace.get('learned_per_second'))} from 429s"
    source = pace.get("in_use_source") or "none"
    paused = pace.get("paused_s") or 0
    return (
        f"pace {rate(pace.get('in_use_per_second'))} ({source}); configured "
        f"{pace.get('configured') or 'none'}; {learned}; "
        + (f"paused for {paused:.2f} s" if paused else "not paused")
    )


def _status_report(
    settings: Settings, env: Mapping[str, str], app: Celery | None = None
) -> dict[str, Any]:
    problems: list[str] = []
    broker = _broker_part(settings, app, problems)
    dead_letters = _dead_letters_part(settings, problems)
    spool = spool_for(settings)
    return {
        "broker": broker,
        "redis": {"url": redis_description(settings)},
        "dead_letters": dead_letters,
        "spool": {"dir": str(spool.directory), "files": len(spool)},
        "projects": [_project_status(settings, name) for name in _configured_projects(env)],
        "problems": problems,
    }


def _print_status(report: Mapping[str, Any]) -> None:
    broker = report["broker"]
    click.echo(f"broker        {broker['url']}")
    click.echo(f"redis         {report['redis']['url']}")
    for part in (broker, *broker.get("project_queues", ())):
        if part["queue_length"] is None:
            if part["note"] is not None:
                click.echo(f"queue         {part['queue']}: {part['note']}")
            continue
        unfinished = part["unfinished"]
        click.echo(
            f"queue         {part['queue']}: {part['queue_length']} waiting"
            + ("" if unfinished is None else f", {unfinished} not yet finished (outbox)")
        )
    dead = report["dead_letters"]
    if dead["total"] is None:
        click.echo(f"dead letters  {dead['note']}")
    else:
        click.echo(f"dead letters  {dead['total']}")
    rows = [
        [x["project"], x["error_type"], str(x["count"])] for x in dead["by_project_and_error_type"]
    ]
    for line in table(["project", "error_type", "count"], rows):
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
        if project.get("pace"):
            click.echo(f"    {_describe_pace(project['pace'])}")
        if project.get("not_stored") is not None:
            click.echo(f"    {_describe_not_stored(project['not_stored'])}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, for scripts.")
def status(as_json: bool) -> None:
    """Show queue length, dead letters, spool and rate limits.

    First the broker and the Redis it looks at (passwords hidden). The queue is the package's
    (OP_CELERY_QUEUE, or where your app's task_routes send op_celery's tasks); its depth is
    read from Redis, or by a passive declare on RabbitMQ and other brokers. Dead letters are
    counted by project and error type. Each configured project (OPENPANEL_CLIENT_ID,
    OPENPANEL_<NAME>_CLIENT_ID) shows its rate limiter's state when a rate is set, and the
    events the server answered without storing them (bots, duplicates, filtered). A part
    that cannot be read is said in its place, and the command exits 1.
    """
    settings = command_settings()
    report = _status_report(settings, os.environ, command_app())
    problems = report["problems"]
    answered = report["broker"]["answered"] or report["dead_letters"]["total"] is not None
    if problems and not answered:
        # Nothing answered: one line; the broker's problem alone when its Redis is op-celery's.
        same = _redis_url_of(broker_url(settings)) == settings.redis_url
        raise click.ClickException(problems[0] if same else "; ".join(problems))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_status(report)
    if problems:
        count = "1 part" if len(problems) == 1 else f"{len(problems)} parts"
        raise click.ClickException(f"{count} of the status could not be read (said above)")
