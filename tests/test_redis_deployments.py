"""The package's Redis on every deployment: one server, a Redis Cluster, Sentinel; the URLs that
name them, the slots the scripts touch, and failovers, on real redis-server processes started
here on free ports (never the shared Redis)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar, cast

import pytest
import redis
from celery import Celery
from redis.crc import key_slot

import op_celery
from op_celery import ConfigurationError, _redis
from op_celery._ledger import Ledger
from op_celery._limiter import RateLimiter
from op_celery._rates import parse_rate
from op_celery._redis import deployment_of, redact, redis_for, storage_errors
from op_celery._settings import Settings, load_settings
from op_celery.dead_letters import DeadLetter, DeadLetterStore
from op_celery.testing import StandInServer

from ._deployments import NODE_TIMEOUT_MS, Cluster, SentinelGroup, tls_files
from ._support import WorkerProcess, dead_letter, wait_until


def test_standalone_urls_are_one_server() -> None:
    for url in ("redis://h:6379/0", "rediss://:pw@h:6380/1", "unix:///tmp/redis.sock?db=2"):
        assert deployment_of(url).kind == "standalone"


def test_a_cluster_url_names_its_seed_nodes_and_keeps_password_and_tls() -> None:
    deployment = deployment_of("rediss+cluster://u:pw@a:7000,b:7001,[::1]:7002?ssl_cert_reqs=none")
    assert deployment.kind == "cluster"
    assert deployment.nodes == (("a", 7000), ("b", 7001), ("::1", 7002))
    options = dict(deployment.options)
    assert options["username"] == "u" and options["password"] == "pw"
    assert options["ssl_cert_reqs"] == "none" and options["ssl"] is True


def test_a_sentinel_url_names_every_sentinel_the_database_and_tls() -> None:
    deployment = deployment_of("sentinel://:pw@a:26379;sentinel://b/2?ssl=true")
    assert deployment.kind == "sentinel"
    assert deployment.nodes == (("a", 26379), ("b", 26379))
    assert deployment.db == 2
    assert dict(deployment.options) == {"password": "pw", "ssl": True}


@pytest.mark.parametrize(
    ("url", "advice"),
    [
        ("redis://a:1,b:2/0", "redis+cluster://host1:port,host2:port"),
        ("redis+cluster://a:port", "is not a port"),
        ("redis+cluster://a:7000/3", "only database 0"),
        ("sentinel://a:26379;redis://b:6379", "sentinel://host:port, separated by ;"),
        ("sentinel://a:1,b:2", "not by commas"),
        ("sentinel://a:26379/db", "a number"),
        ("cluster://a:7000", "redis+cluster://"),
        ("redis-sentinel://a:26379", "sentinel://host:26379"),
        ("127.0.0.1:6379", "no scheme"),
    ],
)
def test_a_malformed_url_is_refused_with_what_to_write(url: str, advice: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        deployment_of(url)
    assert advice in str(caught.value)
    assert "Write one of: redis://" in str(caught.value)


def test_no_password_shows_in_any_form() -> None:
    for url in (
        "redis+cluster://:hunter2@a:7000,b:7001",
        "sentinel://a:26379;sentinel://:hunter2@b:26379",
        "rediss+cluster://user:hunter2@a:7000",
    ):
        assert "hunter2" not in redact(url)
        with pytest.raises(ConfigurationError) as caught:
            deployment_of(url.replace("7000", "70000").replace("b:26379", "b:x"))
        assert "hunter2" not in str(caught.value)


def test_an_events_ledger_keys_share_one_hash_slot() -> None:
    ledger = Ledger(load_settings(env={"OP_CELERY_REDIS_URL": "redis://127.0.0.1:1/0"}))
    for event_id in ("e1", "0f3c2a1e-5b6d-4c7e-8f90-a1b2c3d4e5f6", "odd}{id"):
        delivered, inflight = ledger.keys(event_id)
        assert key_slot(delivered.encode()) == key_slot(inflight.encode())
    assert key_slot(ledger.keys("e1")[0].encode()) != key_slot(ledger.keys("e2")[0].encode())


@pytest.mark.parametrize("prefix", ["{op-celery}", "team{a", "x:{"])
def test_a_prefix_with_a_whole_or_open_hash_tag_keeps_an_events_keys_together(prefix: str) -> None:
    env = {"OP_CELERY_REDIS_URL": "redis://127.0.0.1:1/0", "OP_CELERY_KEY_PREFIX": prefix}
    delivered, inflight = Ledger(load_settings(env=env)).keys("e1")
    assert key_slot(delivered.encode()) == key_slot(inflight.encode())


def test_a_prefix_that_tears_an_events_keys_apart_is_refused() -> None:
    env = {"OP_CELERY_REDIS_URL": "redis://127.0.0.1:1/0", "OP_CELERY_KEY_PREFIX": "a{}b"}
    with pytest.raises(ConfigurationError, match="two Redis Cluster slots"):
        Ledger(load_settings(env=env))


# -- real deployments ------------------------------------------------------------------------

#: Seconds a test retries a call that raises StorageUnavailable while a master fails over.
FAILOVER_TIMEOUT_S = 30.0


def settings_for(url: str, **env: str) -> Settings:
    return load_settings(env={"OP_CELERY_REDIS_URL": url, "OP_CELERY_KEY_PREFIX": PREFIX, **env})


def fresh(settings: Settings) -> Settings:
    """Settings that get a client of their own (``redis_for`` keeps one per deployment)."""
    _redis._clients.clear()
    return settings


def until_answered(call: Callable[[], T], timeout: float = FAILOVER_TIMEOUT_S) -> tuple[T, int]:
    """Call until it answers; (its answer, how many StorageUnavailable came first). Any other
    error fails the test: during a failover the package's Redis means "retry", nothing else."""
    refusals = 0
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call(), refusals
        except op_celery.StorageUnavailable:
            refusals += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def exercise_ledger(ledger: Ledger, event_ids: list[str]) -> None:
    """Claim, release, claim again and mark each event; a second claim sees the mark."""
    for event_id in event_ids:
        first = ledger.claim(event_id, ttl_s=10)
        assert first.token is not None
        assert not ledger.claim(event_id, ttl_s=10).claimed
        ledger.release(event_id, first.token)
        assert ledger.claim(event_id, ttl_s=10).claimed
        ledger.record(event_id, outbox_keys=("records", "due"))
        assert ledger.delivered(event_id)
        assert ledger.claim(event_id, ttl_s=10).delivered
    # A dropped answer: the mark and its count, in two slots, pipelined in one round trip.
    before = ledger.tallies("default")["bot"]
    ledger.record(f"{event_ids[0]}-bot", tally=("default", "bot"))
    assert ledger.delivered(f"{event_ids[0]}-bot")
    assert ledger.tallies("default")["bot"] == before + 1


PREFIX = f"opc-deploy-{uuid.uuid4().hex[:6]}"
T = TypeVar("T")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as running:
        yield running


@pytest.fixture(scope="module")
def sentinels() -> Iterator[SentinelGroup]:
    with SentinelGroup(master_name="op-master", password="pw-" + uuid.uuid4().hex[:8]) as group:
        yield group


def test_the_ledger_claims_releases_and_marks_events_on_every_master_of_a_cluster(
    cluster: Cluster,
) -> None:
    ledger = Ledger(fresh(settings_for(cluster.url)))
    event_ids = [f"cluster-{i}" for i in range(30)]
    owners = {cluster.owner(key_slot(ledger.keys(e)[0].encode())) for e in event_ids}
    assert owners == set(cluster.masters)  # the events' slots are spread over all three
    exercise_ledger(ledger, event_ids)


def test_dead_letters_work_on_a_cluster_under_a_hash_tagged_prefix(cluster: Cluster) -> None:
    store = DeadLetterStore(fresh(settings_for(cluster.url, OP_CELERY_KEY_PREFIX="{opc-dl}")))
    letters = [cast(DeadLetter, dead_letter()) for _ in range(3)]
    for one in letters:
        store.add(one)
    assert {x.id for x in store.list()} == {x.id for x in letters}
    assert store.replay(publish=lambda _: None) == 3
    assert len(store) == 0


def test_a_command_across_two_slots_is_told_as_such_with_the_hash_tag_way_out(
    cluster: Cluster,
) -> None:
    client = redis_for(fresh(settings_for(cluster.url)))
    refused = pytest.raises(op_celery.StorageUnavailable)
    with refused as caught, storage_errors("probe", cluster.url):
        client.pipeline(transaction=True).set("a", 1).set("b", 1).execute()
    assert "two hash slots" in str(caught.value) and "'{op-celery}'" in str(caught.value)


def test_dead_letters_work_on_a_cluster_under_the_default_prefix(cluster: Cluster) -> None:
    store = DeadLetterStore(fresh(settings_for(cluster.url)))
    store.add(cast(DeadLetter, dead_letter()))
    assert len(store) == 1


def test_the_limiter_admits_and_paces_on_a_cluster(cluster: Cluster) -> None:
    limiter = RateLimiter(redis_for(fresh(settings_for(cluster.url))), prefix=PREFIX)
    assert limiter.acquire("cluster-client", parse_rate("10/s")).granted
    assert not limiter.acquire("cluster-client", parse_rate("10/s")).granted


def test_a_cluster_replica_taking_over_by_cluster_failover_keeps_the_ledger() -> None:
    with Cluster() as running:
        ledger = Ledger(fresh(settings_for(running.url)))
        event_id = "moved-event"
        master = running.owner(key_slot(ledger.keys(event_id)[0].encode()))
        replica = running.add_replica(master)
        exercise_ledger(ledger, [event_id])
        assert wait_until(lambda: _replica_has(running, replica, ledger.keys(event_id)[0]), 10)
        running.node(replica).execute_command("CLUSTER FAILOVER")
        assert wait_until(lambda: running.is_master(replica), FAILOVER_TIMEOUT_S)
        assert until_answered(lambda: ledger.delivered(event_id))[0]
        exercise_ledger(ledger, ["after-failover-1", "after-failover-2"])


def _replica_has(cluster: Cluster, port: int, key: str) -> bool:
    node = cluster.node(port)
    node.execute_command("READONLY")
    return bool(node.exists(key))


def test_a_killed_cluster_master_means_retry_until_its_replica_serves_the_slot() -> None:
    with Cluster() as running:
        ledger = Ledger(fresh(settings_for(running.url)))
        event_id = "survivor"
        master = running.owner(key_slot(ledger.keys(event_id)[0].encode()))
        replica = running.add_replica(master)
        ledger.record(event_id)
        assert wait_until(lambda: _replica_has(running, replica, ledger.keys(event_id)[0]), 10)
        running.kill(master)
        # The replica's own election usually wins within a few node timeouts; on a starved CI
        # machine the masters' votes can come late and elections repeat for longer than the
        # retry window, so after a grace the replica is told to take over, as an operator would.
        # What is under test is the package's side: "retry" until the slot is served again.
        grace = time.monotonic() + 10 * NODE_TIMEOUT_MS / 1000

        def delivered_or_take_over() -> bool:
            if time.monotonic() > grace and not running.is_master(replica):
                with contextlib.suppress(redis.RedisError):
                    running.node(replica).execute_command("CLUSTER FAILOVER", "TAKEOVER")
            return ledger.delivered(event_id)

        delivered, _ = until_answered(delivered_or_take_over)
        assert delivered  # replicated before the crash, so not lost with the master
        assert running.is_master(replica)
        exercise_ledger(ledger, [event_id + "-after"])


def test_the_ledger_dead_letters_and_limiter_work_through_sentinel_with_a_password(
    sentinels: SentinelGroup,
) -> None:
    settings = fresh(settings_for(sentinels.url, OP_CELERY_REDIS_SENTINEL_MASTER="op-master"))
    exercise_ledger(Ledger(settings), ["s-1", "s-2"])
    store = DeadLetterStore(settings)
    kept = cast(DeadLetter, dead_letter())
    store.add(kept)
    assert store.get(kept.id) == kept
    assert store.take(kept.id) == kept
    limiter = RateLimiter(redis_for(settings), prefix=PREFIX)
    assert limiter.acquire("sentinel-client", parse_rate("10/s")).granted
    assert not limiter.acquire("sentinel-client", parse_rate("10/s")).granted


def test_an_unknown_sentinel_master_name_is_storage_unavailable_naming_no_password(
    sentinels: SentinelGroup,
) -> None:
    settings = fresh(settings_for(sentinels.url, OP_CELERY_REDIS_SENTINEL_MASTER="nobody"))
    with pytest.raises(op_celery.StorageUnavailable) as caught:
        Ledger(settings).claim("e1", ttl_s=1)
    assert "MasterNotFoundError" in str(caught.value)
    assert sentinels.password is not None and sentinels.password not in str(caught.value)


def test_sentinels_with_a_password_of_their_own_take_it_from_the_setting() -> None:
    with SentinelGroup(password="master-pw", sentinel_password="sentinel-pw") as group:
        url = group.url
        unauthorised = fresh(settings_for(url))
        with pytest.raises(op_celery.StorageUnavailable) as caught:
            Ledger(unauthorised).claim("e1", ttl_s=1)
        assert "sentinel-pw" not in str(caught.value) and "master-pw" not in str(caught.value)
        settings = fresh(settings_for(url, OP_CELERY_REDIS_SENTINEL_PASSWORD="sentinel-pw"))
        assert "sentinel-pw" not in repr(settings)
        exercise_ledger(Ledger(settings), ["through-guarded-sentinels"])


def test_behind_sentinel_a_dead_letter_is_on_a_replica_when_add_returns() -> None:
    with SentinelGroup() as group:
        store = DeadLetterStore(fresh(settings_for(group.url)))
        old = group.master_port()
        replica = redis.Redis(port=next(port for port in group.data_ports if port != old))
        # The replica has finished its first sync (until then no write reaches it at once).
        assert wait_until(lambda: replica.info("replication")["master_link_status"] == "up", 20)
        kept = cast(DeadLetter, dead_letter())
        store.add(kept)
        # No waiting here: add waited for the replica, so a failover now keeps the letter.
        assert replica.hexists(store._hash, kept.id)
        group.failover()
        group.wait_for_new_master(old)
        assert until_answered(lambda: store.get(kept.id))[0] == kept


@pytest.mark.parametrize("how", ["SENTINEL FAILOVER", "SIGKILL the master"])
def test_the_ledger_dead_letters_and_limiter_follow_a_sentinel_failover(how: str) -> None:
    with SentinelGroup() as group:
        settings = fresh(settings_for(group.url))
        ledger, store = Ledger(settings), DeadLetterStore(settings)
        limiter = RateLimiter(redis_for(settings), prefix=PREFIX)
        exercise_ledger(ledger, ["before"])
        kept = cast(DeadLetter, dead_letter())
        store.add(kept)
        old = group.master_port()
        replica = next(port for port in group.data_ports if port != old)
        assert wait_until(lambda: redis.Redis(port=replica).exists(ledger.keys("before")[0]), 10)
        if how == "SENTINEL FAILOVER":
            group.failover()
        else:
            group.kill(old)
        assert group.wait_for_new_master(old) == replica
        assert until_answered(lambda: ledger.delivered("before"))[0]
        assert until_answered(lambda: store.get(kept.id))[0] == kept
        granted, _ = until_answered(lambda: limiter.acquire("failover", parse_rate("10/s")))
        assert granted.granted
        # Writes move to the new master even while the old one still runs (SENTINEL FAILOVER
        # leaves it up until the sentinels demote it, and what it takes meanwhile is dropped).
        new_master = redis.Redis(port=replica)

        def lands_on_the_new_master() -> bool:
            until_answered(lambda: ledger.record("probe"))
            return bool(new_master.exists(ledger.keys("probe")[0]))

        assert wait_until(lands_on_the_new_master, 10)
        exercise_ledger(ledger, ["after"])
        assert new_master.exists(ledger.keys("after")[0])


def test_workers_ride_a_sigkilled_sentinel_master_losing_no_event_and_dead_lettering_none(
    producer: Celery,
    start_worker: Callable[..., WorkerProcess],
    stand_in: StandInServer,
    env: dict[str, str],
) -> None:
    count = 150
    with SentinelGroup() as group:
        workers = [
            start_worker(OP_CELERY_REDIS_URL=group.url, OPENPANEL_RATE_LIMIT="50/s")
            for _ in range(2)
        ]
        for i in range(count):
            op_celery.track.delay(f"failover-{i}")
        assert wait_until(lambda: len(stand_in.received) >= count // 4, 60)
        old = group.master_port()
        group.kill(old)
        group.wait_for_new_master(old)
        expected = {f"failover-{i}" for i in range(count)}
        assert wait_until(
            lambda: {r.payload["name"] for r in stand_in.received} >= expected, 120
        ), workers[0].log
        logs = "".join(worker.log for worker in workers)
        assert "StorageUnavailable" in logs or "LimiterUnavailable" in logs  # it was away
        assert "given up" not in logs
        _redis._clients.clear()
        prefix = env["OP_CELERY_KEY_PREFIX"]
        store = DeadLetterStore(load_settings(env={"OP_CELERY_REDIS_URL": group.url,
                                                   "OP_CELERY_KEY_PREFIX": prefix}))  # fmt: skip
        assert len(store) == 0


def test_a_tls_cluster_works_from_a_rediss_cluster_url(tmp_path: Path) -> None:
    with Cluster(tls=tls_files(tmp_path)) as running:
        assert running.url.startswith("rediss+cluster://")
        exercise_ledger(Ledger(fresh(settings_for(running.url))), ["tls-1", "tls-2", "tls-3"])
        untrusted = running.url.split("?")[0]  # no CA given: the self-signed one is refused
        with pytest.raises(op_celery.StorageUnavailable, match="retried"):
            Ledger(fresh(settings_for(untrusted)))


def test_a_cluster_not_reachable_when_the_ledger_is_made_is_storage_unavailable() -> None:
    with Cluster() as running:
        url = running.url
        for port in running.masters:
            running.kill(port)
        with pytest.raises(op_celery.StorageUnavailable) as caught:
            Ledger(fresh(settings_for(url)))  # the cluster client connects when it is made
        assert "RedisClusterException" in str(caught.value)
        assert not _redis._clients  # no broken client kept: the retry makes a new one


def test_a_tls_sentinel_deployment_carries_the_ledger_through_a_failover(tmp_path: Path) -> None:
    with SentinelGroup(password="tls-master-pw", tls=tls_files(tmp_path)) as group:
        assert "ssl=true" in group.url
        ledger = Ledger(fresh(settings_for(group.url)))
        exercise_ledger(ledger, ["tls-before"])
        old = group.master_port()
        # The sentinels promote without waiting for the replica to catch up: a write still in
        # flight to it is lost (asynchronous replication); what is replicated is carried over.
        replica = group.data_node(next(port for port in group.data_ports if port != old))
        assert wait_until(lambda: replica.exists(ledger.keys("tls-before")[0]), 10)
        group.failover()
        new = group.wait_for_new_master(old)

        def lands_on_the_new_master() -> bool:
            until_answered(lambda: ledger.record("tls-probe"))
            return bool(group.data_node(new).exists(ledger.keys("tls-probe")[0]))

        assert wait_until(lands_on_the_new_master, 10)
        assert until_answered(lambda: ledger.delivered("tls-before"))[0]
