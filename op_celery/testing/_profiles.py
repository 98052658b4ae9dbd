"""The profiles the stand-in keeps, as OpenPanel's profile buffer makes them visible.

On the real server every profile write (``identify``, an ``increment``, a browser session's
start, an ``assign_group``) goes to a Redis list, the profile buffer, which a cron job flushes
every 10 s (``flushProfiles`` in ``apps/worker/src/boot-cron.ts``); only then is the profile
in the cache that ``increment``/``decrement`` read (``getProfileById``). So a profile is
``Profile not found`` until the flush after its first write, and an increment reads the
properties of the last flush: two increments of one property within one interval both start
from the same value, and the second one's write wins (the server loses the first).

`ProfileStore` models that with a worst case rather than a cron phase: a write becomes visible
``flush_s`` seconds after it was made (on the model's clock), so a test that advances the clock
by the interval always finds it; ``flush_s`` 0 makes every write visible at once. Writes are
merged as the buffer merges them (``deepMergeObjects`` after ``strip``, in the order made).

Not modelled: the geo and user-agent properties the server adds to a profile (country, os,
browser...), ClickHouse turning property values into strings, arrays made by ``assocPath`` for
numeric path segments (the stand-in makes objects), and the buffer's early flush at 200 writes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, Final

__all__ = [
    "NOT_A_NUMBER",
    "NOT_FOUND",
    "PROFILE_FLUSH_INTERVAL_S",
    "ProfileStore",
    "profile_writes",
]

#: Seconds between two flushes of OpenPanel's profile buffer (its cron pattern ``1000 * 10``).
PROFILE_FLUSH_INTERVAL_S: Final = 10.0
#: `ProfileStore.adjust`'s answers when it cannot: the server's 404 and 400 messages.
NOT_FOUND: Final = "Profile not found"
NOT_A_NUMBER: Final = "Property value is not a number"
#: What JavaScript's ``parseInt(text, 10)`` reads: leading white space, a sign, decimal digits.
_PARSE_INT: Final = re.compile(r"[\s\ufeff]*([+-]?[0-9]+)")


@dataclasses.dataclass
class _Write:
    due: float  # on the model's clock: when the buffer's flush makes it visible
    properties: dict[str, Any]


@dataclasses.dataclass
class _Profile:
    visible: dict[str, Any] | None = None  # None until a flush: "Profile not found"
    pending: list[_Write] = dataclasses.field(default_factory=list)

    def flush(self, now: float) -> dict[str, Any] | None:
        """Apply the writes due by ``now``, in the order they were made; the visible properties."""
        while self.pending and self.pending[0].due <= now:
            write = self.pending.pop(0)
            self.visible = _deep_merge(self.visible or {}, write.properties)
        return self.visible


class ProfileStore:
    """Profiles per (client id, profile id as stored), written now and visible after a flush.

    Not thread-safe: `ApiModel` calls it under its lock.
    """

    def __init__(self) -> None:
        self._profiles: dict[tuple[str, str], _Profile] = {}

    def clear(self) -> None:
        self._profiles.clear()

    def write(
        self, key: tuple[str, str], properties: dict[str, Any], now: float, flush_s: float
    ) -> None:
        """Queue a write of ``properties`` (``upsertProfile``), visible ``flush_s`` from ``now``."""
        profile = self._profiles.setdefault(key, _Profile())
        # Due times only grow (the clock and flush_s change forward or all at once), but keep
        # the list ordered whatever a test does with the interval.
        due = max(now + flush_s, profile.pending[-1].due if profile.pending else -math.inf)
        profile.pending.append(_Write(due, _strip(properties)))

    def visible(self, key: tuple[str, str], now: float) -> dict[str, Any] | None:
        """The properties ``increment`` would read at ``now``; None while not found."""
        profile = self._profiles.get(key)
        return None if profile is None else profile.flush(now)

    def adjust(
        self, key: tuple[str, str], path: str, by: float, now: float, flush_s: float
    ) -> str | None:
        """Increment (``by`` > 0) or decrement a property as ``adjustProfileProperty`` does;
        None when done, else the server's message (`NOT_FOUND`, `NOT_A_NUMBER`)."""
        properties = self.visible(key, now)
        if properties is None:
            return NOT_FOUND
        segments = path.split(".")
        current = _path_or("0", segments, properties)
        parsed = _parse_int(current)
        if parsed is None:
            return NOT_A_NUMBER
        result: int | float = parsed + by
        # The write carries the whole property map it read, with the one path changed.
        self.write(key, _assoc_path(segments, result, properties), now, flush_s)
        return None


def profile_writes(
    kind: str, payload: Mapping[str, Any], server_event: bool
) -> list[tuple[object, dict[str, Any]]]:
    """The profile writes (profile id, properties) an accepted event makes on the server."""
    if kind == "identify":
        properties = payload.get("properties")
        return [(payload["profileId"], dict(properties) if isinstance(properties, dict) else {})]
    if kind == "assign_group" and payload.get("profileId") is not None:
        return [(payload["profileId"], {})]
    if kind != "track":
        return []
    writes: list[tuple[object, dict[str, Any]]] = []
    properties = payload.get("properties")
    identity = properties.get("__identify") if isinstance(properties, dict) else None
    # getIdentity: properties.__identify, else {profileId}; identified only beyond the id.
    if isinstance(identity, dict) and len(identity) > 1 and identity.get("profileId"):
        inner = identity.get("properties")
        writes.append((identity["profileId"], dict(inner) if isinstance(inner, dict) else {}))
    elif payload.get("profileId") is not None and not server_event:
        writes.append((payload["profileId"], {}))  # the session_start's profile upsert
    return writes


def _path_or(default: object, segments: list[str], value: object) -> object:
    """Ramda's ``pathOr``: the value at the path, or ``default`` if missing or null."""
    for segment in segments:
        if isinstance(value, dict):
            value = value.get(segment)
        elif isinstance(value, list) and segment.isdigit() and int(segment) < len(value):
            value = value[int(segment)]
        else:
            return default
    return default if value is None else value


def _js_text(value: object) -> str:
    """``String(value)`` in JavaScript, as far as ``parseInt`` reads it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**21 else _js_text(float(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        size = abs(value)
        sign = "-" if value < 0 else ""
        if size == 0 or 1e-6 <= size < 1e21:
            return f"{sign}{int(size)}"  # the digits before the point are all parseInt reads
        return sign + repr(size)  # exponent form, "1e+21", "1.5e-07": parseInt reads its digit
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ",".join("" if item is None else _js_text(item) for item in value)
    return "[object Object]"


def _parse_int(value: object) -> int | None:
    """``Number.parseInt(value, 10)``; None for NaN."""
    found = _PARSE_INT.match(_js_text(value))
    return None if found is None else int(found.group(1))


def _assoc_path(segments: list[str], value: object, target: dict[str, Any]) -> dict[str, Any]:
    """Ramda's ``assocPath``: a copy of ``target`` with the path set, objects made as needed."""
    head, rest = segments[0], segments[1:]
    copy = dict(target)
    if rest:
        inner = copy.get(head)
        copy[head] = _assoc_path(rest, value, inner if isinstance(inner, dict) else {})
    else:
        copy[head] = value
    return copy


def _empty(value: object) -> bool:
    return value is None or (isinstance(value, (str, list, dict)) and not value)


def _strip(properties: dict[str, Any]) -> dict[str, Any]:
    """``strip`` of ``upsertProfile``: top-level nulls and empty strings, lists, objects go."""
    return {key: value for key, value in properties.items() if not _empty(value)}


def _deep_merge(target: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """``deepMergeObjects`` of ``@openpanel/common``: source wins, except a null or an empty
    string over a value; objects on both sides merge."""
    merged: dict[str, Any] = {}
    for key in {**target, **source}:
        old, new = target.get(key), source.get(key)
        if (
            key not in source
            or (new is None and old is not None)
            or (new == "" and isinstance(old, str) and old)
        ):
            merged[key] = old
        elif isinstance(old, dict) and isinstance(new, dict):
            merged[key] = _deep_merge(old, new)
        else:
            merged[key] = new
    return merged
