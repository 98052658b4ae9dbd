"""Celery signals the workers send for each event, for metrics and logs of your own.

Connect as to any Celery signal::

    from op_celery.signals import event_delivered

    @event_delivered.connect
    def on_delivered(sender, operation, project, latency_s, age_s, **kwargs): ...

Receivers run in the worker's thread that handled the event: keep them quick.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = [
    "event_dead_lettered",
    "event_delivered",
    "event_dropped",
    "event_retried",
    "event_throttled",
]

#: An event was accepted by the API. ``latency_s``: the HTTP call; ``age_s``: since ``.delay()``.
event_delivered = Signal(name="op_celery.event_delivered")
#: An event will be tried again after ``countdown_s``; ``reason`` is the error's class name.
event_retried = Signal(name="op_celery.event_retried")
#: The shared rate limit (or a 429 pause) made an event wait ``wait_s`` seconds.
event_throttled = Signal(name="op_celery.event_throttled")
#: An event was given up for good and stored as a dead letter.
event_dead_lettered = Signal(name="op_celery.event_dead_lettered")
#: The server answered and stores nothing for the event, and no retry or replay would change
#: that: ``reason`` is ``"bot"`` (202, its bot check), ``"duplicate"`` (200 ``Duplicate
#: event``: it stored a copy moments ago) or ``"filtered"`` (401, the project's filters block
#: the IP or profile id); ``message`` is the server's words, ``status`` its HTTP status. The
#: event is finished (never sent again) and is no dead letter; ``event_delivered`` is not sent.
event_dropped = Signal(name="op_celery.event_dropped")
