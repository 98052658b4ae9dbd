"""The package's Redis on every deployment: one server, a Redis Cluster, Sentinel; the URLs that
name them, the slots the scripts touch, and failovers, on real redis-server processes started
here on free ports (never the shared Redis)."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from op_celery import ConfigurationError
from op_celery._ledger import Ledger
from op_celery._redis import deployment_of, redact
from op_celery._settings import load_settings


def test_standalone_urls_are_one_server() -> None:
    for url in ("redis://h:6379/0", "rediss://:pw@h:6380/1", "unix:///tmp/redis.sock?db=2"):
        assert deployment_of(url).kind == "standalone"


def test_a_cluster_url_names_its_seed_nodes_and_keeps_password_and_tls() -> None:
    deployment = deployment_of("rediss+cluster://u:pw@a:7000,b:7001,[::1]:7002?ssl_cert_reqs=none")
    assert deployment.kind == "cluster"
    assert deployment.nodes == (("a", 7000), ("b", 7001), ("::1", 7002))
    options = dict(deployment.options)
    assert options["username"] == "u" and options["password"] == "pw"
    assert options["ssl_cert_reqs"] == "none" and "connection_class" in options


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
