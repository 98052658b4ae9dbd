"""A Redis that answers but refuses writes, with real processes: full (``maxmemory`` under
``noeviction``: OOM) or a read-only replica (READONLY), for the broker and the package's Redis
at once (the default: they are one server).

Each test runs its own ``redis-server`` (the shared one is never filled), a real ``celery
worker`` and the stand-in; it asserts that the worker stays alive, says so in a few lines (not
one per event), and that every event is delivered once Redis takes writes again, none
dead-lettered. Figures are printed as ``FULL <name>: ...``.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

import op_celery
from op_celery import _drain
from op_celery._app import reset_settings
from op_celery._exceptions import StorageUnavailable
from op_celery._ledger import Ledger
from op_celery._redis import (
    FULL,
    READ_ONLY,
    RefusalNotice,
    write_refusal,
)
from op_celery._settings import load_settings
from op_celery.dead_letters import DeadLetterStore
from op_celery.testing import StandInServer

from ._support import RedisServer, WorkerProcess, free_port, start_redis, wait_until, worker_env

#: The private Redis's memory limit: room for a worker's connections and a few hundred events.
MAXMEMORY = "8mb"
#: Bytes under the memory a fill reached that ``maxmemory`` is then set to, so that a client's
#: buffers shrinking does not let writes through again by chance.
FULL_MARGIN_BYTES = 300_000
#: Events enqueued before and while Redis refuses writes.
SENT = 200
#: Seconds the API takes per event: the worker has a backlog when Redis fills.
API_LATENCY_S = 0.05
#: Worker threads: an event delivered in the instant Redis filled, whose delivered mark was
#: refused, is sent once more (the documented case): at most one per thread.
CONCURRENCY = 4
#: Seconds a test waits for what a worker does, generously (never a measure of speed).
WAIT_S = 90.0
#: Seconds Redis stays full or read-only while the worker meets it.
REFUSING_S = 6.0


#: The package's own lines about a Redis that refuses writes (the events' retry lines, Celery's,
#: quote the error too, and are not counted).
REFUSAL_LINE = re.compile(
    r"op_celery: the (?:broker's|package's) Redis \S+ is (?:full|read-only) \("
)
AGAIN_LINE = re.compile(r"op_celery: the (?:broker's|package's) Redis \S+ takes writes again")


def unique(stand_in: StandInServer) -> int:
    return len({r.payload["name"] for r in stand_in.received})


def report(name: str, **figures: object) -> None:
    print(f"\nFULL {name}: " + ", ".join(f"{key}={value}" for key, value in figures.items()))


def fill(client: redis.Redis) -> None:
    """Write big keys until Redis refuses one (OOM), then set ``maxmemory`` a little under
    what it holds, so that every write is refused until the keys go."""
    index = 0
    for size in (64_000, 4_000, 200):
        while True:
            try:
                client.set(f"filler:{index}", b"x" * size)
            except redis.exceptions.OutOfMemoryError:
                break
            index += 1
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used - FULL_MARGIN_BYTES)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("probe", "1")


def free(client: redis.Redis) -> None:
    keys = list(client.scan_iter(match="filler:*", count=1000))
    client.delete(*keys)


@pytest.fixture
def small_redis() -> Iterator[RedisServer]:
    def make(port: int) -> RedisServer:
        return RedisServer(port, extra_args=["--maxmemory", MAXMEMORY,
                                             "--maxmemory-policy", "noeviction"])  # fmt: skip

    server = start_redis(make)
    yield server
    server.stop()


@pytest.fixture
def setup(
    small_redis: RedisServer, stand_in: StandInServer, tmp_path: Path
) -> Iterator[tuple[dict[str, str], redis.Redis]]:
    """The worker's environment on the private Redis, and a user's app publishing there
    (made current), each with its own spool."""
    env = worker_env(stand_in.url, small_redis.url, "")
    env.update(
        OP_CELERY_SPOOL_DIR=str(tmp_path / "worker-spool"),
        OP_CELERY_VISIBILITY_TIMEOUT="10",
        OP_CELERY_OUTBOX_GRACE="2",
        CONCURRENCY=str(CONCURRENCY),
    )
    app = Celery("full-redis", set_as_current=True)
    app.conf.update(
        broker_url=small_redis.url,
        op_celery_queue=env["OP_CELERY_QUEUE"],
        op_celery_spool_dir=str(tmp_path / "app-spool"),
        op_celery_outbox_grace="2",
        task_ignore_result=True,
    )
    client = redis.Redis.from_url(small_redis.url)
    yield env, client
    app.close()
    reset_settings()


def enqueue(first: int, count: int) -> None:
    for i in range(first, first + count):
        op_celery.track.delay(f"full-{i}")


def outcome(stand_in: StandInServer, env: dict[str, str], worker: WorkerProcess) -> dict[str, int]:
    names = Counter(r.payload["name"] for r in stand_in.received)
    log = worker.log
    return {
        "worker_alive": int(worker.process is not None and worker.process.poll() is None),
        "delivered_unique": len(names),
        "duplicates": sum(count - 1 for count in names.values()),
        "dead_letters": len(DeadLetterStore(load_settings(env=env))),
        "refusal_lines": len(REFUSAL_LINE.findall(log)),
        "again_lines": len(AGAIN_LINE.findall(log)),
        "unrecoverable": log.count("Unrecoverable error"),
    }


def assert_survived(figures: dict[str, int], worker: WorkerProcess, sent: int) -> None:
    assert figures["worker_alive"] == 1, worker.log[-3000:]
    assert figures["unrecoverable"] == 0
    assert figures["delivered_unique"] == sent
    assert figures["dead_letters"] == 0
    # Said once for the broker and once for the package's Redis (the same server here), with
    # room for one episode more at the edge; never a line per event.
    assert 1 <= figures["refusal_lines"] <= 4
    assert figures["again_lines"] >= 1
    assert figures["duplicates"] <= CONCURRENCY


def test_a_worker_started_against_a_full_redis_waits_and_delivers_every_event_once_freed(
    setup: tuple[dict[str, str], redis.Redis], stand_in: StandInServer
) -> None:
    env, client = setup
    enqueue(0, SENT)
    fill(client)
    worker = WorkerProcess(dict(env))
    try:
        worker.start(ready=False)
        assert wait_until(lambda: "is full (" in worker.log, timeout=WAIT_S), worker.log
        wait_until(lambda: worker.process is not None and worker.process.poll() is not None,
                   timeout=REFUSING_S)  # fmt: skip
        assert worker.process is not None and worker.process.poll() is None, worker.log
        assert len(stand_in.received) == 0  # it took no message while Redis was full
        free(client)
        assert wait_until(lambda: unique(stand_in) >= SENT, timeout=WAIT_S), worker.log[-3000:]
        figures = outcome(stand_in, env, worker)
    finally:
        worker.stop()
    report("start-full", sent=SENT, **figures)
    assert_survived(figures, worker, SENT)
    assert figures["duplicates"] == 0  # nothing was delivered in the instant it filled


@pytest.mark.parametrize("refusal", [FULL, READ_ONLY])
def test_a_worker_whose_redis_refuses_writes_mid_run_stays_alive_and_delivers_all_after(
    setup: tuple[dict[str, str], redis.Redis], stand_in: StandInServer, refusal: str
) -> None:
    env, client = setup
    stand_in.set_latency(API_LATENCY_S)
    worker = WorkerProcess(dict(env))
    try:
        worker.start()
        enqueue(0, SENT)
        assert stand_in.wait_for(SENT // 5, timeout=WAIT_S)
        if refusal == FULL:
            fill(client)
        else:  # a replica of a master that does not answer: writes answer READONLY
            client.replicaof("127.0.0.1", free_port())
        # .delay() meets the refusal too: these go to the app's spool, then to the broker.
        enqueue(SENT, SENT)
        wait_until(lambda: worker.process is not None and worker.process.poll() is not None,
                   timeout=REFUSING_S)  # fmt: skip
        assert worker.process is not None and worker.process.poll() is None, worker.log
        held = len(stand_in.received)
        if refusal == FULL:
            free(client)
        else:
            client.replicaof("NO", "ONE")
        # An event popped in the instant Redis filled comes back from the outbox.
        assert wait_until(lambda: unique(stand_in) >= 2 * SENT, timeout=WAIT_S), worker.log[-3000:]
        figures = outcome(stand_in, env, worker)
    finally:
        worker.stop()
    report(f"mid-run-{refusal}", sent=2 * SENT, delivered_before_fix=held, **figures)
    assert_survived(figures, worker, 2 * SENT)


def test_delay_spools_an_event_the_brokers_redis_refuses_saying_so_once(
    setup: tuple[dict[str, str], redis.Redis], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, client = setup
    caplog.set_level(logging.INFO, logger="op_celery")
    fill(client)
    op_celery.track.delay("fast-path")  # op-celery's own publish
    op_celery.track.apply_async(("celery-path",), countdown=1)  # Celery's (a countdown)
    free(client)
    client.replicaof("127.0.0.1", free_port())
    op_celery.track.delay("read-only")
    spooled = list((tmp_path / "app-spool").glob("*.json"))
    client.replicaof("NO", "ONE")
    assert len(spooled) == 3
    spool_lines = [r for r in caplog.records if "kept in the spool" in r.getMessage()]
    assert [r.levelno for r in spool_lines] == [logging.INFO] * 3  # one per event, at INFO
    said = [r.getMessage() for r in caplog.records if REFUSAL_LINE.search(r.getMessage())]
    assert len(said) == 2 and "is full (" in said[0] and "is read-only (" in said[1]


def test_a_full_redis_refuses_a_tasks_take_and_the_message_stays_queued(
    setup: tuple[dict[str, str], redis.Redis],
) -> None:
    env, client = setup
    enqueue(0, 2)
    taker = _drain._queue_for(op_celery.track.app, env["OP_CELERY_QUEUE"])
    assert taker is not None
    before = client.lrange(env["OP_CELERY_QUEUE"], 0, -1)
    fill(client)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        taker.take("", more=True)
    # Redis does not undo a script's earlier commands: the pop comes after the refused writes.
    assert client.lrange(env["OP_CELERY_QUEUE"], 0, -1) == before
    assert client.hlen("unacked") == 0
    free(client)


def test_the_ledger_on_a_full_redis_raises_storage_unavailable_saying_what_to_do_once(
    small_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis.from_url(small_redis.url)
    settings = load_settings(env={"OP_CELERY_REDIS_URL": small_redis.url,
                                  "OP_CELERY_KEY_PREFIX": f"t{uuid.uuid4().hex[:6]}"})  # fmt: skip
    ledger = Ledger(settings)
    fill(client)
    caplog.set_level(logging.WARNING, logger="op_celery")
    for _ in range(10):
        with pytest.raises(StorageUnavailable, match=r"is full .*maxmemory"):
            ledger.claim(uuid.uuid4().hex, 5.0)
    assert ledger.delivered("never") is False  # reads still work
    lines = [r.getMessage() for r in caplog.records if "is full (" in r.getMessage()]
    assert len(lines) <= 1  # once per process: an earlier test may have said it already
    free(client)


def test_a_delivered_mark_a_full_redis_refused_is_written_once_it_takes_writes(
    small_redis: RedisServer,
) -> None:
    client = redis.Redis.from_url(small_redis.url)
    settings = load_settings(env={"OP_CELERY_REDIS_URL": small_redis.url,
                                  "OP_CELERY_KEY_PREFIX": f"t{uuid.uuid4().hex[:6]}"})  # fmt: skip
    ledger = Ledger(settings)
    event_id = uuid.uuid4().hex
    claim = ledger.claim(event_id, 60.0)
    fill(client)
    with pytest.raises(StorageUnavailable, match="is full"):
        ledger.record(event_id)
    assert not ledger.delivered(event_id)
    free(client)
    # The copy that comes back (after the visibility timeout) finds it delivered, not sends it.
    assert wait_until(lambda: ledger.delivered(event_id), timeout=WAIT_S)
    assert claim.claimed and ledger.claim(event_id, 60.0).delivered


def test_write_refusal_names_oom_and_readonly_through_wrapping_errors() -> None:
    try:
        try:
            raise redis.exceptions.OutOfMemoryError("command not allowed")
        except redis.RedisError as exc:
            raise StorageUnavailable("wrapped") from exc
    except StorageUnavailable as wrapped:
        assert write_refusal(wrapped) == FULL
    assert write_refusal(redis.exceptions.ReadOnlyError("READONLY")) == READ_ONLY
    assert write_refusal(redis.exceptions.ResponseError("WRONGTYPE")) is None
    assert write_refusal(redis.ConnectionError("refused")) is None


def test_a_refusal_notice_says_one_line_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    notice = RefusalNotice("a test's Redis", "nothing happens")
    caplog.set_level(logging.WARNING, logger="op_celery")
    for _ in range(50):
        notice.refused(FULL, "redis://x")
        notice.accepted("redis://x")  # within the settle time: the episode goes on
    notice.accepted("redis://x", settled=True)
    notice.accepted("redis://x", settled=True)
    notice.refused(READ_ONLY, "redis://x")
    messages = [r.getMessage() for r in caplog.records if "a test's Redis" in r.getMessage()]
    assert len(messages) == 3
    assert "is full (" in messages[0] and "nothing happens" in messages[0]
    assert "takes writes again (it was full)" in messages[1]
    assert "is read-only (" in messages[2]
