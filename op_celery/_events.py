"""One validating builder per OpenPanel operation.

Each builder takes the keyword arguments of its task (snake_case), checks each one (`_checks`,
which applies the server's rules of `_rules` and `_url`; see the API contract), and returns an
:class:`Event`: the ``{"type", "payload"}`` body the API takes, plus what travels beside it
(project, IP, user agent, event id). The same builders run twice: in the caller at ``.delay()``,
so nothing invalid is enqueued, and on the worker, so a malformed message from elsewhere is
refused rather than sent. What the server accepts is accepted; what it would answer 400 to, or
what cannot be sent at all, raises `InvalidEvent` naming the argument, the rule and the server's
reason (the deliberate strictness is listed in `_checks`).

Hand-written rather than pydantic models: the enqueue path pays for every check, the rules are
few, and each failure must name the argument the *caller* passed, not a camelCase API field.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from . import _checks as check
from ._checks import MAX_BODY_BYTES
from ._checks import MAX_USER_AGENT_CHARS as MAX_USER_AGENT_CHARS
from ._context import current_request

__all__ = ["MAX_BODY_BYTES", "OPERATIONS", "Event", "build_event", "normalize_call"]


@dataclass(frozen=True, slots=True)
class Event:
    """A validated event, ready to send.

    ``body`` is exactly what is POSTed to ``/track``. ``client_ip`` and ``user_agent`` become
    headers; ``event_id`` becomes the ``request-id`` header and the key that stops duplicates;
    ``dedup_for_s``, when the caller set it, is how long (seconds) the ledger remembers the
    event once delivered, if longer than ``OP_CELERY_LEDGER_TTL``.
    """

    operation: str
    body: dict[str, Any]
    project: str
    client_ip: str | None
    user_agent: str | None
    event_id: str
    dedup_for_s: int | None = None


def _drop_none(payload: dict[str, Any]) -> dict[str, Any]:
    # The server rejects null for optional fields (profileId, value): omit them instead.
    return {key: value for key, value in payload.items() if value is not None}


# Each payload builder takes the already-bound keyword arguments of its operation.
_Builder = Callable[[dict[str, Any]], dict[str, Any]]


def _track(kw: dict[str, Any]) -> dict[str, Any]:
    # In the server's order: the fields of the shape, then its refinements (reserved and
    # blocked names, revenue), so the first complaint is the one OpenPanel would make.
    op = "track"
    name = check.non_empty_str(op, "name", kw["name"])
    properties = check.properties(op, kw["properties"]) or {}
    profile_id = check.profile_id(op, kw["profile_id"], required=False)
    groups = None if kw["groups"] is None else check.str_list(op, "groups", kw["groups"])
    check.event_name(op, name)
    if name == "revenue":
        check.revenue(op, properties)
    return _track_payload(op, name, properties, profile_id, groups, kw)


def _track_payload(
    op: str,
    name: str,
    properties: dict[str, Any],
    profile_id: str | int | float | None,
    groups: list[str] | None,
    kw: dict[str, Any],
) -> dict[str, Any]:
    """The payload of a track event, with the special properties its arguments carry."""
    device_id = check.device_id(op, kw["device_id"])
    if device_id is not None:
        if "__deviceId" in properties:
            raise check.fail(
                op,
                "device_id",
                "was given and properties has '__deviceId' too: pass the device id once",
            )
        properties["__deviceId"] = device_id  # as OpenPanel's SDKs send it
    properties["__timestamp"] = check.timestamp(op, kw["timestamp"])
    return _drop_none(
        {"name": name, "properties": properties, "profileId": profile_id, "groups": groups}
    )


def _revenue(kw: dict[str, Any]) -> dict[str, Any]:
    # OpenPanel's SDKs send revenue(amount) as track("revenue", {..., __revenue: amount}).
    op = "revenue"
    amount = check.revenue_amount(op, kw["amount"])
    properties = check.properties(op, kw["properties"]) or {}
    if "__revenue" in properties:
        raise check.fail(
            op, "properties['__revenue']", "is the amount: pass it as amount, not in properties"
        )
    profile_id = check.profile_id(op, kw["profile_id"], required=False)
    groups = None if kw["groups"] is None else check.str_list(op, "groups", kw["groups"])
    properties["__revenue"] = amount
    return _track_payload(op, "revenue", properties, profile_id, groups, kw)


def _identify(kw: dict[str, Any]) -> dict[str, Any]:
    op = "identify"
    return _drop_none(
        {
            "profileId": check.profile_id(op, kw["profile_id"], required=True),
            "firstName": check.optional_str(op, "first_name", kw["first_name"]),
            "lastName": check.optional_str(op, "last_name", kw["last_name"]),
            "email": check.email(op, kw["email"]),
            "avatar": check.url(op, "avatar", kw["avatar"]),
            "properties": check.properties(op, kw["properties"]),
        }
    )


def _alias(kw: dict[str, Any]) -> dict[str, Any]:
    op = "alias"
    return {
        "profileId": check.profile_id(op, kw["profile_id"], required=True),
        "alias": check.non_empty_str(op, "alias", kw["alias"]),
    }


def _counter(op: str) -> _Builder:
    def build(kw: dict[str, Any]) -> dict[str, Any]:
        return {
            "profileId": check.profile_id(op, kw["profile_id"], required=True),
            "property": check.non_empty_str(op, "property", kw["property"]),
            "value": check.positive_number(op, "value", kw["value"]),
        }

    return build


def _group(kw: dict[str, Any]) -> dict[str, Any]:
    op = "group"
    return _drop_none(
        {
            "id": check.non_empty_str(op, "id", kw["id"]),
            "type": check.non_empty_str(op, "type", kw["type"]),
            "name": check.non_empty_str(op, "name", kw["name"]),
            "properties": check.properties(op, kw["properties"]),
        }
    )


def _assign_group(kw: dict[str, Any]) -> dict[str, Any]:
    op = "assign_group"
    return _drop_none(
        {
            "groupIds": check.str_list(op, "group_ids", kw["group_ids"]),
            "profileId": check.profile_id(op, kw["profile_id"], required=False),
        }
    )


_REQUIRED = object()

#: Arguments every operation takes besides its own, with their defaults.
_COMMON: dict[str, Any] = {
    "client_ip": None,
    "user_agent": None,
    "project": "default",
    "event_id": None,
    "dedup_for": None,
}


@dataclass(frozen=True, slots=True)
class _Operation:
    name: str
    params: dict[str, Any]  # the operation's own parameters, in order, with defaults
    build_payload: _Builder
    api_type: str = ""  # the body's "type", when not the operation's name

    @property
    def body_type(self) -> str:
        return self.api_type or self.name

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
                "device_id": None,
            },
            _track,
        ),
        _Operation(
            "revenue",
            {
                "amount": _REQUIRED,
                "properties": None,
                "profile_id": None,
                "groups": None,
                "timestamp": None,
                "device_id": None,
            },
            _revenue,
            api_type="track",
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
    stamped = "timestamp" in params
    if stamped and bound["timestamp"] is None:
        bound["timestamp"] = datetime.now(timezone.utc)
    event = build_event(operation, bound)
    payload = event.body["payload"]
    if stamped:
        bound["timestamp"] = payload["properties"]["__timestamp"]
    # Hand the message the validated copies (plain JSON, tuples as lists), not the caller's
    # objects, so what is enqueued is exactly what was checked; without the special
    # properties the builder adds from other arguments, or the worker would find them twice.
    if "properties" in bound and bound["properties"] is not None:
        added = _ADDED_PROPERTIES[operation]
        if bound.get("device_id") is not None:
            added = added | {"__deviceId"}
        bound["properties"] = {
            key: value for key, value in payload["properties"].items() if key not in added
        }
    for field, api_field in (
        ("groups", "groups"),
        ("group_ids", "groupIds"),
        ("profile_id", "profileId"),  # an integer beyond 2**53 becomes its string
    ):
        if bound.get(field) is not None:
            bound[field] = payload[api_field]
    if operation == "revenue":
        bound["amount"] = payload["properties"]["__revenue"]  # 1200.0 becomes 1200
    bound["client_ip"] = event.client_ip
    bound["dedup_for"] = event.dedup_for_s  # a timedelta becomes its seconds
    check.warn_skipped_ip(operation, event.client_ip)
    # Arguments younger than the message format travel only when given, so that a worker of
    # the version before them (a rolling upgrade: web apps first) still takes the message.
    for key in _SENT_WHEN_GIVEN:
        if bound.get(key, 0) is None:
            del bound[key]
    return bound


#: Arguments left out of a message when None (older workers do not know them).
_SENT_WHEN_GIVEN = ("device_id", "dedup_for")


#: The properties each operation's builder adds from its other arguments (``device_id`` adds
#: ``__deviceId`` to a track or revenue).
_ADDED_PROPERTIES: dict[str, frozenset[str]] = {
    "track": frozenset({"__timestamp"}),
    "revenue": frozenset({"__timestamp", "__revenue"}),
}
_ADDED_PROPERTIES.update(dict.fromkeys(OPERATIONS.keys() - _ADDED_PROPERTIES, frozenset()))


def _bind(
    operation: str,
    params: dict[str, Any],
    args: tuple[Any, ...] | list[Any],
    kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    if len(args) > len(params):
        raise check.fail(
            operation, "arguments", f"takes at most {len(params)} positional arguments"
        )
    bound = dict(zip(params, args, strict=False))
    for key, value in kwargs.items():
        if key not in params:
            raise check.fail(
                operation,
                repr(key),
                f"is not an argument; expected one of: {', '.join(params)}",
            )
        if key in bound:
            raise check.fail(operation, repr(key), "was given both by position and by keyword")
        bound[key] = value
    for key, default in params.items():
        if key not in bound:
            if default is _REQUIRED:
                raise check.fail(operation, key, "is required")
            bound[key] = default
    return bound


def build_event(operation: str, kwargs: Mapping[str, Any]) -> Event:
    """Validate the (bound or message) keyword arguments of one call and build its event.

    Raises :class:`InvalidEvent` naming the argument and the rule it breaks.
    """
    op = OPERATIONS.get(operation)
    if op is None:
        raise check.fail(operation, "operation", f"must be one of {', '.join(OPERATIONS)}")
    params = _ALL_PARAMS[operation]
    kw = _bind(operation, params, (), kwargs) if kwargs.keys() != params.keys() else dict(kwargs)
    if "timestamp" in params and kw["timestamp"] is None:
        kw["timestamp"] = datetime.now(timezone.utc)
    body = {"type": op.body_type, "payload": op.build_payload(kw)}
    check.body_size(operation, body)
    event_id = kw["event_id"]
    return Event(
        operation=operation,
        body=body,
        project=check.project(operation, kw["project"]),
        client_ip=check.client_ip(operation, kw["client_ip"]),
        user_agent=check.user_agent(operation, kw["user_agent"]),
        event_id=uuid.uuid4().hex if event_id is None else check.event_id(operation, event_id),
        dedup_for_s=check.dedup_for(operation, kw["dedup_for"]),
    )
