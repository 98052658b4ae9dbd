"""The client still takes its proxy settings from the environment, once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from op_celery import OpenPanelClient, build_event
from op_celery.testing import StandInServer

from ._support import CLIENT_ID, CLIENT_SECRET


@pytest.fixture
def proxy() -> Iterator[StandInServer]:
    """A second stand-in, as a forward proxy: it answers absolute-form requests itself."""
    with StandInServer(clients={CLIENT_ID: CLIENT_SECRET}) as server:
        yield server


@pytest.fixture
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_http_proxy_from_the_environment_is_used(
    stand_in: StandInServer, proxy: StandInServer, no_proxy_settings: pytest.MonkeyPatch
) -> None:
    no_proxy_settings.setenv("HTTP_PROXY", proxy.url)
    client = OpenPanelClient(CLIENT_ID, CLIENT_SECRET, stand_in.url)
    client.send(build_event("track", {"name": "via-proxy"}))
    client.send(build_event("track", {"name": "via-proxy-again"}))
    assert [r.payload["name"] for r in proxy.received] == ["via-proxy", "via-proxy-again"]
    assert stand_in.received == []


def test_no_proxy_from_the_environment_is_respected(
    stand_in: StandInServer, proxy: StandInServer, no_proxy_settings: pytest.MonkeyPatch
) -> None:
    no_proxy_settings.setenv("HTTP_PROXY", proxy.url)
    no_proxy_settings.setenv("NO_PROXY", "127.0.0.1")
    client = OpenPanelClient(CLIENT_ID, CLIENT_SECRET, stand_in.url)
    client.send(build_event("track", {"name": "direct"}))
    assert [r.payload["name"] for r in stand_in.received] == ["direct"]
    assert proxy.received == []
