"""The typed Celery tasks, one per OpenPanel operation, and their base class.

In the caller, ``apply_async`` (and so ``delay`` and signatures) validates the call with the
operation's builder and enqueues plain JSON: the caller's arguments with defaults filled in,
an event id, and for ``track`` the time of the call. On the worker, ``run`` builds the event
again from the message, looks up the project's credentials, and sends it. Transient failures go
through Celery's autoretry to ``retry``, which asks ``_retry.decide`` for the countdown;
permanent ones are logged once and stored as dead letters. Before sending, a worker claims the
event in the ledger of delivered events (``_ledger``: not delivered before, no copy in flight)
and takes a slot of the project's shared rate limit; once it is finished, the event's outbox
record goes (``_outbox``), and each worker process runs the outbox's sweeper.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, cast

import redis
from celery import Task, shared_task
from celery._state import connect_on_app_finalize
from celery.exceptions import Ignore, Retry
from celery.local import Proxy
from celery.signals import worker_ready
from kombu.exceptions import OperationalError

from . import signals
from ._app import publishing_app, settings_for
from ._client import OpenPanelClient
from ._consumer import install as install_consumer_step
from ._context import current_request
from ._events import Event, build_event, normalize_call
from ._exceptions import (
    ConfigurationError,
    InvalidEvent,
    OpenPanelError,
    PermanentError,
    PublishError,
    RateLimited,
    StorageUnavailable,
    TransientError,
)
from ._ledger import Ledger
from ._limiter import RateLimiter
from ._outbox import BROKER_ERRORS as OUTBOX_ERRORS
from ._outbox import Sweeper, outbox_keys
from ._publish import outbox_writer, publish, redis_broker
from ._rates import DEFAULT_BURST, Rate, parse_burst, parse_rate, with_headroom
from ._redis import redact_url, redis_for
from ._retry import backoff_s, decide
from ._settings import Settings, _redis_url_of
from ._spool import Spool, default_spool_dir
from .dead_letters import DeadLetter, DeadLetterStore

if TYPE_CHECKING:
    from celery.result import AsyncResult

__all__ = [
    "AliasTask",
    "AssignGroupTask",
    "DecrementTask",
    "GroupTask",
    "IdentifyTask",
    "IncrementTask",
    "OpenPanelTask",
    "TrackTask",
    "alias",
    "assign_group",
    "decrement",
    "flush_spool",
    "group",
    "identify",
    "increment",
    "task_for",
    "track",
]

log = logging.getLogger("op_celery")

JSON = Mapping[str, Any]

#: Per (id of a settings object, project): the settings (kept alive, so that id is not reused
#: by a later settings object while the entry exists) and the project's client.
_clients: dict[tuple[int, str], tuple[Settings, OpenPanelClient]] = {}
_clients_lock = threading.Lock()


def client_for(settings: Settings, project: str) -> OpenPanelClient:
    """The worker's client for a project, made once per settings object and project."""
    key = (id(settings), project)
    entry = _clients.get(key)
    if entry is None:
        with _clients_lock:
            entry = _clients.get(key)
            if entry is None:
                client = OpenPanelClient.for_project(
                    settings.project(project),
                    connect_timeout_s=settings.connect_timeout_s,
                    read_timeout_s=settings.read_timeout_s,
                )
                entry = _clients[key] = (settings, client)
    return entry[1]


class _Services:
    """The worker's Redis-backed helpers for one settings object."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ledger = Ledger(settings)
        self.dead_letters = DeadLetterStore(settings)
        self.limiter = RateLimiter(redis_for(settings), prefix=settings.key_prefix)
        self._limits: dict[str, tuple[Rate, int] | None] = {}

    def limit(self, project: str) -> tuple[Rate, int] | None:
        """The project's rate and burst, parsed once; None when it has no limit."""
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
                "op_celery: project %r has no rate limit (OPENPANEL_RATE_LIMIT unset): events "
                "are sent as fast as the workers go",
                project,
            )
        self._limits[project] = limit
        return limit


#: Per id of a settings object; each entry keeps its settings alive, so the id is not reused.
_services: dict[int, _Services] = {}


def services_for(settings: Settings) -> _Services:
    services = _services.get(id(settings))
    if services is None:
        with _clients_lock:
            services = _services.get(id(settings))
            if services is None:
                services = _services[id(settings)] = _Services(settings)
    return services


#: Seconds the pool pauses after a 429 that named no retry-after.
DEFAULT_PAUSE_S = 1.0
#: Seconds of jitter added at most to a throttled event's countdown, so that events woken for
#: the same token don't all ask at once.
THROTTLE_JITTER_S = 0.05

#: Errors that mean the broker did not take a message.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    OSError,
    redis.ConnectionError,
    redis.TimeoutError,
)
#: Option of apply_async (never sent) that makes a publish failure raise instead of spooling.
_NO_SPOOL = "_op_celery_no_spool"
#: Option of apply_async (never sent): publish now even if the request context defers.
_NOW = "_op_celery_now"
#: Seconds between two publish attempts while the broker does not answer.
PUBLISH_RETRY_INTERVAL_S = 0.2

_spools: dict[str, Spool] = {}


def _publish_retry_policy(timeout_s: float) -> dict[str, float]:
    attempts = max(0, math.ceil(timeout_s / PUBLISH_RETRY_INTERVAL_S) - 1)
    return {
        "max_retries": attempts,
        "interval_start": 0,
        "interval_step": PUBLISH_RETRY_INTERVAL_S,
        "interval_max": PUBLISH_RETRY_INTERVAL_S,
    }


def spool_for(settings: Settings) -> Spool:
    directory = settings.spool_dir or str(default_spool_dir())
    spool = _spools.get(directory)
    if spool is None:
        spool = _spools.setdefault(directory, Spool(directory))
    return spool


def _republish(task_name: str, kwargs: dict[str, Any], options: dict[str, Any]) -> object:
    task = cast(OpenPanelTask, publishing_app().tasks[task_name])
    publish_options: dict[str, Any] = {"queue": options.get("queue"), _NO_SPOOL: True}
    return task.apply_async((), kwargs, task_id=options.get("task_id"), **publish_options)


def flush_spool(settings: Settings | None = None) -> int:
    """Re-publish the spooled events now; returns how many. Raises if the broker is away."""
    return spool_for(settings or settings_for(publishing_app())).flush(_republish)


def task_for(operation: str) -> OpenPanelTask:
    """The task of an operation on the app that publishes."""
    return cast(OpenPanelTask, publishing_app().tasks[f"op_celery.{operation}"])


def _age_s(kwargs: Mapping[str, Any]) -> float | None:
    stamp = kwargs.get("timestamp")
    if not isinstance(stamp, str):
        return None
    try:
        return time.time() - datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


if TYPE_CHECKING:
    _TaskBase = Task[..., None]
else:
    _TaskBase = Task


class OpenPanelTask(_TaskBase):
    """Base of the operation tasks: validation at publish, delivery and retry decisions."""

    operation: ClassVar[str]
    #: A worker killed mid-task leaves its event on the broker to be delivered by another.
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    serializer = "json"
    #: Validation is ours (``normalize_call``); Celery's signature check would only repeat it.
    typing = False
    autoretry_for = (TransientError,)
    #: The limit is applied by ``_retry.decide``, which knows the 404 and 429 rules.
    max_retries = None

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        """Validate and enqueue; each operation's class declares its typed signature."""
        return self.apply_async(args, kwargs)

    @property
    def settings(self) -> Settings:
        return settings_for(self.app)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> AsyncResult[Any]:
        """Validate the call (raising :class:`InvalidEvent`), then enqueue it as JSON.

        If the broker does not answer within ``OP_CELERY_PUBLISH_TIMEOUT``, the event goes to
        the local spool (or :class:`PublishError` is raised, if so configured).
        """
        settings = self.settings
        message = normalize_call(self.operation, tuple(args or ()), kwargs)
        context = current_request()
        if context is not None and context.defer is not None and not options.pop(_NOW, False):
            # Validated now; published later (on commit of the request's transaction).
            task_id = task_id or str(uuid.uuid4())
            later = {**options, _NOW: True}
            context.defer(
                lambda: self.apply_async(
                    (), message, task_id, producer, link, link_error, shadow, **later
                )
            )
            return self.AsyncResult(task_id)
        options.pop(_NOW, None)
        spool_on_failure = options.pop(_NO_SPOOL, False) is False
        options.setdefault("queue", settings.queue)
        options["serializer"] = "json"
        options.setdefault("retry", True)
        options.setdefault("retry_policy", _publish_retry_policy(settings.publish_timeout_s))
        try:
            return publish(
                self, message, options, super(), task_id, producer, link, link_error, shadow,
                settings.outbox_grace_s if settings.outbox else None,
            )  # fmt: skip
        except BROKER_ERRORS as exc:
            if not spool_on_failure or settings.on_publish_failure == "raise":
                raise PublishError(
                    f"{self.operation}: the broker at {redact_url(settings.broker_url)} did not "
                    f"take the event within {settings.publish_timeout_s:g} s "
                    f"({type(exc).__name__}); it was not enqueued. Check the broker, or set "
                    "OP_CELERY_ON_PUBLISH_FAILURE=spool to keep such events on disk"
                ) from exc
            task_id = task_id or str(uuid.uuid4())
            spool = spool_for(settings)
            spool.write(self.name, message, {"queue": options["queue"], "task_id": task_id})
            spool.start_flusher(_republish)
            log.warning(
                "op_celery: broker unavailable (%s); %s event %s kept in the spool %s",
                type(exc).__name__, self.operation, message["event_id"], spool.directory,
            )  # fmt: skip
            return self.AsyncResult(task_id)

    def run(self, *args: Any, **kwargs: Any) -> None:
        """Deliver one event (on the worker, or in the caller when called directly)."""
        event: Event | None = None
        try:
            if args:  # a direct call such as track("signup"); messages carry keywords only
                kwargs = normalize_call(self.operation, args, kwargs)
            event = build_event(self.operation, kwargs)
            self.deliver(event, kwargs)
        except (PermanentError, InvalidEvent, ConfigurationError) as exc:
            self.give_up(event, kwargs, exc, "refused")

    def deliver(self, event: Event, kwargs: Mapping[str, Any]) -> None:
        """Send one validated event unless the ledger says it was delivered already, or another
        worker is sending a copy of it right now (then it comes back when that one is done)."""
        settings = self.settings
        client = client_for(settings, event.project)
        if self.request.called_directly:
            self.send(client, event, kwargs, None)
            return
        services = services_for(settings)
        claim = services.ledger.claim(event.event_id, settings.claim_ttl_s)
        if claim.delivered:
            log.info(
                "op_celery: %s event %s was delivered before; not sent again",
                self.operation,
                event.event_id,
            )
            self.finished(event.event_id)
            return
        if claim.token is None:
            log.info(
                "op_celery: %s event %s is being sent by another worker; looking again in %.3g s",
                self.operation,
                event.event_id,
                claim.busy_s,
            )
            self.reschedule(event, claim.busy_s, throttled=False)
        try:
            self.take_token(services, event, client.client_id)
            forgotten = self.send(client, event, kwargs, services)
        except BaseException:
            self.release(services, event.event_id, claim.token)
            raise
        if not forgotten:
            self.finished(event.event_id)

    def send(
        self,
        client: OpenPanelClient,
        event: Event,
        kwargs: Mapping[str, Any],
        services: _Services | None,
    ) -> bool:
        """POST the event; once the API took it, mark it delivered in the ledger.

        Returns whether that also forgot the event's outbox record (when the ledger's Redis is
        the broker's, it is one round trip).
        """
        forgotten = False
        started = time.perf_counter()
        try:
            delivered = client.send(event)
        except RateLimited as exc:
            if services is not None:
                # Every worker of the pool holds off, not only this one.
                services.limiter.pause(client.client_id, exc.retry_after or DEFAULT_PAUSE_S)
            raise
        latency_s = time.perf_counter() - started
        if services is not None:
            try:
                keys = self.outbox_keys()
                services.ledger.record(event.event_id, keys)
                forgotten = keys is not None
            except StorageUnavailable as exc:
                # Delivered; only the memory that prevents a duplicate after a crash is missing.
                log.warning(
                    "op_celery: event %s delivered but not recorded: %s", event.event_id, exc
                )
        signals.event_delivered.send(
            sender=self,
            operation=self.operation,
            project=event.project,
            event_id=event.event_id,
            status=delivered.status,
            latency_s=latency_s,
            age_s=_age_s(kwargs),
        )
        return forgotten

    def outbox_keys(self) -> tuple[str, str] | None:
        """The outbox keys of the current message's queue, as the ledger's client names them:
        only when the ledger's Redis is the broker's (the default), else None."""
        settings = self.settings
        if settings.redis_url is None or settings.redis_url != _redis_url_of(settings.broker_url):
            return None
        if not redis_broker(self.app):
            return None
        options = self.app.conf.broker_transport_options or {}
        return outbox_keys(self.queue_name(), str(options.get("global_keyprefix") or ""))

    def release(self, services: _Services, event_id: str, token: str) -> None:
        """End this attempt's claim on the event, so its retry (or a copy) can send it."""
        try:
            services.ledger.release(event_id, token)
        except StorageUnavailable as exc:
            log.warning(
                "op_celery: event %s: claim not released (it runs out in %g s): %s",
                event_id, self.settings.claim_ttl_s, exc,
            )  # fmt: skip

    def finished(self, event_id: str) -> None:
        """Forget the event's outbox record: it was delivered or dead-lettered.

        Also with ``OP_CELERY_OUTBOX=off`` here: a web app that has it on still writes records,
        and they must not pile up.
        """
        if not redis_broker(self.app):
            return
        try:
            with outbox_writer(self.app) as writer:
                writer.forget(self.queue_name(), (event_id,))
        except OUTBOX_ERRORS as exc:
            # The sweeper finds the record later, sees the event delivered, and removes it.
            log.info("op_celery: event %s: outbox record kept for the sweeper: %s", event_id, exc)

    def queue_name(self) -> str:
        """The queue the current message came from (retries and copies go back to it)."""
        info = self.request.delivery_info or {}
        return str(info.get("routing_key") or self.settings.queue)

    def take_token(self, services: _Services, event: Event, client_id: str) -> None:
        """Take a slot of the project's shared rate limit, waiting inline only briefly.

        A slot at most ``OP_CELERY_MAX_INLINE_WAIT`` ahead is booked in the same round trip and
        slept for; a later one re-schedules the event with that countdown (plus jitter) without
        counting a retry: throttling is not an error.
        """
        limit = services.limit(event.project)
        if limit is None:
            return
        rate, burst = limit
        acquisition = services.limiter.acquire(
            client_id, rate, burst, max_wait_s=services.settings.max_inline_wait_s
        )
        if not acquisition.granted:
            self.reschedule(event, acquisition.wait_s)
        if acquisition.wait_s:
            self.throttled(event, acquisition.wait_s)
            time.sleep(acquisition.wait_s)  # the slot is booked for us: send at it

    def throttled(self, event: Event, wait_s: float) -> None:
        signals.event_throttled.send(
            sender=self,
            operation=self.operation,
            project=event.project,
            event_id=event.event_id,
            wait_s=wait_s,
        )

    def reschedule(self, event: Event, wait_s: float, *, throttled: bool = True) -> NoReturn:
        """Put the event back on the queue to run in ``wait_s`` (plus jitter), same retries."""
        countdown = min(
            wait_s + random.uniform(0, THROTTLE_JITTER_S), self.settings.max_countdown_s
        )
        if throttled:
            self.throttled(event, wait_s)
        request = self.request
        signature = self.signature_from_request(
            request, (), None, countdown=countdown, retries=request.retries
        )
        signature.apply_async()
        raise Retry(exc=None, when=cast(Any, countdown), sig=signature)

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: Exception | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        """Retry after the countdown ``_retry.decide`` gives, or give the event up."""
        if exc is not None and countdown is None and eta is None:
            decision = decide(exc, self.request.retries, self.settings)
            message = dict(self.request.kwargs or {})
            if not decision.retry:
                self.give_up(None, message, exc, decision.reason)
            countdown = decision.countdown_s
            signals.event_retried.send(
                sender=self,
                operation=self.operation,
                project=message.get("project", "default"),
                event_id=message.get("event_id"),
                reason=type(exc).__name__,
                countdown_s=countdown,
            )
        return super().retry(
            args,
            kwargs,
            exc=exc,
            throw=throw,
            eta=eta,
            countdown=countdown,
            max_retries=max_retries,
            **options,
        )

    def give_up(
        self,
        event: Event | None,
        kwargs: dict[str, Any],
        error: BaseException,
        reason: str,
    ) -> None:
        """Log one line, store the event as a dead letter, and end the task as handled."""
        status = getattr(error, "status", None)
        retries = self.request.retries or 0
        project = str(kwargs.get("project", "default"))
        log.warning(
            "op_celery: %s event %s of project %r given up (%s, after %d retries, status %s): %s",
            self.operation,
            kwargs.get("event_id"),
            project,
            reason,
            retries,
            status,
            error,
        )
        if self.request.called_directly:
            raise error
        now = time.time()
        letter = DeadLetter(
            id=str(kwargs.get("event_id") or uuid.uuid4().hex),
            operation=self.operation,
            project=project,
            kwargs=dict(kwargs),
            error=str(error),
            error_type=type(error).__name__,
            status=status,
            attempts=retries + 1,
            failed_at=now,
            first_failed_at=now,
            # Invalid input stays invalid; a refusal or a configuration error can be fixed.
            replayable=not isinstance(error, InvalidEvent),
        )
        try:
            services_for(self.settings).dead_letters.add(letter)
        except (StorageUnavailable, ConfigurationError) as exc:
            # Nowhere to keep it: put it back on the broker for later rather than lose it.
            log.error("op_celery: event %s kept on the queue: %s", letter.id, exc)
            Task.retry(self, exc=exc, countdown=backoff_s(retries, self.settings), max_retries=None)
        if kwargs.get("event_id"):
            self.finished(letter.id)
        signals.event_dead_lettered.send(
            sender=self,
            operation=self.operation,
            project=project,
            event_id=letter.id,
            error_type=letter.error_type,
            status=status,
        )
        # Handled: the message is acked and Celery does not log a second traceback.
        raise Ignore()


class TrackTask(OpenPanelTask):
    operation = "track"

    if TYPE_CHECKING:

        def delay(
            self,
            name: str,
            properties: JSON | None = None,
            profile_id: str | int | None = None,
            groups: Sequence[str] | None = None,
            timestamp: datetime | None = None,
            *,
            client_ip: str | None = None,
            user_agent: str | None = None,
            project: str = "default",
        ) -> AsyncResult[Any]:
            """Enqueue a ``track`` event; ``timestamp`` defaults to now."""
            ...


class IdentifyTask(OpenPanelTask):
    operation = "identify"

    if TYPE_CHECKING:

        def delay(
            self,
            profile_id: str | int,
            first_name: str | None = None,
            last_name: str | None = None,
            email: str | None = None,
            avatar: str | None = None,
            properties: JSON | None = None,
            *,
            client_ip: str | None = None,
            user_agent: str | None = None,
            project: str = "default",
        ) -> AsyncResult[Any]:
            """Enqueue an ``identify``: create or update a profile."""
            ...


class AliasTask(OpenPanelTask):
    operation = "alias"

    if TYPE_CHECKING:

        def delay(
            self,
            profile_id: str | int,
            alias: str,
            *,
            client_ip: str | None = None,
            user_agent: str | None = None,
            project: str = "default",
        ) -> AsyncResult[Any]:
            """Enqueue an ``alias`` (current OpenPanel servers answer "Alias is not supported")."""
            ...


class _CounterTask(OpenPanelTask):
    if TYPE_CHECKING:

        def delay(
            self,
            profile_id: str | int,
            property: str,
            value: float = 1,
            *,
            client_ip: str | None = None,
            user_agent: str | None = None,
            project: str = "default",
        ) -> AsyncResult[Any]:
            """Enqueue a change of a numeric profile property by a positive ``value``."""
            ...


class IncrementTask(_CounterTask):
    operation = "increment"


class DecrementTask(_CounterTask):
    operation = "decrement"


class GroupTask(OpenPanelTask):
    operation = "group"

    if TYPE_CHECKING:

        def delay(
            self,
            id: str,
            type: str,
            name: str,
            properties: JSON | None = None,
            *,
            client_ip: str | None = None,
            user_agent: str | None = None,
            project: str = "default",
        ) -> AsyncResult[Any]:
            """Enqueue a ``group``: create or update a group."""
            ...


class AssignGroupTask(OpenPanelTask):
    operation = "assign_group"

    if TYPE_CHECKING:

        def delay(
            self,
            group_ids: Sequence[str],
            profile_id: str | int | None = None,
            *,
            client_ip: str | None = None,
            user_agent: str | None = None,
            project: str = "default",
        ) -> AsyncResult[Any]:
            """Enqueue an ``assign_group``: put a profile into groups."""
            ...


def _deliver(self: OpenPanelTask, *args: Any, **kwargs: Any) -> None:
    OpenPanelTask.run(self, *args, **kwargs)


def _shared(base: type[OpenPanelTask]) -> Any:
    """Register ``base`` as a shared task on every Celery app (present and future) and return
    a proxy that resolves it on the app that publishes: the user's, else the package's."""
    name = f"op_celery.{base.operation}"
    shared_task(base=base, bind=True, name=name)(cast(Any, _deliver))
    connect_on_app_finalize(install_consumer_step)
    return Proxy(lambda: publishing_app().tasks[name])


track: TrackTask = _shared(TrackTask)
identify: IdentifyTask = _shared(IdentifyTask)
alias: AliasTask = _shared(AliasTask)
increment: IncrementTask = _shared(IncrementTask)
decrement: DecrementTask = _shared(DecrementTask)
group: GroupTask = _shared(GroupTask)
assign_group: AssignGroupTask = _shared(AssignGroupTask)


@worker_ready.connect(weak=False)
def _announce(sender: Any = None, **_: Any) -> None:
    """At worker start: say what the default project's limit is (or that it has none), and
    re-publish what a previous process on this machine left in the spool (a worker that died
    while the broker was away leaves the retries it could not publish there)."""
    app = getattr(sender, "app", None)
    if app is None or "op_celery.track" not in app.tasks:
        return
    settings = settings_for(app)
    try:
        services_for(settings).limit("default")
    except OpenPanelError as exc:
        log.warning("op_celery: the default project is not usable yet: %s", exc)
    _start_sweeper(app, settings)
    spool = spool_for(settings)
    spool.recover_stale_claims()
    if spool.pending():
        log.warning("op_celery: %d events in the spool %s", len(spool), spool.directory)
        spool.start_flusher(_republish)


_sweepers: dict[int, Sweeper] = {}


def _start_sweeper(app: Any, settings: Settings) -> None:
    """Start this process's outbox sweeper (``_outbox``), on a Redis broker with an outbox."""
    if not settings.outbox or not redis_broker(app) or id(app) in _sweepers:
        return

    def republish(task: str, kwargs: dict[str, Any], task_id: str, queue: str) -> object:
        options: dict[str, Any] = {"queue": queue, _NO_SPOOL: True}
        return app.tasks[task].apply_async((), kwargs, task_id=task_id, **options)

    sweeper = _sweepers[id(app)] = Sweeper(
        settings.outbox_grace_s,
        connect=app.connection_for_write,
        queues=lambda: _consumed_queues(app, settings),
        republish=republish,
        delivered=services_for(settings).ledger.delivered,
    )
    sweeper.start()


def _consumed_queues(app: Any, settings: Settings) -> list[str]:
    """The queues this worker consumes (``-Q``), else all the app declares, and the package's."""
    queues = app.amqp.queues
    names = list(queues.consume_from or queues)
    return names if names else [settings.queue]
