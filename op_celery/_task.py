"""The task class every operation's task is made from: Celery's side of one event.

In the caller, ``apply_async`` (and so ``delay`` and signatures) validates the call with the
operation's builder and enqueues plain JSON: the caller's arguments with defaults filled in,
an event id, and for ``track`` the time of the call; a broker that stays away sends the event
to the spool (``_enqueue``). On the worker, ``run`` builds the event again from the message and
hands it to the delivery pipeline (``_delivery``), then maps the pipeline's outcome to Celery:
a retry (``Retry``), a countdown that costs no retry (``Busy``, ``Throttled``), a dead letter
(``GiveUp``) or an ack (``Delivered``; ``Dropped``, the server's bot, duplicate or filter
answer, with a signal of its own and no dead letter). Once an event is finished, its outbox
record goes (``_outbox``); each worker process runs the outbox's sweeper (``_startup``).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import os
import random
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, ParamSpec, cast

from celery import Celery, Task
from celery.exceptions import Ignore
from celery.exceptions import Retry as CeleryRetry

from . import _startup, signals  # noqa: F401  (_startup: the worker's start-up hooks)
from ._app import settings_for
from ._capture import active_recorder
from ._consumer import install as install_consumer_step
from ._context import current_request
from ._delivery import (
    AlreadyDelivered,
    Attempt,
    Busy,
    Delivered,
    Dropped,
    GiveUp,
    Retry,
    Throttled,
    delivery_for,
)
from ._drain import drain
from ._enqueue import (
    BROKER_ERRORS,
    NO_SPOOL,
    NOW,
    publish_retry_policy,
    queue_for,
    republish,
    spool_for,
)
from ._events import build_event, normalize_call
from ._exceptions import (
    ConfigurationError,
    InvalidEvent,
    OpenPanelError,
    PermanentError,
    PublishError,
    StorageUnavailable,
    TransientError,
)
from ._outbox import BROKER_ERRORS as OUTBOX_ERRORS
from ._outbox import broker_refusals, outbox_keys
from ._publish import outbox_writer, publish, redis_broker
from ._redis import redact_url, write_refusal
from ._retry import Decision, backoff_s, decide
from ._settings import Settings, _redis_url_of

if TYPE_CHECKING:
    from celery.result import AsyncResult

__all__ = ["JSON", "OpenPanelTask"]

log = logging.getLogger("op_celery")

JSON = Mapping[str, Any]

#: Seconds of jitter added at most to a throttled event's countdown, so that events woken for
#: the same token don't all ask at once.
THROTTLE_JITTER_S = 0.05


#: How the log says why the server did not store an event (`Dropped.reason`).
_DROPPED_LOG: Mapping[str, str] = {
    "bot": "dropped by the server as a bot's",
    "duplicate": "answered as a duplicate of a copy the server stored moments ago",
    "filtered": "refused by the project's own filters in OpenPanel",
}


#: Threads that publish for ``adelay``: a broker round trip each, so a few keep up with many
#: requests; bounded so a broker outage cannot grow a thread per waiting request.
ADELAY_THREADS = 8
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new pool when needed."""
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def _publish_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(ADELAY_THREADS, thread_name_prefix="op-celery-adelay")
    return _pool


#: Per app: its settings object and the outbox keys of each queue under them (``outbox_keys``).
_outbox_keys_cache: weakref.WeakKeyDictionary[
    Celery, tuple[Settings, dict[str, tuple[str, str] | None]]
] = weakref.WeakKeyDictionary()
#: Queues remembered per app (a worker consumes a handful; a bound, not a tuning knob).
_MAX_CACHED_QUEUES = 1024


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

    _P = ParamSpec("_P")

    def _awaitable(
        delay: Callable[_P, AsyncResult[None]],
    ) -> Callable[_P, Coroutine[Any, Any, AsyncResult[None]]]:
        """The type of ``adelay``: ``delay``'s own signature, awaited."""
        ...
else:
    _TaskBase = Task


class OpenPanelTask(_TaskBase):
    """Base of the operation tasks: validation at publish; on the worker, the pipeline's
    outcome mapped to Celery's retry, countdown, dead letter or ack."""

    operation: ClassVar[str]
    #: A worker killed mid-task leaves its event on the broker to be delivered by another.
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    serializer = "json"
    #: Validation is ours (``normalize_call``); Celery's signature check would only repeat it.
    typing = False
    #: A transient error that escapes the pipeline (a direct call) still goes through ``retry``.
    autoretry_for = (TransientError,)
    #: The limit is applied by ``_retry.decide``, which knows the 404 and 429 rules.
    max_retries = None

    @classmethod
    def on_bound(cls, app: Celery) -> None:
        """Celery binds the shared tasks to every app as it finalizes (public hook): that app's
        workers get the consumer step that keeps malformed messages visible (``_consumer``)."""
        install_consumer_step(app)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult[None]:
        """Validate and enqueue; each operation's class declares its typed signature."""
        return self.apply_async(args, kwargs)

    if TYPE_CHECKING:
        # Typed per operation in each subclass as ``delay``'s signature, awaited.
        adelay: Callable[..., Coroutine[Any, Any, AsyncResult[None]]]
    else:

        async def adelay(self, *args: Any, **kwargs: Any) -> AsyncResult[None]:
            """``delay`` for an event loop: validates at once, publishes without blocking."""
            return await self.aapply_async(args, kwargs)

    async def aapply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult[None]:
        """``apply_async`` for an event loop.

        Validation runs here, in the caller (``InvalidEvent`` raises before the first
        ``await``); the publish, which waits for the broker (up to ``OP_CELERY_PUBLISH_TIMEOUT``
        when it is away, then spools), runs on the package's own small thread pool, with the
        caller's context (its request's IP and user agent) and the same guarantees as
        ``apply_async``. A capture (``op_celery.testing``) records at once, off no thread.
        """
        message = normalize_call(self.operation, tuple(args or ()), kwargs)
        if active_recorder() is not None:
            return self.apply_async((), message, **options)
        context = contextvars.copy_context()
        call = functools.partial(context.run, self.apply_async, (), message, **options)
        return await asyncio.get_running_loop().run_in_executor(_publish_pool(), call)

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
    ) -> AsyncResult[None]:
        """Validate the call (raising :class:`InvalidEvent`), then enqueue it as JSON.

        If the broker does not answer within ``OP_CELERY_PUBLISH_TIMEOUT``, the event goes to
        the local spool (or :class:`PublishError` is raised, if so configured).
        """
        settings = self.settings
        message = normalize_call(self.operation, tuple(args or ()), kwargs)
        context = current_request()
        if context is not None and context.defer is not None and not options.pop(NOW, False):
            # Validated now; published later (on commit of the request's transaction).
            task_id = task_id or str(uuid.uuid4())
            later = {**options, NOW: True}
            context.defer(
                lambda: self.apply_async(
                    (), message, task_id, producer, link, link_error, shadow, **later
                )
            )
            return self.AsyncResult(task_id)
        options.pop(NOW, None)
        recorder = active_recorder()
        if recorder is not None:
            # op_celery.testing.capture(): validated as in production, kept in memory, and
            # nothing reaches a broker or the network (also in eager mode).
            captured = recorder.record(self.operation, message)
            return self.AsyncResult(task_id or captured.event_id)
        if not settings.enabled:
            log.debug(
                "op_celery: %s event %s dropped: OP_CELERY_ENABLED is off",
                self.operation, message["event_id"],
            )  # fmt: skip
            return self.AsyncResult(task_id or str(message["event_id"]))
        if self.app.conf.task_always_eager:
            # Run here and now (Celery's apply): no broker, so no outbox record, no spool.
            options.pop(NO_SPOOL, None)
            return super().apply_async(
                (), message, task_id, producer, link, link_error, shadow, **options
            )
        spool_on_failure = options.pop(NO_SPOOL, False) is False
        if "queue" not in options:
            options["queue"] = queue_for(self.app, self.name, settings, message)
        options["serializer"] = "json"
        options.setdefault("retry", True)
        options.setdefault("retry_policy", publish_retry_policy(settings.publish_timeout_s))
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
            spool.start_flusher(republish)
            refusal = write_refusal(exc)
            if refusal is not None:  # full or read-only: said once, then each event at INFO
                broker_refusals().refused(refusal, redact_url(settings.broker_url))
            log.log(
                logging.INFO if refusal else logging.WARNING,
                "op_celery: broker unavailable (%s); %s event %s kept in the spool %s",
                type(exc).__name__, self.operation, message["event_id"], spool.directory,
            )  # fmt: skip
            return self.AsyncResult(task_id)

    def run(self, *args: Any, **kwargs: Any) -> None:
        """Deliver one event (on the worker, or in the caller when called directly); on a
        worker with a backlog, then the next ones waiting on the queue (``_drain``)."""
        self.run_one(*args, **kwargs)
        request = self.request
        if not (request.called_directly or request.is_eager):
            drain(self, self.queue_name())

    def run_one(self, *args: Any, **kwargs: Any) -> None:
        """Deliver one event: the outcome of the pipeline as Celery's retry, countdown, dead
        letter (these raise) or ack."""
        try:
            if args:  # a direct call such as track("signup"); messages carry keywords only
                kwargs = normalize_call(self.operation, args, kwargs)
            event = build_event(self.operation, kwargs)
        except (InvalidEvent, ConfigurationError) as exc:
            self.give_up(kwargs, exc, "refused")
        except Exception as exc:  # a bug in validation: kept, as below
            log.exception("op_celery: %s event: unexpected error building it", self.operation)
            self.give_up(kwargs, exc, "unexpected error")
        delivery = delivery_for(self.settings)
        if self.request.called_directly or self.request.is_eager:
            # One POST, no ledger, limiter or dead letters: nothing is kept in a Redis that no
            # worker reads. An error is the caller's (the EagerResult's, or raised with
            # task_eager_propagates), and is never retried (see ``retry``).
            try:
                answer = delivery.send_once(event)
            except OpenPanelError as exc:
                reason = "refused" if isinstance(exc, PermanentError) else "not retried here"
                self.give_up(kwargs, exc, reason)
            if isinstance(answer, Dropped):
                self.dropped(event.project, event.event_id, answer)
            return
        age_s = _age_s(kwargs)
        attempt = Attempt(
            retries=self.request.retries or 0, outbox_keys=self.outbox_keys(), age_s=age_s
        )
        try:
            outcome = delivery.deliver(event, attempt)
        except Exception as exc:
            # Nothing maps it (a bug, or a library's error nobody foresaw): the event is kept
            # as a replayable dead letter, never acked into nothing nor looping on the outbox.
            log.exception(
                "op_celery: %s event %s: unexpected error", self.operation, event.event_id
            )
            self.give_up(kwargs, exc, "unexpected error")
        if isinstance(outcome, Delivered):
            if outcome.waited_s:
                self.throttled(kwargs, outcome.waited_s)
            signals.event_delivered.send(
                sender=self,
                operation=self.operation,
                project=event.project,
                event_id=event.event_id,
                status=outcome.status,
                latency_s=outcome.latency_s,
                age_s=age_s,
            )
            if not outcome.forgotten:
                self.finished(event.event_id)
        elif isinstance(outcome, Dropped):
            if outcome.waited_s:
                self.throttled(kwargs, outcome.waited_s)
            self.dropped(event.project, event.event_id, outcome)
            if not outcome.forgotten:
                self.finished(event.event_id)
        elif isinstance(outcome, AlreadyDelivered):
            log.info(
                "op_celery: %s event %s was delivered before; not sent again",
                self.operation,
                event.event_id,
            )
            self.finished(event.event_id)
        elif isinstance(outcome, Busy):
            log.info(
                "op_celery: %s event %s is being sent by another worker; looking again in %.3g s",
                self.operation,
                event.event_id,
                outcome.wait_s,
            )
            self.reschedule(kwargs, outcome.wait_s, throttled=False)
        elif isinstance(outcome, Throttled):
            self.reschedule(kwargs, outcome.wait_s)
        elif isinstance(outcome, Retry):
            self.retry_after(outcome.error, Decision(True, outcome.countdown_s, outcome.reason))
        else:
            assert isinstance(outcome, GiveUp)
            self.give_up(kwargs, outcome.error, outcome.reason)

    def dropped(self, project: str, event_id: str, outcome: Dropped) -> None:
        """Log (INFO: nothing to fix here) and signal an event the server did not store."""
        what = _DROPPED_LOG[outcome.reason]
        log.info(
            "op_celery: %s event %s of project %r %s (HTTP %d %r); finished, not sent again",
            self.operation, event_id, project, what, outcome.status, outcome.message,
        )  # fmt: skip
        signals.event_dropped.send(
            sender=self,
            operation=self.operation,
            project=project,
            event_id=event_id,
            reason=outcome.reason,
            status=outcome.status,
            message=outcome.message,
        )

    def outbox_keys(self) -> tuple[str, str] | None:
        """The outbox keys of the current message's queue, as the ledger's client names them:
        only when the ledger's Redis is the broker's (the default), else None.

        Worked out once per settings object and queue (it runs per event, and reading the
        app's config is most of its cost)."""
        settings = self.settings
        queue = self.queue_name()
        cache = _outbox_keys_cache.get(self.app)
        if cache is None or cache[0] is not settings:
            cache = _outbox_keys_cache[self.app] = (settings, {})
        if queue in cache[1]:
            return cache[1][queue]
        keys = None
        if (
            settings.redis_url is not None
            and settings.redis_url == _redis_url_of(settings.broker_url)
            and redis_broker(self.app)
        ):
            options = self.app.conf.broker_transport_options or {}
            keys = outbox_keys(queue, str(options.get("global_keyprefix") or ""))
        if len(cache[1]) < _MAX_CACHED_QUEUES:
            cache[1][queue] = keys
        return keys

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

    def throttled(self, kwargs: Mapping[str, Any], wait_s: float) -> None:
        signals.event_throttled.send(
            sender=self,
            operation=self.operation,
            project=kwargs.get("project", "default"),
            event_id=kwargs.get("event_id"),
            wait_s=wait_s,
        )

    def countdown(self, seconds: float) -> float:
        """``seconds`` as a countdown this app's broker can honour: whole seconds (rounded up)
        on quorum queues, whose countdowns go through Celery's native delayed delivery, which
        refuses one under a second (the message would be lost); else as given."""
        if seconds > 0 and self.app.conf.task_default_queue_type == "quorum":
            return float(math.ceil(seconds))
        return seconds

    def reschedule(
        self, kwargs: Mapping[str, Any], wait_s: float, *, throttled: bool = True
    ) -> NoReturn:
        """Put the event back on the queue to run in ``wait_s`` (plus jitter), same retries."""
        countdown = self.countdown(
            min(wait_s + random.uniform(0, THROTTLE_JITTER_S), self.settings.max_countdown_s)
        )
        if throttled:
            self.throttled(kwargs, wait_s)
        request = self.request
        signature = self.signature_from_request(
            request, (), None, countdown=countdown, retries=request.retries
        )
        signature.apply_async()
        raise CeleryRetry(exc=None, when=cast(Any, countdown), sig=signature)

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
        """Retry after the countdown ``_retry.decide`` gives, or give the event up.

        Not in eager mode: Celery's eager retry runs the task again inside this call, once
        per retry, until the stack overflows; the error goes to the caller instead.
        """
        if self.request.is_eager:
            if exc is None:
                raise TransientError(
                    f"{self.operation}: a retry was asked for in eager mode (task_always_eager), "
                    "where op-celery does not retry; call the task again or run a worker"
                )
            raise exc
        if exc is not None and countdown is None and eta is None:
            self.retry_after(exc, decide(exc, self.request.retries, self.settings))
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

    def retry_after(self, exc: Exception, decision: Decision) -> NoReturn:
        """Apply a decision of ``_retry.decide``: retry after its countdown, or give up."""
        message = dict(self.request.kwargs or {})
        if not decision.retry:
            self.give_up(message, exc, decision.reason)
        signals.event_retried.send(
            sender=self,
            operation=self.operation,
            project=message.get("project", "default"),
            event_id=message.get("event_id"),
            reason=type(exc).__name__,
            countdown_s=decision.countdown_s,
        )
        super().retry(exc=exc, countdown=self.countdown(decision.countdown_s))
        raise AssertionError("unreachable: Task.retry raises")  # pragma: no cover

    def give_up(self, kwargs: dict[str, Any], error: BaseException, reason: str) -> NoReturn:
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
        if self.request.called_directly or self.request.is_eager:
            raise error
        try:
            letter = delivery_for(self.settings).dead_letter(
                self.operation, kwargs, error, attempts=retries + 1,
                extra={"queue": self.queue_name()},
            )  # fmt: skip
        except (StorageUnavailable, ConfigurationError) as exc:
            # Nowhere to keep it: put it back on the broker for later rather than lose it.
            log.error("op_celery: event %s kept on the queue: %s", kwargs.get("event_id"), exc)
            wait = self.countdown(backoff_s(retries, self.settings))
            Task.retry(self, exc=exc, countdown=wait, max_retries=None)
            raise AssertionError("unreachable: Task.retry raises") from exc  # pragma: no cover
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
