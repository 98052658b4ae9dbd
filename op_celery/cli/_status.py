"""``op-celery status``: the queue, the dead letters, the spool and each project's limiter."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import import_module
from types import ModuleType
from typing import Any

import click
import redis

from .._enqueue import spool_for
from .._exceptions import OpenPanelError
from .._outbox import outbox_keys
from .._settings import EMBEDDED_URL, Settings, _redis_url_of
from ..dead_letters import DeadLetterStore
from ._main import BROKER_TIMEOUT_S, broker_description, command_settings, main, table

__all__ = ["status"]


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
        from .._embedded import embedded_redis

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
    from .._redis import redis_for

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
    queue_key = f"{settings.broker_key_prefix}{settings.queue}"
    broker: dict[str, Any] = {
        "url": broker_description(settings),
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
            f"the broker at {broker_description(settings)} did not answer "
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


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, for scripts.")
def status(as_json: bool) -> None:
    """Show queue length, dead letters, spool and rate limits.

    The queue is the package's (OP_CELERY_QUEUE) on the broker; its length is read from Redis
    (not available for other brokers). Dead letters are counted by project and error type.
    Each configured project (OPENPANEL_CLIENT_ID, OPENPANEL_<NAME>_CLIENT_ID) shows its rate
    limiter's state when a rate is set.
    """
    report = _status_report(command_settings(), os.environ)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_status(report)
