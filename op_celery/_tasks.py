"""The typed Celery tasks, one per OpenPanel operation, and the proxies the package exports.

Each task class only declares its operation and, for type checkers, the signature of its
``delay``/``adelay``; everything it does is :class:`~op_celery._task.OpenPanelTask`'s. The
tasks are shared tasks: Celery registers them on every app, present and future, and a proxy
(``op_celery.track``) resolves to the one on the app that publishes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from celery import shared_task
from celery.local import Proxy

from ._app import publishing_app
from ._task import JSON, OpenPanelTask

if TYPE_CHECKING:
    from celery.result import AsyncResult

    from ._task import _awaitable

__all__ = [
    "AliasTask",
    "AssignGroupTask",
    "DecrementTask",
    "GroupTask",
    "IdentifyTask",
    "IncrementTask",
    "OpenPanelTask",
    "RevenueTask",
    "TrackTask",
    "alias",
    "assign_group",
    "decrement",
    "group",
    "identify",
    "increment",
    "revenue",
    "track",
]


class TrackTask(OpenPanelTask):
    operation = "track"

    if TYPE_CHECKING:

        def delay(
            self,
            name: str,
            properties: JSON | None = None,
            profile_id: str | int | None = None,
            groups: Sequence[str] | None = None,
            timestamp: datetime | None = None,
            device_id: str | None = None,
            *,
            client_ip: str | None = None,
            user_agent: str | None = None,
            project: str = "default",
            event_id: str | None = None,
            dedup_for: float | timedelta | None = None,
        ) -> AsyncResult[None]:
            """Enqueue a ``track`` event; ``timestamp`` defaults to now; ``device_id`` (at
            most 64 characters) is sent as ``properties.__deviceId``, as OpenPanel's SDKs do."""
            ...

        adelay = _awaitable(delay)


class RevenueTask(OpenPanelTask):
    operation = "revenue"

    if TYPE_CHECKING:

        def delay(
            self,
            amount: int,
            properties: JSON | None = None,
            profile_id: str | int | None = None,
            groups: Sequence[str] | None = None,
            timestamp: datetime | None = None,
            device_id: str | None = None,
            *,
            client_ip: str | None = None,
            user_agent: str | None = None,
            project: str = "default",
            event_id: str | None = None,
            dedup_for: float | timedelta | None = None,
        ) -> AsyncResult[None]:
            """Enqueue a revenue of ``amount`` minor units (cents): a ``revenue`` track event
            with ``properties.__revenue``, as OpenPanel's SDKs send ``revenue(amount)``."""
            ...

        adelay = _awaitable(delay)


class IdentifyTask(OpenPanelTask):
    operation = "identify"

    if TYPE_CHECKING:

        def delay(
            self,
            profile_id: str | int,
            first_name: str | None = None,
            last_name: str | None = None,
            email: str | None = None,
            avatar: str | None = None,
            properties: JSON | None = None,
            *,
            client_ip: str | None = None,
            user_agent: str | None = None,
            project: str = "default",
            event_id: str | None = None,
            dedup_for: float | timedelta | None = None,
        ) -> AsyncResult[None]:
            """Enqueue an ``identify``: create or update a profile."""
            ...

        adelay = _awaitable(delay)


class AliasTask(OpenPanelTask):
    operation = "alias"

    if TYPE_CHECKING:

        def delay(
            self,
            profile_id: str | int,
            alias: str,
            *,
            client_ip: str | None = None,
            user_agent: str | None = None,
            project: str = "default",
            event_id: str | None = None,
            dedup_for: float | timedelta | None = None,
        ) -> AsyncResult[None]:
            """Enqueue an ``alias`` (current OpenPanel servers answer "Alias is not supported")."""
            ...

        adelay = _awaitable(delay)


class _CounterTask(OpenPanelTask):
    if TYPE_CHECKING:

        def delay(
            self,
            profile_id: str | int,
            property: str,
            value: float = 1,
            *,
            client_ip: str | None = None,
            user_agent: str | None = None,
            project: str = "default",
            event_id: str | None = None,
            dedup_for: float | timedelta | None = None,
        ) -> AsyncResult[None]:
            """Enqueue a change of a numeric profile property by a positive ``value``."""
            ...

        adelay = _awaitable(delay)


class IncrementTask(_CounterTask):
    operation = "increment"


class DecrementTask(_CounterTask):
    operation = "decrement"


class GroupTask(OpenPanelTask):
    operation = "group"

    if TYPE_CHECKING:

        def delay(
            self,
            id: str,
            type: str,
            name: str,
            properties: JSON | None = None,
            *,
            client_ip: str | None = None,
            user_agent: str | None = None,
            project: str = "default",
            event_id: str | None = None,
            dedup_for: float | timedelta | None = None,
        ) -> AsyncResult[None]:
            """Enqueue a ``group``: create or update a group."""
            ...

        adelay = _awaitable(delay)


class AssignGroupTask(OpenPanelTask):
    operation = "assign_group"

    if TYPE_CHECKING:

        def delay(
            self,
            group_ids: Sequence[str],
            profile_id: str | int | None = None,
            *,
            client_ip: str | None = None,
            user_agent: str | None = None,
            project: str = "default",
            event_id: str | None = None,
            dedup_for: float | timedelta | None = None,
        ) -> AsyncResult[None]:
            """Enqueue an ``assign_group``: put a profile into groups."""
            ...

        adelay = _awaitable(delay)


def _deliver(self: OpenPanelTask, *args: Any, **kwargs: Any) -> None:
    OpenPanelTask.run(self, *args, **kwargs)


def _shared(base: type[OpenPanelTask]) -> Any:
    """Register ``base`` as a shared task on every Celery app (present and future) and return
    a proxy that resolves it on the app that publishes: the user's, else the package's."""
    name = f"op_celery.{base.operation}"
    shared_task(base=base, bind=True, name=name)(cast(Any, _deliver))
    return Proxy(lambda: publishing_app().tasks[name])


track: TrackTask = _shared(TrackTask)
revenue: RevenueTask = _shared(RevenueTask)
identify: IdentifyTask = _shared(IdentifyTask)
alias: AliasTask = _shared(AliasTask)
increment: IncrementTask = _shared(IncrementTask)
decrement: DecrementTask = _shared(DecrementTask)
group: GroupTask = _shared(GroupTask)
assign_group: AssignGroupTask = _shared(AssignGroupTask)
