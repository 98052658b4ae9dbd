"""The outbox's view of the broker's consumers: who is alive, and when a message may be lost.

A message vanishes in kombu's BRPOP window only with the consumer that popped it (it died, or
its connection broke) or with a Redis restart. So each consumer says it is alive
(:class:`Liveness`, every ``ALIVE_INTERVAL_S``, from the consumer step ``_consumer``), and
each sweeper pass (``_outbox_sweeper``) notes with `losses` the consumers not heard from for
``ALIVE_TTL_S``, the reconnections and a Redis restart as possible losses, with their time
(``lua/outbox_losses.lua``). A record whose message is nowhere is published again only if such
a loss happened after its message was last seen (:meth:`Losses.may_have_lost`). The outbox as
a whole is described in ``_outbox``.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from . import _compat
from ._lua import Script
from ._outbox import BROKER_ERRORS, close_quietly

__all__ = ["Liveness", "Losses", "broker_keys", "losses"]

log = logging.getLogger("op_celery")

#: Seconds between a consumer's word to the broker that it is alive (``lua/outbox_alive.lua``).
ALIVE_INTERVAL_S = 2.0
#: Seconds a consumer counts as alive after saying so: one not heard from for that long died
#: (or stalled), and a message it had just popped may be lost.
ALIVE_TTL_S = 10.0
#: Seconds a caller's clock, which dates a new record, may run ahead of Redis' without a loss
#: being missed.
CLOCK_MARGIN_S = 5.0
#: Seconds a possible loss is remembered.
LOSSES_KEPT_S = 7 * 24 * 3600.0
#: Per broker: the consumers alive (id -> until when), what may have lost a message (-> when),
#: and the Redis run id last seen (a new one: Redis restarted).
CONSUMERS_KEY = "_op_celery.outbox_consumers"
LOSSES_KEY = "_op_celery.outbox_losses"
RUN_KEY = "_op_celery.outbox_redis_run"


@dataclass(frozen=True, slots=True)
class Losses:
    """What the broker's consumers may have lost, as of one moment (Redis time)."""

    #: Redis time of the look, in seconds since the epoch.
    now: float
    #: The latest time a message may have been lost (a consumer died or reconnected, Redis
    #: restarted), or None if nothing is known to have lost one.
    latest: float | None

    def may_have_lost(self, last_seen: float) -> bool:
        """Whether a message last seen at ``last_seen`` may have been lost since."""
        return self.latest is not None and self.latest > last_seen - CLOCK_MARGIN_S


def broker_keys(prefix: str = "") -> tuple[str, str, str]:
    """The consumers set, losses set and run-id key of a broker, with its key prefix."""
    return prefix + CONSUMERS_KEY, prefix + LOSSES_KEY, prefix + RUN_KEY


def losses(client: redis.Redis, prefix: str = "") -> Losses:
    """Note the consumers found dead and a Redis restart as possible losses
    (``lua/outbox_losses.lua``), and say when a message was last possibly lost."""
    try:
        run_id = str(client.info("server").get("run_id", ""))
    except redis.ResponseError:  # INFO refused (a managed Redis): restarts go unseen here
        run_id = ""
    now, latest = Script(client, "outbox_losses.lua")(list(broker_keys(prefix)),
                                                      [run_id, LOSSES_KEPT_S])  # fmt: skip
    return Losses(float(now), float(latest) if latest else None)


class Liveness:
    """A consumer's word to the broker that it is alive, so that the sweeper can tell a message
    lost with it (the consumer died or reconnected) from one removed on purpose.

    ``connect()`` returns a kombu connection to the (Redis) broker. :meth:`started` says it
    once, at once (with ``reconnected``, also that the consumer's connection broke), and
    starts a daemon thread that says it every :data:`ALIVE_INTERVAL_S`; :meth:`stop` says the
    consumer stopped cleanly. A consumer not heard from for :data:`ALIVE_TTL_S` is taken for
    dead by the next sweeper pass.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        consumer_id: str | None = None,
        ttl_s: float = ALIVE_TTL_S,
        interval_s: float = ALIVE_INTERVAL_S,
    ) -> None:
        self.consumer_id = consumer_id or f"{uuid.uuid4().hex}"
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self._connect = connect
        self._pending = "beat"
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def say(self, what: str, connection: Any) -> None:
        """Say ``what`` ('beat', 'reconnected' or 'stopped') on ``connection``."""
        channel = connection.default_channel
        prefix = _compat.redis_key_prefix(channel)
        client = _compat.redis_client(channel)
        consumers, lost, _ = broker_keys(prefix)
        Script(client, "outbox_alive.lua")([consumers, lost], [self.consumer_id, self.ttl_s, what])

    def started(self, reconnected: bool = False) -> None:
        """The consumer (re)started: say so now, and keep saying it is alive."""
        with self._lock:
            if reconnected:
                self._pending = "reconnected"
            what = self._pending
        try:
            with self._connect() as connection:
                self.say(what, connection)
        except BROKER_ERRORS as exc:  # the thread says it as soon as the broker answers
            log.warning("op_celery: the consumer could not tell the broker it is alive: %s", exc)
        else:
            with self._lock:
                if self._pending == what:
                    self._pending = "beat"
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="op-celery-alive", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """The consumer stopped cleanly: stop saying it is alive, and say it stopped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + 5)
        try:
            with self._connect() as connection:
                self.say("stopped", connection)
        except BROKER_ERRORS as exc:  # taken for dead later: only more careful
            log.info("op_celery: could not tell the broker the consumer stopped: %s", exc)

    def _run(self) -> None:
        connection = None
        while not self._stop.wait(self.interval_s):
            with self._lock:
                what = self._pending
            try:
                if connection is None:
                    connection = self._connect()
                self.say(what, connection)
            except BROKER_ERRORS as exc:
                log.debug("op_celery: could not tell the broker the consumer is alive: %s", exc)
                if connection is not None:
                    close_quietly(connection)
                    connection = None
                continue
            except Exception:  # a bug must not end the thread
                log.exception("op_celery: telling the broker the consumer is alive failed")
                continue
            with self._lock:
                if self._pending == what:
                    self._pending = "beat"
        if connection is not None:
            close_quietly(connection)
