"""The client against a real HTTP server: headers, and every answer of the contract."""

from __future__ import annotations

import socket
import threading

import pytest

from op_celery import (
    AliasNotSupported,
    AuthenticationError,
    ConfigurationError,
    Delivered,
    Dropped,
    InvalidPayload,
    NetworkError,
    OpenPanelClient,
    PermanentError,
    ProfileNotFound,
    RateLimited,
    ServerError,
    UnexpectedAnswer,
    build_event,
)
from op_celery._client import classify
from op_celery.testing import StandInServer

from ._support import CLIENT_ID, CLIENT_SECRET


@pytest.fixture
def client(stand_in: StandInServer) -> OpenPanelClient:
    return OpenPanelClient(CLIENT_ID, CLIENT_SECRET, stand_in.url, read_timeout_s=2.0)


def test_an_accepted_event_returns_the_servers_answer(
    client: OpenPanelClient, stand_in: StandInServer
) -> None:
    delivered = client.send(build_event("track", {"name": "signup"}))
    assert delivered.status == 200
    assert isinstance(delivered.body, dict) and "deviceId" in delivered.body
    [received] = stand_in.received
    assert received.headers["openpanel-client-secret"] == CLIENT_SECRET
    assert received.headers["content-type"] == "application/json"


def test_a_plain_text_401_is_an_authentication_error_without_the_secret(
    stand_in: StandInServer,
) -> None:
    client = OpenPanelClient(CLIENT_ID, "wrong-secret-77", stand_in.url)
    with pytest.raises(AuthenticationError) as caught:
        client.send(build_event("track", {"name": "x"}))
    assert caught.value.status == 401
    assert caught.value.server_message is not None
    assert caught.value.server_message.startswith("Ingestion:")
    assert "wrong-secret-77" not in str(caught.value)
    assert "wrong-secret-77" not in repr(client)


def test_a_400_carries_the_servers_message(client: OpenPanelClient) -> None:
    # The builders refuse this name; a message from elsewhere can still carry it.
    event = build_event("track", {"name": "ok"})
    event.body["payload"]["name"] = ""
    with pytest.raises(InvalidPayload) as caught:
        client.send(event)
    assert caught.value.status == 400
    assert "body/payload/name" in str(caught.value)  # the server's message names the field


def test_alias_is_not_supported(client: OpenPanelClient) -> None:
    with pytest.raises(AliasNotSupported, match="Alias is not supported"):
        client.send(build_event("alias", {"profile_id": "u", "alias": "a"}))


def test_a_counter_on_an_unknown_profile_is_profile_not_found(client: OpenPanelClient) -> None:
    with pytest.raises(ProfileNotFound):
        client.send(build_event("increment", {"profile_id": "nobody", "property": "n"}))
    client.send(build_event("identify", {"profile_id": "nobody"}))
    client.send(build_event("increment", {"profile_id": "nobody", "property": "n"}))


def test_a_429_gives_the_retry_after_in_seconds(
    client: OpenPanelClient, stand_in: StandInServer
) -> None:
    stand_in.set_rate_limit(1, 10)
    client.send(build_event("track", {"name": "a"}))
    with pytest.raises(RateLimited) as caught:
        client.send(build_event("track", {"name": "b"}))
    assert caught.value.status == 429
    assert caught.value.retry_after is not None and 1 <= caught.value.retry_after <= 10


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_and_proxy_html_are_server_errors(
    client: OpenPanelClient, stand_in: StandInServer, status: int
) -> None:
    stand_in.fail_next(1, status=status, body="<html><body><h1>Bad gateway</h1></body></html>")
    with pytest.raises(ServerError) as caught:
        client.send(build_event("track", {"name": "x"}))
    assert caught.value.status == status


def test_a_dropped_connection_is_a_network_error(
    client: OpenPanelClient, stand_in: StandInServer
) -> None:
    stand_in.drop_next(1)
    with pytest.raises(NetworkError):
        client.send(build_event("track", {"name": "x"}))


def test_a_slow_server_times_out_as_a_network_error(stand_in: StandInServer) -> None:
    client = OpenPanelClient(CLIENT_ID, CLIENT_SECRET, stand_in.url, read_timeout_s=0.2)
    stand_in.set_latency(1.0)
    with pytest.raises(NetworkError, match="timed out"):
        client.send(build_event("track", {"name": "x"}))


def test_a_refused_connection_is_a_network_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = OpenPanelClient(CLIENT_ID, CLIENT_SECRET, f"http://127.0.0.1:{port}")
    with pytest.raises(NetworkError, match="no answer"):
        client.send(build_event("track", {"name": "x"}))


def test_an_unexpected_404_points_at_the_api_url(stand_in: StandInServer) -> None:
    client = OpenPanelClient(CLIENT_ID, CLIENT_SECRET, stand_in.url + "/wrong")
    with pytest.raises(PermanentError, match="OPENPANEL_API_URL"):
        client.send(build_event("track", {"name": "x"}))


def test_plain_http_to_a_remote_host_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="https"):
        OpenPanelClient(CLIENT_ID, CLIENT_SECRET, "http://api.example.com")


def test_each_thread_and_process_gets_its_own_session(client: OpenPanelClient) -> None:
    sessions: list[object] = []
    thread = threading.Thread(target=lambda: sessions.append(client.session))
    thread.start()
    thread.join()
    assert sessions[0] is not client.session
    assert client.session is client.session


def test_the_client_is_safe_under_a_thread_pool(
    client: OpenPanelClient, stand_in: StandInServer
) -> None:
    many_threads = 8

    def send_some() -> None:
        for i in range(20):
            client.send(build_event("track", {"name": f"t{i}"}))

    threads = [threading.Thread(target=send_some) for _ in range(many_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(stand_in.received) == 20 * many_threads


@pytest.mark.parametrize("user_agent", ["Mozilla/5.0 😀", " leading-space", "two\r\nlines", "控制"])
def test_a_header_that_cannot_be_sent_is_a_permanent_error_not_a_retry(
    client: OpenPanelClient, stand_in: StandInServer, user_agent: str
) -> None:
    import dataclasses

    # .delay() refuses these; an event built elsewhere (an old message) must not loop.
    event = dataclasses.replace(build_event("track", {"name": "x"}), user_agent=user_agent)
    with pytest.raises(InvalidPayload, match="cannot be sent as an HTTP request"):
        client.send(event)
    assert stand_in.requests == []


# classify, answer by answer, as OpenPanel's source has them (apps/api/src/hooks/, utils/auth.ts,
# controllers/track.controller.ts), then the same answers through HTTP from the stand-in.

_JSON = {"content-type": "application/json; charset=utf-8"}
_TEXT = {"content-type": "text/plain; charset=utf-8"}
_HTML = {"content-type": "text/html; charset=utf-8"}
_PORTAL = "<!DOCTYPE html><html><head><title>Sign in</title></head><body>Wi-Fi</body></html>"


@pytest.mark.parametrize("operation", ["track", "identify", "increment", "group", "assign_group"])
def test_the_servers_json_200_is_delivered_for_every_operation(operation: str) -> None:
    answer = classify(operation, 200, _JSON, '{"deviceId":"d1","sessionId":""}')
    assert isinstance(answer, Delivered) and answer.body == {"deviceId": "d1", "sessionId": ""}


@pytest.mark.parametrize("text", ["", "ok"], ids=["empty", "ok"])
def test_the_bodies_of_older_servers_200s_are_delivered(text: str) -> None:
    # reply.status(200).send() until 2026-03, send('ok') until 2025-02.
    assert isinstance(classify("identify", 200, {}, text), Delivered)


def test_a_202_bot_is_dropped_as_a_bot_naming_the_bot() -> None:
    answer = classify("track", 202, _JSON, '{"bot":{"name":"Googlebot","type":"Search bot"}}')
    assert isinstance(answer, Dropped)
    assert (answer.status, answer.reason) == (202, "bot")
    assert answer.message == "Googlebot (Search bot)"


def test_a_200_duplicate_event_is_dropped_as_a_duplicate() -> None:
    answer = classify("track", 200, _TEXT, "Duplicate event")
    assert isinstance(answer, Dropped) and answer.reason == "duplicate"


@pytest.mark.parametrize(
    "text",
    [
        "Ingestion: IP address is blocked by project filter",
        "Ingestion: Profile id is blocked by project filter",
    ],
)
def test_a_401_of_the_projects_filters_is_filtered_not_a_credentials_error(text: str) -> None:
    answer = classify("track", 401, _TEXT, text)
    assert isinstance(answer, Dropped)
    assert (answer.status, answer.reason, answer.message) == (401, "filtered", text)


def test_a_401_for_revenue_without_a_secret_names_the_secret_setting() -> None:
    text = "Ingestion: Revenue tracking is not allowed without a client secret"
    with pytest.raises(AuthenticationError) as caught:
        classify("track", 401, _TEXT, text)
    assert caught.value.status == 401 and caught.value.server_message == text
    assert "set OPENPANEL_CLIENT_SECRET" in str(caught.value)
    assert "on the workers" in str(caught.value)


def test_other_401s_are_still_credentials_errors() -> None:
    with pytest.raises(AuthenticationError, match="check OPENPANEL_CLIENT_ID") as caught:
        classify("track", 401, _TEXT, "Ingestion: Invalid cors or secret")
    assert "proxy" not in str(caught.value)


def test_a_403_html_page_is_refused_suggesting_a_proxy_too() -> None:
    page = "<html><body><h1>403 Forbidden</h1>Blocked by the corporate proxy</body></html>"
    with pytest.raises(AuthenticationError, match="check OPENPANEL_CLIENT_ID") as caught:
        classify("track", 403, _HTML, page)
    assert "a proxy may have refused it" in str(caught.value)


@pytest.mark.parametrize(
    ("status", "headers", "text"),
    [
        (200, _HTML, _PORTAL),
        (200, _TEXT, "Access denied by your network administrator"),
        (204, _HTML, "<html></html>"),
        (200, _JSON, '["not", "openpanel"]'),
    ],
    ids=["captive-portal", "proxy-text", "html-204", "json-list"],
)
def test_a_2xx_that_is_not_openpanels_answer_is_a_transient_proxy_error(
    status: int, headers: dict[str, str], text: str
) -> None:
    with pytest.raises(UnexpectedAnswer) as caught:
        classify("track", status, headers, text)
    error = caught.value
    assert isinstance(error, ServerError) and error.status == status
    assert "a proxy or captive portal answered instead of OpenPanel" in str(error)
    assert "OPENPANEL_API_URL" in str(error)


def test_a_page_echoing_the_secret_does_not_put_it_in_the_error() -> None:
    page = f"<html>your headers: openpanel-client-secret: {CLIENT_SECRET}</html>"
    with pytest.raises(UnexpectedAnswer) as caught:
        classify("track", 200, _HTML, page, secret=CLIENT_SECRET)
    assert CLIENT_SECRET not in str(caught.value)
    assert CLIENT_SECRET not in str(caught.value.server_message)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("bot", "bot"),
        ("duplicate", "duplicate"),
        ("ip-filtered", "filtered"),
        ("profile-filtered", "filtered"),
    ],
)
def test_the_stand_ins_named_answers_are_dropped_by_reason(
    client: OpenPanelClient, stand_in: StandInServer, name: str, reason: str
) -> None:
    stand_in.fail_next(1, name)
    answer = client.send(build_event("track", {"name": "x"}))
    assert isinstance(answer, Dropped) and answer.reason == reason


def test_the_stand_ins_captive_portal_is_an_unexpected_answer(
    client: OpenPanelClient, stand_in: StandInServer
) -> None:
    stand_in.fail_next(1, "captive-portal")
    with pytest.raises(UnexpectedAnswer, match=r"HTTP 200 \(text/html"):
        client.send(build_event("track", {"name": "x"}))
