"""The API the stand-in models: OpenPanel's ``POST /track`` rules and state, with no sockets.

`ApiModel` decides the answer to one request from its headers and body, and keeps what that
changes: the clients it accepts, rate-limit windows, injected faults and outages, known profiles
and every request answered. `StandInServer` puts it behind a real HTTP server; connection
threads call the ``_decide``/``_record`` family, tests call the public methods.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, cast, get_args

from op_celery._rules import skipped_ip_kind
from op_celery.testing._answers import (
    IP_FILTERED,
    PROFILE_FILTERED,
    REVENUE_WITHOUT_SECRET,
    Answer,
    accepted,
    error_400,
    fault_answer,
    is_server_event,
    json_answer,
    rate_limited,
    text_answer,
)
from op_celery.testing._profiles import (
    NOT_FOUND,
    PROFILE_FLUSH_INTERVAL_S,
    ProfileStore,
    profile_writes,
)
from op_celery.testing._validation import (
    CLIENT_ID_RE,
    parse_body,
    profile_key,
    validation_issues,
    validation_message,
)

__all__ = [
    "PROFILE_FLUSH_INTERVAL_S",
    "RATE_LIMIT_HEADER_MODES",
    "ApiModel",
    "Decision",
    "RateLimitHeaders",
    "Received",
    "rate_limit_headers_mode",
]

#: Which rate-limit headers the stand-in sends while a limit is set:
#: ``"all"``: ``x-ratelimit-limit``, ``-remaining`` and ``-reset`` on every answer counted against
#: the window and ``retry-after`` too on a 429, as ``@fastify/rate-limit`` does by default;
#: ``"retry-after"``: only ``retry-after`` on a 429, as many proxies and CDNs send;
#: ``"none"``: a bare 429 with no rate-limit header at all.
RateLimitHeaders = Literal["all", "retry-after", "none"]
#: The accepted `RateLimitHeaders` values, for command lines and the control endpoint.
RATE_LIMIT_HEADER_MODES: Final[tuple[str, ...]] = get_args(RateLimitHeaders)
#: The headers the server takes the client IP from, in its order (``DEFAULT_IP_HEADER_ORDER``
#: of ``get-client-ip.ts``, as far as a sender sets them): the first public one wins.
_CLIENT_IP_HEADERS: Final = (
    "openpanel-client-ip", "true-client-ip", "x-client-ip", "cf-connecting-ip",
    "x-forwarded-for", "x-real-ip",
)  # fmt: skip


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


@dataclasses.dataclass
class _Fault:
    """``remaining`` more /track requests get ``answer``, or lose their connection if it's None."""

    remaining: int
    answer: Answer | None


@dataclasses.dataclass(frozen=True)
class Decision:
    """The answer to one ``/track`` request, what to record of it, and how long to hold it."""

    answer: Answer | None  # None: close the connection without answering
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


def rate_limit_headers_mode(value: object) -> RateLimitHeaders:
    """``value`` as a `RateLimitHeaders` mode; ValueError naming the modes otherwise."""
    if isinstance(value, str) and value in RATE_LIMIT_HEADER_MODES:
        return cast(RateLimitHeaders, value)
    modes = ", ".join(repr(mode) for mode in RATE_LIMIT_HEADER_MODES)
    raise ValueError(f"rate-limit headers must be one of {modes}, got {value!r}")


class ApiModel:
    """OpenPanel's ``POST /track`` as a state machine: what to answer, and what that changes.

    ``clients`` maps client ids (lower-case UUIDs, as the real server requires) to secrets.
    ``rate_limit`` is ``(limit, window_seconds)`` for a fixed window per client id (per peer IP
    when the request has no client id), or None for no limit, which is what the open-source
    server does; ``rate_limit_headers`` says which rate-limit headers it sends (see
    `set_rate_limit`).

    ``profile_flush_s`` (default `PROFILE_FLUSH_INTERVAL_S`, the server's 10 s) is how long a
    profile write takes to become visible to ``increment``/``decrement``, as the server's profile
    buffer makes it (see `op_celery.testing._profiles`); 0 makes writes visible at once.

    Time: ``clock`` (default ``time.monotonic``) plus whatever `advance` added is the model's
    clock for rate-limit windows, `fail_for` outages and profile flushes, and for nothing else:
    latency sleeps, `wait_for` timeouts and `Received.at` (wall time) are real time.

    Order of checks on ``POST /track``, as on the real server: injected faults (they stand for a
    proxy in front of it), rate limit (counted at arrival), content type and JSON, body
    validation, authentication (headers, else ``clientId``/``clientSecret`` in the body), then
    alias (400) and increment/decrement on a profile not visible yet (404) or of a property
    whose value is not a number (400). A profile is written by an accepted ``identify``, an
    ``assign_group`` with a ``profileId``, a ``track`` whose ``__identify`` property says more
    than the profile id, and a ``track`` with a ``profileId`` that is not a server event (the
    server writes the profile when such an event opens a session; a server event opens none).
    Every method is thread-safe.
    """

    def __init__(
        self,
        clients: Mapping[str, str] | None = None,
        rate_limit: tuple[int, float] | None = None,
        *,
        rate_limit_headers: RateLimitHeaders = "all",
        clock: Callable[[], float] = time.monotonic,
        profile_flush_s: float = PROFILE_FLUSH_INTERVAL_S,
    ) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._clock = clock
        self._advanced = 0.0
        self._clients: dict[str, str] = {}
        self._rate_limit: _RateLimit | None = None
        self._windows: dict[str, _Window] = {}
        self._faults: deque[_Fault] = deque()
        self._outage_until = -math.inf
        self._outage_answer: Answer | None = None
        self._latency = 0.0
        self._requests: list[Received] = []
        self._accepted: list[Received] = []
        self._counts: Counter[int] = Counter()
        self._dropped = 0
        self._connections = 0
        self._profiles = ProfileStore()
        self._profile_flush_s = 0.0
        self.set_profile_flush(profile_flush_s)
        #: Per client id: the project's filters, (blocked IPs, blocked profile ids).
        self._filters: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        for client_id, secret in (clients or {}).items():
            self.add_client(client_id, secret)
        if rate_limit is not None:
            self.set_rate_limit(*rate_limit, headers=rate_limit_headers)
        else:
            rate_limit_headers_mode(rate_limit_headers)  # refuse a bad mode even without a limit

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

    def _stats(self) -> dict[str, int]:
        """Totals: received (accepted), requests (answered), dropped, connections."""
        with self._lock:
            return {
                "received": len(self._accepted),
                "requests": len(self._requests),
                "dropped": self._dropped,
                "connections": self._connections,
            }

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
        if not CLIENT_ID_RE.match(client_id):
            raise ValueError(f"client id must be a lower-case UUID, got {client_id!r}")
        if not secret:
            raise ValueError("secret must not be empty")
        with self._lock:
            self._clients[client_id] = secret

    def set_filters(
        self, client_id: str, *, ips: tuple[str, ...] = (), profile_ids: tuple[str, ...] = ()
    ) -> None:
        """Give ``client_id``'s project the filters of OpenPanel's project settings.

        A request whose client IP (the first public one of its IP headers, as the server reads
        them) is in ``ips`` gets 401 ``Ingestion: IP address is blocked by project filter``;
        one whose ``payload.profileId`` (a string, compared exactly) is in ``profile_ids``
        gets 401 ``Ingestion: Profile id is blocked by project filter``. Both are checked
        after the client id and before the secret, as the server does. Empty lifts them; they
        stay across `reset`, like the clients.
        """
        with self._lock:
            if ips or profile_ids:
                self._filters[client_id] = (frozenset(ips), frozenset(profile_ids))
            else:
                self._filters.pop(client_id, None)

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
        mode = rate_limit_headers_mode(headers)
        if limit is None:
            setting = None
        else:
            if limit < 1 or window_seconds is None or window_seconds <= 0:
                raise ValueError("rate limit needs limit >= 1 and window_seconds > 0")
            setting = _RateLimit(int(limit), float(window_seconds), mode)
        with self._lock:
            self._rate_limit = setting
            self._windows.clear()

    def set_profile_flush(self, seconds: float) -> None:
        """Make profile writes visible to increment/decrement ``seconds`` after they are made
        (the server flushes its profile buffer every 10 s); 0: at once. Writes already made keep
        the time they were given."""
        if not seconds >= 0 or math.isinf(seconds):
            raise ValueError(f"seconds must be finite and >= 0, got {seconds!r}")
        with self._lock:
            self._profile_flush_s = float(seconds)

    def profile(self, profile_id: str | int | float, client_id: str) -> dict[str, Any] | None:
        """The properties of a profile as increment/decrement would read them now (after the
        flushes due by the server's clock), or None while the server answers 404 for it."""
        with self._lock:
            return self._profiles.visible((client_id, profile_key(profile_id)), self._now())

    def advance(self, seconds: float) -> None:
        """Move the server's clock ``seconds`` forward, for rate-limit windows, `fail_for` and
        profile flushes.

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
        status: int | str = 503,
        body: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer the next ``count`` ``/track`` requests with ``status``, before any other check.

        ``body=None`` picks what the real server or its proxy sends: ``Internal server error``
        for 500, an nginx HTML page for 502/504, the rate-limit JSON for 429, the reason phrase
        otherwise. The content type follows the body (JSON, HTML or plain text) unless
        ``headers`` sets ``content-type``. ``status`` may name an answer of the real server
        instead (``"bot"``, ``"duplicate"``, ``"ip-filtered"``, ``"captive-portal"``...: the
        `NAMED_ANSWERS` of ``_answers``). `fail_next` and `drop_next` calls queue up and are
        served in the order they were made.
        """
        if count < 0:
            raise ValueError("count must be >= 0")
        answer = fault_answer(status, body, headers)
        with self._lock:
            if count:
                self._faults.append(_Fault(count, answer))

    def fail_for(
        self,
        seconds: float,
        status: int | str = 503,
        body: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer every ``/track`` request with ``status`` until ``seconds`` have passed.

        Time is the server's clock (``clock`` and `advance`). Queued `fail_next`/`drop_next`
        faults are served first.
        """
        answer = fault_answer(status, body, headers)
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
    ) -> Decision:
        """Decide the answer to one ``POST /track`` and update the server's state."""
        body, parse_error = parse_body(headers, raw)
        kind = body.get("type") if isinstance(body, dict) else None
        payload = body.get("payload") if isinstance(body, dict) else None
        received_type = kind if isinstance(kind, str) else ""
        received_payload = payload if isinstance(payload, dict) else {}

        with self._lock:
            latency = self._latency
            fault_answer: Answer | None = None
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
            limited: Answer | None = None
            limit_headers: tuple[tuple[str, str], ...] = ()
            if fault_answer is None and not drop:
                limited, limit_headers = self._count_against_window(headers, peer_ip, arrival)

        def decided(answer: Answer | None) -> Decision:
            status = answer.status if answer is not None else 0
            received = Received(received_type, received_payload, headers, status, wall)
            return Decision(answer, received, latency)

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
    ) -> tuple[Answer | None, tuple[tuple[str, str], ...]]:
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
        return rate_limited(counted + retry_after), ()

    def _evaluate(self, body: object, headers: Mapping[str, str], peer_ip: str) -> Answer:
        """Validation, authentication and the handler's own refusals, in the server's order."""
        issues = validation_issues(body)
        if issues:
            # fastify + zod's own text (``body/payload/name Too small: ...``), as the server.
            message = validation_message(body)
            return error_400(message or ", ".join(f"body{path} Invalid input" for path in issues))
        assert isinstance(body, dict)  # validation guarantees it
        client_id, secret = _credentials(headers, body)
        refusal = self._authenticate(headers, body, client_id, secret)
        if refusal is not None:
            return text_answer(401, refusal)
        kind: str = body["type"]
        payload: dict[str, Any] = body["payload"]
        if kind == "alias":
            content = {"status": 400, "error": "Bad Request", "message": "Alias is not supported"}
            return json_answer(400, content)
        server_event = is_server_event(headers.get("user-agent"))
        with self._lock:
            now, flush_s = self._now(), self._profile_flush_s
            if kind in ("increment", "decrement"):
                key = (client_id, profile_key(payload["profileId"]))
                by = payload.get("value") or 1
                failure = self._profiles.adjust(
                    key, payload["property"], by if kind == "increment" else -by, now, flush_s
                )
                if failure is not None:
                    status = 404 if failure == NOT_FOUND else 400
                    return json_answer(status, {"status": status, "message": failure})
            for profile_id, properties in profile_writes(kind, payload, server_event):
                key = (client_id, profile_key(profile_id))
                self._profiles.write(key, properties, now, flush_s)
        return accepted(kind, payload, headers, client_id, peer_ip)

    def _authenticate(
        self, headers: Mapping[str, str], body: Mapping[str, Any], client_id: str, secret: str
    ) -> str | None:
        """The plain-text 401 message, or None when the credentials are good: in the order of
        ``validateSdkRequest`` (the client id, the project's filters, revenue, the secret)."""
        if not client_id:
            return "Ingestion: Missing client id"
        if not CLIENT_ID_RE.match(client_id):
            return "Ingestion: Client ID must be a valid UUIDv4"
        with self._lock:
            expected = self._clients.get(client_id)
            blocked_ips, blocked_profiles = self._filters.get(client_id, (frozenset(), frozenset()))
        if expected is None:
            return "Ingestion: Invalid client id"
        payload = body.get("payload")
        payload = payload if isinstance(payload, dict) else {}
        if blocked_ips and _client_ip(headers) in blocked_ips:
            return IP_FILTERED
        if payload.get("profileId") in blocked_profiles:
            return PROFILE_FILTERED
        properties = payload.get("properties")
        if not secret and isinstance(properties, dict) and "__revenue" in properties:
            return REVENUE_WITHOUT_SECRET
        if not secret or not hmac.compare_digest(secret.encode(), expected.encode()):
            # Without an Origin header, CORS cannot pass either: the server names both.
            return "Ingestion: Invalid cors or secret"
        return None

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


def _client_ip(headers: Mapping[str, str]) -> str:
    """The client IP as the server reads it: the first public one of its IP headers, or ""."""
    for name in _CLIENT_IP_HEADERS:
        value = headers.get(name, "")
        if name == "x-forwarded-for":
            value = value.split(",")[0].strip()
        if value and _is_ip(value) and skipped_ip_kind(value) is None:
            return value
    return ""


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _credentials(headers: Mapping[str, str], body: Mapping[str, Any]) -> tuple[str, str]:
    """The client id and secret as ``validateSdkRequest`` reads them: the ``openpanel-*``
    headers, else the legacy ``mixan-*`` ones, else ``clientId``/``clientSecret`` in the body
    (validation made sure those are strings)."""
    client_id = (
        headers.get("openpanel-client-id")
        or headers.get("mixan-client-id")
        or body.get("clientId")
        or ""
    )
    secret = (
        headers.get("openpanel-client-secret")
        or headers.get("mixan-client-secret")
        or body.get("clientSecret")
        or ""
    )
    return str(client_id), str(secret)
