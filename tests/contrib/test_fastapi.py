"""The ASGI middleware, through Starlette's and FastAPI's ``TestClient``, and called directly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fastapi import BackgroundTasks, FastAPI, WebSocket
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import op_celery
from op_celery import ConfigurationError
from op_celery._context import current_request
from op_celery.contrib.fastapi import OpenPanelMiddleware

from ._support import BROWSER, CLIENT, Published, capturing_publishes


def make_app(**options: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(OpenPanelMiddleware, **options)

    @app.get("/track")
    async def track_view() -> dict[str, bool]:
        op_celery.track.delay("x")
        return {"ok": True}

    @app.get("/sync-track")
    def sync_track_view() -> dict[str, bool]:  # run by FastAPI in its thread pool
        op_celery.track.delay("x-sync")
        return {"ok": True}

    @app.get("/stream")
    async def stream_view() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"first,"
            op_celery.track.delay("streamed")
            yield b"second"

        return StreamingResponse(body(), media_type="text/plain")

    @app.get("/background")
    async def background_view(tasks: BackgroundTasks) -> dict[str, bool]:
        tasks.add_task(op_celery.track.delay, "in_background")
        return {"ok": True}

    @app.websocket("/ws")
    async def websocket_view(websocket: WebSocket) -> None:
        await websocket.accept()
        op_celery.track.delay("ws")
        await websocket.send_text("ok")
        await websocket.close()

    return app


@pytest.fixture
def published() -> Iterator[list[Published]]:
    with capturing_publishes() as messages:
        yield messages


def client_for(app: Any, peer: str = CLIENT) -> TestClient:
    return TestClient(app, client=(peer, 50000), headers={"User-Agent": BROWSER})


def test_a_view_delay_carries_the_requests_ip_and_user_agent(published: list[Published]) -> None:
    response = client_for(make_app()).get("/track")
    assert response.status_code == 200
    [message] = published
    assert message.task == "op_celery.track"
    assert (message.kwargs["client_ip"], message.kwargs["user_agent"]) == (CLIENT, BROWSER)


def test_a_def_endpoint_in_the_thread_pool_sees_the_context(published: list[Published]) -> None:
    assert client_for(make_app()).get("/sync-track").status_code == 200
    assert (published[0].kwargs["name"], published[0].kwargs["client_ip"]) == ("x-sync", CLIENT)


def test_a_streaming_response_streams_and_its_body_sees_the_context(
    published: list[Published],
) -> None:
    with client_for(make_app()).stream("GET", "/stream") as response:
        assert response.status_code == 200
        assert b"".join(response.iter_bytes()) == b"first,second"
    assert (published[0].kwargs["name"], published[0].kwargs["client_ip"]) == ("streamed", CLIENT)


def test_background_tasks_see_the_context(published: list[Published]) -> None:
    assert client_for(make_app()).get("/background").status_code == 200
    assert published[0].kwargs["name"] == "in_background"
    assert published[0].kwargs["client_ip"] == CLIENT


def test_a_websocket_endpoint_sees_the_context(published: list[Published]) -> None:
    with client_for(make_app()).websocket_connect("/ws") as websocket:
        assert websocket.receive_text() == "ok"
    assert (published[0].kwargs["name"], published[0].kwargs["client_ip"]) == ("ws", CLIENT)


def test_lifespan_passes_through(published: list[Published]) -> None:
    started: list[bool] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        started.append(current_request() is None)
        yield

    app = Starlette(
        routes=[Route("/", lambda request: PlainTextResponse("ok"))],
        middleware=[Middleware(OpenPanelMiddleware)],
        lifespan=lifespan,
    )
    with client_for(app) as client:
        assert client.get("/").text == "ok"
    assert started == [True]


def test_a_plain_starlette_app_with_trusted_proxies(published: list[Published]) -> None:
    async def view(request: Request) -> PlainTextResponse:
        op_celery.track.delay("x")
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/", view)],
        middleware=[Middleware(OpenPanelMiddleware, trusted_proxies=["10.0.0.0/8"])],
    )
    client_for(app, peer="198.51.100.9").get("/", headers={"X-Forwarded-For": "1.1.1.1"})
    assert published[-1].kwargs["client_ip"] == "198.51.100.9"
    client_for(app, peer="10.0.0.5").get("/", headers={"X-Forwarded-For": f"1.1.1.1, {CLIENT}"})
    assert published[-1].kwargs["client_ip"] == CLIENT


def test_a_hop_count_is_honoured(published: list[Published]) -> None:
    client = client_for(make_app(trusted_proxies=1), peer="10.0.0.5")
    client.get("/track", headers={"X-Forwarded-For": f"1.1.1.1, {CLIENT}"})
    assert published[-1].kwargs["client_ip"] == CLIENT


def test_a_wrong_setting_fails_when_the_middleware_is_built() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None: ...

    with pytest.raises(ConfigurationError, match="trusted_proxies"):
        OpenPanelMiddleware(app, trusted_proxies=["proxy.internal"])


def test_called_directly_it_passes_every_message_untouched_and_resets_the_context(
    published: list[Published],
) -> None:
    sent_by_app = [
        {"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]},
        {"type": "http.response.body", "body": b"one", "more_body": True},
        {"type": "http.response.body", "body": b"two", "more_body": False},
    ]
    seen_inside: list[object] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for message in sent_by_app:
            seen_inside.append(current_request())
            await send(message)

    received: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        received.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {
        "type": "http",
        "client": (CLIENT, 1),
        "headers": [(b"user-agent", BROWSER.encode())],
    }

    async def run() -> object:
        await OpenPanelMiddleware(app)(scope, receive, send)
        return current_request()

    assert asyncio.run(run()) is None
    assert received == sent_by_app
    assert all(getattr(c, "client_ip", None) == CLIENT for c in seen_inside)


def test_the_context_is_reset_when_the_app_raises() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert current_request() is not None
        raise RuntimeError("boom")

    async def run() -> object:
        with pytest.raises(RuntimeError, match="boom"):
            await OpenPanelMiddleware(app)({"type": "http"}, _never, _never)
        return current_request()

    assert asyncio.run(run()) is None


async def _never(*args: Any) -> Any:
    raise AssertionError("not called")
