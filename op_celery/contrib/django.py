"""Django: a middleware that gives every ``.delay()`` the end user's IP and user agent, and
``delay_on_commit`` for events that must only leave if the transaction commits.

    MIDDLEWARE = [
        # near the top, so views and the other middleware's .delay() calls see it
        "op_celery.contrib.django.OpenPanelMiddleware",
        ...
    ]
    OPENPANEL = {"TRUSTED_PROXIES": ["10.0.0.0/8"]}  # optional

The Django setting ``OPENPANEL`` is one dict; every key is optional:

``TRUSTED_PROXIES`` (default ``None``: trust no proxy, use ``REMOTE_ADDR``)
    The reverse proxies allowed to name the client in ``X-Forwarded-For``: a list of IP
    addresses and networks, or the number of proxies in front of Django (see
    ``op_celery.contrib._proxy``). Read when Django builds the middleware, i.e. at start-up.

An unknown key raises :class:`~op_celery.ConfigurationError` at start-up, so a typo is not
silently ignored.

The middleware is sync and async capable: under ASGI it stays async, and sync views, which
Django runs in a thread, still see the context (asgiref copies it). ``.delay()`` publishes
synchronously, so in an async view wrap it, ``await sync_to_async(track.delay)(...)``, to keep
the event loop free while the broker answers.

``delay_on_commit(track, "signup", profile_id=user.pk)`` validates at once, raising
:class:`~op_celery.InvalidEvent` in the caller like ``.delay()``, and publishes when the current
transaction of the default database commits: never if it rolls back, at once if no transaction
is open. The request's IP, user agent and the event's time are taken at the call, not at the
commit. A publish that fails at commit time is logged by Django (``robust=True``) instead of
turning the committed request into an error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ParamSpec, Protocol, TypeAlias, cast

from .._context import request_context, reset_request_context, set_request_context
from .._events import normalize_call
from .._exceptions import ConfigurationError
from .._tasks import OpenPanelTask
from ._proxy import TrustedProxies, context_from_environ

try:
    import django  # noqa: F401  (first, so that a Django stubbed out of sys.modules fails here)
    from asgiref.sync import iscoroutinefunction, markcoroutinefunction
    from django.conf import settings
    from django.db import transaction
    from django.http import HttpRequest, HttpResponseBase
except ImportError as exc:
    raise ImportError(
        "op_celery.contrib.django needs Django: pip install 'op-celery[django]'"
    ) from exc

__all__ = ["DEFAULTS", "SETTING_NAME", "OpenPanelMiddleware", "delay_on_commit"]

#: The Django setting that holds the integration's settings (a dict).
SETTING_NAME = "OPENPANEL"
#: Its keys and their defaults.
DEFAULTS: Mapping[str, Any] = {"TRUSTED_PROXIES": None, "ENQUEUE_ON_COMMIT": False}

_P = ParamSpec("_P")
_Response: TypeAlias = HttpResponseBase | Awaitable[HttpResponseBase]


def _integration_settings() -> dict[str, Any]:
    raw = getattr(settings, SETTING_NAME, None) or {}
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"settings.{SETTING_NAME} must be a dict, got {raw!r}")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ConfigurationError(
            f"settings.{SETTING_NAME} has unknown keys {unknown}; known: {sorted(DEFAULTS)}"
        )
    return {**DEFAULTS, **raw}


class OpenPanelMiddleware:
    """Set the request's client IP and user agent for every ``.delay()`` made while Django
    handles it (the view, later middleware, signal handlers), and reset it afterwards."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], _Response]) -> None:
        self.get_response = get_response
        config = _integration_settings()
        trusted = config["TRUSTED_PROXIES"]
        # With ENQUEUE_ON_COMMIT, every .delay() in the request is validated at once and
        # published when the transaction commits (at once outside a transaction).
        self.defer = _on_commit if config["ENQUEUE_ON_COMMIT"] else None
        try:
            self.proxies = TrustedProxies(trusted)
        except ConfigurationError as exc:
            raise ConfigurationError(f"settings.{SETTING_NAME}['TRUSTED_PROXIES']: {exc}") from exc
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> _Response:
        if self.async_mode:
            return self.__acall__(request)
        context = context_from_environ(request.META, self.proxies)
        token = set_request_context(context.client_ip, context.user_agent, self.defer)
        try:
            return self.get_response(request)
        finally:
            reset_request_context(token)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        context = context_from_environ(request.META, self.proxies)
        token = set_request_context(context.client_ip, context.user_agent, self.defer)
        try:
            return await cast(Awaitable[HttpResponseBase], self.get_response(request))
        finally:
            reset_request_context(token)


def _on_commit(publish: Callable[[], object]) -> None:
    transaction.on_commit(publish, robust=True)


class _Delayable(Protocol[_P]):
    """What ``delay_on_commit`` takes: an op-celery task; its ``delay`` types the arguments."""

    def delay(self, *args: _P.args, **kwargs: _P.kwargs) -> Any: ...


def delay_on_commit(task: _Delayable[_P], /, *args: _P.args, **kwargs: _P.kwargs) -> None:
    """Validate a call of ``task`` now, and publish it when the transaction commits.

    ``delay_on_commit(op_celery.track, "signup", profile_id=user.pk)`` takes the arguments of
    ``track.delay`` (and mypy checks them against it). Raises :class:`~op_celery.InvalidEvent`
    at once; publishes on commit of the default database's transaction, never on rollback, at
    once when no transaction is open. See the module docstring.
    """
    if not isinstance(task, OpenPanelTask):
        raise TypeError(f"delay_on_commit takes an op_celery task, got {task!r}")
    # Validate and freeze now: arguments, request context and timestamp are the caller's.
    message = normalize_call(task.operation, args, kwargs)

    def publish() -> None:
        # Under the call's context, not whatever context is current when the commit happens.
        with request_context(message["client_ip"], message["user_agent"]):
            task.apply_async((), message)

    transaction.on_commit(publish, robust=True)
