"""One validating builder per OpenPanel operation.

Each builder takes the keyword arguments of its task (snake_case), checks them against the
rules of the server's own schemas (see the API contract), and returns an :class:`Event`: the
``{"type", "payload"}`` body the API takes, plus what travels beside it (project, IP, user agent,
event id). The same builders run twice: in the caller at ``.delay()``, so nothing invalid is
enqueued, and on the worker, so a malformed message from elsewhere is refused rather than sent.

Hand-written rather than pydantic models: the enqueue path pays for every check, the rules are
few, and each failure must name the argument the *caller* passed, not a camelCase API field.
"""

from __future__ import annotations

import ipaddress
import math
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from ._context import current_request
from ._exceptions import InvalidEvent

__all__ = ["OPERATIONS", "Event", "build_event", "normalize_call"]

#: Longest event name the server accepts, in characters.
MAX_EVENT_NAME_CHARS = 80
#: Longest user agent forwarded, in characters; longer ones are refused, not cut.
MAX_USER_AGENT_CHARS = 1024
#: Longest project name, in characters.
MAX_PROJECT_NAME_CHARS = 64
#: Event names the server reserves for its own session tracking.
RESERVED_EVENT_NAMES = frozenset({"session_start", "session_end"})
#: Lower-case fragments the server's attack blocklist refuses anywhere in an event name (path
#: traversal, template and SQL injection probes); a subset of its list.
BLOCKED_NAME_FRAGMENTS = (
    "../", "..\\", "%2e%2e", "${", "%{", "' or '", "' and '", "union select", "pg_sleep",
    "/etc/passwd", "/bin/bash", "cmd.exe", "<!doctype", "/cgi-bin/", ".git/config", ".env.bak",
)  # fmt: skip
#: Names that are URL paths of a vulnerability scanner (``/x.php``, ``/.env``, ``/wp-admin``).
PATH_SCAN_NAME = re.compile(
    r"^/(?:.+\.php$|\.[a-z]|[a-z_-]+\.(?:php|env|ya?ml|json|xml|config|ini|bak|sql|log)"
    r"|wp-|wordpress|phpmyadmin)",
    re.IGNORECASE,
)

#: Any of `BLOCKED_NAME_FRAGMENTS`, in one search.
_BLOCKED_FRAGMENT = re.compile("|".join(re.escape(f) for f in BLOCKED_NAME_FRAGMENTS))
#: ASCII control characters (and DEL), which could break a value out of its HTTP header.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
#: An IPv4 address as ``ipaddress`` writes it (four decimal octets, no leading zeros).
_CANONICAL_IPV4 = re.compile(
    r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}"
    r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
)
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_PROJECT = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True, slots=True)
class Event:
    """A validated event, ready to send.

    ``body`` is exactly what is POSTed to ``/track``. ``client_ip`` and ``user_agent`` become
    headers; ``event_id`` becomes the ``request-id`` header and the key that stops duplicates.
    """

    operation: str
    body: dict[str, Any]
    project: str
    client_ip: str | None
    user_agent: str | None
    event_id: str


def _fail(operation: str, field: str, rule: str) -> InvalidEvent:
    return InvalidEvent(operation, field, rule)


def _non_empty_str(op: str, field: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(op, field, f"must be a non-empty string, got {value!r}")
    return value


def _optional_str(op: str, field: str, value: object) -> str | None:
    if value is None:
        return None
    return _non_empty_str(op, field, value)


def _profile_id(op: str, value: object, *, required: bool) -> str | int | float | None:
    if value is None:
        if required:
            raise _fail(op, "profile_id", "is required (a non-empty string or a number)")
        return None
    if isinstance(value, bool):
        raise _fail(op, "profile_id", "must be a non-empty string or a number, not a bool")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail(op, "profile_id", "must be a finite number")
        return value
    if isinstance(value, str) and value.strip():
        return value
    raise _fail(op, "profile_id", f"must be a non-empty string or a number, got {value!r}")


#: Exact types of values that need no check: a dict or list item of one of them is taken as it
#: is; anything else (floats, containers, subclasses) goes through `_json_value`.
_PLAIN_SCALARS = (str, bool, int, type(None))


def _json_value(op: str, path: str, value: object, depth: int = 0) -> Any:
    """Check that ``value`` is plain JSON; return it with tuples turned into lists."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail(op, path, "must be a finite number (JSON has no NaN or Infinity)")
        return value
    if depth > 32:
        raise _fail(op, path, "is nested more than 32 levels deep")
    # Items that are plain scalars are taken as they are, without a recursive call or the text
    # of their path, which is only needed for an error.
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail(op, path, f"must have string keys, found key {key!r}")
            if type(item) in _PLAIN_SCALARS:
                out[key] = item
            else:
                out[key] = _json_value(op, f"{path}[{key!r}]", item, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [
            item
            if type(item) in _PLAIN_SCALARS
            else _json_value(op, f"{path}[{i}]", item, depth + 1)
            for i, item in enumerate(value)
        ]
    raise _fail(
        op,
        path,
        f"must be JSON (str, int, float, bool, None, list, dict); got {type(value).__name__}: "
        "convert it first, e.g. a datetime with .isoformat()",
    )


def _properties(op: str, value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _fail(op, "properties", f"must be a dict, got {type(value).__name__}")
    result: dict[str, Any] = _json_value(op, "properties", value)
    return result


def _str_list(op: str, field: str, value: object, *, allow_empty: bool) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise _fail(op, field, f"must be a list of non-empty strings, got {value!r}")
    if not value and not allow_empty:
        raise _fail(op, field, "must hold at least one id")
    return [_non_empty_str(op, f"{field}[{i}]", item) for i, item in enumerate(value)]


def _positive_number(op: str, field: str, value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(op, field, f"must be a positive number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise _fail(op, field, f"must be a positive number, got {value!r}")
    return value


def _event_name(op: str, value: object) -> str:
    name = _non_empty_str(op, "name", value)
    if len(name) > MAX_EVENT_NAME_CHARS:
        raise _fail(op, "name", f"must be at most {MAX_EVENT_NAME_CHARS} characters")
    if "\n" in name or "\r" in name:
        raise _fail(op, "name", "must not contain line breaks")
    if name in RESERVED_EVENT_NAMES:
        raise _fail(op, "name", f"must not be {name!r}: the server reserves it for sessions")
    lowered = name.lower()
    if _BLOCKED_FRAGMENT.search(lowered) or PATH_SCAN_NAME.match(name):
        raise _fail(op, "name", "looks like an attack probe, which the server drops; rename it")
    return name


def _email(op: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _EMAIL.match(value):
        raise _fail(op, "email", f"must be a valid email address, got {value!r}")
    return value


def _url(op: str, field: str, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        parts = urlsplit(value)
        if parts.scheme in ("http", "https") and parts.netloc:
            return value
    raise _fail(op, field, f"must be an http(s) URL, got {value!r}")


def _client_ip(op: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(op, "client_ip", f"must be an IP address string, got {value!r}")
    text = value.strip()
    if _CANONICAL_IPV4.fullmatch(text):
        return text  # what ipaddress would return, without parsing it
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise _fail(op, "client_ip", f"must be an IPv4 or IPv6 address, got {value!r}") from None


def _user_agent(op: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(op, "user_agent", f"must be a non-empty string, got {value!r}")
    if len(value) > MAX_USER_AGENT_CHARS:
        raise _fail(op, "user_agent", f"must be at most {MAX_USER_AGENT_CHARS} characters")
    if _CONTROL_CHARS.search(value):
        # A control character would let the value break out of its HTTP header.
        raise _fail(op, "user_agent", "must not contain control characters or line breaks")
    return value


def _project(op: str, value: object) -> str:
    if (
        not isinstance(value, str)
        or not _PROJECT.match(value)
        or len(value) > MAX_PROJECT_NAME_CHARS
    ):
        raise _fail(
            op,
            "project",
            f"must be a project name of letters, digits, '_', '-' or '.', got {value!r}",
        )
    return value


def _timestamp(op: str, value: object) -> str:
    """Return an ISO-8601 UTC time; accept an aware datetime or the ISO string made from one."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise _fail(op, "timestamp", f"must be an ISO-8601 time, got {value!r}") from None
    else:
        raise _fail(op, "timestamp", f"must be a timezone-aware datetime, got {value!r}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise _fail(
            op,
            "timestamp",
            "must be timezone-aware: use datetime.now(timezone.utc), not datetime.utcnow()",
        )
    utc = moment.astimezone(timezone.utc)
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _event_id(op: str, value: object) -> str:
    if not isinstance(value, str) or not 8 <= len(value) <= 64 or not value.isascii():
        raise _fail(op, "event_id", f"must be an ASCII id of 8 to 64 characters, got {value!r}")
    return value


def _drop_none(payload: dict[str, Any]) -> dict[str, Any]:
    # The server rejects null for optional fields (profileId, value): omit them instead.
    return {key: value for key, value in payload.items() if value is not None}


# Each payload builder takes the already-bound keyword arguments of its operation.
_Builder = Callable[[dict[str, Any]], dict[str, Any]]


def _track(kw: dict[str, Any]) -> dict[str, Any]:
    op = "track"
    name = _event_name(op, kw["name"])
    properties = _properties(op, kw["properties"]) or {}
    if name == "revenue":
        revenue = properties.get("__revenue")
        if isinstance(revenue, bool) or not isinstance(revenue, int) or revenue < 0:
            raise _fail(
                op,
                "properties['__revenue']",
                "must be a non-negative integer (minor units) when name is 'revenue'",
            )
    properties["__timestamp"] = _timestamp(op, kw["timestamp"])
    groups = (
        None if kw["groups"] is None else _str_list(op, "groups", kw["groups"], allow_empty=True)
    )
    return _drop_none(
        {
            "name": name,
            "properties": properties,
            "profileId": _profile_id(op, kw["profile_id"], required=False),
            "groups": groups,
        }
    )


def _identify(kw: dict[str, Any]) -> dict[str, Any]:
    op = "identify"
    return _drop_none(
        {
            "profileId": _profile_id(op, kw["profile_id"], required=True),
            "firstName": _optional_str(op, "first_name", kw["first_name"]),
            "lastName": _optional_str(op, "last_name", kw["last_name"]),
            "email": _email(op, kw["email"]),
            "avatar": _url(op, "avatar", kw["avatar"]),
            "properties": _properties(op, kw["properties"]),
        }
    )


def _alias(kw: dict[str, Any]) -> dict[str, Any]:
    op = "alias"
    return {
        "profileId": _profile_id(op, kw["profile_id"], required=True),
        "alias": _non_empty_str(op, "alias", kw["alias"]),
    }


def _counter(op: str) -> _Builder:
    def build(kw: dict[str, Any]) -> dict[str, Any]:
        return {
            "profileId": _profile_id(op, kw["profile_id"], required=True),
            "property": _non_empty_str(op, "property", kw["property"]),
            "value": _positive_number(op, "value", kw["value"]),
        }

    return build


def _group(kw: dict[str, Any]) -> dict[str, Any]:
    op = "group"
    return _drop_none(
        {
            "id": _non_empty_str(op, "id", kw["id"]),
            "type": _non_empty_str(op, "type", kw["type"]),
            "name": _non_empty_str(op, "name", kw["name"]),
            "properties": _properties(op, kw["properties"]),
        }
    )


def _assign_group(kw: dict[str, Any]) -> dict[str, Any]:
    op = "assign_group"
    return _drop_none(
        {
            "groupIds": _str_list(op, "group_ids", kw["group_ids"], allow_empty=False),
            "profileId": _profile_id(op, kw["profile_id"], required=False),
        }
    )


_REQUIRED = object()

#: Arguments every operation takes besides its own, with their defaults.
_COMMON: dict[str, Any] = {
    "client_ip": None,
    "user_agent": None,
    "project": "default",
    "event_id": None,
}


@dataclass(frozen=True, slots=True)
class _Operation:
    name: str
    params: dict[str, Any]  # the operation's own parameters, in order, with defaults
    build_payload: _Builder

    @property
    def all_params(self) -> dict[str, Any]:
        return {**self.params, **_COMMON}


#: The operations of the API, by type, with their task parameters in positional order.
OPERATIONS: dict[str, _Operation] = {
    op.name: op
    for op in (
        _Operation(
            "track",
            {
                "name": _REQUIRED,
                "properties": None,
                "profile_id": None,
                "groups": None,
                "timestamp": None,
            },
            _track,
        ),
        _Operation(
            "identify",
            {
                "profile_id": _REQUIRED,
                "first_name": None,
                "last_name": None,
                "email": None,
                "avatar": None,
                "properties": None,
            },
            _identify,
        ),
        _Operation("alias", {"profile_id": _REQUIRED, "alias": _REQUIRED}, _alias),
        _Operation(
            "increment",
            {"profile_id": _REQUIRED, "property": _REQUIRED, "value": 1},
            _counter("increment"),
        ),
        _Operation(
            "decrement",
            {"profile_id": _REQUIRED, "property": _REQUIRED, "value": 1},
            _counter("decrement"),
        ),
        _Operation(
            "group",
            {"id": _REQUIRED, "type": _REQUIRED, "name": _REQUIRED, "properties": None},
            _group,
        ),
        _Operation("assign_group", {"group_ids": _REQUIRED, "profile_id": None}, _assign_group),
    )
}
_ALL_PARAMS = {name: op.all_params for name, op in OPERATIONS.items()}


def normalize_call(
    operation: str,
    args: tuple[Any, ...] | list[Any] | None,
    kwargs: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Validate a task call and return the keyword arguments to put in its message.

    The result is plain JSON: the caller's arguments with defaults filled in, the timestamp of
    a ``track`` as an ISO string (now, if none was given) and a fresh ``event_id``. Building the
    event from it again (on the worker) gives the same body.
    """
    params = _ALL_PARAMS[operation]
    bound = _bind(operation, params, args or (), kwargs or {})
    if bound["client_ip"] is None or bound["user_agent"] is None:
        context = current_request()
        if context is not None:
            if bound["client_ip"] is None:
                bound["client_ip"] = context.client_ip
            if bound["user_agent"] is None:
                bound["user_agent"] = context.user_agent
    if bound["event_id"] is None:
        bound["event_id"] = uuid.uuid4().hex
    if operation == "track" and bound["timestamp"] is None:
        bound["timestamp"] = datetime.now(timezone.utc)
    event = build_event(operation, bound)
    if operation == "track":
        bound["timestamp"] = event.body["payload"]["properties"]["__timestamp"]
    # Hand the message the validated copies (plain JSON, tuples as lists), not the caller's
    # objects, so what is enqueued is exactly what was checked.
    payload = event.body["payload"]
    if "properties" in bound and bound["properties"] is not None:
        bound["properties"] = {
            key: value for key, value in payload["properties"].items() if key != "__timestamp"
        }
    for field, api_field in (("groups", "groups"), ("group_ids", "groupIds")):
        if bound.get(field) is not None:
            bound[field] = payload[api_field]
    bound["client_ip"] = event.client_ip
    return bound


def _bind(
    operation: str,
    params: dict[str, Any],
    args: tuple[Any, ...] | list[Any],
    kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    if len(args) > len(params):
        raise _fail(operation, "arguments", f"takes at most {len(params)} positional arguments")
    bound = dict(zip(params, args, strict=False))
    for key, value in kwargs.items():
        if key not in params:
            raise _fail(
                operation,
                repr(key),
                f"is not an argument; expected one of: {', '.join(params)}",
            )
        if key in bound:
            raise _fail(operation, repr(key), "was given both by position and by keyword")
        bound[key] = value
    for key, default in params.items():
        if key not in bound:
            if default is _REQUIRED:
                raise _fail(operation, key, "is required")
            bound[key] = default
    return bound


def build_event(operation: str, kwargs: Mapping[str, Any]) -> Event:
    """Validate the (bound or message) keyword arguments of one call and build its event.

    Raises :class:`InvalidEvent` naming the argument and the rule it breaks.
    """
    op = OPERATIONS.get(operation)
    if op is None:
        raise _fail(operation, "operation", f"must be one of {', '.join(OPERATIONS)}")
    params = _ALL_PARAMS[operation]
    kw = _bind(operation, params, (), kwargs) if kwargs.keys() != params.keys() else dict(kwargs)
    if operation == "track" and kw["timestamp"] is None:
        kw["timestamp"] = datetime.now(timezone.utc)
    payload = op.build_payload(kw)
    event_id = kw["event_id"]
    return Event(
        operation=operation,
        body={"type": operation, "payload": payload},
        project=_project(operation, kw["project"]),
        client_ip=_client_ip(operation, kw["client_ip"]),
        user_agent=_user_agent(operation, kw["user_agent"]),
        event_id=uuid.uuid4().hex if event_id is None else _event_id(operation, event_id),
    )
