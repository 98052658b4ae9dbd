"""The body rules of OpenPanel's ``POST /track``: fastify's parsing, then its zod schemas.

`parse_body` reads the body as fastify does for the request's content type (JSON, plain text,
or a 415/400 answer). `validation_issues` returns the paths (fastify's ``instancePath``, e.g.
``/payload/name``) a body fails at; an empty list means the body is valid. Each field rule
returns the sub-paths under its field that fail: ``[]`` valid, ``[""]`` the field itself.

The field rules are op-celery's own (`op_celery._rules`, `op_celery._url`), the ones ``.delay()``
applies, checked against OpenPanel's schema run under Node (``tests/data/openpanel_verdicts.json``):
the full blocklist and path-scan patterns, zod 4's e-mail pattern, WHATWG URL parsing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from op_celery._rules import (
    MAX_EVENT_NAME_UNITS,
    RESERVED_EVENT_NAMES,
    blocked_name,
    email_failure,
    js_length,
    poisoned_key,
)
from op_celery._url import url_failure
from op_celery.testing._answers import Answer, error_400, json_answer

__all__ = [
    "CLIENT_ID_RE",
    "MAX_EVENT_NAME_LENGTH",
    "parse_body",
    "profile_key",
    "validation_errors",
    "validation_issues",
    "validation_message",
]

#: Longest track event name, in UTF-16 code units as JavaScript counts them.
MAX_EVENT_NAME_LENGTH: Final = MAX_EVENT_NAME_UNITS
#: Event names OpenPanel reserves for itself.
_RESERVED_EVENT_NAMES: Final = frozenset(RESERVED_EVENT_NAMES)
#: The server's client-id check: a lower-case hyphenated UUID.
CLIENT_ID_RE: Final = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
#: zod's default ``datetime()``: UTC with a ``Z``, optional fractional seconds.
_DATETIME_RE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?Z$")

#: One problem zod reports: the path under the field ("" the field itself, "/0" an item), its
#: message, and whether zod goes on to the object's refinements after it (a failed check such
#: as ``min`` does; a wrong type does not).
_Issue = tuple[str, str, bool]
#: A field rule returns the issues of its value: [] valid.
_Rule = Callable[[object], list[_Issue]]
#: zod's text for a union with no matching branch (``profileId``).
_INVALID: Final = "Invalid input"
_TOO_SHORT: Final = "Too small: expected string to have >=1 characters"


def _js_type(value: object) -> str:
    """What zod names the type it received (JavaScript's ``typeof``, null and arrays apart)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _wrong_type(expected: str, value: object, received: str | None = None) -> list[_Issue]:
    message = f"Invalid input: expected {expected}, received {received or _js_type(value)}"
    return [("", message, False)]


_js_length = js_length  # UTF-16 code units, as zod's min/max count


def _is_number(value: object) -> bool:
    # bool is an int in Python but not a number in JSON/JavaScript; z.number() refuses Infinity.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _string(value: object) -> list[_Issue]:
    return [] if isinstance(value, str) else _wrong_type("string", value)


def _non_empty_string(value: object) -> list[_Issue]:
    if not isinstance(value, str):
        return _wrong_type("string", value)
    return [] if _js_length(value) >= 1 else [("", _TOO_SHORT, True)]


def _profile_id(value: object) -> list[_Issue]:
    # z.union([z.string().min(1), z.number()]): the string branch's own issue for "", else the
    # union's bare "Invalid input".
    if isinstance(value, str):
        return [] if value else [("", _TOO_SHORT, True)]
    return [] if _is_number(value) else [("", _INVALID, False)]


def _record(value: object) -> list[_Issue]:
    return [] if isinstance(value, dict) else _wrong_type("record", value)


def _positive_number(value: object) -> list[_Issue]:
    if not _is_number(value):
        return _wrong_type("number", value)
    return [] if value > 0 else [("", "Too small: expected number to be >0", True)]  # type: ignore[operator]


def _format(check: Callable[[str], str | None], message: str) -> _Rule:
    def rule(value: object) -> list[_Issue]:
        if not isinstance(value, str):
            return _wrong_type("string", value)
        return [] if check(value) is None else [("", message, True)]

    return rule


_email = _format(email_failure, "Invalid email address")
_url = _format(url_failure, "Invalid URL")


def _non_empty_string_list(value: object) -> list[_Issue]:
    if not isinstance(value, list):
        return _wrong_type("array", value)
    return [
        (f"/{i}{sub}", message, go_on)
        for i, item in enumerate(value)
        for sub, message, go_on in _non_empty_string(item)
    ]


def _int_between(low: int, high: int | None) -> _Rule:
    def rule(value: object) -> list[_Issue]:
        if not _is_number(value) or not float(value).is_integer():  # type: ignore[arg-type]
            return [("", _INVALID, False)]
        valid = value >= low and (high is None or value <= high)  # type: ignore[operator]
        return [] if valid else [("", _INVALID, True)]

    return rule


def _nullish(rule: _Rule) -> _Rule:
    def nullable(value: object) -> list[_Issue]:
        return [] if value is None else rule(value)

    return nullable


def _poisoned(value: object) -> bool:
    """A ``__proto__`` key or ``constructor.prototype`` anywhere, as secure-json-parse finds."""
    if isinstance(value, dict):
        return any(poisoned_key(k, v) or _poisoned(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_poisoned(item) for item in value)
    return False


def _boolean(value: object) -> list[_Issue]:
    return [] if isinstance(value, bool) else _wrong_type("boolean", value)


def _datetime(value: object) -> list[_Issue]:
    valid = isinstance(value, str) and _DATETIME_RE.match(value) is not None
    return [] if valid else [("", _INVALID, not isinstance(value, str))]


def _string_at_most(limit: int) -> _Rule:
    def rule(value: object) -> list[_Issue]:
        if not isinstance(value, str):
            return _wrong_type("string", value)
        return [] if _js_length(value) <= limit else [("", _INVALID, True)]

    return rule


#: A field of a payload schema: its rule, whether it is required, and the type zod names when
#: it is missing (``None``: a union, reported as "Invalid input").
_Field = tuple[_Rule, bool, str | None]
#: increment and decrement share one schema on the server.
_COUNTER_SCHEMA: Final[dict[str, _Field]] = {
    "profileId": (_profile_id, True, None),
    "property": (_non_empty_string, True, "string"),
    "value": (_positive_number, False, "number"),
}
#: Per type, in the schema's key order: field name -> field. Keys not listed are ignored, as
#: zod strips them.
_SCHEMAS: Final[dict[str, dict[str, _Field]]] = {
    "track": {
        "name": (_non_empty_string, True, "string"),
        "properties": (_record, False, "record"),
        "profileId": (_profile_id, False, None),
        "groups": (_nullish(_non_empty_string_list), False, "array"),
    },
    "identify": {
        "profileId": (_profile_id, True, None),
        "firstName": (_string, False, "string"),
        "lastName": (_string, False, "string"),
        "email": (_email, False, "string"),
        "avatar": (_url, False, "string"),
        "properties": (_record, False, "record"),
    },
    "increment": _COUNTER_SCHEMA,
    "decrement": _COUNTER_SCHEMA,
    "alias": {
        "profileId": (_profile_id, True, None),
        "alias": (_non_empty_string, True, "string"),
    },
    "replay": {
        "chunk_index": (_int_between(0, 65_535), True, "number"),
        "events_count": (_int_between(1, None), True, "number"),
        "is_full_snapshot": (_boolean, True, "boolean"),
        "started_at": (_datetime, True, "string"),
        "ended_at": (_datetime, True, "string"),
        "payload": (_string_at_most(2 * 1_048_576), True, "string"),
    },
    "group": {
        "id": (_non_empty_string, True, "string"),
        "type": (_non_empty_string, True, "string"),
        "name": (_non_empty_string, True, "string"),
        "properties": (_record, False, "record"),
    },
    "assign_group": {
        "groupIds": (_non_empty_string_list, True, "array"),
        "profileId": (_profile_id, False, None),
    },
}


def _track_refinements(payload: dict[str, Any]) -> list[tuple[str, str]]:
    """The track schema's ``.refine`` checks, in its order, with their messages."""
    issues: list[tuple[str, str]] = []
    name: str = payload["name"]
    if name in _RESERVED_EVENT_NAMES:
        reserved = ", ".join(RESERVED_EVENT_NAMES)
        issues.append(
            ("payload/name", f"Event name cannot be one of the reserved names: {reserved}")
        )
    if blocked_name(name) is not None and name not in _RESERVED_EVENT_NAMES:
        issues.append(("payload/name", "Event name contains blocked content"))
    if name == "revenue":
        properties = payload.get("properties") or {}
        revenue = properties.get("__revenue")
        valid = revenue is None or (
            _is_number(revenue) and float(revenue).is_integer() and revenue >= 0
        )
        if not valid:
            message = "__revenue must be an integer (no floats or strings)"
            issues.append(("payload/properties/__revenue", message))
    return issues


def validation_errors(body: object) -> list[tuple[str, str]]:
    """zod's issues for the body, in its order: (path as ``payload/name``, message); [] valid."""
    if not isinstance(body, dict):
        # Both sides of the route's intersection (the payload union, the credentials object)
        # report it, so fastify's message says it twice.
        return [("", _wrong_type("object", body)[0][1])] * 2
    errors = _payload_errors(body)
    for field in ("clientId", "clientSecret"):
        if field in body and not isinstance(body[field], str):
            errors.append((field, _wrong_type("string", body[field])[0][1]))
    return errors


def _payload_errors(body: dict[str, Any]) -> list[tuple[str, str]]:
    kind = body.get("type")
    schema = _SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        return [("type", _INVALID)]
    payload = body.get("payload")
    if not isinstance(payload, dict):
        received = "undefined" if "payload" not in body else None
        return [("payload", _wrong_type("object", payload, received)[0][1])]
    errors: list[tuple[str, str]] = []
    go_on = True
    for field, (rule, required, expected) in schema.items():
        if field not in payload:
            if required:
                message = (
                    _INVALID
                    if expected is None
                    else (f"Invalid input: expected {expected}, received undefined")
                )
                errors.append((f"payload/{field}", message))
                go_on = False
            continue
        for sub, message, continues in rule(payload[field]):
            errors.append((f"payload/{field}{sub}", message))
            go_on = go_on and continues
    if go_on and kind == "track":
        errors.extend(_track_refinements(payload))
    return errors


def validation_message(body: object) -> str | None:
    """The 400 message fastify gives for the body (``body/payload/name Invalid input: ...``)."""
    errors = validation_errors(body)
    return ", ".join(f"body/{path} {message}" for path, message in errors) or None


def validation_issues(body: object) -> list[str]:
    """Paths (fastify's ``instancePath``, e.g. ``/payload/name``) the body fails at; [] if valid."""
    paths = [f"/{path}" if path else "" for path, _ in validation_errors(body)]
    return list(dict.fromkeys(paths))


def _reject_constant(name: str) -> Any:
    # JavaScript's JSON.parse rejects NaN and Infinity; Python's json accepts them by default.
    raise ValueError(f"{name} is not valid JSON")


def parse_body(headers: Mapping[str, str], raw: bytes) -> tuple[object, Answer | None]:
    """Parse like fastify: JSON for ``application/json``, a string for ``text/plain``."""
    media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if not raw and media_type != "application/json":
        return None, None  # no body: validation reports "body Invalid input"
    if media_type == "text/plain":
        return raw.decode("utf-8", "replace"), None
    if media_type != "application/json":
        message = f"Unsupported Media Type: {media_type or 'none'}"
        return None, json_answer(415, {"status": 415, "error": "Error", "message": message})
    if not raw:
        message = "Body cannot be empty when content-type is set to 'application/json'"
        return None, error_400(message)
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        return None, error_400(f"Body is not valid JSON: {exc}")
    try:
        poisoned = _poisoned(body)
    except RecursionError as exc:
        return None, error_400(f"Body is not valid JSON: {exc}")
    if poisoned:  # fastify refuses prototype poisoning with this message
        return None, error_400(
            "Body is not valid JSON but content-type is set to 'application/json'"
        )
    return body, None


def profile_key(profile_id: object) -> str:
    """The profile id as the server stores it: numbers become their JavaScript string form."""
    if isinstance(profile_id, float) and profile_id.is_integer():
        return str(int(profile_id))
    return str(profile_id)
