"""A one-file Django app whose views enqueue OpenPanel events with op-celery.

    pip install 'op-celery[django]'
    python examples/django_app/app.py runserver          # http://127.0.0.1:8000/
    celery -A op_celery.worker worker                    # another shell: delivers the events

The views only need the broker (Redis on 127.0.0.1:6379, or ``OP_CELERY_BROKER_URL``); the
worker also needs ``OPENPANEL_CLIENT_ID`` and ``OPENPANEL_CLIENT_SECRET`` (see the README).
"""

from __future__ import annotations

import sys

from django.conf import settings

MIDDLEWARE = ["op_celery.contrib.django.OpenPanelMiddleware"]
#: Behind a reverse proxy, name it: {"TRUSTED_PROXIES": ["10.0.0.0/8"]}, or a number of hops.
OPENPANEL: dict[str, object] = {}

if not settings.configured:  # the project's tests configure Django themselves
    settings.configure(
        DEBUG=True,
        SECRET_KEY="example-only-not-secret",
        ALLOWED_HOSTS=["127.0.0.1", "localhost"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=MIDDLEWARE,
        OPENPANEL=OPENPANEL,
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    )

from django.db import transaction  # noqa: E402  (after settings, as in any one-file Django app)
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402

import op_celery  # noqa: E402
from op_celery.contrib.django import delay_on_commit  # noqa: E402


def index(request: HttpRequest) -> JsonResponse:
    # No client_ip / user_agent here: the middleware supplies the visitor's.
    op_celery.track.delay("page_viewed", properties={"path": request.path})
    return JsonResponse({"enqueued": ["page_viewed"]})


def signup(request: HttpRequest) -> JsonResponse:
    with transaction.atomic():
        # ... create the user here; the events leave only if this transaction commits.
        delay_on_commit(op_celery.identify, "user-42", email="ada@example.com")
        delay_on_commit(op_celery.track, "signed_up", profile_id="user-42")
    return JsonResponse({"enqueued": ["identify", "signed_up"]})


urlpatterns = [path("", index), path("signup", signup)]

if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
