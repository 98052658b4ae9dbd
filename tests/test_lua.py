"""The one way the package runs its Lua scripts: one EVALSHA, reloaded after Redis lost it."""

from __future__ import annotations

import hashlib
import os
import threading
from importlib.resources import files

import pytest
import redis

from op_celery._lua import Script, bulk, encoded, held_connection, lua

from ._support import RedisServer, start_redis


def test_every_script_names_its_keys_and_arguments_at_the_top() -> None:
    for path in (files("op_celery") / "lua").iterdir():
        head = path.read_text(encoding="utf-8").splitlines()[:30]
        assert any("KEYS" in line for line in head if line.startswith("--")), path.name
        assert lua(path.name) == path.read_text(encoding="utf-8")


def test_a_script_runs_by_its_sha_and_loads_itself_again_after_a_flush() -> None:
    with start_redis(lambda port: RedisServer(port)) as server:
        client = redis.Redis.from_url(server.url)
        script = Script(client, "release.lua")
        assert script.sha == hashlib.sha1(lua("release.lua").encode()).hexdigest()
        client.set("inflight:e1", "token-1")
        assert script(("inflight:e1",), ("token-1",)) is not None
        assert client.get("inflight:e1") is None
        client.script_flush()  # as after a restart without persistence
        client.set("inflight:e1", "token-1")
        script(("inflight:e1",), ("token-1",))
        assert client.get("inflight:e1") is None
        assert client.script_exists(script.sha) == [True]


def test_a_script_raises_what_redis_raises_when_redis_is_gone() -> None:
    with start_redis(lambda port: RedisServer(port)) as server:
        client = redis.Redis.from_url(server.url, socket_connect_timeout=0.5)
        script = Script(client, "release.lua")
    with pytest.raises(redis.ConnectionError):
        script(("inflight:e1",), ("token-1",))


def test_a_packed_call_answers_as_the_ordinary_call_and_loads_the_script_after_a_flush() -> None:
    with start_redis(lambda port: RedisServer(port)) as server:
        client = redis.Redis.from_url(server.url)
        script = Script(client, "release.lua")
        keys, args = ("inflight:e1",), ("token-1",)
        packed = script.packed_head(1, 1) + bulk(encoded(keys[0])) + bulk(encoded(args[0]))
        assert packed == b"".join(client.connection_pool.get_connection().pack_command(
            "EVALSHA", script.sha, 1, *keys, *args))  # fmt: skip
        client.script_flush()  # the first packed call meets NOSCRIPT, falls back and loads it
        for _ in range(2):
            client.set("inflight:e1", "token-1")
            assert script.call_packed(client.connection_pool, packed, keys, args) == 1
            assert client.get("inflight:e1") is None
        client.close()


def test_a_packed_call_holds_one_connection_per_thread_and_process_and_survives_a_restart(
    redis_url: str,
) -> None:
    pool = redis.Redis.from_url(redis_url).connection_pool
    held = held_connection(pool)
    assert held_connection(pool) is held  # kept for the next call
    others: list[object] = []
    thread = threading.Thread(target=lambda: others.append(held_connection(pool)))
    thread.start()
    thread.join()
    assert others[0] is not held  # a thread of its own
    child = os.fork()
    if child == 0:  # the parent's socket is the parent's: a child makes its own
        os._exit(0 if held_connection(pool) is not held else 1)
    assert os.waitpid(child, 0)[1] == 0
    assert held_connection(pool) is held
    with start_redis(lambda port: RedisServer(port)) as server:
        client = redis.Redis.from_url(server.url)
        script = Script(client, "release.lua")
        keys, args = ("inflight:e1",), ("token-1",)
        packed = script.packed_head(1, 1) + bulk(encoded(keys[0])) + bulk(encoded(args[0]))
        client.set("inflight:e1", "token-1")
        assert script.call_packed(client.connection_pool, packed, keys, args) == 1
        client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        client.set("inflight:e1", "token-1")  # the held connection is dead: the call goes on
        assert script.call_packed(client.connection_pool, packed, keys, args) == 1
        assert client.get("inflight:e1") is None
        client.close()
