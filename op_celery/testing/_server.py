"""A stand-in OpenPanel ingestion server for tests, benchmarks and demos.

`StandInServer` is a real HTTP/1.1 server on a free loopback port that answers ``POST /track``
the way OpenPanel's server does (see ``openpanel-api.md``): zod-like body validation before
authentication, 401s with plain-text bodies, ``Alias is not supported``, 404 for increments on
unknown profiles, and an optional fixed-window rate limit with the ``@fastify/rate-limit``
headers. Tests can inject faults (canned answers, time-boxed outages, dropped connections,
latency) and read back every request it answered.

`StandInControl` drives and reads a server that runs in another process (for example one started
with ``python -m op_celery.testing``) through the ``/__stand-in/...`` control endpoints.

Limits, stated plainly:

- It validates the shapes OpenPanel's zod schemas check, with approximations: the attack
  blocklist is a representative subset of OpenPanel's, e-mail and URL checks approximate zod's,
  and every 400 message says ``Invalid input`` (the real text varies by zod version).
- It does not model CORS/``Origin`` clients, bot detection (202), duplicate detection, project
  filters, the legacy ``mixan-*`` headers or credentials in the body: every request needs the
  client id and secret headers.
- ``deviceId``/``sessionId`` in a 200 are placeholders (a hash and a random UUID), not
  OpenPanel's salted device ids; event time, IP and user-agent are recorded, not interpreted.
- It keeps every request in memory until `StandInServer.reset`; long benchmarks should reset.
- One thread per connection (stdlib ``http.server``): fine for thousands of requests per
  second on keep-alive connections, not for thousands of simultaneous connections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import math
import re
import selectors
import socket
import socketserver
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import TracebackType
from typing import Any, Final, Literal, cast, get_args
from urllib.parse import urlsplit

__all__ = ["Received", "StandInControl", "StandInServer"]

#: Address the server binds to; loopback only, so a test server is never reachable from outside.
HOST: Final = "127.0.0.1"
#: Largest request body read, in bytes (fastify's default ``bodyLimit``); larger ones get 413.
MAX_BODY_BYTES: Final = 1_048_576
#: Most bytes of a too-large body read and thrown away so the 413 reaches the client.
MAX_DISCARD_BYTES: Final = 64 * 1_048_576
#: Longest track event name, in UTF-16 code units as JavaScript counts them.
MAX_EVENT_NAME_LENGTH: Final = 80
#: How long stop() waits for each connection thread to finish, in seconds.
JOIN_TIMEOUT_SECONDS: Final = 5.0
#: Listen backlog; the stdlib default of 5 drops SYNs when a benchmark opens many connections.
LISTEN_BACKLOG: Final = 128
#: Prefix of the control endpoints.
CONTROL_PREFIX: Final = "/__stand-in/"

#: Which rate-limit headers the stand-in sends while a limit is set:
#: ``"all"``: ``x-ratelimit-limit``, ``-remaining`` and ``-reset`` on every answer counted against
#: the window and ``retry-after`` too on a 429, as ``@fastify/rate-limit`` does by default;
#: ``"retry-after"``: only ``retry-after`` on a 429, as many proxies and CDNs send;
#: ``"none"``: a bare 429 with no rate-limit header at all.
RateLimitHeaders = Literal["all", "retry-after", "none"]
#: The accepted `RateLimitHeaders` values, for command lines and the control endpoint.
RATE_LIMIT_HEADER_MODES: Final[tuple[str, ...]] = get_args(RateLimitHeaders)

_JSON: Final = "application/json; charset=utf-8"
_TEXT: Final = "text/plain; charset=utf-8"
_HTML: Final = "text/html; charset=utf-8"

#: Event names OpenPanel reserves for itself.
_RESERVED_EVENT_NAMES: Final = frozenset({"session_start", "session_end"})
#: Lower-case substrings OpenPanel's event-name blocklist treats as attack payloads; a
#: representative subset of the server's list, enough to test that a client surfaces the 400.
_BLOCKED_SUBSTRINGS: Final = (
    "../",
    "..\\",
    "%2e%2e",
    "${",
    "%{",
    "' or '",
    "' and '",
    "union select",
    "pg_sleep",
    "/etc/passwd",
    "/bin/bash",
    "cmd.exe",
    "<!doctype",
    "/cgi-bin/",
    ".git/config",
    ".env.bak",
)
#: Event names that are really URL paths from a vulnerability scanner (``/x.php``, ``/.env``).
_PATH_SCAN_PATTERNS: Final = (
    re.compile(r"^/.+\.php$", re.IGNORECASE),
    re.compile(r"^/\.[a-z]", re.IGNORECASE),
    re.compile(r"^/[a-z_-]+\.(php|env|yml|yaml|json|xml|config|ini|bak|sql|log)", re.IGNORECASE),
    re.compile(r"^/(wp-|wordpress|phpmyadmin)", re.IGNORECASE),
)
#: The server's client-id check: a lower-case hyphenated UUID.
_CLIENT_ID_RE: Final = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
#: zod's e-mail pattern (no leading dot, no "..", a dotted domain with a 2+ letter TLD).
_EMAIL_RE: Final = re.compile(
    r"^(?!\.)(?!.*\.\.)[A-Za-z0-9_'+\-.]*[A-Za-z0-9_+\-]@([A-Za-z0-9][A-Za-z0-9\-]*\.)+[A-Za-z]{2,}$"
)
_URL_SCHEME_RE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
#: Schemes for which a WHATWG URL parser (zod's ``url()``) requires a host.
_HOST_SCHEMES: Final = frozenset({"http", "https", "ws", "wss", "ftp"})
#: zod's default ``datetime()``: UTC with a ``Z``, optional fractional seconds.
_DATETIME_RE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?Z$")
#: A user agent that is only ``name/version`` (or none) marks a server-side event.
_SERVER_USER_AGENT_RE: Final = re.compile(r"^[^\s/]+/[^\s/]+$")

_RATE_LIMIT_MESSAGE: Final = "You have exceeded the rate limit for this endpoint."
_GATEWAY_PAGE: Final = (
    "<html>\r\n<head><title>{code} {phrase}</title></head>\r\n<body>\r\n"
    "<center><h1>{code} {phrase}</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


@dataclasses.dataclass(frozen=True)
class Received:
    """One ``/track`` request the stand-in answered.

    ``type`` and ``payload`` are taken from the body as sent (``""`` and ``{}`` when the body had
    none, e.g. invalid JSON); unknown payload keys are kept, although the real server drops them.
    ``headers`` has lower-case names; a repeated header's values are joined with ``", "``.
    ``at`` is ``time.time()`` when the request arrived.
    """

    type: str
    payload: dict[str, Any]
    headers: dict[str, str]
    status: int
    at: float

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (the control endpoints' format)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Received:
        """Build a `Received` from `to_json`'s output."""
        return cls(
            type=str(data["type"]),
            payload=dict(data["payload"]),
            headers={str(k): str(v) for k, v in data["headers"].items()},
            status=int(data["status"]),
            at=float(data["at"]),
        )


@dataclasses.dataclass(frozen=True)
class _Answer:
    """A complete HTTP answer, decided before anything is written."""

    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False

    def with_headers(self, extra: tuple[tuple[str, str], ...]) -> _Answer:
        return dataclasses.replace(self, headers=self.headers + extra) if extra else self


@dataclasses.dataclass
class _Fault:
    """``remaining`` more /track requests get ``answer``, or lose their connection if it's None."""

    remaining: int
    answer: _Answer | None


@dataclasses.dataclass(frozen=True)
class _Decision:
    answer: _Answer | None  # None: close the connection without answering
    received: Received
    latency: float


@dataclasses.dataclass
class _Window:
    start: float
    count: int


@dataclasses.dataclass(frozen=True)
class _RateLimit:
    limit: int
    window_seconds: float
    headers: RateLimitHeaders


def _rate_limit_headers(value: object) -> RateLimitHeaders:
    """``value`` as a `RateLimitHeaders` mode; ValueError naming the modes otherwise."""
    if isinstance(value, str) and value in RATE_LIMIT_HEADER_MODES:
        return cast(RateLimitHeaders, value)
    modes = ", ".join(repr(mode) for mode in RATE_LIMIT_HEADER_MODES)
    raise ValueError(f"rate-limit headers must be one of {modes}, got {value!r}")


def _json_answer(status: int, content: Any, headers: tuple[tuple[str, str], ...] = ()) -> _Answer:
    body = json.dumps(content, separators=(",", ":")).encode()
    return _Answer(status, body, _JSON, headers)


def _text_answer(status: int, text: str) -> _Answer:
    return _Answer(status, text.encode(), _TEXT)


def _error_400(message: str) -> _Answer:
    return _json_answer(400, {"status": 400, "error": "Error", "message": message})


def _phrase(status: int) -> str:
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


def _fault_answer(
    status: int, body: str | None, headers: Mapping[str, str] | None, *, close: bool = False
) -> _Answer:
    """An injected answer; ``body=None`` picks what a real server or proxy sends for ``status``."""
    if status < 100 or status > 599:
        raise ValueError(f"status must be an HTTP status code, got {status}")
    extra = tuple((name.lower(), value) for name, value in (headers or {}).items())
    content_type = next((value for name, value in extra if name == "content-type"), None)
    extra = tuple(item for item in extra if item[0] != "content-type")
    if body is None:
        if status == 429:
            content = {"status": 429, "error": "Too Many Requests", "message": _RATE_LIMIT_MESSAGE}
            body = json.dumps(content, separators=(",", ":"))
        elif status == 500:
            body = "Internal server error"
        elif status in (502, 504):
            body = _GATEWAY_PAGE.format(code=status, phrase=_phrase(status))
        else:
            body = _phrase(status)
    return _Answer(status, body.encode(), content_type or _guess_content_type(body), extra, close)


# --- Validation: the server's zod schemas, as functions returning the failing sub-paths. ------

#: A field rule returns the paths under the field that fail: [] valid, [""] the field itself.
_Rule = Callable[[object], list[str]]


def _ok(valid: bool) -> list[str]:
    return [] if valid else [""]


def _js_length(text: str) -> int:
    """Length in UTF-16 code units, as JavaScript (and so zod's ``min``/``max``) counts it."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


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
    return _ok(isinstance(value, str) and _EMAIL_RE.match(value) is not None)


def _url(value: object) -> list[str]:
    if not isinstance(value, str) or not _URL_SCHEME_RE.match(value):
        return [""]
    scheme = value.split(":", 1)[0].lower()
    if scheme in _HOST_SCHEMES:
        try:
            return _ok(bool(urlsplit(value).hostname))
        except ValueError:
            return [""]
    return []


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
        "groups": (_non_empty_string_list, False),
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
    if _js_length(name) > MAX_EVENT_NAME_LENGTH or "\n" in name or "\r" in name:
        return True
    lower = name.lower()
    if any(blocked in lower for blocked in _BLOCKED_SUBSTRINGS):
        return True
    return any(pattern.search(name) for pattern in _PATH_SCAN_PATTERNS)


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


def _validation_issues(body: object) -> list[str]:
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


def _profile_key(profile_id: object) -> str:
    """The profile id as the server stores it: numbers become their JavaScript string form."""
    if isinstance(profile_id, float) and profile_id.is_integer():
        return str(int(profile_id))
    return str(profile_id)


# --- The server. ---------------------------------------------------------------------------


class StandInServer:
    """A faithful stand-in for OpenPanel's ``POST /track`` on ``http://127.0.0.1:<free port>``.

    ``clients`` maps client ids (lower-case UUIDs, as the real server requires) to secrets.
    ``rate_limit`` is ``(limit, window_seconds)`` for a fixed window per client id (per peer IP
    when the request has no client id), or None for no limit, which is what the open-source
    server does; ``rate_limit_headers`` says which rate-limit headers it sends (see
    `set_rate_limit`). ``port`` 0 lets the OS pick.

    Time: ``clock`` (default ``time.monotonic``) plus whatever `advance` added is the server's
    clock for rate-limit windows and `fail_for` outages, and for nothing else: latency sleeps,
    `wait_for` timeouts and `Received.at` (wall time) are real time. Tests drive windows
    without sleeping either by passing a fake ``clock`` or by calling `advance` (also
    ``POST /__stand-in/advance`` for a server in another process).

    Order of checks on ``POST /track``, as on the real server: injected faults (they stand for a
    proxy in front of it), rate limit (counted at arrival; refused requests don't consume),
    content type and JSON, body validation, authentication, then alias (400) and
    increment/decrement on an unknown profile (404). A profile becomes known through an accepted
    ``identify`` or an accepted ``track`` carrying its ``profileId``.

    Start with `start` or ``with StandInServer(...) as server:``; a stopped server cannot be
    restarted. Every method is thread-safe.
    """

    def __init__(
        self,
        clients: Mapping[str, str] | None = None,
        rate_limit: tuple[int, float] | None = None,
        *,
        rate_limit_headers: RateLimitHeaders = "all",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._clock = clock
        self._advanced = 0.0
        self._port = port
        self._clients: dict[str, str] = {}
        self._rate_limit: _RateLimit | None = None
        self._windows: dict[str, _Window] = {}
        self._faults: deque[_Fault] = deque()
        self._outage_until = -math.inf
        self._outage_answer: _Answer | None = None
        self._latency = 0.0
        self._requests: list[Received] = []
        self._accepted: list[Received] = []
        self._counts: Counter[int] = Counter()
        self._dropped = 0
        self._connections = 0
        self._profiles: set[tuple[str, str]] = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        for client_id, secret in (clients or {}).items():
            self.add_client(client_id, secret)
        if rate_limit is not None:
            self.set_rate_limit(*rate_limit, headers=rate_limit_headers)
        else:
            _rate_limit_headers(rate_limit_headers)  # refuse a bad mode even without a limit

    # -- lifecycle --

    def start(self) -> StandInServer:
        """Bind a free loopback port and serve in a background daemon thread; returns self."""
        with self._lock:
            if self._httpd is not None or self._stopped:
                raise RuntimeError("a StandInServer can be started only once")
            self._httpd = _HTTPServer((HOST, self._port), self)
        self._thread = threading.Thread(
            target=self._httpd.accept_until_closed,
            name=f"op-celery-stand-in:{self._httpd.server_port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listening socket and every open connection, and join all threads.

        Requests sleeping in `set_latency` wake up and lose their connection unanswered.
        Calling it again, or on a server never started, does nothing.
        """
        with self._lock:
            httpd, self._httpd = self._httpd, None
            self._stopped = True
        if httpd is None:
            return
        self._stopping.set()
        httpd.stop_accepting()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_SECONDS)
        httpd.close_connections()
        httpd.server_close()

    def __enter__(self) -> StandInServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, without a trailing slash; only while running."""
        httpd = self._httpd
        if httpd is None:
            raise RuntimeError("the StandInServer is not running")
        return f"http://{HOST}:{httpd.server_port}"

    # -- what it received --

    @property
    def received(self) -> list[Received]:
        """Accepted (2xx) ``/track`` requests in arrival order; a copy."""
        with self._lock:
            return list(self._accepted)

    @property
    def requests(self) -> list[Received]:
        """Every ``/track`` request that got an answer, whatever its status; a copy.

        Dropped requests (`drop_next`) got no answer and are only counted in `dropped`.
        """
        with self._lock:
            return list(self._requests)

    @property
    def dropped(self) -> int:
        """How many ``/track`` requests lost their connection through `drop_next`."""
        with self._lock:
            return self._dropped

    @property
    def connections(self) -> int:
        """TCP connections accepted since start or `reset`; with keep-alive, fewer than requests."""
        with self._lock:
            return self._connections

    def counts(self) -> dict[int, int]:
        """Answers to ``/track`` by status code."""
        with self._lock:
            return dict(self._counts)

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least ``count`` requests were accepted; False if ``timeout`` passed."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._accepted) >= count, timeout)

    def reset(self) -> None:
        """Forget recorded requests, counts, faults, latency, known profiles and rate windows.

        Clients and the rate-limit setting stay: the server is as if freshly started, except
        that open keep-alive connections stay open (and are no longer counted in `connections`).
        """
        with self._lock:
            self._requests.clear()
            self._accepted.clear()
            self._counts.clear()
            self._dropped = 0
            self._connections = 0
            self._faults.clear()
            self._outage_until = -math.inf
            self._outage_answer = None
            self._latency = 0.0
            self._profiles.clear()
            self._windows.clear()
            self._changed.notify_all()

    # -- configuration and faults --

    def add_client(self, client_id: str, secret: str) -> None:
        """Accept ``client_id`` (a lower-case UUID, as the real server checks) with ``secret``."""
        if not _CLIENT_ID_RE.match(client_id):
            raise ValueError(f"client id must be a lower-case UUID, got {client_id!r}")
        if not secret:
            raise ValueError("secret must not be empty")
        with self._lock:
            self._clients[client_id] = secret

    def set_rate_limit(
        self,
        limit: int | None,
        window_seconds: float | None = None,
        *,
        headers: RateLimitHeaders = "all",
    ) -> None:
        """Allow ``limit`` requests per ``window_seconds`` per client id; ``None`` turns it off.

        A fixed window, as ``@fastify/rate-limit``'s default store keeps it: it opens at a
        client's first request and lasts ``window_seconds``; every request that arrives while
        it is open counts, the ones over the limit get 429 with the JSON body of the contract.
        ``headers`` picks what the answers say about it:

        - ``"all"`` (default, the plugin's default): every answer counted against a window
          carries ``x-ratelimit-limit``, ``x-ratelimit-remaining`` and ``x-ratelimit-reset``
          (whole seconds until the window closes, rounded up), whatever its status (200, 400,
          401, 404 alike); a 429 also carries ``retry-after``, the same seconds as the reset.
        - ``"retry-after"``: only ``retry-after`` on 429s, as many proxies send.
        - ``"none"``: a bare 429, no rate-limit header on any answer.

        Changing the setting takes effect at the next request: every client's window starts
        afresh under the new limit, as when the real server restarts with a new configuration.
        """
        mode = _rate_limit_headers(headers)
        if limit is None:
            setting = None
        else:
            if limit < 1 or window_seconds is None or window_seconds <= 0:
                raise ValueError("rate limit needs limit >= 1 and window_seconds > 0")
            setting = _RateLimit(int(limit), float(window_seconds), mode)
        with self._lock:
            self._rate_limit = setting
            self._windows.clear()

    def advance(self, seconds: float) -> None:
        """Move the server's clock ``seconds`` forward, for rate-limit windows and `fail_for`.

        Nothing sleeps and nothing else moves: latency, `wait_for` and `Received.at` keep real
        time. The advance adds to ``clock``'s reading and stays across `reset`.
        """
        if not seconds >= 0 or math.isinf(seconds):
            raise ValueError(f"seconds must be finite and >= 0, got {seconds!r}")
        with self._lock:
            self._advanced += float(seconds)

    def _now(self) -> float:
        """The server's clock: ``clock()`` plus every `advance`."""
        return self._clock() + self._advanced

    def fail_next(
        self,
        count: int,
        status: int = 503,
        body: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer the next ``count`` ``/track`` requests with ``status``, before any other check.

        ``body=None`` picks what the real server or its proxy sends: ``Internal server error``
        for 500, an nginx HTML page for 502/504, the rate-limit JSON for 429, the reason phrase
        otherwise. The content type follows the body (JSON, HTML or plain text) unless
        ``headers`` sets ``content-type``. `fail_next` and `drop_next` calls queue up and are
        served in the order they were made.
        """
        if count < 0:
            raise ValueError("count must be >= 0")
        answer = _fault_answer(status, body, headers)
        with self._lock:
            if count:
                self._faults.append(_Fault(count, answer))

    def fail_for(
        self,
        seconds: float,
        status: int = 503,
        body: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer every ``/track`` request with ``status`` until ``seconds`` have passed.

        Time is the server's clock (``clock`` and `advance`). Queued `fail_next`/`drop_next`
        faults are served first.
        """
        answer = _fault_answer(status, body, headers)
        with self._lock:
            self._outage_until = self._clock() + self._advanced + seconds
            self._outage_answer = answer

    def drop_next(self, count: int) -> None:
        """Close the connection of the next ``count`` ``/track`` requests without answering.

        The body is read first, so the client sees a clean close (``RemoteDisconnected``), not a
        reset. Queued in order with `fail_next` calls.
        """
        if count < 0:
            raise ValueError("count must be >= 0")
        with self._lock:
            if count:
                self._faults.append(_Fault(count, None))

    def set_latency(self, seconds: float) -> None:
        """Sleep ``seconds`` before answering (or dropping) each ``/track`` request; 0 turns it off.

        Control endpoints are never delayed. The rate limit still counts at arrival.
        """
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        with self._lock:
            self._latency = float(seconds)

    # -- request handling (called from connection threads) --

    def _decide(
        self, headers: dict[str, str], raw: bytes, peer_ip: str, arrival: float, wall: float
    ) -> _Decision:
        """Decide the answer to one ``POST /track`` and update the server's state."""
        body, parse_error = self._parse_body(headers, raw)
        kind = body.get("type") if isinstance(body, dict) else None
        payload = body.get("payload") if isinstance(body, dict) else None
        received_type = kind if isinstance(kind, str) else ""
        received_payload = payload if isinstance(payload, dict) else {}

        with self._lock:
            latency = self._latency
            fault_answer: _Answer | None = None
            drop = False
            if self._faults:
                fault = self._faults[0]
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.popleft()
                drop = fault.answer is None
                fault_answer = fault.answer
            elif arrival < self._outage_until:
                fault_answer = self._outage_answer
            limited: _Answer | None = None
            limit_headers: tuple[tuple[str, str], ...] = ()
            if fault_answer is None and not drop:
                limited, limit_headers = self._count_against_window(headers, peer_ip, arrival)

        def decided(answer: _Answer | None) -> _Decision:
            status = answer.status if answer is not None else 0
            received = Received(received_type, received_payload, headers, status, wall)
            return _Decision(answer, received, latency)

        if drop:
            return decided(None)
        if fault_answer is not None:
            return decided(fault_answer)
        if limited is not None:
            return decided(limited)
        answer = parse_error or self._evaluate(body, headers, peer_ip)
        return decided(answer.with_headers(limit_headers))

    def _count_against_window(
        self, headers: Mapping[str, str], peer_ip: str, now: float
    ) -> tuple[_Answer | None, tuple[tuple[str, str], ...]]:
        """Fixed window per key: (429 answer or None, rate-limit headers). Hold the lock.

        As ``@fastify/rate-limit`` does: reset and ``retry-after`` are the window's time left in
        whole seconds rounded up; a refused request also counts (it changes nothing visible:
        remaining stays 0 and the window closes when it would have).
        """
        setting = self._rate_limit
        if setting is None:
            return None, ()
        limit = setting.limit
        key = headers.get("openpanel-client-id") or f"ip:{peer_ip}"
        entry = self._windows.get(key)
        if entry is None or now >= entry.start + setting.window_seconds:
            entry = self._windows[key] = _Window(now, 0)
        # Whole seconds, rounded up, so a client that waits this long finds a fresh window.
        reset_seconds = max(1, math.ceil(entry.start + setting.window_seconds - now))
        entry.count += 1
        remaining = max(0, limit - entry.count)
        counted: tuple[tuple[str, str], ...] = ()
        if setting.headers == "all":
            counted = (
                ("x-ratelimit-limit", str(limit)),
                ("x-ratelimit-remaining", str(remaining)),
                ("x-ratelimit-reset", str(reset_seconds)),
            )
        if entry.count <= limit:
            return None, counted
        retry_after = (("retry-after", str(reset_seconds)),) if setting.headers != "none" else ()
        content = {"status": 429, "error": "Too Many Requests", "message": _RATE_LIMIT_MESSAGE}
        return _json_answer(429, content, counted + retry_after), ()

    @staticmethod
    def _parse_body(headers: Mapping[str, str], raw: bytes) -> tuple[object, _Answer | None]:
        """Parse like fastify: JSON for ``application/json``, a string for ``text/plain``."""
        media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if not raw and media_type != "application/json":
            return None, None  # no body: validation reports "body Invalid input"
        if media_type == "text/plain":
            return raw.decode("utf-8", "replace"), None
        if media_type != "application/json":
            message = f"Unsupported Media Type: {media_type or 'none'}"
            return None, _json_answer(415, {"status": 415, "error": "Error", "message": message})
        if not raw:
            message = "Body cannot be empty when content-type is set to 'application/json'"
            return None, _error_400(message)
        try:
            return json.loads(raw, parse_constant=_reject_constant), None
        except (ValueError, RecursionError) as exc:
            return None, _error_400(f"Body is not valid JSON: {exc}")

    def _evaluate(self, body: object, headers: Mapping[str, str], peer_ip: str) -> _Answer:
        """Validation, authentication and the handler's own refusals, in the server's order."""
        issues = _validation_issues(body)
        if issues:
            return _error_400(", ".join(f"body{path} Invalid input" for path in issues))
        assert isinstance(body, dict)  # validation guarantees it
        refusal = self._authenticate(headers)
        if refusal is not None:
            return _text_answer(401, refusal)
        kind: str = body["type"]
        payload: dict[str, Any] = body["payload"]
        client_id = headers["openpanel-client-id"]
        if kind == "alias":
            content = {"status": 400, "error": "Bad Request", "message": "Alias is not supported"}
            return _json_answer(400, content)
        profile_id = payload.get("profileId")
        profile = None if profile_id is None else (client_id, _profile_key(profile_id))
        with self._lock:
            if kind in ("increment", "decrement") and profile not in self._profiles:
                return _json_answer(404, {"status": 404, "message": "Profile not found"})
            if kind in ("identify", "track") and profile is not None:
                self._profiles.add(profile)
        return _json_answer(200, self._ids(kind, payload, headers, client_id, peer_ip))

    def _authenticate(self, headers: Mapping[str, str]) -> str | None:
        """The plain-text 401 message, or None when the credentials are good."""
        client_id = headers.get("openpanel-client-id", "")
        if not client_id:
            return "Ingestion: Missing client id"
        if not _CLIENT_ID_RE.match(client_id):
            return "Ingestion: Client ID must be a valid UUIDv4"
        with self._lock:
            expected = self._clients.get(client_id)
        if expected is None:
            return "Ingestion: Invalid client id"
        given = headers.get("openpanel-client-secret", "")
        if not given or not hmac.compare_digest(given.encode(), expected.encode()):
            # Without an Origin header, CORS cannot pass either: the server names both.
            return "Ingestion: Invalid cors or secret"
        return None

    @staticmethod
    def _ids(
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

    def _record(self, received: Received) -> None:
        with self._lock:
            self._requests.append(received)
            self._counts[received.status] += 1
            if 200 <= received.status < 300:
                self._accepted.append(received)
                self._changed.notify_all()

    def _count_connection(self) -> None:
        with self._lock:
            self._connections += 1

    def _record_drop(self) -> None:
        with self._lock:
            self._dropped += 1

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless stop() comes first; False if it did (then the request goes unanswered)."""
        # An Event wait, not time.sleep, so stop() wakes sleeping requests at once.
        if seconds > 0:
            return not self._stopping.wait(seconds)
        return not self._stopping.is_set()

    # -- control endpoints --

    def _control(self, method: str, path: str, raw: bytes) -> _Answer:
        """Serve ``/__stand-in/...``; see `StandInControl` for what each endpoint does."""
        name = path[len(CONTROL_PREFIX) :]
        try:
            data = json.loads(raw) if raw else {}
            if not isinstance(data, dict):
                raise ValueError("the body must be a JSON object")
            if method == "GET" and name == "received":
                return _json_answer(200, [r.to_json() for r in self.received])
            if method == "GET" and name == "requests":
                return _json_answer(200, [r.to_json() for r in self.requests])
            if method == "GET" and name == "counts":
                return _json_answer(200, {str(k): v for k, v in sorted(self.counts().items())})
            if method == "GET" and name == "stats":
                with self._lock:
                    stats = {
                        "received": len(self._accepted),
                        "requests": len(self._requests),
                        "dropped": self._dropped,
                        "connections": self._connections,
                    }
                return _json_answer(200, stats)
            if method == "POST" and name == "reset":
                self.reset()
            elif method == "POST" and name == "fail":
                status = int(data.get("status", 503))
                body, headers = data.get("body"), data.get("headers")
                if not isinstance(body, str | None) or not isinstance(headers, dict | None):
                    raise TypeError("body must be a string and headers an object")
                if "seconds" in data:
                    self.fail_for(float(data["seconds"]), status, body, headers)
                else:
                    self.fail_next(int(data["count"]), status, body, headers)
            elif method == "POST" and name == "drop":
                self.drop_next(int(data["count"]))
            elif method == "POST" and name == "latency":
                self.set_latency(float(data["seconds"]))
            elif method == "POST" and name == "rate-limit":
                limit, window = data.get("limit"), data.get("window")
                self.set_rate_limit(
                    None if limit is None else int(limit),
                    None if window is None else float(window),
                    headers=_rate_limit_headers(data.get("headers", "all")),
                )
            elif method == "POST" and name == "advance":
                self.advance(float(data["seconds"]))
            elif method == "POST" and name == "clients":
                self.add_client(str(data["client_id"]), str(data["secret"]))
            else:
                return _json_answer(404, {"error": f"no control endpoint {method} {path}"})
        except (ValueError, KeyError, TypeError) as exc:
            return _json_answer(400, {"error": f"{type(exc).__name__}: {exc}"})
        return _json_answer(200, {"ok": True})


class _HTTPServer(HTTPServer):
    """``HTTPServer`` with one daemon thread per connection that stop() can close and join.

    Not ``ThreadingHTTPServer``: it keeps no handle on open sockets, so idle keep-alive
    connections would keep their threads blocked in ``readline`` after shutdown. Not
    ``serve_forever`` either: it notices ``shutdown()`` only every ``poll_interval``, which
    would add that much to every test's teardown; a wake-up socket ends our loop at once.
    """

    request_queue_size = LISTEN_BACKLOG
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], stand_in: StandInServer) -> None:
        self.stand_in = stand_in
        self._open: dict[socket.socket, threading.Thread] = {}
        self._open_lock = threading.Lock()
        self._closing = threading.Event()
        self._wake_reader, self._wake_writer = socket.socketpair()
        super().__init__(address, _Handler)

    def accept_until_closed(self) -> None:
        """Accept connections until `stop_accepting`; each gets its own thread."""
        # Non-blocking, so a client that resets between select and accept cannot block the loop.
        self.socket.setblocking(False)
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while not self._closing.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self.socket and not self._closing.is_set():
                        self._accept_one()

    def _accept_one(self) -> None:
        try:
            request, client_address = self.get_request()
        except OSError:
            return  # the client gave up before we accepted
        try:
            self.process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def stop_accepting(self) -> None:
        """Make `accept_until_closed` return promptly."""
        self._closing.set()
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")

    def server_close(self) -> None:
        super().server_close()
        self._wake_reader.close()
        self._wake_writer.close()

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name with getfqdn, which can take seconds
        # without DNS; the name is only used for SERVER_NAME, which nothing here reads.
        socketserver.TCPServer.server_bind(self)
        self.server_name = HOST
        self.server_port = self.socket.getsockname()[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        # Without TCP_NODELAY a keep-alive answer waits ~40 ms for Nagle and delayed ACKs.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # BSD and macOS pass the listener's non-blocking mode on to accepted sockets.
        request.setblocking(True)
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"op-celery-stand-in:{self.server_port}:connection",
            daemon=True,
        )
        with self._open_lock:
            self._open[request] = thread
        self.stand_in._count_connection()
        thread.start()

    def _serve_connection(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            with self._open_lock:
                self._open.pop(request, None)
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up, or stop() closing the socket, is normal here, not an error.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Shut down every open connection so its thread leaves ``readline``, then join them."""
        with self._open_lock:
            open_now = list(self._open.items())
        for sock, _ in open_now:
            with contextlib.suppress(OSError):  # the client may have closed it already
                sock.shutdown(socket.SHUT_RDWR)
        for _, thread in open_now:
            thread.join(JOIN_TIMEOUT_SECONDS)


class _BadFraming(Exception):
    """The request body cannot be read; answer ``answer`` and close the connection."""

    def __init__(self, answer: _Answer) -> None:
        super().__init__(answer.status)
        self.answer = answer


class _Handler(BaseHTTPRequestHandler):
    """Parses HTTP, reads the body and writes the answer; decisions live in `StandInServer`."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        # Per-request logging to stderr costs throughput and floods test output.
        pass

    def _dispatch(self) -> None:
        wall = time.time()
        stand_in = self.server.stand_in
        arrival = stand_in._now()
        try:
            raw = self._read_body()
        except _BadFraming as exc:
            self._write(exc.answer)
            return
        path = urlsplit(self.path).path
        if path.startswith(CONTROL_PREFIX):
            self._write(stand_in._control(self.command, path, raw))
            return
        if path != "/track" or self.command != "POST":
            message = f"Route {self.command}:{path} not found"
            content = {"message": message, "error": "Not Found", "statusCode": 404}
            self._write(_json_answer(404, content))
            return
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        decision = stand_in._decide(headers, raw, self.client_address[0], arrival, wall)
        if not stand_in._sleep(decision.latency):
            self.close_connection = True  # stopping: like a killed server, answer nothing
            return
        if decision.answer is None:
            stand_in._record_drop()
            self.close_connection = True
            return
        stand_in._record(decision.received)
        self._write(decision.answer)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            return self._read_chunked()
        length_header = self.headers.get("content-length")
        if length_header is None:
            return b""
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError(length_header)
        except ValueError:
            raise _BadFraming(self._framing_error(400, "Invalid Content-Length")) from None
        if length > MAX_BODY_BYTES:
            self._discard(length)
            raise _BadFraming(self._framing_error(413, "Request body is too large"))
        raw = self.rfile.read(length)
        if len(raw) < length:
            raise ConnectionResetError("client closed the connection mid-body")
        return raw

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadFraming(self._framing_error(400, "Invalid chunk size")) from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers carry nothing the stand-in uses
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                self._discard(size)
                raise _BadFraming(self._framing_error(413, "Request body is too large"))
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _discard(self, length: int) -> None:
        """Read and forget ``length`` bytes (at most `MAX_DISCARD_BYTES`) before refusing them.

        Closing a socket with unread data sends a TCP reset, which can destroy the refusal
        before the client reads it; a client still sending would see a connection error.
        """
        remaining = min(length, MAX_DISCARD_BYTES)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 65_536))
            if not chunk:
                return
            remaining -= len(chunk)

    @staticmethod
    def _framing_error(status: int, message: str) -> _Answer:
        content = {"status": status, "error": "Error", "message": message}
        return dataclasses.replace(_json_answer(status, content), close=True)

    def _write(self, answer: _Answer) -> None:
        if answer.close:
            self.close_connection = True
        lines = [
            f"HTTP/1.1 {answer.status} {_phrase(answer.status)}",
            f"content-type: {answer.content_type}",
            f"content-length: {len(answer.body)}",
            f"date: {formatdate(usegmt=True)}",
            "connection: close" if self.close_connection else "connection: keep-alive",
        ]
        lines.extend(f"{name}: {value}" for name, value in answer.headers)
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        # One write per answer: with TCP_NODELAY, separate writes for head and body would go
        # out as separate packets.
        self.wfile.write(head + answer.body)


# --- Driving a server in another process. ----------------------------------------------------


class StandInControl:
    """Drive and read a `StandInServer` over its ``/__stand-in/...`` endpoints.

    For a server in another process (``python -m op_celery.testing``); in-process tests can call
    the server's methods directly. Uses ``urllib`` without proxies, so it needs no extra
    package and never sends loopback traffic to an ``HTTP_PROXY``. Every method is one request,
    except `wait_for`, which polls.
    """

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _call(self, method: str, name: str, data: Mapping[str, Any] | None = None) -> Any:
        body = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(
            f"{self.url}{CONTROL_PREFIX}{name}",
            data=body,
            method=method,
            headers={"content-type": "application/json"},
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            raise RuntimeError(f"stand-in control {method} {name}: {exc.code} {detail}") from exc

    def received(self) -> list[Received]:
        """Accepted (2xx) ``/track`` requests (``GET /__stand-in/received``)."""
        return [Received.from_json(item) for item in self._call("GET", "received")]

    def requests(self) -> list[Received]:
        """Every answered ``/track`` request (``GET /__stand-in/requests``)."""
        return [Received.from_json(item) for item in self._call("GET", "requests")]

    def counts(self) -> dict[int, int]:
        """Answers by status code (``GET /__stand-in/counts``)."""
        return {int(k): int(v) for k, v in self._call("GET", "counts").items()}

    def stats(self) -> dict[str, int]:
        """Totals: received, requests, dropped, connections (``GET /__stand-in/stats``)."""
        return {str(k): int(v) for k, v in self._call("GET", "stats").items()}

    def reset(self) -> None:
        """`StandInServer.reset` (``POST /__stand-in/reset``)."""
        self._call("POST", "reset", {})

    def fail_next(
        self,
        count: int,
        status: int = 503,
        body: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """`StandInServer.fail_next` (``POST /__stand-in/fail`` with ``count``)."""
        self._fail({"count": count}, status, body, headers)

    def fail_for(
        self,
        seconds: float,
        status: int = 503,
        body: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """`StandInServer.fail_for` (``POST /__stand-in/fail`` with ``seconds``)."""
        self._fail({"seconds": seconds}, status, body, headers)

    def _fail(
        self,
        how_long: dict[str, float],
        status: int,
        body: str | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        data = {**how_long, "status": status, "body": body, "headers": dict(headers or {})}
        self._call("POST", "fail", data)

    def drop_next(self, count: int) -> None:
        """`StandInServer.drop_next` (``POST /__stand-in/drop``)."""
        self._call("POST", "drop", {"count": count})

    def set_latency(self, seconds: float) -> None:
        """`StandInServer.set_latency` (``POST /__stand-in/latency``)."""
        self._call("POST", "latency", {"seconds": seconds})

    def set_rate_limit(
        self,
        limit: int | None,
        window_seconds: float | None = None,
        *,
        headers: RateLimitHeaders = "all",
    ) -> None:
        """`StandInServer.set_rate_limit` (``POST /__stand-in/rate-limit``)."""
        data = {"limit": limit, "window": window_seconds, "headers": headers}
        self._call("POST", "rate-limit", data)

    def advance(self, seconds: float) -> None:
        """`StandInServer.advance` (``POST /__stand-in/advance``)."""
        self._call("POST", "advance", {"seconds": seconds})

    def add_client(self, client_id: str, secret: str) -> None:
        """`StandInServer.add_client` (``POST /__stand-in/clients``)."""
        self._call("POST", "clients", {"client_id": client_id, "secret": secret})

    def wait_for(self, count: int, timeout: float = 10.0, poll_seconds: float = 0.05) -> bool:
        """Poll until at least ``count`` requests were accepted; False if ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while True:
            if self.stats()["received"] >= count:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_seconds)
