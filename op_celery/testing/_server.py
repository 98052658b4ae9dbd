"""A stand-in OpenPanel ingestion server for tests, benchmarks and demos.

`StandInServer` is a real HTTP/1.1 server on a free loopback port that answers ``POST /track``
the way OpenPanel's server does (see ``openpanel-api.md``): zod-like body validation before
authentication, 401s with plain-text bodies, ``Alias is not supported``, 404 for increments on
profiles not flushed yet, and an optional fixed-window rate limit with the ``@fastify/rate-limit``
headers. Tests can inject faults (canned answers, time-boxed outages, dropped connections,
latency) and read back every request it answered.

`StandInControl` drives and reads a server that runs in another process (for example one started
with ``python -m op_celery.testing``) through the ``/__stand-in/...`` control endpoints.

It is built from one module per concept: `_validation` (fastify's body parsing and the zod
schemas), `_answers` (what it answers), `_model` (`ApiModel`: the rules and state of the API,
no sockets), `_profiles` (the profile buffer), `_http` (the loopback HTTP server and its
framing), `_control` (the control endpoints and `StandInControl`), `_log` (one line per
request), and this module, which puts the model behind the server.

Limits, stated plainly:

- It validates with op-celery's own rules (``op_celery._rules``, ``_url``: the full blocklist,
  zod 4's e-mail pattern, WHATWG URLs), which agree with OpenPanel's schema run under Node on
  every row of ``tests/data/openpanel_verdicts.json``; its 400 messages still say ``Invalid
  input`` per failing field (`_validation.validation_message` has zod's exact words).
- It models the project's filters (`set_filters`: 401 ``... blocked by project filter``) and
  revenue sent without a secret (401), in the server's order, and reads the credentials as the
  server does (the ``openpanel-*`` headers, the legacy ``mixan-*`` ones, or ``clientId`` and
  ``clientSecret`` in the body). It does not model CORS/``Origin`` clients: every request needs
  a client id and its secret. So the bot check (202, only for requests without a secret)
  and the duplicate check (200 ``Duplicate event``, only with an ``Origin``) never answer by
  themselves: give them with ``fail_next(n, "bot")`` / ``fail_next(n, "duplicate")``, as a
  captive portal's HTML 200 with ``fail_next(n, "captive-portal")``.
- Profiles follow the server's profile buffer (`_profiles`): visible to increment/decrement
  ``profile_flush_s`` (10 s) after a write, values read as ``parseInt`` reads them (400
  ``Property value is not a number``), without the geo and device properties the server adds.
- ``deviceId`` in a 200 is the event's ``__deviceId`` as the server takes it, else a hash, not
  OpenPanel's salted one; ``sessionId`` is derived as the server derives it (never empty).
- It keeps every request in memory until `StandInServer.reset`; long benchmarks should reset.
- One thread per connection (stdlib ``http.server``): fine for thousands of requests per
  second on keep-alive connections, not for thousands of simultaneous connections.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TextIO

from op_celery.testing._http import HOST, JOIN_TIMEOUT_SECONDS, LoopbackHTTPServer
from op_celery.testing._log import RequestLog
from op_celery.testing._model import PROFILE_FLUSH_INTERVAL_S, ApiModel, RateLimitHeaders

__all__ = ["StandInServer"]


class StandInServer(ApiModel):
    """A faithful stand-in for OpenPanel's ``POST /track`` on ``http://127.0.0.1:<free port>``.

    The API's rules, state and controls are `ApiModel`'s, which this class extends with a real
    HTTP server: ``clients``, ``rate_limit``, ``rate_limit_headers`` and ``clock`` are the
    model's (see `ApiModel` and `set_rate_limit`), and so is ``profile_flush_s``: a profile
    is visible to increment/decrement 10 s after its identify, as on the real server, unless a
    test sets 0 or advances the clock; ``port`` 0 lets the OS pick.
    ``request_log``, a text stream such as ``sys.stdout``, gets one line per request: time,
    method, path, status, client id, event type and name, never the secret (see
    `op_celery.testing._log`); it is written from a thread of its own, so a slow stream never
    holds an answer.

    Time: ``clock`` (default ``time.monotonic``) plus whatever `advance` added is the server's
    clock for rate-limit windows and `fail_for` outages, and for nothing else: latency sleeps,
    `wait_for` timeouts and `Received.at` (wall time) are real time. Tests drive windows
    without sleeping either by passing a fake ``clock`` or by calling `advance` (also
    ``POST /__stand-in/advance`` for a server in another process).

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
        request_log: TextIO | None = None,
        profile_flush_s: float = PROFILE_FLUSH_INTERVAL_S,
    ) -> None:
        super().__init__(
            clients,
            rate_limit,
            rate_limit_headers=rate_limit_headers,
            clock=clock,
            profile_flush_s=profile_flush_s,
        )
        self._port = port
        self._request_log_stream = request_log
        self._request_log: RequestLog | None = None
        self._httpd: LoopbackHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    # -- lifecycle --

    def start(self) -> StandInServer:
        """Bind a free loopback port and serve in a background daemon thread; returns self."""
        with self._lock:
            if self._httpd is not None or self._stopped:
                raise RuntimeError("a StandInServer can be started only once")
            self._httpd = LoopbackHTTPServer((HOST, self._port), self)
        name = f"op-celery-stand-in:{self._httpd.server_port}"
        if self._request_log_stream is not None:
            self._request_log = RequestLog(self._request_log_stream, f"{name}:log")
            self._httpd.request_log = self._request_log
        self._thread = threading.Thread(
            target=self._httpd.accept_until_closed,
            name=name,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listening socket and every open connection, and join all threads.

        Requests sleeping in `set_latency` wake up and lose their connection unanswered; the
        request log writes what waits, then ends.
        Calling it again, or on a server never started, does nothing.
        """
        with self._lock:
            httpd, self._httpd = self._httpd, None
            self._stopped = True
        if httpd is None:
            return
        httpd.stop_accepting()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_SECONDS)
        httpd.close_connections()
        httpd.server_close()
        if self._request_log is not None:
            self._request_log.close(JOIN_TIMEOUT_SECONDS)  # after the last connection's line

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
