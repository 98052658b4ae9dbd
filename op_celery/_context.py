"""The end user's IP and user agent for the current request, read by ``.delay()``.

Framework middleware (``op_celery.contrib``) sets it per request; a task call that passes no
``client_ip`` / ``user_agent`` takes them from here, so events are attributed to the browser
that caused them rather than to the server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass

__all__ = ["RequestContext", "current_request", "request_context", "set_request_context"]


#: Takes a zero-argument publish function and runs it later (Django's transaction.on_commit).
Defer = Callable[[Callable[[], object]], object]


@dataclass(frozen=True, slots=True)
class RequestContext:
    client_ip: str | None = None
    user_agent: str | None = None
    #: When set, ``.delay()`` validates at once and hands the publish to it.
    defer: Defer | None = None


_current: ContextVar[RequestContext | None] = ContextVar("op_celery_request", default=None)


def current_request() -> RequestContext | None:
    """The context of the request being handled, if a middleware set one."""
    return _current.get()


def set_request_context(
    client_ip: str | None = None, user_agent: str | None = None, defer: Defer | None = None
) -> Token[RequestContext | None]:
    """Set the context; pass the returned token to ``reset_request_context`` afterwards."""
    return _current.set(RequestContext(client_ip or None, user_agent or None, defer))


def reset_request_context(token: Token[RequestContext | None]) -> None:
    _current.reset(token)


@contextmanager
def request_context(
    client_ip: str | None = None, user_agent: str | None = None
) -> Iterator[RequestContext]:
    """``with request_context(ip, ua):`` every ``.delay()`` inside forwards them."""
    token = set_request_context(client_ip, user_agent)
    try:
        context = _current.get()
        assert context is not None
        yield context
    finally:
        _current.reset(token)
