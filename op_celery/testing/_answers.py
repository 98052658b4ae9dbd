"""What the stand-in answers: one `Answer` type and the bodies the server and its proxy send.

An `Answer` is decided whole before anything is written, so the HTTP layer only frames it. The
canned bodies follow ``openpanel-api.md``: JSON errors from fastify, plain-text 401s and 500s,
the rate-limit JSON on 429, an nginx HTML page on 502/504. In a 200, ``deviceId`` is the
event's ``__deviceId`` as the server takes it (trimmed, 1 to 64 UTF-16 units), else a hash of
client, IP and user agent (a placeholder: OpenPanel's is salted, and rotates daily); ``sessionId``
is made as the server makes it (``getSessionId`` in ``apps/api/src/utils/ids.ts``): a hash of
client, device id and the event's 30-minute window, never empty, server events included (the
server stores a server event without a session, but its answer carries the id all the same).

`NAMED_ANSWERS` are the server's answers that are no plain status, by name, for `fault_answer`
(``fail_next(1, "bot")``): its bot hook's 202, its duplicate hook's 200, the 401s of the
project's filters and of revenue without a secret, and a captive portal's HTML 200 (which is
no answer of OpenPanel's at all). Status, body and content type are the server's (fastify sends
a string as ``text/plain; charset=utf-8``, an object as JSON).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Mapping
from datetime import datetime
from http import HTTPStatus
from typing import Any, Final

from op_celery._rules import js_length, js_trim

__all__ = [
    "IP_FILTERED",
    "NAMED_ANSWERS",
    "PROFILE_FILTERED",
    "RATE_LIMIT_MESSAGE",
    "REVENUE_WITHOUT_SECRET",
    "Answer",
    "accepted",
    "error_400",
    "fault_answer",
    "is_server_event",
    "json_answer",
    "phrase",
    "rate_limited",
    "text_answer",
]

_JSON: Final = "application/json; charset=utf-8"
_TEXT: Final = "text/plain; charset=utf-8"
_HTML: Final = "text/html; charset=utf-8"

#: The message of the server's 429 body.
RATE_LIMIT_MESSAGE: Final = "You have exceeded the rate limit for this endpoint."
#: The 401 texts of ``apps/api/src/utils/auth.ts`` for the project's filters and for revenue.
IP_FILTERED: Final = "Ingestion: IP address is blocked by project filter"
PROFILE_FILTERED: Final = "Ingestion: Profile id is blocked by project filter"
REVENUE_WITHOUT_SECRET: Final = "Ingestion: Revenue tracking is not allowed without a client secret"
#: What a hotel's or an office's captive portal answers to any request it intercepts.
_CAPTIVE_PORTAL_PAGE: Final = (
    "<!DOCTYPE html>\n<html><head><title>Sign in to the network</title></head>\n"
    '<body><form method="post" action="/login"><h1>Welcome</h1>'
    "<p>Accept the terms of use to continue.</p></form></body></html>\n"
)
#: ``SINGLE_NAME_VERSION_REGEX`` of OpenPanel's user-agent parser: ``name/1.2`` alone is a
#: server's user agent (``$`` is the very end in JavaScript).
_SINGLE_NAME_VERSION_RE: Final = re.compile(r"^[^/]+/[\d.]+\Z")
#: Words ua-parser-js finds a browser, an OS or a device by. A user agent with none of them it
#: parses to nothing, which OpenPanel also takes for a server; this list approximates the parser.
_CLIENT_MARKERS_RE: Final = re.compile(
    r"mozilla|opera|chrome|safari|firefox|edg|msie|trident|windows|mac os|macintosh|android|"
    r"iphone|ipad|ipod|linux|cros|mobile|darwin|cfnetwork",
    re.IGNORECASE,
)
#: The server's ``MAX_OVERRIDE_DEVICE_ID_LENGTH`` (UTF-16 code units, once trimmed).
_MAX_DEVICE_ID_UNITS: Final = 64
#: ``SESSION_TIMEOUT_MS`` and the grace at the start of a window, as ``getSessionId`` uses them.
_SESSION_WINDOW_MS: Final = 30 * 60 * 1000
_SESSION_GRACE_MS: Final = 5_000
_ONE_MINUTE_MS: Final = 60_000
_GATEWAY_PAGE: Final = (
    "<html>\r\n<head><title>{code} {phrase}</title></head>\r\n<body>\r\n"
    "<center><h1>{code} {phrase}</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


@dataclasses.dataclass(frozen=True)
class Answer:
    """A complete HTTP answer, decided before anything is written."""

    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False

    def with_headers(self, extra: tuple[tuple[str, str], ...]) -> Answer:
        return dataclasses.replace(self, headers=self.headers + extra) if extra else self


def json_answer(status: int, content: Any, headers: tuple[tuple[str, str], ...] = ()) -> Answer:
    body = json.dumps(content, separators=(",", ":")).encode()
    return Answer(status, body, _JSON, headers)


def text_answer(status: int, text: str) -> Answer:
    return Answer(status, text.encode(), _TEXT)


def error_400(message: str) -> Answer:
    return json_answer(400, {"status": 400, "error": "Error", "message": message})


def phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


#: The server's answers that are no plain status, by name (`fault_answer` takes the name):
#: (status, body, content type).
NAMED_ANSWERS: Final[Mapping[str, tuple[int, str, str]]] = {
    # is-bot.hook.ts: reply.status(202).send({ bot }), bot = {name, type} of its bot list.
    "bot": (202, '{"bot":{"name":"Googlebot","type":"Search bot"}}', _JSON),
    # duplicate.hook.ts: reply.status(200).send('Duplicate event').
    "duplicate": (200, "Duplicate event", _TEXT),
    "ip-filtered": (401, IP_FILTERED, _TEXT),
    "profile-filtered": (401, PROFILE_FILTERED, _TEXT),
    "revenue-without-secret": (401, REVENUE_WITHOUT_SECRET, _TEXT),
    "captive-portal": (200, _CAPTIVE_PORTAL_PAGE, _HTML),
}


def _guess_content_type(body: str) -> str:
    stripped = body.lstrip()
    if stripped.startswith(("{", "[")):
        return _JSON
    if stripped.startswith("<"):
        return _HTML
    return _TEXT


def fault_answer(
    status: int | str,
    body: str | None,
    headers: Mapping[str, str] | None,
    *,
    close: bool = False,
) -> Answer:
    """An injected answer; ``body=None`` picks what a real server or proxy sends for ``status``.

    ``status`` may also name one of `NAMED_ANSWERS` (``"bot"``, ``"duplicate"``,
    ``"ip-filtered"``, ``"profile-filtered"``, ``"revenue-without-secret"``,
    ``"captive-portal"``): that answer, its status, body and content type, as the server sends
    it (``body`` and ``headers`` still override).
    """
    if isinstance(status, str):
        if status not in NAMED_ANSWERS:
            names = ", ".join(repr(name) for name in NAMED_ANSWERS)
            raise ValueError(f"status must be an HTTP status or one of {names}, got {status!r}")
        code, text, named_type = NAMED_ANSWERS[status]
        given = {name.lower(): value for name, value in (headers or {}).items()}
        given.setdefault("content-type", named_type)
        return fault_answer(code, text if body is None else body, given, close=close)
    if status < 100 or status > 599:
        raise ValueError(f"status must be an HTTP status code, got {status}")
    extra = tuple((name.lower(), value) for name, value in (headers or {}).items())
    content_type = next((value for name, value in extra if name == "content-type"), None)
    extra = tuple(item for item in extra if item[0] != "content-type")
    if body is None:
        if status == 429:
            body = rate_limited().body.decode()
        elif status == 500:
            body = "Internal server error"
        elif status in (502, 504):
            body = _GATEWAY_PAGE.format(code=status, phrase=phrase(status))
        else:
            body = phrase(status)
    return Answer(status, body.encode(), content_type or _guess_content_type(body), extra, close)


def rate_limited(headers: tuple[tuple[str, str], ...] = ()) -> Answer:
    """The 429 of ``@fastify/rate-limit`` as OpenPanel configures it, with ``headers``."""
    content = {"status": 429, "error": "Too Many Requests", "message": RATE_LIMIT_MESSAGE}
    return json_answer(429, content, headers)


def is_server_event(user_agent: str | None) -> bool:
    """Whether OpenPanel takes an event with this user agent for a server's (``isServer``)."""
    if not user_agent:
        return True
    if _SINGLE_NAME_VERSION_RE.match(user_agent):
        return True
    return _CLIENT_MARKERS_RE.search(user_agent) is None


def accepted(
    kind: str, payload: Mapping[str, Any], headers: Mapping[str, str], client_id: str, ip: str
) -> Answer:
    """The 200 for an accepted event: its device and session ids (`_ids`)."""
    return json_answer(200, _ids(kind, payload, headers, client_id, ip))


def _override_device_id(kind: str, payload: Mapping[str, Any]) -> str | None:
    """``getOverrideDeviceId``: a track's ``__deviceId``, trimmed, if 1 to 64 units."""
    properties = payload.get("properties")
    raw = properties.get("__deviceId") if kind == "track" and isinstance(properties, dict) else None
    if not isinstance(raw, str):
        return None
    trimmed = js_trim(raw)
    return trimmed if trimmed and js_length(trimmed) <= _MAX_DEVICE_ID_UNITS else None


def _event_ms(payload: Mapping[str, Any]) -> int:
    """The event's time as ``getTimestamp`` takes it: ``__timestamp`` unless unreadable or more
    than a minute ahead, else now (wall time, in milliseconds)."""
    now_ms = int(time.time() * 1000)
    properties = payload.get("properties")
    stamp = properties.get("__timestamp") if isinstance(properties, dict) else None
    if not isinstance(stamp, str) or not stamp:
        return now_ms
    try:
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        stamp_ms = int(moment.timestamp() * 1000)
    except (ValueError, OverflowError, OSError):
        return now_ms
    return now_ms if moment.tzinfo is None or stamp_ms > now_ms + _ONE_MINUTE_MS else stamp_ms


def _session_id(client_id: str, device_id: str, event_ms: int) -> str:
    """``getSessionId``: the first 16 bytes of a SHA-256 of project, device and window."""
    bucket = event_ms // _SESSION_WINDOW_MS
    if event_ms - bucket * _SESSION_WINDOW_MS < _SESSION_GRACE_MS:
        bucket -= 1  # the grace at a window's start keeps the previous window's id
    digest = hashlib.sha256(f"sess:v1:{client_id}:{device_id}:{bucket}".encode()).digest()
    return base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")


def _ids(
    kind: str, payload: Mapping[str, Any], headers: Mapping[str, str], client_id: str, ip: str
) -> dict[str, str]:
    """The device and session ids of the 200 (the client id stands for the project id)."""
    device_id = _override_device_id(kind, payload)
    if device_id is None:
        # The server hashes salt, project, IP and user agent ("unknown/1.0" when none).
        user_agent = headers.get("user-agent") or "unknown/1.0"
        ip = headers.get("openpanel-client-ip", ip)
        device_id = hashlib.sha256(f"{client_id}|{ip}|{user_agent}".encode()).hexdigest()[:32]
    return {
        "deviceId": device_id,
        "sessionId": _session_id(client_id, device_id, _event_ms(payload)),
    }
