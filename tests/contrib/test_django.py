"""The Django middleware and ``delay_on_commit``, through Django's own test clients.

This module is also the URLconf of its tests (``ROOT_URLCONF = __name__``).
"""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from asgiref.sync import iscoroutinefunction

from .._support import mypy_on
from ._support import BROWSER, CLIENT, Published, capturing_publishes, configure_django

configure_django()

from django.db import transaction  # noqa: E402  (Django needs its settings first)
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.test import AsyncClient, Client, RequestFactory, override_settings  # noqa: E402
from django.urls import path  # noqa: E402

import op_celery  # noqa: E402
from op_celery import ConfigurationError, InvalidEvent  # noqa: E402
from op_celery._context import current_request, request_context  # noqa: E402
from op_celery.contrib.django import OpenPanelMiddleware, delay_on_commit  # noqa: E402

MIDDLEWARE = "op_celery.contrib.django.OpenPanelMiddleware"


class Rollback(Exception):
    pass


def track_view(request: HttpRequest) -> HttpResponse:
    op_celery.track.delay("x")
    return HttpResponse("ok")


async def async_track_view(request: HttpRequest) -> HttpResponse:
    op_celery.track.delay("x-async")
    return HttpResponse("ok")


def signup_view(request: HttpRequest) -> HttpResponse:
    with transaction.atomic():
        delay_on_commit(op_celery.track, "signup", profile_id="user-1")
    try:
        with transaction.atomic():
            delay_on_commit(op_celery.track, "rolled_back")
            raise Rollback
    except Rollback:
        pass
    return HttpResponse("ok")


urlpatterns = [
    path("track", track_view),
    path("async-track", async_track_view),
    path("signup", signup_view),
]


@pytest.fixture
def published() -> Iterator[list[Published]]:
    with (
        override_settings(ROOT_URLCONF=__name__, MIDDLEWARE=[MIDDLEWARE], OPENPANEL={}),
        capturing_publishes() as messages,
    ):
        yield messages


def test_a_view_delay_carries_the_requests_ip_and_user_agent(published: list[Published]) -> None:
    response = Client().get("/track", REMOTE_ADDR=CLIENT, HTTP_USER_AGENT=BROWSER)
    assert response.status_code == 200
    [message] = published
    assert message.task == "op_celery.track"
    assert message.queue == "openpanel"
    assert message.kwargs["name"] == "x"
    assert (message.kwargs["client_ip"], message.kwargs["user_agent"]) == (CLIENT, BROWSER)


def test_the_context_is_reset_after_the_request(published: list[Published]) -> None:
    Client().get("/track", REMOTE_ADDR=CLIENT, HTTP_USER_AGENT=BROWSER)
    assert current_request() is None
    op_celery.track.delay("after")
    assert published[-1].kwargs["client_ip"] is None


# AsyncClient's peer is always 127.0.0.1, so these trust it as a proxy and name the client in
# X-Forwarded-For.
@override_settings(OPENPANEL={"TRUSTED_PROXIES": ["127.0.0.1"]})
def test_an_async_view_through_the_async_stack_sees_the_context(
    published: list[Published],
) -> None:
    async def call() -> int:
        headers = {"user-agent": BROWSER, "x-forwarded-for": CLIENT}
        response = await AsyncClient().get("/async-track", headers=headers)
        return response.status_code

    assert asyncio.run(call()) == 200
    [message] = published
    assert (message.kwargs["client_ip"], message.kwargs["user_agent"]) == (CLIENT, BROWSER)


@override_settings(OPENPANEL={"TRUSTED_PROXIES": ["127.0.0.1"]})
def test_a_sync_view_under_the_async_stack_sees_the_context(published: list[Published]) -> None:
    async def call() -> int:
        response = await AsyncClient().get("/track", headers={"x-forwarded-for": CLIENT})
        return response.status_code

    assert asyncio.run(call()) == 200
    assert published[0].kwargs["client_ip"] == CLIENT


def test_the_middleware_is_async_when_the_stack_is_async() -> None:
    async def get_response(request: HttpRequest) -> HttpResponse:
        return HttpResponse("ok")

    assert iscoroutinefunction(OpenPanelMiddleware(get_response))
    assert not iscoroutinefunction(OpenPanelMiddleware(lambda request: HttpResponse("ok")))


def test_x_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(
    published: list[Published],
) -> None:
    Client().get("/track", REMOTE_ADDR="198.51.100.9", HTTP_X_FORWARDED_FOR="1.1.1.1")
    assert published[-1].kwargs["client_ip"] == "198.51.100.9"
    with override_settings(OPENPANEL={"TRUSTED_PROXIES": ["10.0.0.0/8"]}):
        Client().get("/track", REMOTE_ADDR="198.51.100.9", HTTP_X_FORWARDED_FOR="1.1.1.1")
        assert published[-1].kwargs["client_ip"] == "198.51.100.9"
        Client().get(
            "/track", REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR=f"1.1.1.1, {CLIENT}, 10.0.0.4"
        )
        assert published[-1].kwargs["client_ip"] == CLIENT


def test_a_hop_count_setting_is_honoured(published: list[Published]) -> None:
    with override_settings(OPENPANEL={"TRUSTED_PROXIES": 1}):
        Client().get("/track", REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR=f"1.1.1.1, {CLIENT}")
    assert published[-1].kwargs["client_ip"] == CLIENT


def test_an_explicit_client_ip_wins_over_the_request(published: list[Published]) -> None:
    request = RequestFactory().get("/", REMOTE_ADDR=CLIENT, HTTP_USER_AGENT=BROWSER)

    def view(request: HttpRequest) -> HttpResponse:
        op_celery.track.delay("x", client_ip="192.0.2.44")
        return HttpResponse("ok")

    OpenPanelMiddleware(view)(request)
    assert published[-1].kwargs["client_ip"] == "192.0.2.44"
    assert published[-1].kwargs["user_agent"] == BROWSER


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"TRUSTED_PROXIES": ["not-a-network"]}, "TRUSTED_PROXIES"),
        ({"TRUSTED_PROXY": ["10.0.0.0/8"]}, "unknown keys"),
        (["10.0.0.0/8"], "must be a dict"),
    ],
)
def test_a_wrong_openpanel_setting_fails_at_startup(setting: object, message: str) -> None:
    with override_settings(OPENPANEL=setting), pytest.raises(ConfigurationError, match=message):
        OpenPanelMiddleware(lambda request: HttpResponse("ok"))


def test_delay_on_commit_publishes_when_the_transaction_commits(
    published: list[Published],
) -> None:
    with transaction.atomic():
        delay_on_commit(op_celery.track, "signup", profile_id="user-1")
        assert published == []
    [message] = published
    assert (message.kwargs["name"], message.kwargs["profile_id"]) == ("signup", "user-1")


def test_delay_on_commit_publishes_nothing_when_the_transaction_rolls_back(
    published: list[Published],
) -> None:
    with pytest.raises(Rollback), transaction.atomic():
        delay_on_commit(op_celery.identify, "user-1", email="ada@example.com")
        raise Rollback
    assert published == []


def test_delay_on_commit_publishes_at_once_outside_a_transaction(
    published: list[Published],
) -> None:
    delay_on_commit(op_celery.increment, "user-1", "logins")
    assert [message.task for message in published] == ["op_celery.increment"]


def test_delay_on_commit_validates_in_the_caller_at_once(published: list[Published]) -> None:
    with transaction.atomic():
        with pytest.raises(InvalidEvent, match="name"):
            delay_on_commit(op_celery.track, "")
        with pytest.raises(TypeError, match="op_celery task"):
            delay_on_commit(print, "x")  # type: ignore[arg-type]
    assert published == []


def test_delay_on_commit_keeps_the_context_and_time_of_the_call(
    published: list[Published],
) -> None:
    with transaction.atomic():
        with request_context(CLIENT, BROWSER):
            delay_on_commit(op_celery.track, "signup")
        with request_context("192.0.2.1", "Other/1"):
            pass  # a later context, still before the commit
    [message] = published
    assert (message.kwargs["client_ip"], message.kwargs["user_agent"]) == (CLIENT, BROWSER)
    assert message.kwargs["timestamp"].endswith("Z")


def test_delay_on_commit_in_a_view_publishes_the_committed_event_with_the_request(
    published: list[Published],
) -> None:
    response = Client().get("/signup", REMOTE_ADDR=CLIENT, HTTP_USER_AGENT=BROWSER)
    assert response.status_code == 200
    [message] = published
    assert message.kwargs["name"] == "signup"
    assert (message.kwargs["client_ip"], message.kwargs["user_agent"]) == (CLIENT, BROWSER)


def test_mypy_checks_delay_on_commit_arguments_against_the_tasks_signature(
    tmp_path: Path,
) -> None:
    source = textwrap.dedent(
        """
        from op_celery import increment, track
        from op_celery.contrib.django import delay_on_commit
        delay_on_commit(track, nme="x")
        delay_on_commit(increment, "u1", "logins", value="2")
        delay_on_commit(track, "fine", properties={"a": 1}, profile_id="u1")
        """
    )
    out, errors = mypy_on(source, tmp_path)
    assert 'Unexpected keyword argument "nme"' in out
    assert 'Argument "value" to "delay_on_commit" has incompatible type "str"' in out
    assert len(errors) == 2, out


def test_enqueue_on_commit_defers_every_delay_in_the_request_to_the_commit(
    published: list[Published],
) -> None:
    inside: list[int] = []

    def view(request: HttpRequest) -> HttpResponse:
        with transaction.atomic():
            op_celery.track.delay("ordered", profile_id="u1")
            if request.GET.get("fail"):
                transaction.set_rollback(True)
            inside.append(len(published))
        return HttpResponse("ok")

    with override_settings(OPENPANEL={"ENQUEUE_ON_COMMIT": True}):
        middleware = OpenPanelMiddleware(view)
        middleware(RequestFactory().get("/", REMOTE_ADDR=CLIENT))
        middleware(RequestFactory().get("/?fail=1", REMOTE_ADDR=CLIENT))
    assert inside == [0, 1]  # nothing published inside either transaction
    [message] = published  # the committed one only
    assert (message.kwargs["name"], message.kwargs["client_ip"]) == ("ordered", CLIENT)


def test_enqueue_on_commit_still_validates_at_the_call(published: list[Published]) -> None:
    def view(request: HttpRequest) -> HttpResponse:
        with pytest.raises(InvalidEvent):
            op_celery.track.delay("")
        return HttpResponse("ok")

    with override_settings(OPENPANEL={"ENQUEUE_ON_COMMIT": True}):
        assert OpenPanelMiddleware(view)(RequestFactory().get("/")).status_code == 200
    assert published == []


def test_capture_records_a_views_on_commit_event_when_its_transaction_commits() -> None:
    from op_celery.testing import capture

    with (
        override_settings(ROOT_URLCONF=__name__, MIDDLEWARE=[MIDDLEWARE], OPENPANEL={}),
        capture() as events,
    ):
        Client(HTTP_USER_AGENT=BROWSER).get("/signup")
    assert events.names == ["signup"]  # the rolled-back one never reached the recorder
    assert events[0].user_agent == BROWSER


def test_capture_works_with_djangos_capture_on_commit_callbacks() -> None:
    from django.test import TestCase

    from op_celery.testing import capture

    # As inside a TestCase: the test's transaction is rolled back at its end, never committed,
    # and captureOnCommitCallbacks(execute=True) runs the on-commit callbacks instead.
    with (
        override_settings(ROOT_URLCONF=__name__, MIDDLEWARE=[MIDDLEWARE], OPENPANEL={}),
        capture() as events,
        pytest.raises(Rollback),
        transaction.atomic(),
    ):
        with TestCase.captureOnCommitCallbacks(execute=True) as callbacks:
            delay_on_commit(op_celery.track, "signup", profile_id="user-1")
            assert events == []  # not before the (captured) commit
        assert len(callbacks) == 1
        raise Rollback
    assert events.names == ["signup"]
