"""What the stand-in answers: one `Answer` type and the bodies the server and its proxy send.

An `Answer` is decided whole before anything is written, so the HTTP layer only frames it. The
canned bodies follow ``openpanel-api.md``: JSON errors from fastify, plain-text 401s and 500s,
the rate-limit JSON on 429, an nginx HTML page on 502/504. ``deviceId``/``sessionId`` in a 200
are placeholders (a hash and a random UUID), not OpenPanel's salted device ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import uuid
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, Final

__all__ = [
    "RATE_LIMIT_MESSAGE",
    "Answer",
    "accepted",
    "error_400",
    "fault_answer",
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
#: A user agent that is only ``name/version`` (or none) marks a server-side event.
_SERVER_USER_AGENT_RE: Final = re.compile(r"^[^\s/]+/[^\s/]+$")
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


def _guess_content_type(body: str) -> str:
    stripped = body.lstrip()
    if stripped.startswith(("{", "[")):
        return _JSON
    if stripped.startswith("<"):
        return _HTML
    return _TEXT


def fault_answer(
    status: int, body: str | None, headers: Mapping[str, str] | None, *, close: bool = False
) -> Answer:
    """An injected answer; ``body=None`` picks what a real server or proxy sends for ``status``."""
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


def accepted(
    kind: str, payload: Mapping[str, Any], headers: Mapping[str, str], client_id: str, ip: str
) -> Answer:
    """The 200 for an accepted event, with `_placeholder_ids`."""
    return json_answer(200, _placeholder_ids(kind, payload, headers, client_id, ip))


def _placeholder_ids(
    kind: str, payload: Mapping[str, Any], headers: Mapping[str, str], client_id: str, ip: str
) -> dict[str, str]:
    """Placeholder device and session ids: stable per client/IP/user agent, not OpenPanel's."""
    properties = payload.get("properties")
    override = properties.get("__deviceId") if isinstance(properties, dict) else None
    user_agent = headers.get("user-agent", "")
    ip = headers.get("openpanel-client-ip", ip)
    if kind == "track" and isinstance(override, str) and override:
        device_id = override
    else:
        device_id = hashlib.sha256(f"{client_id}|{ip}|{user_agent}".encode()).hexdigest()[:32]
    # Server events (no user agent, or only "name/version") get no session on the real server.
    is_server_event = not user_agent or _SERVER_USER_AGENT_RE.match(user_agent) is not None
    session_id = "" if is_server_event else str(uuid.uuid4())
    return {"deviceId": device_id, "sessionId": session_id}
