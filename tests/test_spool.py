"""A broker outage at ``.delay()``: bounded wait, then the spool; nothing dropped."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

import op_celery
from op_celery import PublishError
from op_celery._app import reset_settings
from op_celery._enqueue import flush_spool
from op_celery._spool import Spool
from op_celery.testing import StandInServer

from ._support import CLIENT_SECRET, RedisServer, WorkerProcess, free_port, worker_env


def test_flush_publishes_oldest_first_and_removes_each_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for i in range(3):
        spool.write("op_celery.track", {"name": f"e{i}"}, {"queue": "q"})
    seen: list[str] = []
    assert spool.flush(lambda task, kwargs, options: seen.append(kwargs["name"])) == 3
    assert seen == ["e0", "e1", "e2"]
    assert len(spool) == 0


def test_a_failed_flush_keeps_the_files_for_the_next_one(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.write("op_celery.track", {"name": "a"}, {})
    spool.write("op_celery.track", {"name": "b"}, {})

    def down(*_: object) -> None:
        raise ConnectionError("still down")

    with pytest.raises(ConnectionError):
        spool.flush(down)
    assert len(spool) == 2


def test_a_file_claimed_by_a_dead_process_is_recovered(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    path = spool.write("op_celery.track", {"name": "orphan"}, {})
    os.rename(path, path.with_name(path.name + ".claimed-999999"))
    assert len(spool) == 0
    seen: list[str] = []
    assert spool.flush(lambda task, kwargs, options: seen.append(kwargs["name"])) == 1
    assert seen == ["orphan"]


@pytest.fixture
def down_broker_app(tmp_path: Path) -> Iterator[tuple[Celery, int]]:
    """A user's app whose Redis broker is not running (yet)."""
    port = free_port()
    app = Celery("outage", set_as_current=True)
    app.conf.update(
        broker_url=f"redis://127.0.0.1:{port}/0",
        op_celery_spool_dir=str(tmp_path / "spool"),
        op_celery_queue=f"openpanel-outage-{uuid.uuid4().hex[:6]}",
        broker_transport_options={"socket_connect_timeout": 0.5},
    )
    yield app, port
    app.close()
    reset_settings()


def test_delay_spools_the_event_when_the_broker_is_down_and_returns(
    down_broker_app: tuple[Celery, int], tmp_path: Path
) -> None:
    started = time.monotonic()
    result = op_celery.track.delay("during-outage", profile_id="u1")
    blocked_s = time.monotonic() - started
    files = list((tmp_path / "spool").glob("*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["task"] == "op_celery.track"
    assert record["kwargs"]["name"] == "during-outage"
    assert record["options"]["task_id"] == result.id
    assert CLIENT_SECRET not in files[0].read_text()
    print(f"delay() blocked {blocked_s:.2f} s before spooling")


def test_delay_raises_publish_error_when_configured_to(
    down_broker_app: tuple[Celery, int], tmp_path: Path
) -> None:
    app, _ = down_broker_app
    app.conf.op_celery_on_publish_failure = "raise"
    reset_settings()
    with pytest.raises(PublishError, match="OP_CELERY_ON_PUBLISH_FAILURE"):
        op_celery.track.delay("refused")
    assert not list((tmp_path / "spool").glob("*.json"))


def test_spooled_events_are_delivered_once_the_broker_is_back(
    down_broker_app: tuple[Celery, int], stand_in: StandInServer, tmp_path: Path
) -> None:
    app, port = down_broker_app
    for i in range(5):
        op_celery.track.delay(f"spooled-{i}")
    assert len(list((tmp_path / "spool").glob("*.json"))) == 5
    with RedisServer(port) as server:
        env = worker_env(stand_in.url, server.url, "")
        env["OP_CELERY_QUEUE"] = app.conf.op_celery_queue
        worker = WorkerProcess(env)
        worker.start()
        try:
            assert flush_spool() == 5
            assert stand_in.wait_for(5, timeout=20)
        finally:
            worker.stop()
    names = sorted(r.payload["name"] for r in stand_in.received)
    assert names == [f"spooled-{i}" for i in range(5)]


def test_spool_files_and_their_directory_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        (tmp_path / "wide").mkdir(mode=0o777)
        os.chmod(tmp_path / "wide", 0o777)
        for directory in (tmp_path / "new" / "spool", tmp_path / "wide"):
            path = Spool(directory).write("op_celery.track", {"name": "x"}, {})
            assert directory.stat().st_mode & 0o777 == 0o700
            assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
