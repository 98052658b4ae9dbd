"""The delivery pipeline: what happens to one event on a worker, with no Celery in it.

One event in, one :data:`Outcome` out::

    take a slot of the project's shared rate limit: the lower of OPENPANEL_RATE_LIMIT and the
      │  rate learned from the server (a slot within OP_CELERY_MAX_INLINE_WAIT is slept for;
      │  the pool paused meanwhile, or a slot further off: the event's turn in the project's
      │  waiting line) ────────────────────────────────────────────→ Throttled(wait_s)
    claim the event in the ledger ── delivered before ──────────────→ AlreadyDelivered
      │                          └── a copy is being sent elsewhere ─→ Busy(wait_s)
    POST it (``_client``)
      ├── 2xx: learn from its x-ratelimit headers (``_learning``); mark it delivered in the
      │        ledger (and forget its outbox record, when the ledger's Redis is the broker's:
      │        one round trip) ─────────────────────────────────────────→ Delivered
      ├── answered but not stored: 202 bot, 200 "Duplicate event", 401 of the project's
      │        filters: learn and mark as above, and count the reason in the same round
      │        trip (``Ledger.tallies``); never sent again, no dead letter → Dropped(reason)
      ├── 429: pause the pool, back the learned rate off (``_learning``) → Throttled(pause)
      │        (no retry counted; only an event older than MAX_THROTTLED_AGE_S counts it)
      ├── transient failure (a 5xx, no answer, a 2xx that is not OpenPanel's such as a
      │        captive portal's page), ``_retry.decide`` says again ───→ Retry(countdown_s)
      └── permanent failure, or retries used up ───────────────────────→ GiveUp(reason)

The slot comes before the claim, so a throttled event, the common case under a backlog, costs
no ledger traffic; a slot taken by an event that then turns out to be delivered already (or
busy) is one slot unused. Both are one script (``lua/slot_claim.lua``: one round trip before
the request, one after it) unless Redis is a cluster, where their keys live in two slots.
Whatever ends the attempt early ends its claim too, so a retry (or a copy) can claim again.
The caller maps the outcome to its scheduler: the Celery layer (``_tasks``) turns ``Retry`` into
Celery's retry, ``Busy`` and ``Throttled`` into a countdown that counts no retry, ``GiveUp`` into
a dead letter (:meth:`Delivery.dead_letter`) and acks the rest (``Dropped`` with a signal of its
own). Signals, the outbox and the broker are the caller's business: this module talks to the
API and the package's Redis only, so it can be read and tested with the stand-in server and a
Redis, and nothing else.

A 429 is the server pacing the pool, not the event failing: it never uses up an event's
retries, so it never dead-letters an event by itself. The bound is the event's age: an event
whose timestamp (a ``track``'s, which is its ``.delay()`` time unless the caller gave one) is
more than :data:`MAX_THROTTLED_AGE_S` old counts its 429s as retries again, and after
``OP_CELERY_MAX_RETRIES`` of them becomes a (replayable) dead letter. The server accepts such an
event, it only stops counting it towards sessions after 15 minutes; the bound is there so that
a pool fed faster than the server allows, for hours, ends with dead letters rather than an ever
longer queue. Events without a timestamp (all but ``track``) have no bound.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._client import Dropped as DroppedAnswer
from ._client import DropReason, OpenPanelClient
from ._events import Event
from ._exceptions import (
    ConfigurationError,
    InvalidEvent,
    OpenPanelError,
    PermanentError,
    RateLimited,
    StorageUnavailable,
    TransientError,
)
from ._learning import RateLearner
from ._ledger import Claim, Ledger
from ._limiter import DEFAULT_PAUSE_S, RateLimiter, RateStatus
from ._lua import Script, bulk, encoded
from ._rates import DEFAULT_BURST, Rate, parse_burst, parse_rate, with_headroom
from ._redis import is_cluster, redis_for, storage_errors
from ._retry import decide
from ._settings import Settings
from .dead_letters import DeadLetter, DeadLetterStore

__all__ = [
    "DEFAULT_PAUSE_S",
    "MAX_LINE_S",
    "MAX_THROTTLED_AGE_S",
    "PAUSE_RECHECK_S",
    "AlreadyDelivered",
    "Attempt",
    "Busy",
    "Delivered",
    "Delivery",
    "Dropped",
    "GiveUp",
    "Outcome",
    "Retry",
    "Throttled",
    "delivery_for",
    "rate_statuses",
]

log = logging.getLogger("op_celery")

#: Seconds of age (since the event's timestamp) after which a 429 counts as a retry again.
MAX_THROTTLED_AGE_S = 6 * 3600.0
#: A booked slot at least this many seconds ahead is checked against a pause (a 429 elsewhere)
#: after the sleep, before sending into it; nearer slots are sent without the extra round trip.
PAUSE_RECHECK_S = 0.02
#: Packed slot-and-claim commands kept per pipeline (one per project and pace in use; a bound,
#: not a tuning knob).
MAX_PACKED_COMMANDS = 1024
#: Longest wait, in seconds, a throttled event is given as its turn in the project's waiting
#: line (``_limiter``): a backlog is woken one event per slot instead of all at once each slot,
#: so it costs about one refusal per event, not one per event per slot, and another project's
#: events on the same queue are not stuck behind its churn. Events further back come back
#: after this long and queue again, so the line follows a rate that changes meanwhile.
MAX_LINE_S = 300.0


@dataclass(frozen=True, slots=True)
class Attempt:
    """What the scheduler knows of this try of the event."""

    #: Retries made before this attempt (0 on the first).
    retries: int = 0
    #: The outbox keys of the event's queue when the ledger's Redis is the broker's, so the
    #: ledger's mark forgets the outbox record in the same round trip; else None.
    outbox_keys: tuple[str, str] | None = None
    #: Seconds since the event's timestamp (``track``; None for the others): bounds how long
    #: 429s are waited out without counting retries (:data:`MAX_THROTTLED_AGE_S`).
    age_s: float | None = None


@dataclass(frozen=True, slots=True)
class Delivered:
    """The API took the event."""

    status: int
    #: Seconds the HTTP exchange took.
    latency_s: float
    #: Seconds the attempt waited inline for its rate-limit slot before sending (0 if none).
    waited_s: float = 0.0
    #: Whether the ledger's mark also forgot the event's outbox record.
    forgotten: bool = False


@dataclass(frozen=True, slots=True)
class Dropped:
    """The server answered and stores nothing for the event: ``reason`` ``"bot"`` (202),
    ``"duplicate"`` (200 ``Duplicate event``) or ``"filtered"`` (401 of the project's filters).

    Finished like a delivered event (marked in the ledger, never sent again), and no dead
    letter: no fix and no replay would make the server store it. ``message`` is the server's.
    """

    reason: DropReason
    message: str
    status: int
    #: Seconds the HTTP exchange took.
    latency_s: float
    #: Seconds the attempt waited inline for its rate-limit slot before sending (0 if none).
    waited_s: float = 0.0
    #: Whether the ledger's mark also forgot the event's outbox record.
    forgotten: bool = False


@dataclass(frozen=True, slots=True)
class AlreadyDelivered:
    """The ledger says the event was delivered before: it is not sent again."""


@dataclass(frozen=True, slots=True)
class Busy:
    """Another attempt holds the event's claim (a copy is being sent): look again later."""

    wait_s: float


@dataclass(frozen=True, slots=True)
class Throttled:
    """The project's shared limit has no slot soon enough, or the server answered 429: run
    again in ``wait_s``.

    Throttling is not a failure: it costs the event no retry.
    """

    wait_s: float


@dataclass(frozen=True, slots=True)
class Retry:
    """A transient failure: try again in ``countdown_s`` (one more retry)."""

    error: TransientError
    countdown_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Retrying cannot help (or the retries are used up): the event becomes a dead letter."""

    error: OpenPanelError
    reason: str


Outcome = Delivered | Dropped | AlreadyDelivered | Busy | Throttled | Retry | GiveUp


class Delivery:
    """The pipeline of one settings object: its clients, ledger, limiter and dead letters."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ledger = Ledger(settings)
        self.dead_letters = DeadLetterStore(settings)
        client = redis_for(settings)
        self.limiter = RateLimiter(client, prefix=settings.key_prefix)
        self.learner = RateLearner(self.limiter, headroom_pct=settings.rate_headroom_pct)
        #: The slot and the claim in one round trip (``lua/slot_claim.lua``); on a Redis
        #: Cluster the limiter's and the ledger's keys are in two slots: two calls there.
        self._slot_claim = None if is_cluster(client) else Script(client, "slot_claim.lua")
        self._pool: Any = None if is_cluster(client) else client.connection_pool
        self._encoding = str(getattr(self._pool, "connection_kwargs", {}).get("encoding", "utf-8"))
        #: The slot-and-claim command's bytes that stay the same for a project and its
        #: arguments: (what comes before the event's keys, what comes between them and the
        #: attempt's token), packed once (``_take_slot_and_claim``).
        self._packed: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}
        self._clients: dict[str, OpenPanelClient] = {}
        self._limits: dict[str, tuple[Rate, int] | None] = {}
        self._lock = threading.Lock()

    def client(self, project: str) -> OpenPanelClient:
        """The project's client, made once; :class:`ConfigurationError` without credentials."""
        client = self._clients.get(project)
        if client is None:
            with self._lock:
                client = self._clients.get(project)
                if client is None:
                    client = self._clients[project] = OpenPanelClient.for_project(
                        self.settings.project(project),
                        connect_timeout_s=self.settings.connect_timeout_s,
                        read_timeout_s=self.settings.read_timeout_s,
                    )
        return client

    def limit(self, project: str) -> tuple[Rate, int] | None:
        """The project's configured rate and burst, parsed once; None when it has none."""
        if project in self._limits:
            return self._limits[project]
        config = self.settings.project(project)
        limit = None
        if config.rate_limit:
            rate = parse_rate(config.rate_limit)
            limit = (
                with_headroom(rate, self.settings.rate_headroom_pct),
                DEFAULT_BURST if config.rate_burst is None else parse_burst(config.rate_burst),
            )
            log.info(
                "op_celery: project %r limited to %s, paced at %.4g/s (%g %% headroom), "
                "shared by all workers",
                project,
                rate,
                limit[0].per_second,
                self.settings.rate_headroom_pct,
            )
        else:
            log.info(
                "op_celery: project %r has no rate limit set (OPENPANEL_RATE_LIMIT unset): the "
                "workers pace at the rate the server allows, learned from its x-ratelimit "
                "headers or its 429s, and send as fast as they go until it shows one",
                project,
            )
        self._limits[project] = limit
        return limit

    def deliver(self, event: Event, attempt: Attempt) -> Outcome:
        """Pace, claim, send and mark one event; see the module docstring for the outcomes."""
        try:
            client = self.client(event.project)
            limit = self.limit(event.project)
            if self._slot_claim is not None:
                taken = self._take_slot_and_claim(client.client_id, limit, event.event_id)
                if isinstance(taken, Throttled):
                    return taken
                claim, waited_s = taken
            else:
                granted, waited_s = self._take_slot(client.client_id, limit)
                if not granted:
                    return Throttled(waited_s)
                claim = self.ledger.claim(event.event_id, self.settings.claim_ttl_s)
        except ConfigurationError as exc:
            return GiveUp(exc, "refused")
        except TransientError as exc:
            return self._after(exc, attempt)
        if claim.delivered:
            return AlreadyDelivered()
        if claim.token is None:
            return Busy(claim.busy_s)
        try:
            outcome = self._send(client, event, attempt, limit, waited_s)
        except BaseException:
            self._release(event.event_id, claim.token)
            raise
        if not isinstance(outcome, Delivered | Dropped):
            self._release(event.event_id, claim.token)
        return outcome

    def send_once(self, event: Event) -> Delivered | Dropped:
        """POST the event with no ledger, limiter or retries (a task called directly);
        raises what the client raises."""
        client = self.client(event.project)
        started = time.perf_counter()
        answer = client.send(event)
        latency_s = time.perf_counter() - started
        if isinstance(answer, DroppedAnswer):
            return Dropped(answer.reason, answer.message, answer.status, latency_s)
        return Delivered(answer.status, latency_s)

    def _send(
        self,
        client: OpenPanelClient,
        event: Event,
        attempt: Attempt,
        limit: tuple[Rate, int] | None,
        waited_s: float,
    ) -> Outcome:
        try:
            started = time.perf_counter()
            try:
                answer = client.send(event)
            except RateLimited as exc:
                # Every worker of the pool holds off, not only this one; the pace backs off.
                backoff = self.learner.rate_limited(
                    client.client_id, exc.retry_after, None if limit is None else limit[0]
                )
                if attempt.age_s is None or attempt.age_s <= MAX_THROTTLED_AGE_S:
                    return Throttled(backoff.pause_s)
                raise
            latency_s = time.perf_counter() - started
        except PermanentError as exc:
            return GiveUp(exc, "refused")
        except TransientError as exc:
            return self._after(exc, attempt)
        try:
            self.learner.observe(client.client_id, answer.headers)
        except StorageUnavailable as exc:
            # Delivered; the rate is learned from a later answer.
            log.warning("op_celery: the server's rate limit headers not stored: %s", exc)
        dropped = isinstance(answer, DroppedAnswer)
        tally = (event.project, answer.reason) if isinstance(answer, DroppedAnswer) else None
        forgotten = False
        try:
            self.ledger.record(
                event.event_id, attempt.outbox_keys, dedup_for_s=event.dedup_for_s, tally=tally
            )
            forgotten = attempt.outbox_keys is not None
        except StorageUnavailable as exc:
            # Finished; only the memory that prevents a resend after a crash is missing.
            log.warning(
                "op_celery: event %s %s but not recorded: %s",
                event.event_id, "answered" if dropped else "delivered", exc,
            )  # fmt: skip
        if isinstance(answer, DroppedAnswer):
            reason, message, status = answer.reason, answer.message, answer.status
            return Dropped(reason, message, status, latency_s, waited_s, forgotten)
        return Delivered(answer.status, latency_s, waited_s, forgotten)

    def _take_slot(self, client_id: str, limit: tuple[Rate, int] | None) -> tuple[bool, float]:
        """Take a slot of the project's shared limit: (True, seconds slept for it), or (False,
        seconds until one) when it is further off than ``OP_CELERY_MAX_INLINE_WAIT`` or the
        pool was paused while this attempt slept for its slot."""
        rate, burst = (None, DEFAULT_BURST) if limit is None else limit
        acquisition = self.limiter.acquire(
            client_id,
            rate,
            burst,
            max_wait_s=self.settings.max_inline_wait_s,
            line_s=min(MAX_LINE_S, self.settings.max_countdown_s),
        )
        if not acquisition.granted:
            return False, acquisition.wait_s
        if acquisition.wait_s:
            time.sleep(acquisition.wait_s)  # the slot is booked for us: send at it
            if acquisition.wait_s >= PAUSE_RECHECK_S:
                paused_s = self.limiter.paused_for(client_id)
                if paused_s > 0:  # a 429 elsewhere while we slept: the window is spent
                    return False, paused_s
        return True, acquisition.wait_s

    def _take_slot_and_claim(
        self, client_id: str, limit: tuple[Rate, int] | None, event_id: str
    ) -> tuple[Claim, float] | Throttled:
        """:meth:`_take_slot` and the ledger's claim in one round trip: (the claim, seconds
        slept for the slot), or Throttled as :meth:`_take_slot` refuses. An event found
        delivered or busy does not sleep for its slot, and a claim taken for a slot that a pause
        then spends is released."""
        rate, burst = (None, DEFAULT_BURST) if limit is None else limit
        assert self._slot_claim is not None
        keys, args = self.limiter.acquire_call(
            client_id,
            rate,
            burst,
            max_wait_s=self.settings.max_inline_wait_s,
            line_s=min(MAX_LINE_S, self.settings.max_countdown_s),
        )
        claim_keys, (token, hold_ms) = self.ledger.claim_call(event_id, self.settings.claim_ttl_s)
        cache_key = (client_id, *args)
        pieces = self._packed.get(cache_key)
        if pieces is None:
            if len(self._packed) >= MAX_PACKED_COMMANDS:
                self._packed.clear()
            head = self._slot_claim.packed_head(len(keys) + 2, len(args) + 2)
            head += b"".join(bulk(key) for key in keys)
            middle = b"".join(bulk(encoded(arg, self._encoding)) for arg in args)
            pieces = self._packed[cache_key] = (head, middle)
        packed = b"".join(
            (
                pieces[0],
                bulk(claim_keys[0].encode(self._encoding)),
                bulk(claim_keys[1].encode(self._encoding)),
                pieces[1],
                bulk(token.encode()),
                bulk(b"%d" % hold_ms),
            )
        )
        full_keys, full_args = (*keys, *claim_keys), (*args, token, hold_ms)
        what = "taking a rate-limit slot and claiming the event"
        with storage_errors(what, self.settings.redis_url):
            answer = self._slot_claim.call_packed(self._pool, packed, full_keys, full_args)
        acquisition = RateLimiter.acquisition(int(answer[0]))
        if not acquisition.granted:
            return Throttled(acquisition.wait_s)
        claim = Ledger.claim_of(int(answer[1]), token)
        if not acquisition.wait_s or not claim.claimed:
            return claim, 0.0
        time.sleep(acquisition.wait_s)  # the slot is booked for us: send at it
        if acquisition.wait_s >= PAUSE_RECHECK_S:
            try:
                paused_s = self.limiter.paused_for(client_id)
            except BaseException:
                self._release(event_id, token)
                raise
            if paused_s > 0:  # a 429 elsewhere while we slept: the window is spent
                self._release(event_id, token)
                return Throttled(paused_s)
        return claim, acquisition.wait_s

    def rate_status(self, project: str) -> RateStatus:
        """The project's pace: configured, learned (and from where), in use, pause; for
        ``op-celery status`` and the metrics. Raises ConfigurationError for a project without
        credentials, LimiterUnavailable when Redis does not answer."""
        limit = self.limit(project)
        config = self.settings.project(project)
        status = self.limiter.status(config.client_id, None if limit is None else limit[0])
        status["configured"] = config.rate_limit or None  # as written; the pace has the headroom
        return status

    def _after(self, error: TransientError, attempt: Attempt) -> Retry | GiveUp:
        decision = decide(error, attempt.retries, self.settings)
        if not decision.retry:
            return GiveUp(error, decision.reason)
        return Retry(error, decision.countdown_s, decision.reason)

    def _release(self, event_id: str, token: str) -> None:
        """End this attempt's claim on the event, so its retry (or a copy) can send it."""
        try:
            self.ledger.release(event_id, token)
        except StorageUnavailable as exc:
            log.warning(
                "op_celery: event %s: claim not released (it runs out in %g s): %s",
                event_id, self.settings.claim_ttl_s, exc,
            )  # fmt: skip

    def dead_letter(
        self,
        operation: str,
        kwargs: Mapping[str, Any],
        error: BaseException,
        attempts: int,
        extra: Mapping[str, Any] | None = None,
    ) -> DeadLetter:
        """Store the event as a dead letter; raises StorageUnavailable (or
        ConfigurationError) when there is nowhere to keep it."""
        now = time.time()
        letter = DeadLetter(
            id=str(kwargs.get("event_id") or uuid.uuid4().hex),
            operation=operation,
            project=str(kwargs.get("project", "default")),
            kwargs=dict(kwargs),
            error=str(error),
            error_type=type(error).__name__,
            status=getattr(error, "status", None),
            attempts=attempts,
            failed_at=now,
            first_failed_at=now,
            # Invalid input stays invalid; a refusal or a configuration error can be fixed.
            replayable=not isinstance(error, InvalidEvent),
            extra=dict(extra or {}),
        )
        self.dead_letters.add(letter)
        return letter


_deliveries: dict[Settings, Delivery] = {}
_deliveries_lock = threading.Lock()


def rate_statuses() -> list[tuple[str, RateStatus]]:
    """(project, its pace) for every project this process has delivered for, read from Redis
    now; a project whose Redis does not answer is left out."""
    statuses = []
    for delivery in list(_deliveries.values()):
        for project in list(delivery._limits):
            try:
                statuses.append((project, delivery.rate_status(project)))
            except (StorageUnavailable, ConfigurationError):
                continue
    return statuses


def delivery_for(settings: Settings) -> Delivery:
    """The pipeline of a settings object, made once per process."""
    delivery = _deliveries.get(settings)
    if delivery is None:
        with _deliveries_lock:
            delivery = _deliveries.get(settings)
            if delivery is None:
                delivery = _deliveries[settings] = Delivery(settings)
    return delivery
