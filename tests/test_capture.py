"""Capture: a user's tests assert on what their code tracked, with no broker, worker or network,
and bad input still raises; ``OP_CELERY_ENABLED=false`` drops events after validating them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from celery import Celery

import op_celery
from op_celery import _app
from op_celery.testing import capture

from ._support import free_port


@pytest.fixture
def unreachable_app(monkeypatch: pytest.MonkeyPatch) -> Celery:
    """A user's app whose broker does not exist: a publish would fail or spool."""
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setenv("OP_CELERY_ON_PUBLISH_FAILURE", "raise")
    app = Celery("user-app-capture", set_as_current=True)
    app.conf.broker_url = nowhere
    _app.reset_settings()
    yield app
    app.close()
    _app.reset_settings()


def test_capture_records_the_payload_openpanel_would_receive_and_publishes_nothing(
    unreachable_app: Celery,
) -> None:
    with capture() as events:
        op_celery.track.delay(
            "signup", properties={"plan": "pro"}, profile_id="u1",
            client_ip="203.0.113.7", user_agent="Mozilla/5.0",
        )  # fmt: skip
        op_celery.identify.delay("u1", email="ada@example.com")
        op_celery.increment.apply_async(("u1", "logins"))
        op_celery.group.s("acme", "company", "Acme").delay()
    assert [e.operation for e in events] == ["track", "identify", "increment", "group"]
    signup = events.tracked("signup")[0]
    assert signup.payload["profileId"] == "u1"
    assert signup.properties["plan"] == "pro" and "__timestamp" in signup.properties
    assert (signup.client_ip, signup.user_agent, signup.project) == (
        "203.0.113.7",
        "Mozilla/5.0",
        "default",
    )
    assert events.names == ["signup"]
    assert events.of("identify")[0].payload["email"] == "ada@example.com"
    assert len({e.event_id for e in events}) == 4


def test_a_captured_revenue_is_a_tracked_event_named_revenue(unreachable_app: Celery) -> None:
    with capture() as events:
        op_celery.track.delay("checkout")
        op_celery.revenue.delay(1299, {"currency": "USD"}, device_id="cookie-abc")
    assert events.names == ["checkout", "revenue"]
    [revenue] = events.of("revenue")
    assert events.tracked("revenue") == [revenue]
    assert revenue.properties["__revenue"] == 1299
    assert revenue.properties["__deviceId"] == "cookie-abc"
    assert revenue.kwargs["amount"] == 1299


def test_capture_still_refuses_bad_input_at_delay(unreachable_app: Celery) -> None:
    with capture() as events, pytest.raises(op_celery.InvalidEvent):
        op_celery.track.delay("")
    assert events == []


def test_capture_sees_events_published_from_threads_the_test_starts(
    unreachable_app: Celery,
) -> None:
    with capture() as events:
        threads = [
            threading.Thread(target=op_celery.track.delay, args=(f"e{i}",)) for i in range(5)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(events.names) == [f"e{i}" for i in range(5)]


def test_capture_also_wins_over_eager_mode(unreachable_app: Celery) -> None:
    unreachable_app.conf.task_always_eager = True
    with capture() as events:
        result = op_celery.track.delay("signup")
    assert events.names == ["signup"]
    assert result.id == events[0].event_id


def test_nested_captures_each_get_their_own_events(unreachable_app: Celery) -> None:
    with capture() as outer:
        op_celery.track.delay("a")
        with capture() as inner:
            op_celery.track.delay("b")
        op_celery.track.delay("c")
    assert (outer.names, inner.names) == (["a", "c"], ["b"])


def test_disabled_delivery_validates_then_drops_the_event(
    unreachable_app: Celery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OP_CELERY_ENABLED", "false")
    _app.reset_settings()
    with caplog.at_level("DEBUG", logger="op_celery"):
        op_celery.track.delay("signup")  # the broker does not exist: nothing was published
    assert "OP_CELERY_ENABLED is off" in caplog.text
    with pytest.raises(op_celery.InvalidEvent):
        op_celery.track.delay("")
    monkeypatch.setenv("OP_CELERY_ENABLED", "maybe")
    _app.reset_settings()
    with pytest.raises(op_celery.ConfigurationError, match="OP_CELERY_ENABLED"):
        op_celery.track.delay("signup")


def test_a_users_own_suite_uses_the_openpanel_events_fixture_with_nothing_configured(
    tmp_path: Path,
) -> None:
    (tmp_path / "test_views.py").write_text(
        textwrap.dedent(
            """
            import pytest
            import op_celery

            def signup_view(email):
                op_celery.identify.delay("u1", email=email)
                op_celery.track.delay("signup", profile_id="u1")

            def test_the_view_tracks_a_signup(openpanel_events):
                signup_view("ada@example.com")
                assert openpanel_events.names == ["signup"]
                assert openpanel_events.of("identify")[0].payload["email"] == "ada@example.com"

            def test_each_test_starts_empty(openpanel_events):
                assert openpanel_events == []

            def test_bad_input_still_raises(openpanel_events):
                with pytest.raises(op_celery.InvalidEvent):
                    op_celery.track.delay("")
            """
        )
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENPANEL_", "OP_CELERY_", "CELERY_", "REDIS_", "BROKER_"))
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
