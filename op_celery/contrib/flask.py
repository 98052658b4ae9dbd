"""Flask: the ``OpenPanel`` extension gives every ``.delay()`` the end user's IP and user agent.

    from op_celery.contrib.flask import OpenPanel

    app = Flask(__name__)
    OpenPanel(app)                     # or: openpanel = OpenPanel(); openpanel.init_app(app)

Settings, in ``app.config`` (read by ``init_app``):

``OPENPANEL_TRUSTED_PROXIES`` (default ``None``: trust no proxy, use ``REMOTE_ADDR``)
    The reverse proxies allowed to name the client in ``X-Forwarded-For``: a list of IP
    addresses and networks, or the number of proxies in front of the app (see
    ``op_celery.contrib._proxy``). The ``trusted_proxies`` argument, when given, wins. If the app
    is wrapped in Werkzeug's ``ProxyFix``, ``REMOTE_ADDR`` is already the client's: leave this
    unset.

A ``before_request`` hook sets the context and a ``teardown_request`` hook resets it, so it
covers the view and ``after_request`` hooks; async views (run by Flask through asgiref) see it
too, and so does a body streamed with ``stream_with_context``, which runs after teardown: the
``appcontext_pushed`` signal sets the context again when that body pushes the request's
context. Register the extension before other ``before_request`` hooks that call ``.delay()``.
"""

from __future__ import annotations

from contextvars import Token

from .._context import RequestContext, reset_request_context, set_request_context
from .._exceptions import ConfigurationError
from ._proxy import TrustedProxies, TrustedProxiesSetting, context_from_environ

try:
    import flask  # noqa: F401  (first, so that a Flask stubbed out of sys.modules fails here)
    from flask import Flask, appcontext_pushed, current_app, g, request
except ImportError as exc:
    raise ImportError(
        "op_celery.contrib.flask needs Flask: pip install 'op-celery[flask]'"
    ) from exc

__all__ = ["CONFIG_KEY", "EXTENSION_NAME", "OpenPanel"]

#: The ``app.config`` key of the trusted proxies.
CONFIG_KEY = "OPENPANEL_TRUSTED_PROXIES"
#: The extension's key in ``app.extensions``; its value is the app's :class:`TrustedProxies`.
EXTENSION_NAME = "op_celery"
#: Where the request's context, and the token that resets it at teardown, wait on ``flask.g``.
_CONTEXT_ATTR = "_op_celery_context"
_TOKEN_ATTR = "_op_celery_context_token"


class OpenPanel:
    """The Flask extension: ``OpenPanel(app)``, or ``OpenPanel()`` and later ``init_app(app)``
    (one instance may serve several apps, each with its own config)."""

    def __init__(
        self, app: Flask | None = None, *, trusted_proxies: TrustedProxiesSetting = None
    ) -> None:
        self.trusted_proxies = trusted_proxies
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read the app's config and register the request hooks on ``app``."""
        setting = self.trusted_proxies
        if setting is None:
            setting = app.config.get(CONFIG_KEY)
        try:
            proxies = TrustedProxies(setting)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{CONFIG_KEY}: {exc}") from exc
        app.extensions[EXTENSION_NAME] = proxies
        app.before_request(_set_context)
        app.teardown_request(_reset_context)
        appcontext_pushed.connect(_restore_context, app)


def _set_context() -> None:
    proxies: TrustedProxies = current_app.extensions[EXTENSION_NAME]
    context = context_from_environ(request.environ, proxies)
    setattr(g, _CONTEXT_ATTR, context)
    _activate(context)


def _activate(context: RequestContext) -> None:
    setattr(g, _TOKEN_ATTR, set_request_context(context.client_ip, context.user_agent))


def _restore_context(sender: Flask, **extra: object) -> None:
    # stream_with_context pushes the request's app context again to run the body, after
    # teardown has reset ours: set it again from what before_request kept on ``g``.
    context = g.get(_CONTEXT_ATTR)
    if context is not None and _TOKEN_ATTR not in g:
        _activate(context)


def _reset_context(error: BaseException | None) -> None:
    # Teardown also runs when an earlier before_request hook answered and ours never ran.
    token: Token[RequestContext | None] | None = g.pop(_TOKEN_ATTR, None)
    if token is not None:
        reset_request_context(token)
