"""The Flask extension, through Flask's own test client."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from flask import Flask, Response, stream_with_context

import op_celery
from op_celery import ConfigurationError, _checks
from op_celery._context import current_request
from op_celery.contrib.flask import EXTENSION_NAME, OpenPanel

from ._support import BROWSER, CLIENT, Published, capturing_publishes


def make_app(**config: object) -> Flask:
    app = Flask(__name__)
    app.config.update(config)

    @app.get("/track")
    def track_view() -> str:
        op_celery.track.delay("x")
        return "ok"

    @app.get("/async-track")
    async def async_track_view() -> str:
        op_celery.track.delay("x-async")
        return "ok"

    @app.get("/stream")
    def stream_view() -> Response:
        def body() -> Iterator[str]:
            yield "a"
            op_celery.track.delay("streamed")
            yield "b"

        return Response(stream_with_context(body()))

    return app


@pytest.fixture
def published() -> Iterator[list[Published]]:
    with capturing_publishes() as messages:
        yield messages


def get(app: Flask, path: str, peer: str = CLIENT, **headers: str) -> int:
    client = app.test_client()
    response = client.get(path, environ_base={"REMOTE_ADDR": peer}, headers=headers)
    response.get_data()
    return response.status_code


def test_a_view_delay_carries_the_requests_ip_and_user_agent(published: list[Published]) -> None:
    app = make_app()
    OpenPanel(app)
    assert get(app, "/track", **{"User-Agent": BROWSER}) == 200
    [message] = published
    assert message.task == "op_celery.track"
    assert (message.kwargs["client_ip"], message.kwargs["user_agent"]) == (CLIENT, BROWSER)


def test_a_loopback_peer_without_a_trusted_proxy_is_warned_of_once_and_still_sent(
    published: list[Published], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The app behind a proxy on the same host, trusted_proxies not set: the peer is the proxy.
    monkeypatch.setattr(_checks, "_warned_skipped_ip", False)
    app = make_app()
    OpenPanel(app)
    with caplog.at_level(logging.WARNING, logger="op_celery"):
        assert get(app, "/track", peer="127.0.0.1") == 200
        assert get(app, "/track", peer="127.0.0.1") == 200
    assert [m.kwargs["client_ip"] for m in published] == ["127.0.0.1", "127.0.0.1"]
    [warning] = [r for r in caplog.records if "client_ip" in r.getMessage()]
    assert "a loopback address" in warning.getMessage()
    assert "trusted_proxies" in warning.getMessage()


def test_init_app_later_works_as_the_factory_pattern_does(published: list[Published]) -> None:
    openpanel = OpenPanel()
    app = make_app()
    openpanel.init_app(app)
    get(app, "/track")
    assert published[0].kwargs["client_ip"] == CLIENT
    assert isinstance(app.extensions[EXTENSION_NAME], op_celery.contrib._proxy.TrustedProxies)


def test_the_context_is_reset_after_the_request(published: list[Published]) -> None:
    app = make_app()
    OpenPanel(app)
    get(app, "/track")
    assert current_request() is None


def test_an_async_view_sees_the_context(published: list[Published]) -> None:
    pytest.importorskip("asgiref")  # Flask runs async views through asgiref (flask[async])
    app = make_app()
    OpenPanel(app)
    assert get(app, "/async-track") == 200
    assert published[0].kwargs["client_ip"] == CLIENT


def test_a_streamed_response_sees_the_context(published: list[Published]) -> None:
    app = make_app()
    OpenPanel(app)
    assert get(app, "/stream") == 200
    assert published[0].kwargs["name"] == "streamed"
    assert published[0].kwargs["client_ip"] == CLIENT
    assert current_request() is None


def test_x_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(
    published: list[Published],
) -> None:
    untrusting = make_app()
    OpenPanel(untrusting)
    get(untrusting, "/track", peer="10.0.0.5", **{"X-Forwarded-For": "1.1.1.1"})
    assert published[-1].kwargs["client_ip"] == "10.0.0.5"

    trusting = make_app(OPENPANEL_TRUSTED_PROXIES=["10.0.0.0/8"])
    OpenPanel(trusting)
    get(trusting, "/track", peer="198.51.100.9", **{"X-Forwarded-For": "1.1.1.1"})
    assert published[-1].kwargs["client_ip"] == "198.51.100.9"
    get(trusting, "/track", peer="10.0.0.5", **{"X-Forwarded-For": f"1.1.1.1, {CLIENT}"})
    assert published[-1].kwargs["client_ip"] == CLIENT


def test_the_trusted_proxies_argument_wins_over_the_config(published: list[Published]) -> None:
    app = make_app(OPENPANEL_TRUSTED_PROXIES=["10.0.0.0/8"])
    OpenPanel(app, trusted_proxies=1)
    get(app, "/track", peer="192.0.2.1", **{"X-Forwarded-For": CLIENT})
    assert published[-1].kwargs["client_ip"] == CLIENT


def test_a_wrong_setting_fails_in_init_app() -> None:
    with pytest.raises(ConfigurationError, match="OPENPANEL_TRUSTED_PROXIES"):
        OpenPanel(make_app(OPENPANEL_TRUSTED_PROXIES=["proxy.internal"]))


def test_teardown_without_before_request_is_harmless(published: list[Published]) -> None:
    app = make_app()

    @app.before_request
    def answer_early() -> str:
        return "early"

    OpenPanel(app)  # registered after a hook that answers: ours never runs
    assert get(app, "/track") == 200
    assert published == []
    assert current_request() is None
