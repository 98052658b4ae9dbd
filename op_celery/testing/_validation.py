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
    "validation_issues",
]

#: Longest track event name, in UTF-16 code units as JavaScript counts them.
MAX_EVENT_NAME_LENGTH: Final = MAX_EVENT_NAME_UNITS
#: Event names OpenPanel reserves for itself.
_RESERVED_EVENT_NAMES: Final = frozenset(RESERVED_EVENT_NAMES)
#: The server's client-id check: a lower-case hyphenated UUID.
CLIENT_ID_RE: Final = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
#: zod's default ``datetime()``: UTC with a ``Z``, optional fractional seconds.
_DATETIME_RE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?Z$")

#: A field rule returns the paths under the field that fail: [] valid, [""] the field itself.
_Rule = Callable[[object], list[str]]


def _ok(valid: bool) -> list[str]:
    return [] if valid else [""]


_js_length = js_length  # UTF-16 code units, as zod's min/max count


def _is_number(value: object) -> bool:
    # bool is an int in Python but not a number in JSON/JavaScript.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _string(value: object) -> list[str]:
    return _ok(isinstance(value, str))


def _non_empty_string(value: object) -> list[str]:
    return _ok(isinstance(value, str) and _js_length(value) >= 1)


def _profile_id(value: object) -> list[str]:
    return _ok(_is_number(value) or (isinstance(value, str) and value != ""))


def _record(value: object) -> list[str]:
    return _ok(isinstance(value, dict))


def _positive_number(value: object) -> list[str]:
    return _ok(_is_number(value) and value > 0)  # type: ignore[operator]


def _email(value: object) -> list[str]:
    return _ok(isinstance(value, str) and email_failure(value) is None)


def _url(value: object) -> list[str]:
    return _ok(isinstance(value, str) and url_failure(value) is None)


def _non_empty_string_list(value: object) -> list[str]:
    if not isinstance(value, list):
        return [""]
    return [f"/{i}" for i, item in enumerate(value) if _non_empty_string(item)]


def _int_between(low: int, high: int | None) -> _Rule:
    def rule(value: object) -> list[str]:
        if not _is_number(value) or not float(value).is_integer():  # type: ignore[arg-type]
            return [""]
        return _ok(value >= low and (high is None or value <= high))  # type: ignore[operator]

    return rule


def _nullish(rule: _Rule) -> _Rule:
    def nullable(value: object) -> list[str]:
        return [] if value is None else rule(value)

    return nullable


def _poisoned(value: object) -> bool:
    """A ``__proto__`` key or ``constructor.prototype`` anywhere, as secure-json-parse finds."""
    if isinstance(value, dict):
        return any(poisoned_key(k, v) or _poisoned(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_poisoned(item) for item in value)
    return False


def _boolean(value: object) -> list[str]:
    return _ok(isinstance(value, bool))


def _datetime(value: object) -> list[str]:
    return _ok(isinstance(value, str) and _DATETIME_RE.match(value) is not None)


def _string_at_most(limit: int) -> _Rule:
    def rule(value: object) -> list[str]:
        return _ok(isinstance(value, str) and _js_length(value) <= limit)

    return rule


#: increment and decrement share one schema on the server.
_COUNTER_SCHEMA: Final[dict[str, tuple[_Rule, bool]]] = {
    "profileId": (_profile_id, True),
    "property": (_non_empty_string, True),
    "value": (_positive_number, False),
}
#: Per type: field name -> (rule, required). Keys not listed are ignored, as zod strips them.
_SCHEMAS: Final[dict[str, dict[str, tuple[_Rule, bool]]]] = {
    "track": {
        "name": (_non_empty_string, True),
        "properties": (_record, False),
        "profileId": (_profile_id, False),
        "groups": (_nullish(_non_empty_string_list), False),
    },
    "identify": {
        "profileId": (_profile_id, True),
        "firstName": (_string, False),
        "lastName": (_string, False),
        "email": (_email, False),
        "avatar": (_url, False),
        "properties": (_record, False),
    },
    "increment": _COUNTER_SCHEMA,
    "decrement": _COUNTER_SCHEMA,
    "alias": {
        "profileId": (_profile_id, True),
        "alias": (_non_empty_string, True),
    },
    "replay": {
        "chunk_index": (_int_between(0, 65_535), True),
        "events_count": (_int_between(1, None), True),
        "is_full_snapshot": (_boolean, True),
        "started_at": (_datetime, True),
        "ended_at": (_datetime, True),
        "payload": (_string_at_most(2 * 1_048_576), True),
    },
    "group": {
        "id": (_non_empty_string, True),
        "type": (_non_empty_string, True),
        "name": (_non_empty_string, True),
        "properties": (_record, False),
    },
    "assign_group": {
        "groupIds": (_non_empty_string_list, True),
        "profileId": (_profile_id, False),
    },
}


def _is_blocked_event_name(name: str) -> bool:
    return blocked_name(name) is not None


def _track_refinements(payload: dict[str, Any]) -> list[str]:
    """The track schema's ``.refine`` checks; zod runs them only once the shape is valid."""
    issues: list[str] = []
    name: str = payload["name"]
    if name in _RESERVED_EVENT_NAMES or _is_blocked_event_name(name):
        issues.append("/name")
    if name == "revenue":
        revenue = (payload.get("properties") or {}).get("__revenue")
        valid = revenue is None or (
            _is_number(revenue) and float(revenue).is_integer() and revenue >= 0
        )
        if not valid:
            issues.append("/properties/__revenue")
    return issues


def validation_issues(body: object) -> list[str]:
    """Paths (fastify's ``instancePath``, e.g. ``/payload/name``) the body fails at; [] if valid."""
    if not isinstance(body, dict):
        return [""]
    kind = body.get("type")
    schema = _SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        return ["/type"]
    payload = body.get("payload")
    if not isinstance(payload, dict):
        return ["/payload"]
    issues: list[str] = []
    for field, (rule, required) in schema.items():
        if field not in payload:
            if required:
                issues.append(f"/{field}")
            continue
        issues.extend(f"/{field}{sub}" for sub in rule(payload[field]))
    if not issues and kind == "track":
        issues = _track_refinements(payload)
    return [f"/payload{issue}" for issue in issues]


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
