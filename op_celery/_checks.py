"""Checks of one task argument: apply a rule, or raise `InvalidEvent` naming the argument.

The value rules themselves are in `_rules` and `_url` (shared with the stand-in server); here
each argument is checked as the caller passed it (snake_case, Python types) and turned into what
the body carries. What the server accepts is accepted, what it answers 400 to is refused here,
with the argument, the rule and the server's reason (``track: name is 82 UTF-16 code units;
OpenPanel allows 80``). Where op-celery refuses more than the server, on purpose, the
message says so:

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
  latin-1 and RFC 9110 allow (no emoji or CJK, no control characters, no leading space), as
  ``requests`` would send them, or the worker could not send the event at all;
- a ``device_id`` the server would silently ignore (not a string, blank, or longer than
  `MAX_DEVICE_ID_UNITS` once trimmed): the caller meant it, so dropping it is a bug to report.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import re
import reprlib
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from ._exceptions import InvalidEvent
from ._rules import (
    MAX_SAFE_INTEGER,
    blocked_name,
    email_failure,
    header_failure,
    js_length,
    js_trim,
    poisoned_key,
    skipped_ip_kind,
)
from ._url import url_failure

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_DEDUP_FOR_S",
    "MAX_DEVICE_ID_UNITS",
    "MAX_NESTING_LEVELS",
    "MAX_PROJECT_NAME_CHARS",
    "MAX_USER_AGENT_CHARS",
    "body_size",
    "client_ip",
    "dedup_for",
    "device_id",
    "email",
    "event_id",
    "event_name",
    "fail",
    "json_bound",
    "non_empty_str",
    "optional_str",
    "positive_number",
    "profile_id",
    "project",
    "properties",
    "revenue",
    "revenue_amount",
    "show",
    "str_list",
    "timestamp",
    "url",
    "user_agent",
    "warn_skipped_ip",
]

#: Longest user agent forwarded, in characters; longer ones are refused, not cut.
MAX_USER_AGENT_CHARS = 1024
#: Longest project name, in characters.
MAX_PROJECT_NAME_CHARS = 64
#: Largest body sent, in bytes of compact JSON (what the client POSTs); larger events are
#: refused at ``.delay()`` rather than answered 413 by a proxy on the worker.
MAX_BODY_BYTES = 1_048_576
#: Deepest nesting of dicts and lists in ``properties`` (op-celery's own limit).
MAX_NESTING_LEVELS = 32
#: Longest device id, in UTF-16 code units once trimmed (``MAX_OVERRIDE_DEVICE_ID_LENGTH`` of
#: OpenPanel's track.controller.ts; a longer one the server silently ignores).
MAX_DEVICE_ID_UNITS = 64
#: Longest ``dedup_for`` of one event, in seconds (400 days): the delivered mark is one Redis key
#: per event, so a longer memory is a retention decision rather than a retry window.
MAX_DEDUP_FOR_S = 400 * 86_400

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


def fail(operation: str, field: str, rule: str) -> InvalidEvent:
    return InvalidEvent(operation, field, rule)


def show(value: object) -> str:
    """A short repr for a message: never the whole of a huge value, never a 4,300-digit int."""
    if isinstance(value, int) and not -(10**40) < value < 10**40:
        return f"an integer of {value.bit_length()} bits"
    try:
        return _SHOW.repr(value)
    except Exception:  # an int too long for str() in a container, a repr that raises
        return f"a {type(value).__name__}"


def _unsafe_integer(value: int) -> str:
    return (
        f"is {show(value)}, beyond 2**53 - 1 (Number.MAX_SAFE_INTEGER): OpenPanel reads "
        "numbers as JavaScript doubles and would store it rounded; op-celery refuses it, "
        "send it as a string"
    )


def non_empty_str(op: str, field: str, value: object) -> str:
    # zod's min(1): one UTF-16 code unit is enough, " " included.
    if not isinstance(value, str) or not value:
        raise fail(op, field, f"must be a non-empty string, got {show(value)}")
    return value


def optional_str(op: str, field: str, value: object) -> str | None:
    # z.string().optional(): any string, "" included.
    if value is None or isinstance(value, str):
        return value
    raise fail(op, field, f"must be a string, got {show(value)}")


def profile_id(op: str, value: object, *, required: bool) -> str | int | float | None:
    if value is None:
        if required:
            raise fail(op, "profile_id", "is required (a non-empty string or a number)")
        return None
    if isinstance(value, bool):
        raise fail(op, "profile_id", "must be a non-empty string or a number, not a bool")
    if isinstance(value, int):
        if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            return value
        # Beyond 2**53 the server would round it; its decimal string is stored exactly.
        try:
            return str(value)
        except ValueError:
            raise fail(op, "profile_id", f"is {show(value)}: too long to send") from None
    if isinstance(value, float):
        if not math.isfinite(value):
            raise fail(op, "profile_id", "must be a finite number (JSON has no NaN or Infinity)")
        return value
    if isinstance(value, str) and value:
        return value
    raise fail(op, "profile_id", f"must be a non-empty string or a number, got {show(value)}")


#: Exact types of values that need no check: a dict or list item of one of them is taken as it
#: is; anything else (ints, floats, containers, subclasses) goes through `_json_value`.
_PLAIN_SCALARS = (str, bool, type(None))


def _plain_number(item: object) -> bool:
    """An exact int within 2**53 or a finite float: sent as it is, no recursive call."""
    kind = type(item)
    if kind is int:
        return -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER  # type: ignore[operator]
    return kind is float and math.isfinite(item)  # type: ignore[arg-type]


def _json_value(op: str, path: str, value: object, depth: int = 0) -> Any:
    """Check that ``value`` is plain JSON; return it with tuples turned into lists."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise fail(op, path, _unsafe_integer(value))
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise fail(
                op,
                path,
                "must be a finite number: JSON has no NaN or Infinity, so op-celery refuses "
                f"{value!r}",
            )
        return value
    if depth >= MAX_NESTING_LEVELS:
        raise fail(
            op, path, f"is nested more than {MAX_NESTING_LEVELS} levels deep (op-celery's limit)"
        )
    # Items that are plain scalars are taken as they are, without a recursive call or the text
    # of their path, which is only needed for an error.
    if isinstance(value, Mapping):
        for key in ("__proto__", "constructor"):  # one lookup per dict, not a test per key
            if key in value and poisoned_key(key, value[key]):
                raise fail(
                    op,
                    f"{path}[{key!r}]",
                    "is a key OpenPanel's JSON parser refuses (prototype poisoning: the "
                    "server answers 400 'Body is not valid JSON'); rename it",
                )
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise fail(
                    op,
                    path,
                    f"has the key {show(key)} ({type(key).__name__}): op-celery wants string "
                    "keys, as JSON has, rather than letting json.dumps change it; convert it",
                )
            if type(item) in _PLAIN_SCALARS or _plain_number(item):
                out[key] = item
            else:
                out[key] = _json_value(op, f"{path}[{key!r}]", item, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [
            item
            if type(item) in _PLAIN_SCALARS or _plain_number(item)
            else _json_value(op, f"{path}[{i}]", item, depth + 1)
            for i, item in enumerate(value)
        ]
    raise fail(
        op,
        path,
        f"must be JSON (str, int, float, bool, None, list, dict); got {type(value).__name__}: "
        "convert it first, e.g. a datetime with .isoformat()",
    )


def properties(op: str, value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise fail(op, "properties", f"must be a dict, got {type(value).__name__}")
    result: dict[str, Any] = _json_value(op, "properties", value)
    return result


def str_list(op: str, field: str, value: object) -> list[str]:
    # z.array(z.string().min(1)): an empty list is valid.
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise fail(op, field, f"must be a list of non-empty strings, got {show(value)}")
    return [non_empty_str(op, f"{field}[{i}]", item) for i, item in enumerate(value)]


def positive_number(op: str, field: str, value: object) -> int | float:
    # z.number().positive(): finite and > 0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(op, field, f"must be a positive number, got {show(value)}")
    if isinstance(value, int) and value > MAX_SAFE_INTEGER:
        raise fail(op, field, _unsafe_integer(value))
    if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
        raise fail(op, field, f"must be a positive (finite) number, got {show(value)}")
    return value


def event_name(op: str, value: object) -> str:
    name = non_empty_str(op, "name", value)
    reason = blocked_name(name)
    if reason is not None:
        raise fail(op, "name", reason)
    return name


def revenue_amount(op: str, value: object) -> int:
    """The ``amount`` of a ``revenue`` event, as the server's refine takes ``__revenue``:
    ``Number.isInteger`` and >= 0 (so ``1200.0`` passes and is sent as ``1200``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(
            op, "amount", f"must be an integer number of minor units (cents), got {show(value)}"
        )
    if isinstance(value, float):
        if not value.is_integer():  # NaN and infinities included
            raise fail(
                op,
                "amount",
                f"is {show(value)}; OpenPanel wants an integer in minor units (12.99 USD is "
                "1299): '__revenue must be an integer (no floats or strings)'",
            )
        value = int(value)
    if value < 0:
        raise fail(
            op,
            "amount",
            f"is {show(value)}; OpenPanel refuses a negative revenue (send refunds as their own "
            "event)",
        )
    if value > MAX_SAFE_INTEGER:
        raise fail(op, "amount", _unsafe_integer(value))
    return value


def device_id(op: str, value: object) -> str | None:
    # The server takes properties.__deviceId only if it is a string that, trimmed, is 1 to 64
    # UTF-16 code units; anything else it ignores without a word (the event then gets the
    # device id it derives from IP and user agent). op-celery refuses instead: a device id the
    # caller passed on purpose and the server would drop is a bug to see at .delay().
    if value is None:
        return None
    if not isinstance(value, str) or not js_trim(value):
        raise fail(op, "device_id", f"must be a non-empty string, got {show(value)}")
    trimmed = js_trim(value)
    units = js_length(trimmed)
    if units > MAX_DEVICE_ID_UNITS:
        raise fail(
            op,
            "device_id",
            f"is {units} UTF-16 code units once trimmed; OpenPanel takes at most "
            f"{MAX_DEVICE_ID_UNITS} and ignores a longer one",
        )
    return value


def dedup_for(op: str, value: object) -> int | None:
    """Seconds the ledger remembers the event once delivered (whole seconds, rounded up)."""
    if value is None:
        return None
    seconds: object = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise fail(op, "dedup_for", f"must be seconds (a number) or a timedelta, got {show(value)}")
    if not 0 < seconds <= MAX_DEDUP_FOR_S:  # NaN fails too
        raise fail(
            op,
            "dedup_for",
            f"is {show(value)}; it must be more than 0 and at most {MAX_DEDUP_FOR_S} seconds "
            "(400 days)",
        )
    return math.ceil(seconds)


def revenue(op: str, properties: dict[str, Any]) -> None:
    # The refine of zTrackPayload: absent or null passes; else Number.isInteger and >= 0.
    revenue = properties.get("__revenue")
    if revenue is None:
        return
    integral = not isinstance(revenue, bool) and (
        isinstance(revenue, int) or (isinstance(revenue, float) and revenue.is_integer())
    )
    if not integral or revenue < 0:
        raise fail(
            op,
            "properties['__revenue']",
            f"is {show(revenue)}; OpenPanel wants a non-negative integer (minor units) when "
            "name is 'revenue' ('__revenue must be an integer (no floats or strings)')",
        )


def email(op: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise fail(op, "email", f"must be a string, got {show(value)}")
    reason = email_failure(value)
    if reason is not None:
        raise fail(op, "email", f"{show(value)} {reason}")
    return value


def url(op: str, field: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise fail(op, field, f"must be a URL string, got {show(value)}")
    reason = url_failure(value)
    if reason is not None:
        raise fail(
            op,
            field,
            f"{show(value)} {reason}: OpenPanel takes what JavaScript's new URL() parses "
            "(400 'Invalid URL')",
        )
    return value


def _header(op: str, field: str, header: str, value: str) -> str:
    reason = header_failure(value)
    if reason is not None:
        raise fail(op, field, f"{show(value)} {reason}; it is sent as the {header} header")
    return value


def client_ip(op: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise fail(op, "client_ip", f"must be an IP address string, got {show(value)}")
    text = value.strip()
    if _CANONICAL_IPV4.fullmatch(text):
        return text  # what ipaddress would return, without parsing it
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise fail(op, "client_ip", f"must be an IPv4 or IPv6 address, got {show(value)}") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # the server reads ::ffff:1.2.3.4 as no address at all
    return _header(op, "client_ip", "openpanel-client-ip", str(address))


log = logging.getLogger("op_celery")
#: Whether this process has warned of a client IP the server skips (`warn_skipped_ip`).
_warned_skipped_ip = False


def warn_skipped_ip(op: str, ip: str | None) -> None:
    """Warn, once per process, of a client IP that OpenPanel's server skips (a private or
    loopback one): nearly always the app's own proxy, not the end user. Still sent as given:
    the server decides (it then takes the next public IP of the request's headers, or none)."""
    global _warned_skipped_ip
    if _warned_skipped_ip or ip is None:
        return
    kind = skipped_ip_kind(ip)
    if kind is None:
        return
    _warned_skipped_ip = True
    log.warning(
        "op_celery: a %s event carries client_ip %s, a %s address, which OpenPanel's server "
        "ignores (it skips private and loopback IPs), so its events get no location: this is "
        "most likely a proxy in front of the app, not the user. Let the middleware trust the "
        "proxy's X-Forwarded-For (trusted_proxies, OPENPANEL['TRUSTED_PROXIES'] in Django) or "
        "pass client_ip= the real client's address. Sent as it is; said once per process",
        op, ip, kind,
    )  # fmt: skip


def user_agent(op: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise fail(op, "user_agent", f"must be a non-empty string, got {show(value)}")
    if len(value) > MAX_USER_AGENT_CHARS:
        raise fail(op, "user_agent", f"must be at most {MAX_USER_AGENT_CHARS} characters")
    return _header(op, "user_agent", "user-agent", value)


def project(op: str, value: object) -> str:
    if (
        not isinstance(value, str)
        or not _PROJECT.fullmatch(value)
        or len(value) > MAX_PROJECT_NAME_CHARS
    ):
        raise fail(
            op,
            "project",
            f"must be a project name of letters, digits, '_', '-' or '.', got {show(value)}",
        )
    return value


def timestamp(op: str, value: object) -> str:
    """Return an ISO-8601 UTC time; accept an aware datetime or the ISO string made from one."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise fail(op, "timestamp", f"must be an ISO-8601 time, got {show(value)}") from None
    else:
        raise fail(op, "timestamp", f"must be a timezone-aware datetime, got {show(value)}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise fail(
            op,
            "timestamp",
            "must be timezone-aware: use datetime.now(timezone.utc), not datetime.utcnow()",
        )
    try:
        utc = moment.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise fail(
            op, "timestamp", f"is {show(value)}, which is outside the years 1 to 9999 in UTC"
        ) from None
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_id(op: str, value: object) -> str:
    if not isinstance(value, str) or not 8 <= len(value) <= 64 or not value.isascii():
        raise fail(op, "event_id", f"must be an ASCII id of 8 to 64 characters, got {show(value)}")
    return _header(op, "event_id", "request-id", value)


#: Most bytes a scalar of each exact type takes in compact JSON, its comma included (a safe int
#: has at most 17 characters, a float's repr at most 24).
_SCALAR_BYTES = {int: 18, float: 25, bool: 6, type(None): 5}


def json_bound(value: object) -> int:
    """An upper bound of ``len(json.dumps(value, separators=(",", ":")))``, without encoding.

    With ``ensure_ascii`` a character takes at most 12 bytes (an astral one, as two ``\\u``
    escapes); an unknown type gives a huge bound, so the caller encodes exactly.
    """
    if isinstance(value, dict):
        pairs: Any = value.items()
    elif isinstance(value, list):
        pairs = ((None, item) for item in value)
    elif type(value) is str:
        return 12 * len(value) + 3
    else:
        return 1 << 62
    total = 2
    for key, item in pairs:
        if key is not None:
            total += 12 * len(key) + 3
        kind = type(item)
        if kind is str:
            total += 12 * len(item) + 3
        else:
            total += _SCALAR_BYTES.get(kind) or json_bound(item) + 1
    return total


def body_size(op: str, body: dict[str, Any]) -> None:
    if json_bound(body) <= MAX_BODY_BYTES:
        return  # the usual case, at about half the cost of encoding
    size = len(_COMPACT_JSON.encode(body))
    if size <= MAX_BODY_BYTES:
        return
    payload = body["payload"]
    largest = max(payload, key=lambda key: len(json.dumps(payload[key])))
    raise fail(
        op,
        _API_TO_ARGUMENT.get(largest, largest),
        f"makes the event {size:,} bytes of JSON; op-celery sends at most {MAX_BODY_BYTES:,} "
        "(1 MiB), which proxies in front of OpenPanel commonly allow (larger ones end as 413)",
    )
