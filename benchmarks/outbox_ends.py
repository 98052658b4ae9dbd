"""What the outbox brings back that a user or Celery removed (issue 16): events delivered, or
published again, after they were purged, expired, or refused by a worker.

Each scenario runs real ``celery worker`` processes against the stand-in with a short outbox
grace (``--grace``, 2 s) and watches for ``--watch`` seconds (40 s: the time a missing message
waits to be judged, ``_outbox_sweeper.SETTLE_S``, and many grace periods) after the end:

- ``purge``: ``--events`` enqueued with no worker running, ``celery purge -Q <queue> -f``, then a
  worker starts: events delivered anyway;
- ``expires``: one ``track.apply_async(countdown=5, expires=2)``: times published again;
- ``unregistered``: ``--events`` dropped by a worker whose module does not import op_celery,
  then an op-celery worker starts: events delivered anyway;
- ``refused``: a worker with ``accept_content=["pickle"]`` gets ``--events`` events: dead letters
  at the end (one per event is right), times published again;
- ``dead-letter purge``: those dead letters purged (``DeadLetterStore.purge``): dead letters
  that came back.

Run it once per version to compare (the code measured is whichever ``op_celery`` Python
imports: run from outside the repository with ``PYTHONPATH`` at another checkout)::

    python benchmarks/outbox_ends.py [--events 200] [--grace 2] [--watch 40]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    DEFAULT_REDIS_URL,
    StandIn,
    Worker,
    broker_env,
    clean_env,
    describe_machine,
    redis_namespace,
    stand_in_server,
)
from celery import Celery

import op_celery
from op_celery._app import reset_settings
from op_celery._settings import load_settings
from op_celery.dead_letters import DeadLetterStore

#: Worker modules of the scenarios, written to a temporary directory on the workers' path.
PLAIN_APP = """
import os
from celery import Celery
app = Celery("plain", broker=os.environ["OP_CELERY_BROKER_URL"])
app.conf.update(
    broker_transport_options={"global_keyprefix": os.environ["OP_CELERY_BROKER_KEY_PREFIX"]},
    task_default_queue=os.environ["OP_CELERY_QUEUE"],
)
"""
PICKLE_APP = """
from op_celery.worker import app
app.conf.accept_content = ["pickle"]
"""


def republished(worker: Worker) -> int:
    return worker.log_path.read_text(errors="replace").count("published again from the outbox")


class Run:
    def __init__(self, stand_in: StandIn, redis_url: str, grace: str, apps: Path) -> None:
        self.stand_in = stand_in
        self.redis_url = redis_url
        self.grace = grace
        self.apps = apps

    @contextmanager
    def scenario(self, name: str) -> Iterator[tuple[dict[str, str], Celery]]:
        self.stand_in.control.reset()
        with redis_namespace(self.redis_url) as namespace:
            queue = namespace.queue(name)
            env = clean_env({
                **broker_env(namespace, queue),
                "OPENPANEL_CLIENT_ID": CLIENT_ID,
                "OPENPANEL_CLIENT_SECRET": CLIENT_SECRET,
                "OPENPANEL_API_URL": self.stand_in.url,
                "OP_CELERY_OUTBOX_GRACE": self.grace,
                "C_FORCE_ROOT": "1",
            })  # fmt: skip
            env["PYTHONPATH"] = os.pathsep.join([str(self.apps), env["PYTHONPATH"]])
            app = Celery(f"bench-{name}", set_as_current=True)
            app.conf.update(
                broker_url=self.redis_url,
                broker_transport_options={"global_keyprefix": namespace.prefix},
                op_celery_queue=queue,
                op_celery_outbox_grace=self.grace,
                task_ignore_result=True,
            )
            try:
                yield env, app
            finally:
                app.close()
                reset_settings()

    def worker(self, env: dict[str, str], module: str = "op_celery.worker") -> Worker:
        worker = Worker(module, env["OP_CELERY_QUEUE"], "threads", 4, env)
        worker.command[worker.command.index("WARNING")] = "INFO"
        return worker

    def received(self) -> int:
        return int(self.stand_in.control.stats()["received"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--grace", default="2")
    parser.add_argument("--watch", type=float, default=40.0)
    args = parser.parse_args()
    print(describe_machine())
    print(f"op_celery from {Path(op_celery.__file__).parent}")
    with tempfile.TemporaryDirectory() as apps, stand_in_server() as stand_in:
        Path(apps, "bench_plain_app.py").write_text(PLAIN_APP)
        Path(apps, "bench_pickle_app.py").write_text(PICKLE_APP)
        run = Run(stand_in, args.redis_url, args.grace, Path(apps))
        n = args.events

        with run.scenario("purge") as (env, _app):
            for i in range(n):
                op_celery.track.delay(f"purged-{i}")
            purge = subprocess.run(
                [sys.executable, "-m", "celery", "-A", "op_celery.worker", "purge",
                 "-Q", env["OP_CELERY_QUEUE"], "-f"],
                env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            with run.worker(env) as worker:
                time.sleep(args.watch)
                print(f"purge: {purge.stdout.strip()!r}; delivered anyway {run.received()} of "
                      f"{n}; published again {republished(worker)}")  # fmt: skip

        with run.scenario("expires") as (env, _app), run.worker(env) as worker:
            time.sleep(3)
            op_celery.track.apply_async(("too late",), countdown=5, expires=2)
            time.sleep(args.watch)
            print(f"expires: delivered {run.received()}; published again {republished(worker)} "
                  f"in {args.watch:g} s")  # fmt: skip

        with run.scenario("unregistered") as (env, _app):
            with run.worker(env, "bench_plain_app") as plain:
                time.sleep(3)
                for i in range(n):
                    op_celery.track.delay(f"unregistered-{i}")
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    if plain.log_path.read_text(errors="replace").count("unregistered task") >= n:
                        break
                    time.sleep(0.2)
            with run.worker(env) as worker:
                time.sleep(args.watch)
                print(f"unregistered: delivered anyway {run.received()} of {n}; published "
                      f"again {republished(worker)}")  # fmt: skip

        with run.scenario("refused") as (env, _app):
            store = DeadLetterStore(load_settings(env=env))
            with run.worker(env, "bench_pickle_app") as worker:
                time.sleep(3)
                for i in range(n):
                    op_celery.track.delay(f"refused-{i}")
                time.sleep(args.watch)
                print(f"refused: dead letters {len(store)} for {n} events; published again "
                      f"{republished(worker)} in {args.watch:g} s")  # fmt: skip
                purged = store.purge()
                before = republished(worker)
                time.sleep(args.watch)
                print(
                    f"dead-letter purge: purged {purged}; dead letters again {len(store)}; "
                    f"published again {republished(worker) - before} in {args.watch:g} s"
                )


if __name__ == "__main__":
    main()
