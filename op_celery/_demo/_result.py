"""What the demo is asked to do and what it saw: options, the plan of events, the summary."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_EVENTS",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_WORKERS",
    "MIN_EVENTS",
    "DemoError",
    "DemoOptions",
    "DemoResult",
    "plan_events",
]

#: Events enqueued by default.
DEFAULT_EVENTS = 300
#: Fewest events: enough for one of every type and a few tracks.
MIN_EVENTS = 10
#: Worker processes started by default.
DEFAULT_WORKERS = 2
#: Threads per worker process by default.
DEFAULT_CONCURRENCY = 4
#: Seconds the whole demo may take (start, delivery) before it gives up.
DEFAULT_TIMEOUT_S = 120.0
#: Seconds a stopped worker gets to finish before its process group is killed.

_TRACK_NAMES = ("page_view", "signup", "add_to_cart", "checkout_completed", "search")


class DemoError(Exception):
    """The demo could not run (a worker died, the broker does not answer, ...)."""


@dataclass(frozen=True)
class DemoOptions:
    events: int = DEFAULT_EVENTS
    workers: int = DEFAULT_WORKERS
    concurrency: int = DEFAULT_CONCURRENCY
    #: A rate such as ``"50/s"``: the workers' limit (``OPENPANEL_RATE_LIMIT``), and the
    #: stand-in's server-side limit, so a limiter that does not hold it shows up as 429s.
    rate_limit: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass
class DemoResult:
    """What the demo saw. ``deliverable`` excludes alias events: OpenPanel refuses them."""

    enqueued: int = 0
    by_operation: dict[str, int] = field(default_factory=dict)
    deliverable: int = 0
    delivered: int = 0
    retried_by_reason: dict[str, int] = field(default_factory=dict)
    throttled_429: int = 0
    limiter_waits: int = 0
    dead_letters_by_type: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    rate_per_s: float | None = None
    rate_limit: str | None = None
    #: The limit as (requests, period in seconds).
    rate_limit_parsed: tuple[int, float] | None = None
    #: The rate actually held: the most requests sent in any span of ``busiest_window_s``.
    busiest_count: int | None = None
    busiest_window_s: float | None = None
    timed_out: bool = False

    @property
    def retried(self) -> int:
        return sum(self.retried_by_reason.values())

    @property
    def dead_letters(self) -> int:
        return sum(self.dead_letters_by_type.values())

    @property
    def all_delivered(self) -> bool:
        return not self.timed_out and self.delivered >= self.deliverable

    def summary_lines(self) -> list[str]:
        def counts(values: Mapping[str, int]) -> str:
            ordered = sorted(values.items(), key=lambda item: (-item[1], item[0]))
            return ", ".join(f"{key} {value}" for key, value in ordered)

        aliases = self.by_operation.get("alias", 0)
        lines = [
            "Summary",
            f"  enqueued      {self.enqueued:>6}  ({counts(self.by_operation)})",
            f"  delivered     {self.delivered:>6}  of {self.deliverable} deliverable"
            + (
                f" ({aliases} alias: OpenPanel answers 'Alias is not supported')" if aliases else ""
            ),
            f"  retried       {self.retried:>6}"
            + (f"  ({counts(self.retried_by_reason)})" if self.retried else ""),
            f"  throttled     {self.throttled_429:>6}  429 answers seen",
            f"  dead letters  {self.dead_letters:>6}"
            + (f"  ({counts(self.dead_letters_by_type)})" if self.dead_letters else ""),
        ]
        if self.rate_limit is not None:
            lines.append(
                f"  limiter waits {self.limiter_waits:>6}  (events held back by the limit)"
            )
        if self.rate_per_s is None:
            lines.append("  rate               -  (fewer than two deliveries)")
        else:
            rate = (
                f"  rate          {self.rate_per_s:>6.1f}  events/s, first to last accepted request"
            )
            if self.rate_limit_parsed is not None:
                limit, period_s = self.rate_limit_parsed
                rate += (
                    f" ({self.rate_per_s * period_s / limit:.0%} of the {self.rate_limit} limit)"
                )
            lines.append(rate)
        if self.rate_limit_parsed and self.busiest_count and self.busiest_window_s:
            limit, period_s = self.rate_limit_parsed
            window_s = self.busiest_window_s
            held = self.busiest_count / window_s
            lines.append(
                f"  rate held     {held:>6.1f}  events/s in the busiest {window_s:g} s "
                f"({held * period_s / limit:.0%} of the {self.rate_limit} limit)"
            )
        lines.append(f"  took          {self.elapsed_s:>6.1f}  s")
        if self.all_delivered:
            lines.append(f"All {self.deliverable} deliverable events were delivered.")
        else:
            why = "timed out" if self.timed_out else "some were given up"
            lines.append(
                f"Not all delivered ({why}): {self.delivered} of {self.deliverable}; see "
                "`op-celery dead-letters list` in a run of your own"
            )
        return lines


def plan_events(count: int) -> list[tuple[str, dict[str, Any]]]:
    """``count`` events of every type: identifies first (so the profiles exist), mostly
    tracks, and the increments, decrements, group assignment and one alias at the end."""
    if count < MIN_EVENTS:
        raise ValueError(f"the demo needs at least {MIN_EVENTS} events, got {count}")
    profiles = [f"demo-user-{i}" for i in range(1, max(2, count // 30) + 1)]
    head: list[tuple[str, dict[str, Any]]] = [
        (
            "identify",
            {"profile_id": p, "first_name": "Demo", "email": f"{p}@example.com"},
        )
        for p in profiles
    ]
    head.append(
        ("group", {"id": "demo-team", "type": "team", "name": "Demo team", "properties": {}})
    )
    tail: list[tuple[str, dict[str, Any]]] = [
        ("assign_group", {"group_ids": ["demo-team"], "profile_id": profiles[0]})
    ]
    tail += [
        ("increment", {"profile_id": p, "property": "visits", "value": 1})
        for p in profiles[: max(1, count // 60)]
    ]
    tail += [
        ("decrement", {"profile_id": p, "property": "credits", "value": 2})
        for p in profiles[: max(1, count // 120)]
    ]
    tail.append(("alias", {"profile_id": profiles[0], "alias": "demo-alias-1"}))
    tracks: list[tuple[str, dict[str, Any]]] = [
        (
            "track",
            {
                "name": _TRACK_NAMES[i % len(_TRACK_NAMES)],
                "properties": {"demo": True, "n": i},
                "profile_id": profiles[i % len(profiles)],
            },
        )
        for i in range(count - len(head) - len(tail))
    ]
    return head + tracks + tail
