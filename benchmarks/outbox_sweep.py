"""What does one pass of the outbox sweeper cost the broker?

The sweeper (``_outbox_sweeper``) runs ``lua/outbox_sweep.lua`` when records are due: it reads
every message on the queue's lists and in kombu's ``unacked`` hash, inside Redis, so Redis does
nothing else meanwhile. This measures that pause against baselines in the same run, on a queue
of N real ``track`` messages (published by ``.delay()``, each with its record, all records due):

- ``EVALSHA return 1``: the floor of any script call;
- ``LRANGE in Lua``: a script that only reads the list, in chunks of 500 as the sweep script
  does (what any scan must do at least);
- ``LRANGE to the client``: reading the list out, as a sweeper in Python would have to;
- ``sweep pass``: one :meth:`Sweeper.sweep_queue`, lock and record bookkeeping included.

Each figure is the median of ``--rounds`` calls, interleaved; records are made due again before
each sweep pass (outside the timing). All keys go under a private prefix and are deleted.

    python benchmarks/outbox_sweep.py [--sizes 1000,5000,20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import redis
from _harness import (
    DEFAULT_REDIS_URL,
    Namespace,
    broker_env,
    describe_machine,
    median,
    redis_namespace,
)
from celery import Celery

import op_celery
from op_celery._app import reset_settings, settings_for
from op_celery._ledger import Ledger
from op_celery._outbox import outbox_keys
from op_celery._outbox_sweeper import Sweeper

#: The floor of any scan in Lua: read the list in chunks of 500, as the sweep script does.
READ_IN_CHUNKS = """
local n = 0
for start = 0, redis.call('LLEN', KEYS[1]) - 1, 500 do
  n = n + #redis.call('LRANGE', KEYS[1], start, start + 499)
end
return n
"""
PROPERTIES = {"plan": "pro", "path": "/checkout", "amount": 42.5, "items": ["a", "b"]}


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1e6


def measure(redis_url: str, namespace: Namespace, size: int, rounds: int) -> dict[str, float]:
    """Median µs of each contender on a queue of ``size`` messages, all records due."""
    queue = namespace.queue(f"sweep-{size}")
    os.environ.update(broker_env(namespace, queue))
    reset_settings()
    app = Celery("bench-sweep", set_as_current=True)
    app.conf.update(
        broker_url=redis_url,
        broker_transport_options={"global_keyprefix": namespace.prefix},
        op_celery_queue=queue,
        task_ignore_result=True,
    )
    for i in range(size):
        op_celery.track.delay(f"event-{i}", properties=PROPERTIES, profile_id=f"u{i}")
    settings = settings_for(app)
    sweeper = Sweeper(
        settings.outbox_grace_s,
        connect=app.connection_for_write,
        queues=lambda: [queue],
        republish=lambda *a: None,
        delivered=Ledger(settings).delivered,
    )
    client = redis.Redis.from_url(redis_url)
    list_key = namespace.prefix + queue
    _, due_key = outbox_keys(queue, namespace.prefix)
    members = client.zrange(due_key, 0, -1)
    assert client.llen(list_key) == size == len(members)
    ping = client.script_load("return 1")
    read = client.script_load(READ_IN_CHUNKS)
    figures: dict[str, list[float]] = {}
    with app.connection_for_write() as connection:

        def one_pass() -> None:
            result = sweeper.sweep_queue(connection, queue)
            assert result.swept and result.lost == 0, result

        contenders: dict[str, Callable[[], object]] = {
            "EVALSHA return 1": lambda: client.execute_command("EVALSHA", ping, 0),
            "LRANGE in Lua": lambda: client.execute_command("EVALSHA", read, 1, list_key),
            "LRANGE to the client": lambda: client.lrange(list_key, 0, -1),
            "sweep pass": one_pass,
        }
        for _ in range(rounds):
            client.zadd(due_key, dict.fromkeys(members, 0))
            for name, call in contenders.items():
                figures.setdefault(name, []).append(timed(call))
    client.close()
    app.close()
    return {name: median(values) for name, values in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,20000")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    args = parser.parse_args()
    print(describe_machine())
    print(f"{'messages':>9} | {'contender':<22} | {'median µs':>10} | {'µs per message':>14}")
    with redis_namespace(args.redis_url) as namespace:
        for size in (int(x) for x in args.sizes.split(",")):
            for name, value in measure(args.redis_url, namespace, size, args.rounds).items():
                print(f"{size:>9,} | {name:<22} | {value:>10,.0f} | {value / size:>14.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
