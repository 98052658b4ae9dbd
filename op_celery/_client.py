"""The HTTP client: one event, one POST to ``{api_url}/track``, every answer classified.

Usable without Celery::

    client = OpenPanelClient(client_id="...", client_secret="...")
    client.send(build_event("track", {"name": "signup"}))

On urllib3 (requests' own HTTP layer) directly; its exceptions become op-celery's here and
nowhere else. A keep-alive connection is kept per thread and per process: a pooled connection
inherited across ``fork()`` would be shared by parent and child.
"""

from __future__ import annotations

import codecs
import http.client
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from . import __about__, _deadline
from ._events import Event
from ._exceptions import (
    AliasNotSupported,
    AuthenticationError,
    ConfigurationError,
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
from ._rules import header_failure
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
    session: Any = None


def _pool_manager(url: str) -> urllib3.PoolManager:
    """A keep-alive pool manager for ``url`` with what requests would take from the environment
    for it: the proxy of ``HTTP(S)_PROXY``/``ALL_PROXY`` unless ``NO_PROXY`` names the host,
    and the CA bundle of ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE`` or ``SSL_CERT_FILE``
    (certifi's otherwise, as requests). Its connections keep the request deadline."""
    from requests.utils import get_auth_from_url, get_environ_proxies, select_proxy

    bundle = (
        os.environ.get("REQUESTS_CA_BUNDLE")
        or os.environ.get("CURL_CA_BUNDLE")
        or os.environ.get("SSL_CERT_FILE")
        or _default_ca_bundle()
    )
    tls: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED"}
    tls["ca_cert_dir" if os.path.isdir(bundle) else "ca_certs"] = bundle
    # One connection per host: the manager is this thread's alone.
    options: dict[str, Any] = {"num_pools": 4, "maxsize": 1, "block": False, **tls}
    proxy = select_proxy(url, get_environ_proxies(url))
    manager: urllib3.PoolManager
    if proxy:
        if not proxy.lower().startswith(("http://", "https://")):
            raise ConfigurationError(
                f"the proxy {redact_url(proxy)} of the environment (HTTPS_PROXY, HTTP_PROXY or "
                "ALL_PROXY) is not an http:// or https:// proxy, the only kinds the client "
                "supports; set NO_PROXY for the API's host or use an HTTP proxy"
            )
        username, password = get_auth_from_url(proxy)
        headers = (
            urllib3.util.make_headers(proxy_basic_auth=f"{username}:{password}")
            if username
            else None
        )
        manager = urllib3.ProxyManager(proxy, proxy_headers=headers, **options)
    else:
        manager = urllib3.PoolManager(**options)
    _use_deadline_pools(manager)
    return manager


def _default_ca_bundle() -> str:
    import certifi  # requests' own dependency, and its default bundle

    return str(certifi.where())


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
        pool_factory: Callable[[str], urllib3.PoolManager] = _pool_manager,
    ) -> None:
        self.client_id = client_id
        self._secret = client_secret if isinstance(client_secret, Secret) else Secret(client_secret)
        checked = check_api_url(api_url, allow_insecure=allow_insecure_http)
        self._track_url = f"{checked}/track"
        #: The API URL as messages, logs and dead letters show it: credentials in it are hidden.
        self.api_url = redact_url(checked)
        self._timeout = urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s)
        #: The whole request's bound (``_deadline``): one connect and one read timeout. The
        #: ledger's claim outlives it (``Settings.claim_ttl_s`` adds a margin to the same sum),
        #: so no request is still running when another worker may claim its event.
        self._deadline_s = connect_timeout_s + read_timeout_s
        self._pool_factory = pool_factory
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
    def session(self) -> urllib3.PoolManager:
        """This thread's keep-alive connections in this process (new ones after ``fork()``):
        the ``pool_factory``'s manager for the track URL, made on first use."""
        sessions = self._sessions
        pid = os.getpid()
        if sessions.session is None or sessions.pid != pid:
            sessions.session = self._pool_factory(self._track_url)
            sessions.pid = pid
        manager: urllib3.PoolManager = sessions.session
        return manager

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

        On urllib3 directly, with this thread's keep-alive connection: requests' session
        machinery (preparing, merging settings, hooks, the response object) cost about as much
        CPU per event as the HTTP exchange itself (``benchmarks/cpu.py``). What it took from
        the environment is read once per thread and process instead (`_pool_manager`).
        """
        headers = self.headers_for(event)
        for name in ("user-agent", "openpanel-client-ip"):
            value = headers.get(name)
            if value is not None and header_failure(value) is not None:
                # Validation at .delay() refuses what cannot be a header; an event from
                # elsewhere (an old message, a replay edited by hand) still must not loop.
                raise _unsendable(event, name)
        manager = self.session
        data = json.dumps(event.body, separators=(",", ":")).encode()
        deadline = _deadline.arm(self._deadline_s)
        try:
            response = manager.urlopen(
                "POST",
                self._track_url,
                body=data,
                headers=headers,
                timeout=self._timeout,
                retries=_NO_RETRIES,
                redirect=False,
                preload_content=True,
            )
        except UnicodeError:
            raise _unsendable(event, "a") from None
        except _NO_ANSWER_ERRORS as exc:
            raise _no_answer(event, self.api_url, exc, deadline, self._deadline_s) from None
        finally:
            deadline.disarm()
        if deadline.expired:
            # Cut off mid-answer: http.client takes an end of stream inside the headers for
            # their end, so what was read can look like a whole 200. It is not an answer.
            cut = urllib3.exceptions.ProtocolError("the deadline cut the answer off")
            raise _no_answer(event, self.api_url, cut, deadline, self._deadline_s)
        headers_in = response.headers
        return classify(
            event.operation,
            response.status,
            headers_in,
            response.data.decode(_charset(headers_in.get("content-type")), "replace"),
            secret=self._base_headers["openpanel-client-secret"],
        )


#: No retry inside urllib3 (Celery's retry is the one), and a read error raised as itself.
_NO_RETRIES = urllib3.util.Retry(0, read=False, redirect=False)
#: What a request that got no (complete) answer raises (urllib3 wraps most; a socket error
#: or http.client's may come through).
_NO_ANSWER_ERRORS = (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


def _charset(content_type: str | None) -> str:
    """The answer's charset (UTF-8, OpenPanel's, when it names none or one Python lacks)."""
    if content_type:
        for part in content_type.split(";")[1:]:
            name, _, value = part.strip().partition("=")
            if name.lower() == "charset" and value:
                charset = value.strip("\"' ")
                try:
                    codecs.lookup(charset)
                except LookupError:
                    break
                return charset
    return "utf-8"


def _unsendable(event: Event, what: str) -> InvalidPayload:
    return InvalidPayload(
        f"{event.operation}: the event cannot be sent as an HTTP request ({what} header value "
        "is not latin-1 text without control characters); fix its user_agent or client_ip, "
        "then replay the dead letter"
    )


def _no_answer(
    event: Event, where: str, exc: BaseException, deadline: Any, deadline_s: float
) -> NetworkError:
    """The NetworkError of a request that got no (complete) answer, saying whether the server
    may have received it: after the request was sent, a retry can deliver it twice."""
    reason = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc
    name = type(reason).__name__
    if deadline.expired:
        what = f"no complete answer within the request's {deadline_s:g} s deadline ({name})"
        maybe = True
    elif isinstance(reason, urllib3.exceptions.NewConnectionError):
        what, maybe = f"no answer ({name})", False  # refused, or no such host
    elif isinstance(reason, urllib3.exceptions.ConnectTimeoutError | urllib3.exceptions.ProxyError):
        what, maybe = f"could not connect ({name})", False
    elif isinstance(reason, urllib3.exceptions.ReadTimeoutError | TimeoutError):
        what, maybe = f"timed out waiting for the answer ({name})", True
    elif isinstance(reason, urllib3.exceptions.ProtocolError | OSError):
        what, maybe = f"no answer ({name})", _sent(reason)
    else:
        what, maybe = f"no complete answer ({name})", True
    tail = "; the server may have received it, so the retry may deliver it twice" if maybe else ""
    error = NetworkError(f"{event.operation} to {where}: {what}; will retry{tail}")
    error.maybe_delivered = maybe
    return error


def _sent(exc: BaseException) -> bool:
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
