"""The whole path on one machine: the stand-in OpenPanel server, a worker, the example app.

Starts the stand-in server on a free port, one ``celery -A op_celery.worker worker`` process,
runs ``send_every_operation.py``, waits for the events, and prints what the server recorded.
Uses the broker in ``OP_CELERY_BROKER_URL``; with none, the embedded Redis, which this script
starts first so that it stays up for the worker and the app alike.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from op_celery import load_settings
from op_celery._embedded import embedded_redis
from op_celery._settings import EMBEDDED_URL
from op_celery.testing import StandInServer

HERE = Path(__file__).resolve().parent
CLIENT_ID = str(uuid.uuid4())
CLIENT_SECRET = "sec_" + uuid.uuid4().hex
#: Events the example enqueues; alias is refused by the server ("Alias is not supported").
EXPECTED_ACCEPTED = 7


def main() -> int:
    if load_settings().broker_url == EMBEDDED_URL:
        embedded_redis()  # held by this process until it exits
    with StandInServer(clients={CLIENT_ID: CLIENT_SECRET}) as server:
        env = dict(
            os.environ,
            OPENPANEL_CLIENT_ID=CLIENT_ID,
            OPENPANEL_CLIENT_SECRET=CLIENT_SECRET,
            OPENPANEL_API_URL=server.url,
            OP_CELERY_QUEUE=f"openpanel-example-{uuid.uuid4().hex[:6]}",
            OP_CELERY_RETRY_BACKOFF="0.1",
        )
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "op_celery.worker", "worker",
             "--pool", "threads", "--concurrency", "4", "--loglevel", "WARNING",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            env=env, start_new_session=True,
        )  # fmt: skip
        try:
            app_env = {k: v for k, v in env.items() if k != "OPENPANEL_CLIENT_SECRET"}
            subprocess.run(
                [sys.executable, str(HERE / "send_every_operation.py")], env=app_env, check=True
            )
            # The increments meet the server's profile flush (10 s after the identify): they
            # are answered 404 and retried 6-7 s apart until the profile is visible.
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline:
                if len(server.received) >= EXPECTED_ACCEPTED and any(
                    r.type == "alias" for r in server.requests
                ):
                    break
                time.sleep(0.1)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(20)
        print(f"\nthe stand-in server at {server.url} answered {len(server.requests)} requests:")
        for r in server.requests:
            shown = {k: v for k, v in r.payload.items() if k != "properties"}
            print(f"  {r.status}  {r.type:<13} {shown}")
        accepted = len(server.received)
        print(f"accepted {accepted} of {EXPECTED_ACCEPTED} expected; alias refused by design")
        return 0 if accepted >= EXPECTED_ACCEPTED else 1


if __name__ == "__main__":
    raise SystemExit(main())
