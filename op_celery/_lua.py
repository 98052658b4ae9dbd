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
from collections.abc import Sequence
from functools import cache
from importlib.resources import files
from typing import Any

import redis

__all__ = ["Script", "bulk", "encoded", "lua", "source"]


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
        about as much as the round trip itself. A stale pooled connection (after a Redis
        restart) or a script Redis lost falls back to the ordinary call, with redis-py's own
        retries and the script's reload. Raises what redis-py raises.
        """
        connection = pool.get_connection()
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
        finally:
            pool.release(connection)

    def packed_head(self, keys: int, args: int) -> bytes:
        """The start of an ``EVALSHA`` of this script with ``keys`` keys and ``args``
        arguments: follow it with the keys' and then the arguments' :func:`bulk` pieces."""
        return b"*%d\r\n%s%s%s" % (
            3 + keys + args,
            bulk(b"EVALSHA"),
            bulk(self.sha.encode()),
            bulk(b"%d" % keys),
        )


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
