"""The one exception tree of op-celery.

Every error the package raises derives from :class:`OpenPanelError`::

    OpenPanelError
    ├── InvalidEvent            (also a ValueError) bad input, raised in the caller at .delay()
    ├── ConfigurationError      a missing or wrong setting; fix the configuration
    ├── PublishError            the broker could not take the message at .delay()
    ├── DeliveryError           the OpenPanel API did not accept an event (``status``)
    │   ├── PermanentError      retrying cannot help; the event goes to the dead letters
    │   │   ├── InvalidPayload      400: the server rejected the payload
    │   │   ├── AliasNotSupported   400 "Alias is not supported"
    │   │   └── AuthenticationError 401/403: wrong client id or secret (or none at all)
    │   └── RateLimited, ServerError, NetworkError, ProfileNotFound   (also TransientError)
    └── TransientError          retrying later can help; carries the server's retry delay if any
        ├── RateLimited         429                                          (a DeliveryError)
        ├── ServerError         5xx                                          (a DeliveryError)
        │   └── UnexpectedAnswer  a 2xx whose body is not OpenPanel's (a proxy's page)
        ├── NetworkError        connection refused or reset, timeout         (a DeliveryError)
        ├── ProfileNotFound     404 on increment/decrement before the profile exists (idem)
        └── StorageUnavailable  the package's Redis (ledger, dead letters) did not answer
            └── LimiterUnavailable  the rate limiter's Redis did not answer

Two questions, two branches: *did the API refuse?* (:class:`DeliveryError`, with the HTTP
status) and *will a retry help?* (:class:`TransientError` or :class:`PermanentError`). A Redis
outage is transient but no answer of the API, so the storage errors are not DeliveryErrors;
Celery's autoretry, ``_retry.decide`` and the pipeline all ask the second question only.

``urllib3`` exceptions (the HTTP client's) are mapped to these in ``_client.py`` only;
``redis`` ones in ``_limiter.py`` (limiter calls) and ``_redis.py`` (ledger and dead letters)
only; broker errors at publish in ``OpenPanelTask.apply_async``. No message contains the client
secret or a Redis password.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AliasNotSupported",
    "AuthenticationError",
    "ConfigurationError",
    "DeliveryError",
    "InvalidEvent",
    "InvalidPayload",
    "LimiterUnavailable",
    "NetworkError",
    "OpenPanelError",
    "PermanentError",
    "ProfileNotFound",
    "PublishError",
    "RateLimited",
    "ServerError",
    "StorageUnavailable",
    "TransientError",
    "UnexpectedAnswer",
]


class OpenPanelError(Exception):
    """Base class of every error raised by op-celery."""


class InvalidEvent(OpenPanelError, ValueError):
    """An event's input breaks a rule of the OpenPanel API; nothing was enqueued.

    ``field`` names the offending argument (as passed to the task) and ``rule`` says what
    it must be.
    """

    def __init__(self, operation: str, field: str, rule: str) -> None:
        self.operation = operation
        self.field = field
        self.rule = rule
        super().__init__(f"{operation}: {field} {rule}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.operation, self.field, self.rule))


class ConfigurationError(OpenPanelError):
    """A setting is missing or invalid; the message names the setting to fix."""


class PublishError(OpenPanelError):
    """The broker did not accept a task message within the publish bound."""


class DeliveryError(OpenPanelError):
    """The OpenPanel API did not accept an event.

    ``status`` is the HTTP status (``None`` when no response arrived) and ``server_message``
    the server's own words, as far as the body held any.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        server_message: str | None = None,
    ) -> None:
        self.status = status
        self.server_message = server_message
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_delivery_error, (type(self), str(self), dict(self.__dict__)))


def _rebuild_delivery_error(
    cls: type[DeliveryError], message: str, state: dict[str, object]
) -> DeliveryError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class PermanentError(DeliveryError):
    """Retrying cannot help: fix the event or the configuration, then replay the dead letter."""


class InvalidPayload(PermanentError):
    """400: the server rejected the payload; its message says which field."""


class AliasNotSupported(PermanentError):
    """400 "Alias is not supported": the OpenPanel server does not implement alias."""


class AuthenticationError(PermanentError):
    """401/403: the client id or secret is wrong, or the server took the request as sent
    without a secret (revenue tracking needs one).

    A 401 of the project's own filters ("IP address is blocked by project filter") is no
    error: the client returns it as a :class:`~op_celery.Dropped` answer.
    """


class TransientError(OpenPanelError):
    """Retrying later can help. ``retry_after`` is the server's delay in seconds, if it gave one."""

    retry_after: float | None = None

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        # Cooperative: for the API's transient errors the next class is DeliveryError, which
        # takes ``status`` and ``server_message``; for the storage errors it is the base.
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class RateLimited(TransientError, DeliveryError):
    """429: the API's rate limit was exceeded; wait ``retry_after`` seconds."""


class ServerError(TransientError, DeliveryError):
    """5xx: the server or a proxy in front of it failed."""


class UnexpectedAnswer(ServerError):
    """A 2xx whose body is none of OpenPanel's (its JSON, ``Duplicate event``, an empty or
    ``ok`` body of older servers): something else answered in its place, typically a captive
    portal's or a proxy's HTML page. The event was not delivered; it is retried like a 5xx."""


class NetworkError(TransientError, DeliveryError):
    """No (complete) response: the connection failed, timed out or passed its deadline.

    ``maybe_delivered`` is True when the request had gone out: the server may have stored the
    event, and a retry can then deliver it twice (OpenPanel keeps no idempotency key).
    """

    maybe_delivered: bool = False


class ProfileNotFound(TransientError, DeliveryError):
    """404 "Profile not found": the profile may not be processed yet; retried a few times."""


class StorageUnavailable(TransientError):
    """The package's Redis (delivered ids, claims, dead letters) did not answer, or refused the
    write (full at maxmemory, a read-only replica: the message says which); retried later."""


class LimiterUnavailable(StorageUnavailable):
    """The rate limiter's Redis did not answer; the event is retried, never sent unthrottled."""
