"""Capture: while a recorder is active, ``.delay()`` validates as in production and then records
the event here instead of publishing it; nothing reaches a broker or the network.

This is the core half of ``op_celery.testing.capture()`` and the ``openpanel_events`` pytest
fixture. Recorders are process-wide, not per context or thread, because the code under test
may publish from threads it starts (a thread does not inherit a ``ContextVar``); the innermost
active recorder receives the events.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ._events import Event, build_event

__all__ = ["CapturedEvent", "Recorder", "active_recorder", "capturing"]


@dataclass(frozen=True, slots=True)
class CapturedEvent:
    """One event a task call would have sent."""

    #: ``track``, ``revenue``, ``identify``, ``alias``, ``increment``, ``decrement``, ``group``,
    #: ``assign_group``.
    operation: str
    #: The JSON payload OpenPanel would receive (``properties.__timestamp`` included for track).
    payload: dict[str, Any]
    project: str
    client_ip: str | None
    user_agent: str | None
    event_id: str
    #: The call's arguments as they would travel on the broker (defaults filled in).
    kwargs: dict[str, Any]

    @property
    def name(self) -> str | None:
        """The event's name for ``track``, the group's for ``group``; else None."""
        name = self.payload.get("name")
        return name if isinstance(name, str) else None

    @property
    def properties(self) -> dict[str, Any]:
        properties = self.payload.get("properties")
        return properties if isinstance(properties, dict) else {}

    @classmethod
    def of(cls, event: Event, kwargs: Mapping[str, Any]) -> CapturedEvent:
        return cls(
            operation=event.operation,
            payload=dict(event.body.get("payload") or {}),
            project=event.project,
            client_ip=event.client_ip,
            user_agent=event.user_agent,
            event_id=event.event_id,
            kwargs=dict(kwargs),
        )


class Recorder(list[CapturedEvent]):
    """The captured events, oldest first: a list, with the filters a test wants."""

    _lock: threading.Lock

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def record(self, operation: str, kwargs: Mapping[str, Any]) -> CapturedEvent:
        """Build the event of a validated call (as the worker would) and keep it."""
        captured = CapturedEvent.of(build_event(operation, kwargs), kwargs)
        with self._lock:
            self.append(captured)
        return captured

    def of(self, operation: str) -> list[CapturedEvent]:
        """The captured events of one operation, e.g. ``events.of("identify")``."""
        return [event for event in self if event.operation == operation]

    def tracked(self, name: str | None = None) -> list[CapturedEvent]:
        """The ``track`` events (a ``revenue`` is one, named ``revenue``), or those named
        ``name``."""
        return [e for e in self if e.operation in _TRACKS and (name is None or e.name == name)]

    @property
    def names(self) -> list[str]:
        """The names of the tracked events, in order: ``assert events.names == ["signup"]``."""
        return [e.name for e in self.tracked() if e.name is not None]


#: The operations that send a track event: ``revenue`` sends one named ``revenue``.
_TRACKS = frozenset({"track", "revenue"})


_recorders: list[Recorder] = []
_recorders_lock = threading.Lock()


def active_recorder() -> Recorder | None:
    """The recorder that receives events now, or None (then calls publish as usual)."""
    return _recorders[-1] if _recorders else None


@contextmanager
def capturing() -> Iterator[Recorder]:
    """Make a new recorder active until the block ends."""
    recorder = Recorder()
    with _recorders_lock:
        _recorders.append(recorder)
    try:
        yield recorder
    finally:
        with _recorders_lock:
            # By identity: recorders are lists, and two empty ones are equal.
            index = next(i for i, r in enumerate(_recorders) if r is recorder)
            del _recorders[index]
