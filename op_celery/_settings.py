"""Settings: one frozen object built from the environment and the Celery app's config.

Every setting has an environment variable; the same name in lower case in the Celery config
(``app.conf.openpanel_client_id``, or ``CELERY_OPENPANEL_CLIENT_ID`` in Django with the
``CELERY`` namespace) overrides it. Named projects: ``project="shop"`` on a task uses
``OPENPANEL_SHOP_CLIENT_ID`` / ``OPENPANEL_SHOP_CLIENT_SECRET`` / ... on the workers, or the
entry ``"shop"`` of the Celery setting ``openpanel_projects`` (a dict of dicts with the keys
``client_id``, ``client_secret``, ``api_url``, ``rate_limit``, ``rate_burst``). Messages carry
only the project's name; the credentials exist only where the workers run.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ._exceptions import ConfigurationError

__all__ = ["EMBEDDED_URL", "Project", "Secret", "Settings", "load_settings"]

#: Where events go when OPENPANEL_API_URL is not set.
DEFAULT_API_URL = "https://api.openpanel.dev"
#: The queue the tasks are sent to and the package's worker consumes.
DEFAULT_QUEUE = "openpanel"
#: Broker used when no broker setting is present: the embedded Redis (``op_celery._embedded``).
EMBEDDED_URL = "embedded://"
DEFAULT_BROKER_URL = EMBEDDED_URL
#: Seconds before the Redis broker hands a crashed worker's unacked event to another worker.
#: Well inside OpenPanel's 15-minute session window, and above every countdown we set.
DEFAULT_VISIBILITY_TIMEOUT_S = 300.0
#: Seconds to wait for the API's TCP connection.
DEFAULT_CONNECT_TIMEOUT_S = 3.05
#: Seconds to wait for the API's answer once connected.
DEFAULT_READ_TIMEOUT_S = 10.0
#: Retries of a transient failure before the event is dead-lettered.
DEFAULT_MAX_RETRIES = 10
#: First backoff step in seconds; step n waits a random time in [0, base * 2**n].
DEFAULT_RETRY_BACKOFF_S = 1.0
#: Longest backoff in seconds.
DEFAULT_RETRY_BACKOFF_MAX_S = 120.0
#: Retries of a 404 "Profile not found" (an identify queued just before may still be in flight).
DEFAULT_PROFILE_NOT_FOUND_RETRIES = 5
#: Namespace of every Redis key op-celery writes (ledger, dead letters, limiter).
DEFAULT_KEY_PREFIX = "op-celery"
#: Seconds a delivered event's id is remembered; longer than the visibility timeout, so a
#: redelivered event is still recognised. A call's ``dedup_for`` raises it for that event.
DEFAULT_LEDGER_TTL_S = 3600.0
#: Seconds ``.delay()`` keeps retrying a broker that does not answer before it spools the event.
DEFAULT_PUBLISH_TIMEOUT_S = 1.0
#: Seconds a worker thread may wait inline for a rate-limit token; a longer wait re-schedules
#: the event with a countdown instead, so throttled events don't hold worker slots.
DEFAULT_MAX_INLINE_WAIT_S = 1.0
#: Percent below OPENPANEL_RATE_LIMIT the pool is paced, as room for network jitter against a
#: server counting that limit per fixed window.
DEFAULT_RATE_HEADROOM_PCT = 1.0
#: Seconds an outbox record (an enqueued, unfinished event) waits before the sweeper checks
#: that its message still exists; messages vanish only in kombu's BRPOP window (``_outbox``).
DEFAULT_OUTBOX_GRACE_S = 60.0
#: The Sentinel service name of the package's Redis when OP_CELERY_REDIS_URL is ``sentinel://``.
DEFAULT_REDIS_SENTINEL_MASTER = "mymaster"
#: What ``.delay()`` does when the broker stays away: "spool" to disk, or "raise" PublishError.
DEFAULT_ON_PUBLISH_FAILURE = "spool"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class Secret:
    """A string that never shows itself in ``repr()``, ``str()`` or a log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that needs it: the request header."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class Project:
    """Credentials and limits of one OpenPanel project, as the workers know them."""

    name: str
    client_id: str
    client_secret: Secret
    api_url: str
    rate_limit: str | None = None
    rate_burst: int | None = None


@dataclass(frozen=True)
class Settings:
    """All settings of op-celery. Build it with :func:`load_settings`."""

    broker_url: str = DEFAULT_BROKER_URL
    broker_url_source: str = "default"
    broker_key_prefix: str = ""
    redis_url: str | None = None
    #: With a ``sentinel://`` OP_CELERY_REDIS_URL: the master's service name, and the password
    #: of the sentinels themselves when they have one (the URL's password is the master's).
    redis_sentinel_master: str = DEFAULT_REDIS_SENTINEL_MASTER
    redis_sentinel_password: Secret | None = None
    queue: str = DEFAULT_QUEUE
    #: ``OP_CELERY_PROJECT_QUEUES``: the named projects whose events go to a queue of their own,
    #: ``<queue>.<project>``, which every worker that consumes ``queue`` consumes too (a comma-
    #: separated list; a list in the Celery config). A project throttled far below its traffic
    #: then never holds up another project's events on the shared queue. Set the same list
    #: on the web apps and the workers.
    project_queues: tuple[str, ...] = ()
    visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    max_retries: int = DEFAULT_MAX_RETRIES
    retry_backoff_s: float = DEFAULT_RETRY_BACKOFF_S
    retry_backoff_max_s: float = DEFAULT_RETRY_BACKOFF_MAX_S
    profile_not_found_retries: int = DEFAULT_PROFILE_NOT_FOUND_RETRIES
    allow_insecure_http: bool = False
    key_prefix: str = DEFAULT_KEY_PREFIX
    ledger_ttl_s: float = DEFAULT_LEDGER_TTL_S
    publish_timeout_s: float = DEFAULT_PUBLISH_TIMEOUT_S
    on_publish_failure: str = DEFAULT_ON_PUBLISH_FAILURE
    spool_dir: str = ""
    max_inline_wait_s: float = DEFAULT_MAX_INLINE_WAIT_S
    rate_headroom_pct: float = DEFAULT_RATE_HEADROOM_PCT
    outbox: bool = True
    outbox_grace_s: float = DEFAULT_OUTBOX_GRACE_S
    #: ``OP_CELERY_DRAIN``: a worker's task, done with its event, takes the next ones waiting
    #: on a Redis broker's queue itself (``_drain``); off, every event is a Celery task run.
    drain: bool = True
    #: ``OP_CELERY_ENABLED``: off, ``.delay()`` validates and then drops the event (a debug
    #: line), publishing nothing (development machines, users who did not consent).
    enabled: bool = True
    #: Where projects' credentials come from, read lazily so a producer that never sends needs
    #: none: only the ``OPENPANEL_*`` environment variables and ``openpanel*`` config entries,
    #: frozen, so that settings stay a small hashable value (caches key on them); secrets are
    #: kept as :class:`Secret`.
    _env: tuple[tuple[str, Any], ...] = field(default=(), repr=False)
    _conf: tuple[tuple[str, Any], ...] = field(default=(), repr=False)

    def queue_of(self, project: str) -> str:
        """The queue of ``project``'s events when no route names one: its own queue when it is
        in :attr:`project_queues`, else :attr:`queue`."""
        return f"{self.queue}.{project}" if project in self.project_queues else self.queue

    @property
    def queues(self) -> tuple[str, ...]:
        """Every queue the package's events go to by default: :attr:`queue` and the
        projects' own queues."""
        return (self.queue, *(f"{self.queue}.{name}" for name in self.project_queues))

    @property
    def max_countdown_s(self) -> float:
        """Longest countdown the project sets: half the visibility timeout, so an event that
        waits its turn on a worker is never redelivered to another meanwhile."""
        return self.visibility_timeout_s / 2

    @property
    def claim_ttl_s(self) -> float:
        """Longest time one attempt holds an event (``_ledger``): its inline wait for a token and
        both HTTP timeouts, plus a margin; a killed worker's claim runs out after that."""
        return self.max_inline_wait_s + self.connect_timeout_s + self.read_timeout_s + 5.0

    def project(self, name: str = "default") -> Project:
        """The named project's credentials; :class:`ConfigurationError` if it has none."""
        prefix = "OPENPANEL_" if name == "default" else f"OPENPANEL_{_env_name(name)}_"
        env = dict(self._env)
        conf = dict(self._conf)
        projects = conf.get("openpanel_projects") or ()
        if not isinstance(projects, tuple) or not all(
            isinstance(item, tuple) and isinstance(item[1], tuple) for item in projects
        ):
            raise ConfigurationError("openpanel_projects must be a dict of project dicts")
        entry = dict(dict(projects).get(name) or ())

        def get(key: str) -> Any:
            if key in entry:
                return entry[key]
            if name == "default":
                conf_key = f"openpanel_{key}"
                if conf.get(conf_key) is not None:
                    return conf[conf_key]
            return env.get(prefix + key.upper())

        client_id = get("client_id")
        secret = get("client_secret")
        where = f"{prefix}CLIENT_ID" if not entry else f"openpanel_projects[{name!r}]"
        if not client_id:
            raise ConfigurationError(
                f"project {name!r} has no client id: set {where} on the workers"
            )
        if not secret:
            raise ConfigurationError(
                f"project {name!r} has no client secret: set {prefix}CLIENT_SECRET on the "
                "workers (server-side requests always need it)"
            )
        api_url = str(get("api_url") or env.get("OPENPANEL_API_URL") or DEFAULT_API_URL)
        burst = get("rate_burst")
        return Project(
            name=name,
            client_id=str(client_id),
            client_secret=secret if isinstance(secret, Secret) else Secret(str(secret)),
            api_url=check_api_url(api_url, allow_insecure=self.allow_insecure_http),
            rate_limit=get("rate_limit") or None,
            rate_burst=None if burst in (None, "") else _as_int(f"{prefix}RATE_BURST", burst),
        )


def _freeze(key: str, value: Any) -> Any:
    """A hashable copy of a config value: dicts become sorted tuples of pairs, and the value of
    any key naming a secret becomes a :class:`Secret`, so no repr or ``asdict`` shows it."""
    if isinstance(value, str) and "secret" in key.lower():
        return Secret(value)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(str(k), v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(_freeze(key, v) for v in value)
    try:
        hash(value)
    except TypeError:
        raise ConfigurationError(
            f"{key} holds a {type(value).__name__}, which op-celery cannot use as a setting: "
            "give it a string, a number or a dict of those"
        ) from None
    return value


def _redis_url_of(broker_url: str) -> str | None:
    """The redis-py URL of a Redis broker URL (kombu's socket form differs), else None."""
    if broker_url.startswith(("redis://", "rediss://", "unix://")) or broker_url == EMBEDDED_URL:
        return broker_url
    if broker_url.startswith("redis+socket://"):
        return "unix://" + broker_url[len("redis+socket://") :]
    return None


def _env_name(project: str) -> str:
    return project.upper().replace("-", "_").replace(".", "_")


def redact_url(url: str) -> str:
    """``url`` with its credentials hidden, for every message, log line, stored error and status
    output: a password becomes ``***``, and so does a user name given without one (a token).

    Also for the forms that name several servers (the sentinels' ``;``-separated URLs, a
    cluster's comma-separated hosts) and for URLs that do not parse: only the text before the
    last ``@`` of each server part is touched, so no password can survive a parsing quirk.
    """
    return ";".join(_redact_one(part) for part in url.split(";"))


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    netloc, tail = (rest, "") if cut < 0 else (rest[:cut], rest[cut:])
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    hidden = f"{user}:***" if colon else "***"
    return f"{scheme}{sep}{hidden}@{hosts}{tail}"


def check_api_url(url: str, *, allow_insecure: bool) -> str:
    """Return the API URL without a trailing slash; refuse plain http to non-loopback hosts."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"OPENPANEL_API_URL must be an http(s) URL such as {DEFAULT_API_URL}, got "
            f"{redact_url(url)!r}"
        )
    if parts.scheme == "http" and not allow_insecure and not _is_loopback(parts.hostname):
        raise ConfigurationError(
            f"OPENPANEL_API_URL {redact_url(url)!r} is plain http to a non-loopback host, which "
            "would send the client secret in clear text: use https, or set "
            "OPENPANEL_ALLOW_INSECURE_HTTP=1"
        )
    return url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _as_int(name: str, value: object) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise ConfigurationError(f"{name} must be a whole number, got {value!r}") from None
    if number < 0:
        raise ConfigurationError(f"{name} must not be negative, got {value!r}")
    return number


def _as_float(name: str, value: object) -> float:
    try:
        number = float(str(value))
    except ValueError:
        raise ConfigurationError(f"{name} must be a number of seconds, got {value!r}") from None
    if not number >= 0:
        raise ConfigurationError(f"{name} must not be negative, got {value!r}")
    return number


def _default(value: object, default: object) -> object:
    return default if value in (None, "") else value


def _as_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigurationError(f"{name} must be true or false, got {value!r}")


#: What a project's name may be (``_checks.project``, which ``.delay()`` applies, says the same).
_PROJECT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _project_names(name: str, value: object) -> tuple[str, ...]:
    """A comma-separated list of project names (or a list of them), each checked once."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple | set | frozenset):
        raise ConfigurationError(f"{name} must be a list of project names, got {value!r}")
    names: list[str] = []
    for item in items:
        text = str(item).strip()
        if not text and isinstance(value, str):
            continue
        if not _PROJECT_NAME.fullmatch(text) or text == "default":
            raise ConfigurationError(
                f"{name}: {text!r} is not a named project (letters, digits, '_', '-' or '.', "
                "at most 64; the default project always uses the package's queue)"
            )
        if text not in names:
            names.append(text)
    return tuple(names)


def load_settings(
    conf: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Build the settings from ``env`` (default: ``os.environ``) and a Celery config mapping,
    whose lower-case keys override the environment variables of the same name."""
    env = dict(os.environ if env is None else env)
    conf = dict(conf or {})

    def get(name: str) -> Any:
        value = conf.get(name.lower())
        return env.get(name) if value is None else value

    broker_url, source = DEFAULT_BROKER_URL, "default"
    # A user's own app names its broker in its config (``broker_url``): the worker-side Redis
    # helpers default to it, as the package's app defaults to the environment.
    for name in ("OP_CELERY_BROKER_URL", "BROKER_URL", "CELERY_BROKER_URL", "REDIS_URL"):
        value = conf.get("broker_url") if name == "BROKER_URL" else get(name)
        if value:
            broker_url, source = str(value), name
            break
    redis_url = get("OP_CELERY_REDIS_URL") or _redis_url_of(broker_url)

    def number(name: str, default: float) -> float:
        value = get(name)
        return default if value in (None, "") else _as_float(name, value)

    def whole(name: str, default: int) -> int:
        value = get(name)
        return default if value in (None, "") else _as_int(name, value)

    settings = Settings(
        broker_url=broker_url,
        broker_url_source=source,
        broker_key_prefix=str(get("OP_CELERY_BROKER_KEY_PREFIX") or ""),
        redis_url=str(redis_url) if redis_url else None,
        redis_sentinel_master=str(
            get("OP_CELERY_REDIS_SENTINEL_MASTER") or DEFAULT_REDIS_SENTINEL_MASTER
        ),
        redis_sentinel_password=(
            Secret(str(get("OP_CELERY_REDIS_SENTINEL_PASSWORD")))
            if get("OP_CELERY_REDIS_SENTINEL_PASSWORD")
            else None
        ),
        queue=str(get("OP_CELERY_QUEUE") or DEFAULT_QUEUE),
        project_queues=_project_names(
            "OP_CELERY_PROJECT_QUEUES", get("OP_CELERY_PROJECT_QUEUES") or ()
        ),
        visibility_timeout_s=number("OP_CELERY_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT_S),
        connect_timeout_s=number("OP_CELERY_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT_S),
        read_timeout_s=number("OP_CELERY_READ_TIMEOUT", DEFAULT_READ_TIMEOUT_S),
        max_retries=whole("OP_CELERY_MAX_RETRIES", DEFAULT_MAX_RETRIES),
        retry_backoff_s=number("OP_CELERY_RETRY_BACKOFF", DEFAULT_RETRY_BACKOFF_S),
        retry_backoff_max_s=number("OP_CELERY_RETRY_BACKOFF_MAX", DEFAULT_RETRY_BACKOFF_MAX_S),
        profile_not_found_retries=whole(
            "OP_CELERY_PROFILE_NOT_FOUND_RETRIES", DEFAULT_PROFILE_NOT_FOUND_RETRIES
        ),
        allow_insecure_http=_as_bool(
            "OPENPANEL_ALLOW_INSECURE_HTTP",
            get("OPENPANEL_ALLOW_INSECURE_HTTP") or False,
        ),
        key_prefix=str(get("OP_CELERY_KEY_PREFIX") or DEFAULT_KEY_PREFIX),
        ledger_ttl_s=number("OP_CELERY_LEDGER_TTL", DEFAULT_LEDGER_TTL_S),
        publish_timeout_s=number("OP_CELERY_PUBLISH_TIMEOUT", DEFAULT_PUBLISH_TIMEOUT_S),
        on_publish_failure=str(
            get("OP_CELERY_ON_PUBLISH_FAILURE") or DEFAULT_ON_PUBLISH_FAILURE
        ).lower(),
        spool_dir=str(get("OP_CELERY_SPOOL_DIR") or ""),
        max_inline_wait_s=number("OP_CELERY_MAX_INLINE_WAIT", DEFAULT_MAX_INLINE_WAIT_S),
        rate_headroom_pct=number("OPENPANEL_RATE_HEADROOM", DEFAULT_RATE_HEADROOM_PCT),
        outbox=_as_bool("OP_CELERY_OUTBOX", _default(get("OP_CELERY_OUTBOX"), True)),
        outbox_grace_s=number("OP_CELERY_OUTBOX_GRACE", DEFAULT_OUTBOX_GRACE_S),
        drain=_as_bool("OP_CELERY_DRAIN", _default(get("OP_CELERY_DRAIN"), True)),
        enabled=_as_bool("OP_CELERY_ENABLED", _default(get("OP_CELERY_ENABLED"), True)),
        _env=tuple(
            sorted((k, _freeze(k, v)) for k, v in env.items() if k.startswith("OPENPANEL_"))
        ),
        _conf=tuple(
            sorted(
                (k, _freeze(k, v))
                for k, v in conf.items()
                if k.startswith("openpanel") and v is not None
            )
        ),
    )
    if settings.visibility_timeout_s < 10:
        raise ConfigurationError(
            "OP_CELERY_VISIBILITY_TIMEOUT must be at least 10 seconds, "
            f"got {settings.visibility_timeout_s:g}"
        )
    if settings.rate_headroom_pct >= 50:
        raise ConfigurationError(
            "OPENPANEL_RATE_HEADROOM is a percent below OPENPANEL_RATE_LIMIT, at most 50, got "
            f"{settings.rate_headroom_pct:g}"
        )
    if settings.on_publish_failure not in ("spool", "raise"):
        raise ConfigurationError(
            "OP_CELERY_ON_PUBLISH_FAILURE must be 'spool' (keep the event on disk and return) "
            f"or 'raise' (raise PublishError), got {settings.on_publish_failure!r}"
        )
    if settings.outbox_grace_s < 1:
        raise ConfigurationError(
            "OP_CELERY_OUTBOX_GRACE must be at least 1 second (how long an unfinished event "
            f"waits before the sweeper checks its message still exists), got "
            f"{settings.outbox_grace_s:g}"
        )
    if settings.ledger_ttl_s <= settings.visibility_timeout_s:
        raise ConfigurationError(
            f"OP_CELERY_LEDGER_TTL ({settings.ledger_ttl_s:g} s) must exceed "
            f"OP_CELERY_VISIBILITY_TIMEOUT ({settings.visibility_timeout_s:g} s), or a "
            "redelivered event would be sent twice"
        )
    return settings
