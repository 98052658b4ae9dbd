"""op-celery: send analytics to OpenPanel from Celery workers, without slowing a request or
losing an event.

    from op_celery import track
    track.delay("signup", properties={"plan": "pro"}, profile_id="user-1")

The tasks validate in the caller, travel as JSON on their own queue, and are delivered by
Celery workers (``celery -A op_celery.worker worker``) with retries that follow the API.

How the package is built: four layers, each importing only the ones below it (lazy imports
count; ``lint-imports`` checks it against ``[tool.importlinter]`` in ``pyproject.toml``)::

    tools           cli, _demo, worker, contrib (Django, Flask, FastAPI), metrics, testing
    ─────────────────────────────────────────────────────────────────────────────────────────
    Celery layer    _tasks      the eight typed tasks and the proxies exported here
                    _task       their class: validate at .delay(), map outcomes to Celery
                    _startup    what a worker does as it starts (sweeper, checks, announce)
                    _enqueue    spool, re-publish, dead-letter replay's publisher
                    _consumer   the consumer step that keeps malformed messages visible
                    _publish    the fast publish path (its plan: _publish_plan; its bound and
                                pools: _publish_bound; the arguments' text copies: _reprs)
                    _outbox     records of what was published (_outbox_liveness: consumers
                                alive and possible losses; _outbox_sweeper: the sweeper)
                    _app        which Celery app publishes, and its settings;  signals
                    _compat     every private Celery/kombu/redis-py name, with its fallback
    ─────────────────────────────────────────────────────────────────────────────────────────
    pipeline        _delivery   one event in, one outcome out: claim, pace, POST, mark
    ─────────────────────────────────────────────────────────────────────────────────────────
    core (no        dead_letters, _client (HTTP) and _deadline (a request's total bound),
    Celery)         _ledger (delivered ids), _limiter and _learning (the shared rate, learned
                    from the API), _capture (test recorder), _spool, _redis (one server,
                    Cluster, Sentinel), _retry (the one retry decision), _events, _checks,
                    _rules and _url (validation as OpenPanel's server), _rates, _lua,
                    _process, _settings, _embedded, _context, __about__, _exceptions

Public names are the ones in ``__all__`` below; modules with a leading underscore are internal.
"""

from .__about__ import __version__
from ._client import Delivered, Dropped, OpenPanelClient
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
    UnexpectedAnswer,
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
    revenue,
    track,
)

__all__ = [
    "AliasNotSupported",
    "AuthenticationError",
    "ConfigurationError",
    "Delivered",
    "DeliveryError",
    "Dropped",
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
    "UnexpectedAnswer",
    "__version__",
    "alias",
    "assign_group",
    "build_event",
    "decrement",
    "group",
    "identify",
    "increment",
    "load_settings",
    "revenue",
    "track",
]
