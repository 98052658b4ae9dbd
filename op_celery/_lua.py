"""The package's Lua scripts (``op_celery/lua/*.lua``, each naming its KEYS and ARGV at the top),
and the one way they are run: :class:`Script`.

A script is loaded by its SHA once per client and each call is then one ``EVALSHA`` through
``execute_command``. That skips redis-py's ``Script.__call__`` argument handling, which costs
more than the rest of a ledger or outbox call (benchmarks/RESULTS.md), and it routes on a
Redis Cluster by the script's keys. Hot paths that pack the command bytes once (the limiter's
acquire) use :attr:`Script.sha` and :meth:`Script.load` of the same object, so the reload after
a Redis restart (``NOSCRIPT``) is the same everywhere.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections.abc import Sequence
from functools import cache
from importlib.resources import files
from typing import Any

import redis

__all__ = ["Script", "bulk", "encoded", "held_connection", "lua", "source"]


@cache
def lua(name: str) -> str:
    """The text of ``op_celery/lua/<name>``, read once per process."""
    return (files("op_celery") / "lua" / name).read_text(encoding="utf-8")


#: A line of a script that stands for the whole text of another (``--@include acquire.lua``).
INCLUDE = "--@include "


@cache
def source(name: str) -> str:
    """What Redis runs of ``op_celery/lua/<name>``: its text, each ``--@include`` line replaced
    by the included script's source (a script made of two operations, each kept in its own
    file)."""
    text = lua(name)
    if INCLUDE not in text:
        return text
    return "\n".join(
        source(line[len(INCLUDE) :].strip()) if line.startswith(INCLUDE) else line
        for line in text.splitlines()
    )


class Script:
    """``op_celery/lua/<name>`` on ``client``: call it with its keys and arguments."""

    def __init__(self, client: Any, name: str) -> None:
        self.name = name
        self.source = source(name)
        self.sha = hashlib.sha1(self.source.encode("utf-8"), usedforsecurity=False).hexdigest()
        self._client = client

    def __call__(self, keys: Sequence[Any], args: Sequence[Any] = (), client: Any = None) -> Any:
        """One ``EVALSHA`` on ``client`` (the script's own by default); if Redis lost the script
        (a restart, ``SCRIPT FLUSH``) it is loaded again and the call repeated once.

        Raises what redis-py raises; callers map that to the package's errors.
        """
        target = self._client if client is None else client
        try:
            return target.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            self.load(target)
            return target.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    def load(self, client: Any = None) -> None:
        """Load the script into ``client``'s Redis (the script's own client by default)."""
        (self._client if client is None else client).script_load(self.source)

    def call_packed(
        self, pool: Any, packed: bytes, keys: Sequence[Any], args: Sequence[Any] = ()
    ) -> Any:
        """The call ``packed`` (:meth:`packed_head` and :func:`bulk` pieces: the same as
        ``self(keys, args)``), sent as it is on a connection of ``pool`` (not a cluster's).

        For calls that run per event: redis-py's command building and response machinery cost
        about as much as the round trip itself, and so does taking a connection from the pool
        and giving it back (``held_connection``). A stale connection (after a Redis restart)
        or a script Redis lost falls back to the ordinary call, with redis-py's own retries and
        the script's reload. Raises what redis-py raises.
        """
        if type(pool) is redis.ConnectionPool and getattr(pool, "cache", None) is None:
            return self._exchange(held_connection(pool), packed, keys, args)
        # A Sentinel pool checks where the master is when it lends a connection, and a
        # client-side cache wraps each connection: only a plain pool's connection is held.
        connection = pool.get_connection()
        try:
            return self._exchange(connection, packed, keys, args)
        finally:
            pool.release(connection)

    def _exchange(
        self, connection: Any, packed: bytes, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        try:
            connection.send_packed_command([packed], check_health=False)  # a list of chunks
            return connection.read_response()
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.NoScriptError) as exc:
            if not isinstance(exc, redis.exceptions.NoScriptError):
                connection.disconnect()
            return self(keys, args)
        except redis.exceptions.ResponseError:
            raise  # Redis' own answer (a full Redis, a script error): the connection is fine
        except BaseException:
            connection.disconnect()  # interrupted mid-reply: its state is unknown
            raise

    def packed_head(self, keys: int, args: int) -> bytes:
        """The start of an ``EVALSHA`` of this script with ``keys`` keys and ``args``
        arguments: follow it with the keys' and then the arguments' :func:`bulk` pieces."""
        return b"*%d\r\n%s%s%s" % (
            3 + keys + args,
            bulk(b"EVALSHA"),
            bulk(self.sha.encode()),
            bulk(b"%d" % keys),
        )


class _Held(threading.local):
    """This thread's own connections, one per pool, made in this process (``_fork``)."""

    def __init__(self) -> None:
        self.generation = -1
        self.connections: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


_held = _Held()
#: Bumped in a forked child: the parent's connections are the parent's.
_generation = 0


def _fork() -> None:
    global _generation
    _generation += 1


os.register_at_fork(after_in_child=_fork)


def held_connection(pool: Any) -> Any:
    """This thread's own connection to ``pool``'s server, with the pool's settings but not
    taken from it, kept for the next call.

    Taking a pooled connection costs five system calls a time (redis-py checks the process id
    on taking and on giving back, and peeks at the socket for stray data, switching it to
    non-blocking and back), as many as the command's own exchange; a connection nobody else
    uses has no stray data, because every call that is cut short disconnects it
    (:meth:`Script.call_packed`). It connects on first use and again after a disconnect, and
    goes when its pool does.
    """
    if _held.generation != _generation:
        _held.connections = weakref.WeakKeyDictionary()
        _held.generation = _generation
    connection = _held.connections.get(pool)
    if connection is None:
        connection = _held.connections[pool] = pool.connection_class(**pool.connection_kwargs)
    return connection


def bulk(item: bytes) -> bytes:
    """``item`` as one RESP bulk string, as redis-py packs a command's argument."""
    return b"$%d\r\n%s\r\n" % (len(item), item)


def encoded(value: Any, encoding: str = "utf-8") -> bytes:
    """A command argument as redis-py encodes it: bytes as they are, text in ``encoding``,
    numbers as their decimal (``repr`` of a float)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode(encoding)
    if isinstance(value, float):
        return repr(value).encode()
    return b"%d" % value
