"""What the framework tests share: capturing what ``.delay()`` publishes, and Django's settings.

Publishes are captured with Celery's public ``before_task_publish`` signal, from a real Celery
app on the in-memory broker, so the whole publishing path runs and no Redis is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from celery import Celery, _state
from celery.signals import before_task_publish

from op_celery import _app

#: The browser of the tests' requests.
BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0"
#: The end user's address (TEST-NET-3).
CLIENT = "203.0.113.7"


@dataclass(frozen=True)
class Published:
    """One task message, as the broker would get it."""

    task: str
    kwargs: dict[str, Any]
    queue: str | None


@contextmanager
def capturing_publishes() -> Iterator[list[Published]]:
    """Make an in-memory Celery app the one that publishes; yield the list of what it publishes.

    Celery's current app is per thread, and the frameworks' test clients run views in threads of
    their own (Starlette's portal, thread pools), where op-celery publishes through its package
    app: that one is pointed at the same in-memory app for the duration.
    """
    previous_current = _state._tls.current_app
    previous_package = _app._package_app
    app = Celery("op-celery-contrib-tests", broker="memory://", set_as_current=True)
    app.conf.update(task_always_eager=False, task_ignore_result=True)
    _app._package_app = app
    published: list[Published] = []

    def capture(
        sender: str | None = None,
        body: Any = None,
        routing_key: str | None = None,
        **_: Any,
    ) -> None:
        if sender and sender.startswith("op_celery."):
            _args, kwargs, _embed = body
            published.append(Published(sender, dict(kwargs), routing_key))

    before_task_publish.connect(capture, weak=False)
    try:
        yield published
    finally:
        before_task_publish.disconnect(capture)
        _app._package_app = previous_package
        _app.reset_settings(app)
        _state._set_current_app(previous_current)
        app.close()


def configure_django() -> None:
    """Configure Django once per process: no apps, an in-memory SQLite database. Each test
    module then sets its own ``ROOT_URLCONF``, ``MIDDLEWARE`` and ``OPENPANEL`` with
    ``override_settings``."""
    import django
    from django.conf import settings

    if settings.configured:
        return
    settings.configure(
        DEBUG=False,
        SECRET_KEY="op-celery-tests",
        ALLOWED_HOSTS=["testserver"],
        INSTALLED_APPS=[],
        MIDDLEWARE=[],
        ROOT_URLCONF="tests.contrib.test_django",
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        USE_TZ=True,
    )
    django.setup()
