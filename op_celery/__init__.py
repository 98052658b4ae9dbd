"""op-celery: send analytics to OpenPanel from Celery workers, without slowing a request or
losing an event.

    from op_celery import track
    track.delay("signup", properties={"plan": "pro"}, profile_id="user-1")

The tasks validate in the caller, travel as JSON on their own queue, and are delivered by
Celery workers (``celery -A op_celery.worker worker``) with retries that follow the API.
"""

from .__about__ import __version__
from ._client import Delivered, OpenPanelClient
from ._events import Event, build_event
from ._exceptions import (
    AliasNotSupported,
    AuthenticationError,
    ConfigurationError,
    DeliveryError,
    InvalidEvent,
    InvalidPayload,
    LimiterUnavailable,
    NetworkError,
    OpenPanelError,
    PermanentError,
    ProfileNotFound,
    PublishError,
    RateLimited,
    ServerError,
    StorageUnavailable,
    TransientError,
)
from ._settings import Project, Secret, Settings, load_settings
from ._tasks import (
    OpenPanelTask,
    alias,
    assign_group,
    decrement,
    group,
    identify,
    increment,
    track,
)

__all__ = [
    "AliasNotSupported",
    "AuthenticationError",
    "ConfigurationError",
    "Delivered",
    "DeliveryError",
    "Event",
    "InvalidEvent",
    "InvalidPayload",
    "LimiterUnavailable",
    "NetworkError",
    "OpenPanelClient",
    "OpenPanelError",
    "OpenPanelTask",
    "PermanentError",
    "ProfileNotFound",
    "Project",
    "PublishError",
    "RateLimited",
    "Secret",
    "ServerError",
    "Settings",
    "StorageUnavailable",
    "TransientError",
    "__version__",
    "alias",
    "assign_group",
    "build_event",
    "decrement",
    "group",
    "identify",
    "increment",
    "load_settings",
    "track",
]
