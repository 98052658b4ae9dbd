"""The HTTP client: one event, one POST to ``{api_url}/track``, every answer classified.

Usable without Celery::

    client = OpenPanelClient(client_id="...", client_secret="...")
    client.send(build_event("track", {"name": "signup"}))

``requests`` exceptions become op-celery's here and nowhere else. A ``requests.Session`` is
kept per thread and per process: sessions are not thread-safe, and a pooled connection
inherited across ``fork()`` would be shared by parent and child.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from . import __about__, _deadline
from ._events import Event
from ._exceptions import (
    AliasNotSupported,
    AuthenticationError,
    DeliveryError,
    InvalidPayload,
    NetworkError,
    PermanentError,
    ProfileNotFound,
    RateLimited,
    ServerError,
    UnexpectedAnswer,
)
from ._retry import parse_retry_after
from ._settings import (
    DEFAULT_API_URL,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_READ_TIMEOUT_S,
    Project,
    Secret,
    check_api_url,
    redact_url,
)

__all__ = [
    "DEFAULT_USER_AGENT",
    "DUPLICATE_TEXT",
    "FILTER_TEXTS",
    "REVENUE_TEXT",
    "SDK_NAME",
    "Delivered",
    "DropReason",
    "Dropped",
    "OpenPanelClient",
]

log = logging.getLogger("op_celery.client")

#: Sent as ``openpanel-sdk-name``.
SDK_NAME = "op-celery"
#: The user agent of events sent without the end user's: ``name/version`` alone makes the
#: server treat the event as a server event (no session, device "server").
DEFAULT_USER_AGENT = f"{SDK_NAME}/{__about__.__version__}"
#: Characters of a server's answer kept in an error message (a proxy's HTML page can be long).
MAX_SERVER_MESSAGE_CHARS = 200
#: The text body of the server's 200 to a copy it saw within 100 ms (``duplicate.hook.ts``).
DUPLICATE_TEXT: Final = "Duplicate event"
#: The 401 texts of the project's own filters (``utils/auth.ts``, after ``Ingestion: ``).
FILTER_TEXTS: Final = (
    "IP address is blocked by project filter",
    "Profile id is blocked by project filter",
)
#: The 401 text for a ``__revenue`` property on a request without a client secret.
REVENUE_TEXT: Final = "Revenue tracking is not allowed without a client secret"
#: 2xx text bodies of older OpenPanel servers: ``ok`` until 2025-02, then empty until its
#: handler answered ``{"deviceId", "sessionId"}`` for every type (2026-03).
_LEGACY_OK_BODIES: Final = ("", "ok")

#: Why the server answered without storing the event: its bot check (``202 {"bot": ...}``),
#: its duplicate check (``200 Duplicate event``), the project's filters (a 401).
DropReason = Literal["bot", "duplicate", "filtered"]


@dataclass(frozen=True, slots=True)
class Delivered:
    """The server accepted the event (2xx)."""

    status: int
    body: Any
    #: The answer's headers (case-insensitive), for the rate-limit headers (``_learning``).
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Dropped:
    """The server answered and stores nothing for this event, and no retry would change that.

    ``reason`` is ``"bot"`` (202: the user agent is a bot's; only without a client secret),
    ``"duplicate"`` (200 ``Duplicate event``: the server stored a copy of it moments ago; only
    for requests with an ``Origin``) or ``"filtered"`` (401: the project's filters block the
    client IP or the profile id). ``message`` is the server's words: the bot it matched, or
    its text.
    """

    status: int
    reason: DropReason
    message: str
    body: Any
    #: As :attr:`Delivered.headers`.
    headers: Mapping[str, str] | None = None


class _Sessions(threading.local):
    pid: int = -1
    session: requests.Session | None = None
    #: What ``Session.request`` would take from the environment for the track URL (proxies,
    #: CA bundle), read once per session; see `OpenPanelClient.send`.
    environment: Mapping[str, Any] | None = None


class OpenPanelClient:
    """Sends events of one OpenPanel project."""

    def __init__(
        self,
        client_id: str,
        client_secret: str | Secret,
        api_url: str = DEFAULT_API_URL,
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        allow_insecure_http: bool = False,
        session_factory: Callable[[], requests.Session] = requests.Session,
    ) -> None:
        self.client_id = client_id
        self._secret = client_secret if isinstance(client_secret, Secret) else Secret(client_secret)
        checked = check_api_url(api_url, allow_insecure=allow_insecure_http)
        self._track_url = f"{checked}/track"
        #: The API URL as messages, logs and dead letters show it: credentials in it are hidden.
        self.api_url = redact_url(checked)
        self._timeout = (connect_timeout_s, read_timeout_s)
        #: The whole request's bound (``_deadline``): one connect and one read timeout. The
        #: ledger's claim outlives it (``Settings.claim_ttl_s`` adds a margin to the same sum),
        #: so no request is still running when another worker may claim its event.
        self._deadline_s = connect_timeout_s + read_timeout_s
        self._session_factory = session_factory
        self._sessions = _Sessions()
        self._base_headers = {
            "content-type": "application/json",
            "openpanel-client-id": client_id,
            "openpanel-client-secret": self._secret.reveal(),
            "openpanel-sdk-name": SDK_NAME,
            "openpanel-sdk-version": __about__.__version__,
        }

    @classmethod
    def for_project(
        cls,
        project: Project,
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    ) -> OpenPanelClient:
        # The project's URL was checked against the insecure-http rule when it was loaded.
        return cls(
            project.client_id,
            project.client_secret,
            project.api_url,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            allow_insecure_http=True,
        )

    def __repr__(self) -> str:
        return f"OpenPanelClient(client_id={self.client_id!r}, api_url={self.api_url!r})"

    @property
    def session(self) -> requests.Session:
        """This thread's session in this process (a new one after ``fork()``)."""
        sessions = self._sessions
        pid = os.getpid()
        if sessions.session is None or sessions.pid != pid:
            session = self._session_factory()
            for prefix in ("https://", "http://"):
                # Only the stock adapter: a test's or user's own adapter is left as it is.
                if type(session.adapters.get(prefix)) is HTTPAdapter:
                    session.mount(prefix, _DeadlineAdapter())
            sessions.session = session
            sessions.pid = pid
            sessions.environment = None
        return sessions.session

    def headers_for(self, event: Event) -> dict[str, str]:
        headers = dict(self._base_headers)
        headers["user-agent"] = event.user_agent or DEFAULT_USER_AGENT
        headers["request-id"] = event.event_id
        if event.client_ip:
            # The server reads openpanel-client-ip first; the public guide names x-client-ip.
            headers["openpanel-client-ip"] = event.client_ip
            headers["x-client-ip"] = event.client_ip
        return headers

    def send(self, event: Event) -> Delivered | Dropped:
        """POST the event. Returns the server's acceptance, or its :class:`Dropped` answer (a
        bot, a duplicate, the project's filters); raises a :class:`DeliveryError` subclass
        otherwise (`classify`).

        This is ``session.post(...)`` spelled out as ``Session.request`` does it, except that
        the environment's settings (``HTTP(S)_PROXY``, ``NO_PROXY``, ``REQUESTS_CA_BUNDLE``)
        are read when the session is made, once per thread and process, instead of on every
        request: requests scans the whole environment twice per request, about a fifth of the
        client's CPU time per event (see ``benchmarks/RESULTS.md``).
        """
        session = self.session
        sessions = self._sessions
        request = requests.Request(
            "POST",
            self._track_url,
            headers=self.headers_for(event),
            data=json.dumps(event.body, separators=(",", ":")),
            params={},
        )
        deadline = _deadline.arm(self._deadline_s)
        try:
            prepared = session.prepare_request(request)
            environment = sessions.environment
            if environment is None:
                environment = dict(
                    session.merge_environment_settings(prepared.url, {}, None, None, None)
                )
                sessions.environment = environment
            response = session.send(
                prepared, timeout=self._timeout, allow_redirects=False, **environment
            )
        except (requests.exceptions.InvalidHeader, UnicodeError) as exc:
            # Validation at .delay() refuses what cannot be a header; an event from elsewhere
            # (an old message, a replay edited by hand) still must not loop on retries.
            raise InvalidPayload(
                f"{event.operation}: the event cannot be sent as an HTTP request "
                f"({type(exc).__name__}: a header value is not latin-1 text without control "
                "characters); fix its user_agent or client_ip, then replay the dead letter"
            ) from None
        except requests.RequestException as exc:
            raise _no_answer(event, self.api_url, exc, deadline, self._deadline_s) from None
        finally:
            deadline.disarm()
        if deadline.expired:
            # Cut off mid-answer: http.client takes an end of stream inside the headers for
            # their end, so what was read can look like a whole 200. It is not an answer.
            cut = requests.ConnectionError("the deadline cut the answer off")
            raise _no_answer(event, self.api_url, cut, deadline, self._deadline_s)
        return classify(
            event.operation,
            response.status_code,
            response.headers,
            response.text,
            secret=self._base_headers["openpanel-client-secret"],
        )


def _no_answer(
    event: Event, where: str, exc: requests.RequestException, deadline: Any, deadline_s: float
) -> NetworkError:
    """The NetworkError of a request that got no (complete) answer, saying whether the server
    may have received it: after the request was sent, a retry can deliver it twice."""
    name = type(exc).__name__
    if deadline.expired:
        what = f"no complete answer within the request's {deadline_s:g} s deadline ({name})"
        maybe = True
    elif isinstance(exc, requests.ConnectTimeout | requests.exceptions.ProxyError):
        what, maybe = f"could not connect ({name})", False
    elif isinstance(exc, requests.ConnectionError) and not isinstance(
        exc, requests.exceptions.ChunkedEncodingError
    ):
        what, maybe = f"no answer ({name})", _sent(exc)
    elif isinstance(exc, requests.Timeout):
        what, maybe = f"timed out waiting for the answer ({name})", True
    else:
        what, maybe = f"no complete answer ({name})", True
    tail = "; the server may have received it, so the retry may deliver it twice" if maybe else ""
    error = NetworkError(f"{event.operation} to {where}: {what}; will retry{tail}")
    error.maybe_delivered = maybe
    return error


def _sent(exc: requests.RequestException) -> bool:
    """Whether a connection error came after the request went out (a reset mid-answer)."""
    text = str(exc)
    return not any(
        marker in text
        for marker in ("NewConnectionError", "Connection refused", "Name or service", "resolve")
    )


class _BindsDeadline:
    """Mixed into urllib3's connections: binds the thread's request deadline when a request
    starts on the connection, so the watchdog knows which socket to shut."""

    def request(self, *args: Any, **kwargs: Any) -> Any:
        deadline = _deadline.current()
        if deadline is not None:
            deadline.bind(self)
        return super().request(*args, **kwargs)  # type: ignore[misc]


class _DeadlineConnection(_BindsDeadline, HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_BindsDeadline, HTTPSConnection):
    pass


class _DeadlinePool(HTTPConnectionPool):
    ConnectionCls = _DeadlineConnection


class _DeadlineHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection


class _DeadlineAdapter(HTTPAdapter):
    """requests' adapter, its pools making connections that keep the request deadline."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        _use_deadline_pools(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        _use_deadline_pools(manager)
        return manager


def _use_deadline_pools(manager: Any) -> None:
    manager.pool_classes_by_scheme = {"http": _DeadlinePool, "https": _DeadlineHTTPSPool}


def _server_message(text: str) -> tuple[Any, str]:
    """The parsed body (JSON if it is JSON) and the server's message in a few words."""
    body: Any = text
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        try:
            body = json.loads(stripped)
        except ValueError:
            body = text
    if isinstance(body, dict):
        message = body.get("message") or body.get("error") or stripped
    else:
        message = stripped
    message = " ".join(str(message).split())
    if len(message) > MAX_SERVER_MESSAGE_CHARS:
        message = message[: MAX_SERVER_MESSAGE_CHARS - 1] + "…"
    return body, message


def _bot_message(body: Any) -> str:
    bot = body.get("bot")
    if isinstance(bot, dict):
        name, kind = bot.get("name"), bot.get("type")
        return f"{name} ({kind})" if name and kind else str(name or kind or bot)
    return str(bot)


def _accepted(operation: str, status: int, headers: Any, text: str) -> Delivered | Dropped:
    """A 2xx, by its body: OpenPanel's JSON, one of its texts, or someone else's page."""
    body, message = _server_message(text)
    if isinstance(body, dict):
        if status == 202 and "bot" in body:
            return Dropped(status, "bot", _bot_message(body), body, headers)
        return Delivered(status, body, headers)
    stripped = text.strip()
    if stripped == DUPLICATE_TEXT:
        return Dropped(status, "duplicate", stripped, body, headers)
    if stripped.lower() in _LEGACY_OK_BODIES:
        return Delivered(status, body, headers)
    content_type = headers.get("content-type") or "no content type"
    raise UnexpectedAnswer(
        f"{operation}: HTTP {status} ({content_type}) {message!r} is not OpenPanel's answer: "
        "a proxy or captive portal answered instead of OpenPanel, and the event was not "
        "delivered; check OPENPANEL_API_URL and the workers' proxy settings (HTTPS_PROXY, "
        "NO_PROXY); will retry",
        status=status,
        server_message=message,
    )


def classify(
    operation: str, status: int, headers: Any, text: str, *, secret: str | None = None
) -> Delivered | Dropped:
    """Map one HTTP answer to success, a :class:`Dropped` answer, or the right
    :class:`DeliveryError` (the contract's table, and the server's hooks as its source has
    them: ``is-bot``, ``duplicate``, the project filters of ``utils/auth.ts``).

    ``secret`` is masked in the body first: a proxy's page that echoes the request's headers
    must not carry it into an error message, a log line or a dead letter.
    """
    if secret and secret in text:
        text = text.replace(secret, "********")
    if 200 <= status < 300:
        return _accepted(operation, status, headers, text)
    body, message = _server_message(text)
    retry_after = parse_retry_after(headers.get("retry-after"))
    detail = f"{operation}: HTTP {status} {message!r}"
    lowered = message.lower()
    error: DeliveryError
    if status == 429:
        error = RateLimited(
            f"{detail}; rate limited, will retry",
            status=status,
            server_message=message,
            retry_after=retry_after,
        )
    elif status >= 500 or status == 408:
        error = ServerError(
            f"{detail}; server error, will retry",
            status=status,
            server_message=message,
            retry_after=retry_after,
        )
    elif status == 400 and "alias is not supported" in lowered:
        error = AliasNotSupported(
            f"{operation}: Alias is not supported by this OpenPanel server; "
            "send identify with the new profile id instead",
            status=status,
            server_message=message,
        )
    elif status == 400:
        error = InvalidPayload(
            f"{detail}; the server rejected the payload: fix the event, then replay it",
            status=status,
            server_message=message,
        )
    elif status == 401 and any(text.lower() in lowered for text in FILTER_TEXTS):
        # The project's own filters, checked before the secret: no credentials problem.
        return Dropped(status, "filtered", message, body, headers)
    elif status == 401 and REVENUE_TEXT.lower() in lowered:
        error = AuthenticationError(
            f"{detail}; the server took the request as sent without a client secret: set "
            "OPENPANEL_CLIENT_SECRET (OPENPANEL_<NAME>_CLIENT_SECRET for a named project) on "
            "the workers, and check that no proxy strips the openpanel-client-secret header, "
            "then replay the dead letters",
            status=status,
            server_message=message,
        )
    elif status in (401, 403):
        # OpenPanel refuses in plain text (or the guide's JSON); a page is someone else's.
        proxy = (
            " (the answer is an HTML page, not OpenPanel's: a proxy may have refused it; "
            "check OPENPANEL_API_URL and the workers' proxy settings too)"
            if text.lstrip().startswith("<")
            else ""
        )
        error = AuthenticationError(
            f"{detail}; check OPENPANEL_CLIENT_ID and OPENPANEL_CLIENT_SECRET{proxy}, then "
            "replay the dead letters",
            status=status,
            server_message=message,
        )
    elif status == 404 and "profile not found" in lowered:
        error = ProfileNotFound(
            f"{detail}; the profile may not be processed yet, will retry",
            status=status,
            server_message=message,
        )
    elif status == 404:
        error = PermanentError(
            f"{detail}; is OPENPANEL_API_URL right? It should be the API's base URL",
            status=status,
            server_message=message,
        )
    else:
        error = PermanentError(
            f"{detail}; unexpected answer, not retried",
            status=status,
            server_message=message,
        )
    raise error
