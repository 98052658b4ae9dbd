"""Starlette and FastAPI: a pure ASGI middleware that gives every ``.delay()`` the end user's IP
and user agent.

    from op_celery.contrib.fastapi import OpenPanelMiddleware

    app = FastAPI()                    # or Starlette()
    app.add_middleware(OpenPanelMiddleware, trusted_proxies=["10.0.0.0/8"])

``trusted_proxies`` (default ``None``: trust no proxy, use the ASGI ``client``) names the
reverse proxies allowed to name the client in ``X-Forwarded-For``: a list of IP addresses and
networks, or the number of proxies in front of the app (see ``op_celery.contrib._proxy``). If
the server already rewrites the client from that header (uvicorn ``--proxy-headers`` with
``--forwarded-allow-ips``), leave it unset.

It wraps the whole ASGI call of each ``http`` and ``websocket`` connection, sets the context
before the app runs and resets it when the app returns. A plain ASGI middleware rather than
Starlette's ``BaseHTTPMiddleware``: the response, streamed or not, passes through untouched,
and the endpoint, a streaming body and background tasks all run inside the call, so all of
them see the context; ``def`` endpoints too, as Starlette copies the context into its thread
pool. ``lifespan`` passes through untouched.

``.delay()`` publishes synchronously: in an ``async def`` endpoint it holds the event loop for
the publish (usually well under a millisecond, longer if the broker is slow or away). Call it
from a ``def`` endpoint, or ``await run_in_threadpool(track.delay, ...)``; the context follows.
"""

from __future__ import annotations

from .._context import reset_request_context, set_request_context
from .._exceptions import ConfigurationError
from ._proxy import TrustedProxies, TrustedProxiesSetting, context_from_scope

try:
    import starlette  # noqa: F401  (first, so that a Starlette stubbed out of sys.modules fails)
    from starlette.types import ASGIApp, Receive, Scope, Send
except ImportError as exc:
    raise ImportError(
        "op_celery.contrib.fastapi needs Starlette (FastAPI brings it): "
        "pip install 'op-celery[fastapi]'"
    ) from exc

__all__ = ["OpenPanelMiddleware"]

#: The ASGI connection types whose calls get a request context.
CONNECTION_TYPES = frozenset({"http", "websocket"})


class OpenPanelMiddleware:
    """ASGI middleware: ``app.add_middleware(OpenPanelMiddleware)``, or wrap any ASGI app,
    ``OpenPanelMiddleware(app, trusted_proxies=1)``."""

    def __init__(self, app: ASGIApp, *, trusted_proxies: TrustedProxiesSetting = None) -> None:
        self.app = app
        try:
            self.proxies = TrustedProxies(trusted_proxies)
        except ConfigurationError as exc:
            raise ConfigurationError(f"OpenPanelMiddleware(trusted_proxies=...): {exc}") from exc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in CONNECTION_TYPES:
            await self.app(scope, receive, send)
            return
        context = context_from_scope(scope, self.proxies)
        token = set_request_context(context.client_ip, context.user_agent)
        try:
            await self.app(scope, receive, send)
        finally:
            reset_request_context(token)
