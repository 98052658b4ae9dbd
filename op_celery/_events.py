"""One validating builder per OpenPanel operation.

Each builder takes the keyword arguments of its task (snake_case), checks them against the
rules of the server's own schemas (`_rules`, `_url`; see the API contract), and returns an
:class:`Event`: the ``{"type", "payload"}`` body the API takes, plus what travels beside it
(project, IP, user agent, event id). The same builders run twice: in the caller at ``.delay()``,
so nothing invalid is enqueued, and on the worker, so a malformed message from elsewhere is
refused rather than sent.

What the server accepts is accepted, what it answers 400 to is refused here, with the argument,
the rule and the server's reason (``track: name is 82 UTF-16 code units; OpenPanel allows 80``).
Where op-celery refuses more than the server, on purpose, the message says so:

- NaN and infinities (JSON cannot carry them), dict keys that are not strings (``json.dumps``
  would turn ``1`` into ``"1"`` silently), values that are not JSON types, nesting deeper than
  `MAX_NESTING_LEVELS`;
- integers beyond ``2**53 - 1`` anywhere but ``profile_id``: the server reads numbers as
  JavaScript doubles and would store them rounded (``2**60`` as ``1152921504606847000``). A
  ``profile_id`` that large is sent as its decimal string, which the server stores exactly;
- a body larger than `MAX_BODY_BYTES` (1 MiB): OpenPanel's own server takes up to 500 MiB
  (``bodyLimit`` in ``apps/api/src/app.ts``), but proxies in front of it usually take far less
  (nginx's default is 1 MiB, as is fastify's), and a refused body would end as a 413 dead letter;
- values that become HTTP headers (``user_agent``, ``client_ip``, ``event_id``) must be what
  latin-1 and RFC 9110 allow (no emoji or CJK, no control characters, no leading or trailing
  space), as ``requests`` would send them, or the worker could not send the event at all.

Hand-written rather than pydantic models: the enqueue path pays for every check, the rules are
few, and each failure must name the argument the *caller* passed, not a camelCase API field.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import reprlib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ._context import current_request
from ._exceptions import InvalidEvent
from ._rules import (
    MAX_SAFE_INTEGER,
    blocked_name,
    email_failure,
    header_failure,
    poisoned_key,
)
from ._url import url_failure

__all__ = ["MAX_BODY_BYTES", "OPERATIONS", "Event", "build_event", "normalize_call"]

#: Longest user agent forwarded, in characters; longer ones are refused, not cut.
MAX_USER_AGENT_CHARS = 1024
#: Longest project name, in characters.
MAX_PROJECT_NAME_CHARS = 64
#: Largest body sent, in bytes of compact JSON (what the client POSTs); larger events are
#: refused at ``.delay()`` rather than answered 413 by a proxy on the worker.
MAX_BODY_BYTES = 1_048_576
#: Deepest nesting of dicts and lists in ``properties`` (op-celery's own limit).
MAX_NESTING_LEVELS = 32

#: An IPv4 address as ``ipaddress`` writes it (four decimal octets, no leading zeros).
_CANONICAL_IPV4 = re.compile(
    r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}"
    r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
)
_PROJECT = re.compile(r"[A-Za-z0-9_.-]+")
#: The client's JSON (compact, ASCII, so characters are bytes); no cycle survives `_json_value`.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), check_circular=False)
_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 60
_API_TO_ARGUMENT = {"profileId": "profile_id", "firstName": "first_name",
                    "lastName": "last_name", "groupIds": "group_ids"}  # fmt: skip


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


def _show(value: object) -> str:
    """A short repr for a message: never the whole of a huge value, never a 4,300-digit int."""
    if isinstance(value, int) and not -(10**40) < value < 10**40:
        return f"an integer of {value.bit_length()} bits"
    try:
        return _SHOW.repr(value)
    except ValueError:  # an int too long for str() inside a container
        return f"a {type(value).__name__}"


def _unsafe_integer(value: int) -> str:
    return (
        f"is {_show(value)}, beyond 2**53 - 1 (Number.MAX_SAFE_INTEGER): OpenPanel reads "
        "numbers as JavaScript doubles and would store it rounded; op-celery refuses it, "
        "send it as a string"
    )


def _non_empty_str(op: str, field: str, value: object) -> str:
    # zod's min(1): one UTF-16 code unit is enough, " " included.
    if not isinstance(value, str) or not value:
        raise _fail(op, field, f"must be a non-empty string, got {_show(value)}")
    return value


def _optional_str(op: str, field: str, value: object) -> str | None:
    # z.string().optional(): any string, "" included.
    if value is None or isinstance(value, str):
        return value
    raise _fail(op, field, f"must be a string, got {_show(value)}")


def _profile_id(op: str, value: object, *, required: bool) -> str | int | float | None:
    if value is None:
        if required:
            raise _fail(op, "profile_id", "is required (a non-empty string or a number)")
        return None
    if isinstance(value, bool):
        raise _fail(op, "profile_id", "must be a non-empty string or a number, not a bool")
    if isinstance(value, int):
        if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            return value
        # Beyond 2**53 the server would round it; its decimal string is stored exactly.
        try:
            return str(value)
        except ValueError:
            raise _fail(op, "profile_id", f"is {_show(value)}: too long to send") from None
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail(op, "profile_id", "must be a finite number (JSON has no NaN or Infinity)")
        return value
    if isinstance(value, str) and value:
        return value
    raise _fail(op, "profile_id", f"must be a non-empty string or a number, got {_show(value)}")


#: Exact types of values that need no check: a dict or list item of one of them is taken as it
#: is; anything else (ints, floats, containers, subclasses) goes through `_json_value`.
_PLAIN_SCALARS = (str, bool, type(None))


def _json_value(op: str, path: str, value: object, depth: int = 0) -> Any:
    """Check that ``value`` is plain JSON; return it with tuples turned into lists."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise _fail(op, path, _unsafe_integer(value))
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail(
                op,
                path,
                "must be a finite number: JSON has no NaN or Infinity, so op-celery refuses "
                f"{value!r}",
            )
        return value
    if depth >= MAX_NESTING_LEVELS:
        raise _fail(
            op, path, f"is nested more than {MAX_NESTING_LEVELS} levels deep (op-celery's limit)"
        )
    # Items that are plain scalars are taken as they are, without a recursive call or the text
    # of their path, which is only needed for an error.
    if isinstance(value, Mapping):
        for key in ("__proto__", "constructor"):  # one lookup per dict, not a test per key
            if key in value and poisoned_key(key, value[key]):
                raise _fail(
                    op,
                    f"{path}[{key!r}]",
                    "is a key OpenPanel's JSON parser refuses (prototype poisoning: the "
                    "server answers 400 'Body is not valid JSON'); rename it",
                )
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail(
                    op,
                    path,
                    f"has the key {_show(key)} ({type(key).__name__}): op-celery wants string "
                    "keys, as JSON has, rather than letting json.dumps change it; convert it",
                )
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


def _str_list(op: str, field: str, value: object) -> list[str]:
    # z.array(z.string().min(1)): an empty list is valid.
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise _fail(op, field, f"must be a list of non-empty strings, got {_show(value)}")
    return [_non_empty_str(op, f"{field}[{i}]", item) for i, item in enumerate(value)]


def _positive_number(op: str, field: str, value: object) -> int | float:
    # z.number().positive(): finite and > 0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(op, field, f"must be a positive number, got {_show(value)}")
    if isinstance(value, int) and value > MAX_SAFE_INTEGER:
        raise _fail(op, field, _unsafe_integer(value))
    if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
        raise _fail(op, field, f"must be a positive (finite) number, got {_show(value)}")
    return value


def _event_name(op: str, value: object) -> str:
    name = _non_empty_str(op, "name", value)
    reason = blocked_name(name)
    if reason is not None:
        raise _fail(op, "name", reason)
    return name


def _revenue(op: str, properties: dict[str, Any]) -> None:
    # The refine of zTrackPayload: absent or null passes; else Number.isInteger and >= 0.
    revenue = properties.get("__revenue")
    if revenue is None:
        return
    integral = not isinstance(revenue, bool) and (
        isinstance(revenue, int) or (isinstance(revenue, float) and revenue.is_integer())
    )
    if not integral or revenue < 0:
        raise _fail(
            op,
            "properties['__revenue']",
            f"is {_show(revenue)}; OpenPanel wants a non-negative integer (minor units) when "
            "name is 'revenue' ('__revenue must be an integer (no floats or strings)')",
        )


def _email(op: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(op, "email", f"must be a string, got {_show(value)}")
    reason = email_failure(value)
    if reason is not None:
        raise _fail(op, "email", f"{_show(value)} {reason}")
    return value


def _url(op: str, field: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(op, field, f"must be a URL string, got {_show(value)}")
    reason = url_failure(value)
    if reason is not None:
        raise _fail(
            op,
            field,
            f"{_show(value)} {reason}: OpenPanel takes what JavaScript's new URL() parses "
            "(400 'Invalid URL')",
        )
    return value


def _header(op: str, field: str, header: str, value: str) -> str:
    reason = header_failure(value)
    if reason is not None:
        raise _fail(op, field, f"{_show(value)} {reason}; it is sent as the {header} header")
    return value


def _client_ip(op: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(op, "client_ip", f"must be an IP address string, got {_show(value)}")
    text = value.strip()
    if _CANONICAL_IPV4.fullmatch(text):
        return text  # what ipaddress would return, without parsing it
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise _fail(
            op, "client_ip", f"must be an IPv4 or IPv6 address, got {_show(value)}"
        ) from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # the server reads ::ffff:1.2.3.4 as no address at all
    return _header(op, "client_ip", "openpanel-client-ip", str(address))


def _user_agent(op: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(op, "user_agent", f"must be a non-empty string, got {_show(value)}")
    if len(value) > MAX_USER_AGENT_CHARS:
        raise _fail(op, "user_agent", f"must be at most {MAX_USER_AGENT_CHARS} characters")
    return _header(op, "user_agent", "user-agent", value)


def _project(op: str, value: object) -> str:
    if (
        not isinstance(value, str)
        or not _PROJECT.fullmatch(value)
        or len(value) > MAX_PROJECT_NAME_CHARS
    ):
        raise _fail(
            op,
            "project",
            f"must be a project name of letters, digits, '_', '-' or '.', got {_show(value)}",
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
            raise _fail(op, "timestamp", f"must be an ISO-8601 time, got {_show(value)}") from None
    else:
        raise _fail(op, "timestamp", f"must be a timezone-aware datetime, got {_show(value)}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise _fail(
            op,
            "timestamp",
            "must be timezone-aware: use datetime.now(timezone.utc), not datetime.utcnow()",
        )
    try:
        utc = moment.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise _fail(
            op, "timestamp", f"is {_show(value)}, which is outside the years 1 to 9999 in UTC"
        ) from None
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _event_id(op: str, value: object) -> str:
    if not isinstance(value, str) or not 8 <= len(value) <= 64 or not value.isascii():
        raise _fail(
            op, "event_id", f"must be an ASCII id of 8 to 64 characters, got {_show(value)}"
        )
    return _header(op, "event_id", "request-id", value)


def _body_size(op: str, body: dict[str, Any]) -> None:
    size = len(_COMPACT_JSON.encode(body))
    if size <= MAX_BODY_BYTES:
        return
    payload = body["payload"]
    largest = max(payload, key=lambda key: len(json.dumps(payload[key])))
    raise _fail(
        op,
        _API_TO_ARGUMENT.get(largest, largest),
        f"makes the event {size:,} bytes of JSON; op-celery sends at most {MAX_BODY_BYTES:,} "
        "(1 MiB), which proxies in front of OpenPanel commonly allow (larger ones end as 413)",
    )


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
        _revenue(op, properties)
    properties["__timestamp"] = _timestamp(op, kw["timestamp"])
    groups = None if kw["groups"] is None else _str_list(op, "groups", kw["groups"])
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
            "groupIds": _str_list(op, "group_ids", kw["group_ids"]),
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
    for field, api_field in (
        ("groups", "groups"),
        ("group_ids", "groupIds"),
        ("profile_id", "profileId"),  # an integer beyond 2**53 becomes its string
    ):
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
    body = {"type": operation, "payload": op.build_payload(kw)}
    _body_size(operation, body)
    event_id = kw["event_id"]
    return Event(
        operation=operation,
        body=body,
        project=_project(operation, kw["project"]),
        client_ip=_client_ip(operation, kw["client_ip"]),
        user_agent=_user_agent(operation, kw["user_agent"]),
        event_id=uuid.uuid4().hex if event_id is None else _event_id(operation, event_id),
    )
