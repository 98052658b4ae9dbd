"""The package's Redis (ledger, dead letters, limiter) on every deployment redis-py supports, and
the one mapping of its errors.

``OP_CELERY_REDIS_URL`` names the deployment by its scheme:

- standalone: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS),
  ``unix:///path/to/redis.sock[?db=N]``, through ``redis.Redis``;
- Redis Cluster: ``redis+cluster://[[user]:password@]host:port[,host:port...]`` (or
  ``rediss+cluster://`` for TLS), any of the nodes as seeds, through
  ``redis.cluster.RedisCluster``, which finds the rest and follows slot moves and failovers;
- Sentinel: ``sentinel://[[user]:password@]host:port[;sentinel://host:port...][/db]``, as
  kombu spells it for brokers: the sentinels to ask, the master's service name from
  ``OP_CELERY_REDIS_SENTINEL_MASTER`` (default ``mymaster``), the URL's password the master's
  (``OP_CELERY_REDIS_SENTINEL_PASSWORD`` the sentinels', if they have one), ``?ssl=true`` (and
  redis-py's ``ssl_*`` options) for TLS to both; through ``redis.sentinel.Sentinel.master_for``,
  whose connections ask the sentinels for the master again after a failover.

Every Lua script of the package touches the keys of one hash slot (a project's limiter keys
share the tag ``{client id}``, an event's ledger keys the tag ``{event id}``), so each runs on a
cluster. While a master fails over, commands fail for a few seconds: redis-py's errors become
:class:`StorageUnavailable` here, which the tasks take as "retry shortly", never "give up".

A Redis can also answer and still refuse every write (:data:`WRITE_REFUSALS`): at
``maxmemory`` under the ``noeviction`` policy (``OOM``), or a read-only replica (``READONLY``).
That lasts until someone acts (memory freed, the replica promoted), so it is said once per
process and Redis (:class:`RefusalNotice`), with what to do, and once more when writes are
taken again; meanwhile each write becomes a :class:`StorageUnavailable` as above, and the
event waits on the broker, never dead-lettered for it.

One client per deployment and process: redis-py's pools notice a ``fork()`` and reconnect, and
their connections are safe to share between the threads of a thread-pool worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote, unquote

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import parse_url
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from ._embedded import embedded_redis
from ._exceptions import ConfigurationError, StorageUnavailable
from ._settings import EMBEDDED_URL, Settings, redact_url

__all__ = [
    "FULL",
    "READ_ONLY",
    "WRITE_REFUSALS",
    "Deployment",
    "RefusalNotice",
    "behind_sentinel",
    "deployment_of",
    "is_cluster",
    "note_refusal",
    "redact",
    "redact_url",
    "redis_for",
    "refusal_message",
    "refusal_notice",
    "storage_errors",
    "write_refusal",
]
# redact_url lives in _settings; it is re-exported here, where the Redis URLs are.

log = logging.getLogger("op_celery")

#: Seconds to wait for Redis before calling it unavailable; short, so a task fails fast to retry.
REDIS_TIMEOUT_S = 5.0
#: Seconds a pooled connection may sit idle before it is checked with a PING on its next use.
HEALTH_CHECK_INTERVAL_S = 30
#: Times a cluster client asks again after a node went away or a slot moved, before it raises
#: (redis-py waits a short exponential backoff between them): enough to ride a replica's
#: promotion of a few seconds, few enough that a task gives its slot back soon to retry.
CLUSTER_ERROR_RETRY_ATTEMPTS = 3
#: Seconds between two questions of a Sentinel client to the sentinels: which server is master
#: now? After a failover, connections still open to the old master are closed within this, so
#: writes stop going to a server that will drop them once it is made a replica.
MASTER_CHECK_INTERVAL_S = 1.0
#: Seconds a Sentinel client waits before asking a sentinel that failed once more, at most.
SENTINEL_RETRY_BACKOFF_S = 0.05
#: Port of a host named without one: Redis's and Sentinel's defaults.
DEFAULT_REDIS_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

_STANDALONE = ("redis", "rediss", "unix")
_CLUSTER = ("redis+cluster", "rediss+cluster")
_SENTINEL = ("sentinel",)
_FORMS = (
    "redis://host:6379/0, rediss://host:6380/0, unix:///path/redis.sock?db=0 (one server); "
    "redis+cluster://host1:6379,host2:6379 or rediss+cluster://... (Redis Cluster); "
    "sentinel://host1:26379;sentinel://host2:26379 with OP_CELERY_REDIS_SENTINEL_MASTER "
    "(Sentinel)"
)

#: A cluster's refusals of a command whose keys live in two slots: a bug, not an outage.
_CROSS_SLOT = (
    redis.exceptions.ClusterCrossSlotError,
    redis.exceptions.CrossSlotTransactionError,
)


#: Redis' refusals of a write that last until someone acts, not until a reconnection: memory at
#: ``maxmemory`` under the ``noeviction`` policy, and a read-only replica. Reads still work.
#: Both are ``ResponseError``s, which kombu files as channel errors and Celery's consumer takes
#: for unrecoverable (the worker exits); the consumer step waits them out (``_consumer``).
WRITE_REFUSALS: tuple[type[redis.RedisError], ...] = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
)
#: Seconds without a refusal before a write taken says the Redis takes writes again: at the
#: edge of maxmemory writes pass and fail by turns, which is one episode, said once.
REFUSAL_SETTLE_S = 5.0
#: What a Redis that refuses writes is, as :func:`write_refusal` says it.
FULL = "full"
READ_ONLY = "read-only"
#: What to do about each, for the log line.
_ADVICE = {
    FULL: "its memory is at maxmemory and its policy is noeviction: free memory, raise "
    "maxmemory, or give it an evicting policy for keys other than the broker's",
    READ_ONLY: "it is a read-only replica: point the URL at the master, or promote this server",
}
#: Errors followed through ``__cause__``/``__context__`` looking for a refusal (kombu wraps).
_MAX_CAUSES = 5


def write_refusal(exc: BaseException | None) -> str | None:
    """:data:`FULL` or :data:`READ_ONLY` when ``exc`` is Redis refusing a write, or wraps one
    (kombu's ``OperationalError``, our ``StorageUnavailable``); else None."""
    for _ in range(_MAX_CAUSES):
        if exc is None:
            return None
        if isinstance(exc, redis.exceptions.OutOfMemoryError):
            return FULL
        if isinstance(exc, redis.exceptions.ReadOnlyError):
            return READ_ONLY
        exc = exc.__cause__ or exc.__context__
    return None


class RefusalNotice:
    """One log line when a Redis starts refusing writes, one when it takes them again.

    A full Redis refuses every write of every event; a line per refusal would bury the one
    that says what to do. ``subject`` names the Redis ("the broker's Redis"), ``meanwhile``
    what the package does until it takes writes again.
    """

    def __init__(self, subject: str, meanwhile: str) -> None:
        self.subject = subject
        self.meanwhile = meanwhile
        self.state: str | None = None
        self._refused_at = 0.0
        self._lock = threading.Lock()

    def refused(self, state: str, where: str) -> None:
        """The Redis at ``where`` (a redacted URL) refused a write for being ``state``."""
        self._refused_at = time.monotonic()
        with self._lock:
            if self.state == state:
                return
            self.state = state
        log.warning("op_celery: %s %s is %s (%s); %s", self.subject, where, state,
                    _ADVICE.get(state, "it refuses writes"), self.meanwhile)  # fmt: skip

    def accepted(self, where: str, *, settled: bool = False) -> None:
        """The Redis at ``where`` took a write: say so if it had refused one, once no write
        was refused for :data:`REFUSAL_SETTLE_S` (or at once, if the caller knows it is
        ``settled``)."""
        if self.state is None:  # the usual case, without the lock
            return
        if not settled and time.monotonic() - self._refused_at < REFUSAL_SETTLE_S:
            return  # at the edge of maxmemory, writes pass and fail by turns: not over yet
        with self._lock:
            if self.state is None:
                return
            state, self.state = self.state, None
        log.warning("op_celery: %s %s takes writes again (it was %s)", self.subject, where, state)


_notices: dict[str, RefusalNotice] = {}
_notices_lock = threading.Lock()


def refusal_notice(subject: str, meanwhile: str) -> RefusalNotice:
    """The process's one notice for ``subject`` (made with the first ``meanwhile`` given)."""
    notice = _notices.get(subject)
    if notice is None:
        with _notices_lock:
            notice = _notices.setdefault(subject, RefusalNotice(subject, meanwhile))
    return notice


_clients: dict[tuple[Any, ...], Any] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class Deployment:
    """What an ``OP_CELERY_REDIS_URL`` names: its kind, its nodes and the connection options."""

    #: "standalone", "cluster" or "sentinel".
    kind: str
    #: The cluster's seed nodes or the sentinels, as (host, port); empty for standalone.
    nodes: tuple[tuple[str, int], ...] = ()
    #: The database of a standalone or Sentinel-managed server (a cluster has only 0).
    db: int = 0
    #: The rest of the connection options redis-py reads from a URL (password, TLS ...).
    options: tuple[tuple[str, Any], ...] = ()


def redis_for(settings: Settings) -> redis.Redis:
    """The client for ``settings.redis_url`` (``OP_CELERY_REDIS_URL``, else a Redis broker).

    A :class:`redis.cluster.RedisCluster` for a cluster URL: it answers the same commands as
    ``redis.Redis`` (the return type says ``redis.Redis`` so that callers typed against it keep
    checking), but it has no ``connection_pool``; code that reaches for one must check
    :func:`is_cluster` first. Raises :class:`ConfigurationError` for a URL that is none of the
    forms above, saying what to write instead, and :class:`StorageUnavailable` when a cluster
    cannot be reached to learn its slots (the only client that connects when it is made).
    """
    url = settings.redis_url
    if url is None:
        raise ConfigurationError(
            "op-celery needs a Redis for its ledger, dead letters and limiter: set "
            "OP_CELERY_REDIS_URL (the broker is not Redis)"
        )
    cache_key = (url, settings.redis_sentinel_master, settings.redis_sentinel_password)
    client = _clients.get(cache_key)
    if client is None:
        with _lock:
            client = _clients.get(cache_key)
            if client is None:
                # A cluster client connects when it is made (to learn the slots): a cluster not
                # reachable yet is a Redis away, to retry, and no client is kept.
                with storage_errors("connecting to the Redis Cluster", url):
                    client = _connect(settings)
                _clients[cache_key] = client
    return cast("redis.Redis", client)


def behind_sentinel(settings: Settings) -> bool:
    """Whether the package's Redis is found through Sentinel (``sentinel://``)."""
    url = settings.redis_url
    return url not in (None, EMBEDDED_URL) and deployment_of(str(url)).kind == "sentinel"


def is_cluster(client: object) -> bool:
    """Whether ``client`` is a Redis Cluster client (no ``connection_pool``, keys by slot)."""
    return isinstance(client, RedisCluster)


def _connect(settings: Settings) -> Any:
    url = cast("str", settings.redis_url)
    options: dict[str, Any] = {
        "socket_timeout": REDIS_TIMEOUT_S,
        "socket_connect_timeout": REDIS_TIMEOUT_S,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
    }
    if url == EMBEDDED_URL:
        return redis.Redis(unix_socket_path=embedded_redis(), **options)
    deployment = deployment_of(url)
    if deployment.kind == "standalone":
        return redis.Redis.from_url(url, **options)
    options.update(deployment.options)
    if deployment.kind == "cluster":
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in deployment.nodes],  # type: ignore[no-untyped-call]
            retry=Retry(ExponentialWithJitterBackoff(), CLUSTER_ERROR_RETRY_ATTEMPTS),
            **options,
        )
    sentinel_options = {
        key: value
        for key, value in options.items()
        if key not in ("username", "password", "db", "health_check_interval")
    }
    if settings.redis_sentinel_password is not None:
        sentinel_options["password"] = settings.redis_sentinel_password.reveal()
    # One quick retry per sentinel: discovery asks the next one anyway, and redis-py's default
    # (backoff up to seconds, a refused password retried too) held a call 20 s for 3 sentinels.
    sentinel_options["retry"] = Retry(
        ExponentialWithJitterBackoff(SENTINEL_RETRY_BACKOFF_S, SENTINEL_RETRY_BACKOFF_S), 1
    )
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(deployment.nodes), sentinel_kwargs=sentinel_options, db=deployment.db, **options
    )
    return sentinel.master_for(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master, connection_pool_class=_FollowingPool
    )


class _FollowingPool(SentinelConnectionPool):
    """redis-py's Sentinel pool, which asks the sentinels for the master only when it opens a
    connection, so after a failover that left the old master running (``SENTINEL FAILOVER``, a
    partition) its open connections keep writing there until the sentinels demote it, seconds
    later, and those writes are dropped. This one asks every :data:`MASTER_CHECK_INTERVAL_S`
    and closes connections to a server that is no longer the master (redis-py then closes the
    idle ones itself)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._next_check = 0.0

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + MASTER_CHECK_INTERVAL_S
            with suppress(redis.RedisError):  # no sentinel answered: keep the connections
                self.get_master_address()  # type: ignore[no-untyped-call]
        connection = super().get_connection(*args, **kwargs)
        address = self.master_address
        if address is not None and (connection.host, connection.port) != tuple(address):
            connection.disconnect()  # type: ignore[no-untyped-call]  # reconnects at next use
        return connection


def deployment_of(url: str) -> Deployment:
    """Parse ``url`` into a :class:`Deployment`; :class:`ConfigurationError` if it is none of
    the accepted forms, with the forms that are."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise _malformed(url, "it has no scheme")
    if scheme in _STANDALONE:
        if scheme != "unix" and "," in rest.split("/", 1)[0]:
            raise _malformed(url, "a redis:// URL names one server; for a cluster write "
                                  f"{scheme}+cluster://host1:port,host2:port")  # fmt: skip
        _check_parses(url, url)
        return Deployment("standalone")
    if scheme in _CLUSTER:
        return _cluster(url, scheme, rest)
    if scheme in _SENTINEL:
        return _sentinel(url)
    hint = ""
    if "cluster" in scheme:
        hint = "; a cluster is redis+cluster:// or rediss+cluster://"
    elif "sentinel" in scheme:
        hint = "; Sentinel is sentinel://host:26379;sentinel://host2:26379"
    raise _malformed(url, f"op-celery does not know the scheme {scheme}://{hint}")


def _cluster(url: str, scheme: str, rest: str) -> Deployment:
    netloc, path, query = _split(rest)
    userinfo, at, hosts = netloc.rpartition("@")
    nodes = tuple(_node(url, item, DEFAULT_REDIS_PORT) for item in hosts.split(","))
    if path not in ("", "/", "/0"):
        raise _malformed(url, "a Redis Cluster has only database 0: drop the /db path")
    base = "rediss" if scheme.startswith("rediss") else "redis"
    single = f"{base}://{userinfo}{at}{_netloc(nodes[0])}/0{query}"
    options = _check_parses(url, single)
    if options.get("db", 0) != 0:
        raise _malformed(url, "a Redis Cluster has only database 0: drop the db option")
    for key in ("host", "port", "db", "path"):
        options.pop(key, None)
    # The cluster client builds a redis.Redis per node, which takes ssl=True, not a class.
    if options.pop("connection_class", None) is redis.SSLConnection:
        options["ssl"] = True
    return Deployment("cluster", nodes, 0, tuple(sorted(options.items())))


def _sentinel(url: str) -> Deployment:
    parts = url.split(";")
    nodes: list[tuple[str, int]] = []
    userinfo, path, query = "", "", ""
    for part in parts:
        scheme, _, rest = part.strip().partition("://")
        if scheme.lower() != "sentinel":
            raise _malformed(url, "each sentinel is written sentinel://host:port, separated by ;")
        netloc, part_path, part_query = _split(rest)
        info, at, hostport = netloc.rpartition("@")
        if "," in hostport:
            raise _malformed(url, "sentinels are separated by ';sentinel://', not by commas")
        nodes.append(_node(url, hostport, DEFAULT_SENTINEL_PORT))
        userinfo = userinfo or (info + at)
        path = path or part_path
        query = query or part_query
    db_text = path.strip("/") or "0"
    if not db_text.isdigit():
        raise _malformed(url, f"the path names the database, a number, not {db_text!r}")
    single = f"redis://{userinfo}{_netloc(nodes[0])}/{db_text}{query}"
    options = _check_parses(url, single)
    # ssl=True, not an SSL connection class: the pool's connections must stay the
    # Sentinel-managed kind (that asks the sentinels again after a failover), over TLS.
    if str(options.pop("ssl", "")).lower() in ("1", "true", "yes", "on"):
        options["ssl"] = True
    db = int(options.pop("db", db_text))
    for key in ("host", "port", "path"):
        options.pop(key, None)
    return Deployment("sentinel", tuple(nodes), db, tuple(sorted(options.items())))


def _split(rest: str) -> tuple[str, str, str]:
    """(netloc, path, "?query") of what follows ``scheme://``."""
    rest, mark, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    return netloc, slash + path, mark + query


def _node(url: str, text: str, default_port: int) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, tail = text[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise _malformed(url, f"{text!r} names no host")
    if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise _malformed(url, f"{port_text!r} is not a port")
    return unquote(host), int(port_text) if port_text else default_port


def _netloc(node: tuple[str, int]) -> str:
    host, port = node
    return f"[{host}]:{port}" if ":" in host else f"{quote(host, safe='.-_')}:{port}"


def _check_parses(url: str, single: str) -> dict[str, Any]:
    try:
        return dict(parse_url(single))  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise _malformed(url, str(exc)) from None


def redact(url: str) -> str:
    """``url`` with every password hidden: :func:`op_celery._settings.redact_url`, which also
    reads the several-server forms."""
    return redact_url(url)


def _malformed(url: str, why: str) -> ConfigurationError:
    return ConfigurationError(
        f"OP_CELERY_REDIS_URL {redact(url)!r} is not a Redis URL op-celery can use: {why}. "
        f"Write one of: {_FORMS}"
    )


@contextmanager
def storage_errors(what: str, url: str | None, *, writes: bool = True) -> Iterator[None]:
    """Turn redis-py's errors into :class:`StorageUnavailable`, never showing a password.

    Includes a cluster client's own errors (``RedisClusterException``: no node answered, a slot
    not covered while a master fails over), which are not ``RedisError``. A refused write
    (:data:`WRITE_REFUSALS`) is said once (:class:`RefusalNotice`); a block that ``writes``
    and succeeds says, once, that writes are taken again.
    """
    notice = _storage_notice()
    try:
        yield
    except WRITE_REFUSALS as exc:
        where = redact(url) if url else "Redis"
        state = note_refusal(exc, where) or FULL
        raise StorageUnavailable(refusal_message(what, where, state, exc)) from exc
    except _CROSS_SLOT as exc:
        where = redact(url) if url else "Redis"
        raise StorageUnavailable(
            f"{what}: the Redis Cluster {where} refused keys of two hash slots in one command "
            f"({type(exc).__name__}); the event will be retried. Until op-celery keeps these "
            "keys in one slot, set OP_CELERY_KEY_PREFIX to a hash tag such as '{op-celery}' "
            "(all keys then live on one node)"
        ) from exc
    except (redis.RedisError, RedisClusterException) as exc:
        where = redact(url) if url else "Redis"
        raise StorageUnavailable(
            f"{what}: {where} did not answer ({type(exc).__name__}); the event will be retried. "
            "Check that Redis runs and OP_CELERY_REDIS_URL is right"
        ) from exc
    else:
        if writes and notice.state is not None:
            notice.accepted(redact(url) if url else "Redis")


#: What the workers do while the package's Redis refuses writes.
_STORAGE_MEANWHILE = (
    "events wait on the broker and are retried (none is dead-lettered for it) until it takes "
    "writes again"
)


def _storage_notice() -> RefusalNotice:
    return refusal_notice("the package's Redis", _STORAGE_MEANWHILE)


def note_refusal(exc: BaseException, where: str) -> str | None:
    """If ``exc`` is the package's Redis at ``where`` refusing a write: say so once
    (:class:`RefusalNotice`) and return what it is (:data:`FULL`, :data:`READ_ONLY`)."""
    state = write_refusal(exc)
    if state is not None:
        _storage_notice().refused(state, where)
    return state


def refusal_message(what: str, where: str, state: str, exc: BaseException) -> str:
    """The text of the error a refused write of the package's Redis becomes."""
    return (
        f"{what}: {where} is {state} ({type(exc).__name__}); the event will be retried until "
        f"it takes writes again: {_ADVICE.get(state, 'it refuses writes')}"
    )
